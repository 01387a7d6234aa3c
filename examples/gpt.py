"""A small character-level GPT trained with nanoGPT's recipe, on the Python manual's prose.

The corpus is ``pydoc_data.topics.topics``: the text of the Python language reference that
``help()`` shows, shipped with every Python, so nothing is downloaded. Its topics are joined
in sorted key order and capped at MAX_CHARS; the first 90% is the training split (the job's
dataset), the last 10% the validation split that ``finish`` scores. The vocabulary is every
character seen at least MIN_COUNT times, sorted, plus one UNKNOWN symbol: sorting makes it
identical on every worker, with no file to ship.

The model (348,864 parameters; ``GPT_TINY=1``: 15,072) is nanoGPT's ``model.py`` in miniature:
token + position embeddings, N_LAYERS pre-LayerNorm blocks (causal self-attention, then a
GELU MLP, each added to the residual stream), a final LayerNorm, and an output head that
reuses the token embedding matrix. Attention is ``scaled_dot_product_attention(is_causal=
True)``, so no mask buffer exists: every tensor in the state is a float32 parameter the
servers can shard.

The recipe, and what each piece buys:

- AdamW with betas (0.9, 0.95): a shorter memory for the second moment than the default
  0.999, so the step size follows the gradient scale as it shrinks during training.
- Weight decay only on 2-D tensors (matmul weights and embeddings): decay pulls weights
  toward 0 to regularise; on LayerNorm gains it would pull them toward 0 instead of 1,
  and on biases it regularises nothing. ``param_groups`` splits the two by ``dim``.
- Linear warmup, then cosine decay (``lr_at``): Adam's moment estimates are noisy for the
  first steps, so full-size steps then can throw the weights somewhere bad; afterwards a
  learning rate that falls smoothly to MIN_LR lets the loss settle into a minimum.
- Gradient clipping at global norm 1.0: a rare spiky batch moves the weights at most a
  bounded distance, which keeps a high learning rate from diverging.
- Tied input/output embeddings: the head scores a hidden vector against each character's
  own embedding (logits = h @ tok.weight.T). One matrix instead of two (fewer parameters),
  and the head's gradient trains the embedding too.
- nanoGPT's init: normal(0, 0.02) everywhere, and the two projections that write into the
  residual stream scaled by 1/sqrt(2 * N_LAYERS), so the stream's variance stays about the
  same however many blocks add to it.

The framework reads OPTIMIZER, param_groups, lr_at, CLIP_GRAD_NORM, AUTOCAST and (with
``--mode diloco``) OUTER_OPTIMIZER; this file only declares them (``worker/job.py`` describes the job contract).
"""
import collections
import math
import os

import torch
from torch import nn
from torch.nn import functional as F
from pydoc_data.topics import topics

TINY = os.environ.get("GPT_TINY") == "1"    # shrunk model and corpus, for fast tests

MAX_CHARS = 20_000 if TINY else 300_000    # of the ~465 KB manual; ~270 KB to train on
MIN_COUNT = 5           # rarer characters all map to UNKNOWN
UNKNOWN = "\u2400"      # the one symbol for rare characters (a symbol for NUL, never in the text)
VAL_FRACTION = 0.1      # the last 10% of the text is held out
CONTEXT = 16 if TINY else 64    # characters per window, and the model's block size
STRIDE = 48             # window starts are STRIDE apart: 5,624 training windows (overlap 16)
D_MODEL = 32 if TINY else 96    # residual stream width
N_HEADS = 4             # 24 dimensions per head (8 when tiny)
N_LAYERS = 1 if TINY else 3     # transformer blocks

OPTIMIZER = {"name": "adamw", "lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
MIN_LR = OPTIMIZER["lr"] / 10   # nanoGPT's rule of thumb: the floor is a tenth of the peak
WARMUP_STEPS = 5 if TINY else 50
CLIP_GRAD_NORM = 1.0
# --mode diloco only: the servers' outer step on the workers' mean pseudo-gradient. Plain
# averaging (lr 1, no momentum) suits the short rounds this model runs (H = 8): 4 workers x
# 2 servers, 160 steps, validation loss 2.4975 against BSP's 2.4134; with DiLoCo's
# default (Nesterov, lr 0.7, momentum 0.9) 2.5867; lr 0.9 Nesterov 0.5: 2.5369.
OUTER_OPTIMIZER = {"name": "sgd", "lr": 1.0}
AUTOCAST = os.environ.get("GPT_AUTOCAST") or None   # "bfloat16": forward under autocast
BATCH_SIZE = 32
SHUFFLE = True
EPOCHS = 4              # 176 steps per epoch, 704 in all: ~30 s single-process on 2 cores,
                        # loss 4.5 -> ~1.5 (validation 1.49)

TEXT = "".join(topics[k] for k in sorted(topics))[:MAX_CHARS]
VOCAB = sorted(ch for ch, n in collections.Counter(TEXT).items() if n >= MIN_COUNT) + [UNKNOWN]
STOI = {ch: i for i, ch in enumerate(VOCAB)}
SPLIT = int(len(TEXT) * (1 - VAL_FRACTION))     # first char of the validation split


def n_windows(n_chars: int, stride: int) -> int:
    """Windows in a text of n_chars: every start needs CONTEXT + 1 characters (x and y)."""
    return len(range(0, n_chars - CONTEXT, stride))


# The schedule ends when a plain run does: the framework runs ceil(windows / BATCH_SIZE)
# steps per epoch (ps.core.tasks.steps_per_epoch). A run given --steps beyond this trains
# on at MIN_LR.
LR_DECAY_STEPS = -(-n_windows(SPLIT, STRIDE) // BATCH_SIZE) * EPOCHS


def lr_at(step: int) -> float:
    """Learning rate of step ``step`` (from 0): nanoGPT's ``get_lr``, exactly.

    Warmup: lr * (step + 1) / (WARMUP_STEPS + 1), so step 0 already moves (lr / 51) and the
    last warmup step is just under lr. Then cosine from lr at step WARMUP_STEPS down to
    MIN_LR at LR_DECAY_STEPS, and MIN_LR after.
    """
    lr = OPTIMIZER["lr"]
    if step < WARMUP_STEPS:
        return lr * (step + 1) / (WARMUP_STEPS + 1)
    if step > LR_DECAY_STEPS:
        return MIN_LR
    ratio = (step - WARMUP_STEPS) / (LR_DECAY_STEPS - WARMUP_STEPS)    # 0 -> 1
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - MIN_LR)


def param_groups(model: nn.Module) -> list:
    """Two groups of parameter names: 2-D tensors decayed, the rest (LayerNorm) not."""
    named = list(model.named_parameters())
    return [{"params": [n for n, p in named if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [n for n, p in named if p.dim() < 2], "weight_decay": 0.0}]


def encode(s: str) -> torch.Tensor:
    """(len(s),) int64 ids; characters outside VOCAB become UNKNOWN."""
    unk = STOI[UNKNOWN]
    return torch.tensor([STOI.get(ch, unk) for ch in s], dtype=torch.int64)


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


class Windows(torch.utils.data.Dataset):
    """Item i: (x, y), both (CONTEXT,) int64, y the characters one after x's."""

    def __init__(self, ids: torch.Tensor, stride: int):
        self.ids = ids                                          # (n,) int64
        self.starts = range(0, n_windows(len(ids), stride) * stride, stride)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = self.starts[i]
        return self.ids[s:s + CONTEXT], self.ids[s + 1:s + CONTEXT + 1]


class Block(nn.Module):
    """Pre-LayerNorm block: x + attention(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL, bias=False)
        self.attn_out = nn.Linear(D_MODEL, D_MODEL, bias=False)     # writes to the residual
        self.fc = nn.Linear(D_MODEL, 4 * D_MODEL, bias=False)
        self.mlp_out = nn.Linear(4 * D_MODEL, D_MODEL, bias=False)  # writes to the residual

    def forward(self, x):                                       # x: (b, t, d)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)         # 3 x (b, t, d)
        q, k, v = (z.view(b, t, N_HEADS, d // N_HEADS).transpose(1, 2)
                   for z in (q, k, v))                          # 3 x (b, heads, t, d/heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))   # (b, t, d)
        return x + self.mlp_out(F.gelu(self.fc(self.ln2(x))))   # (b, t, d)


class GPT(nn.Module):
    """(b, t) ids -> (b, t, vocab) logits; the head is the token embedding, transposed."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), D_MODEL)
        self.pos = nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        for name, p in self.named_parameters():
            if p.dim() >= 2:        # LayerNorm keeps its ones and zeros
                std = 0.02 / math.sqrt(2 * N_LAYERS) if name.endswith("_out.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, ids):                                     # ids: (b, t) int64
        pos = torch.arange(ids.shape[1], device=ids.device)     # (t,)
        x = self.tok(ids) + self.pos(pos)                       # (b, t, d)
        for block in self.blocks:
            x = block(x)
        # Tied head: F.linear with the embedding matrix rather than a second Linear sharing
        # the Parameter, so named_parameters() yields the matrix once, under one name, and
        # the flat vector the servers shard holds it once.
        return F.linear(self.ln_f(x), self.tok.weight)         # (b, t, vocab)


def build_model() -> nn.Module:
    return GPT()


def build_dataset() -> Windows:
    return Windows(encode(TEXT[:SPLIT]), STRIDE)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-character cross-entropy over all b * CONTEXT positions."""
    x, y = batch                                                # (b, t), (b, t) int64
    logits = model(x)                                           # (b, t, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def validation_windows() -> Windows:
    """The held-out split, cut into non-overlapping windows (stride CONTEXT)."""
    return Windows(encode(TEXT[SPLIT:]), CONTEXT)


@torch.no_grad()
def validation_loss(model: nn.Module, batch_size: int = 64) -> float:
    """Mean cross-entropy over every validation window, in eval mode; deterministic."""
    windows, was_training = validation_windows(), model.training
    model.eval()
    total = 0.0
    for lo in range(0, len(windows), batch_size):
        x, y = (torch.stack(z) for z in zip(*(windows[i] for i in
                range(lo, min(lo + batch_size, len(windows))))))       # (b, t), (b, t)
        logits = model(x)                                       # (b, t, vocab)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (len(windows) * CONTEXT)


@torch.no_grad()
def generate(model, prompt="The ", n_chars=200, temperature=0.8, seed=0) -> str:
    """Sample n_chars after prompt; a private generator makes the sample repeatable."""
    gen = torch.Generator().manual_seed(seed)
    ids = encode(prompt).unsqueeze(0)                           # (1, t)
    for _ in range(n_chars):
        logits = model(ids[:, -CONTEXT:])[0, -1] / temperature  # (vocab,)
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return decode(ids[0].tolist())


def finish(model: nn.Module) -> None:
    """Print the validation loss, then 200 characters the model writes after "The "."""
    loss = validation_loss(model)
    print(f"gpt: validation loss {loss:.4f} ({len(validation_windows())} windows)")
    model.eval()
    print(f"gpt: sample after 'The ':\n{generate(model)}")
