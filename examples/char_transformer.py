"""Character-level GPT trained on the Python standard library's own source.

The text is a fixed, sorted list of stdlib modules read from the running interpreter's
install (`os.path.dirname(os.__file__)`): real prose and code that every machine already
has, so no download is needed; workers must share one Python version, whose stdlib is the
text. The vocabulary is every character seen at least MIN_COUNT times, in sorted order,
plus one symbol for the rest; sorting makes it the same on every worker. Each sample is a
window of CONTEXT characters and the same window shifted by one, so the model learns to
predict every next character at once.

The model is a two-layer GPT in the style of nanoGPT: token and position embeddings,
pre-norm blocks of causal self-attention and an MLP, and a linear head. Causality comes
from `scaled_dot_product_attention(is_causal=True)`, so the model holds no mask buffer:
every tensor in its state is a float32 parameter the servers can shard.

Every worker imports this file; worker 0 calls `finish`, which prints generated text.
"""
import collections
import os

import torch
from torch import nn
from torch.nn import functional as F

SOURCES = sorted([  # stdlib modules rich in docstrings; sorted so the order is fixed
    "abc.py", "bisect.py", "calendar.py", "contextlib.py", "copy.py", "difflib.py",
    "fnmatch.py", "fractions.py", "functools.py", "glob.py", "heapq.py", "queue.py",
    "random.py", "shlex.py", "statistics.py", "string.py", "textwrap.py",
])
MAX_CHARS = 256 * 1024  # cap on the text, ~256 KB
MIN_COUNT = 10          # rarer characters all map to UNKNOWN
UNKNOWN = "\ufffd"      # the one symbol for rare characters; never in the kept set
CONTEXT = 64            # characters the model sees; also the window length
STRIDE = 96             # window starts are STRIDE apart: 2730 windows, 86 steps/epoch
D_MODEL = 64            # embedding width; ~116k parameters in all
N_HEADS = 4             # 16 dimensions per head
N_LAYERS = 2            # transformer blocks

OPTIMIZER = {"name": "adamw", "lr": 5e-3, "weight_decay": 0.01}
BATCH_SIZE = 32         # global batch per step
EPOCHS = 3              # 258 steps: loss falls from ~4.6 (ln vocab) to ~2.1
SHUFFLE = True


def load_text() -> str:
    """Concatenate SOURCES found in this interpreter's stdlib, capped at MAX_CHARS."""
    stdlib = os.path.dirname(os.__file__)
    parts = []
    for name in SOURCES:
        path = os.path.join(stdlib, name)
        if os.path.exists(path):  # a future Python may drop a module; skip, don't fail
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
    return "".join(parts)[:MAX_CHARS]


def build_vocab(text: str) -> list:
    """Sorted characters seen at least MIN_COUNT times, then UNKNOWN at the end."""
    counts = collections.Counter(text)
    return sorted(ch for ch, n in counts.items() if n >= MIN_COUNT) + [UNKNOWN]


TEXT = load_text()
VOCAB = build_vocab(TEXT)
STOI = {ch: i for i, ch in enumerate(VOCAB)}


def encode(s: str) -> torch.Tensor:
    """(len(s),) int64 ids; characters outside VOCAB become UNKNOWN."""
    unk = STOI[UNKNOWN]
    return torch.tensor([STOI.get(ch, unk) for ch in s], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


class CharWindows(torch.utils.data.Dataset):
    """Map-style windows: item i is (x, y), both (CONTEXT,) int64, y = x shifted by one."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids                                          # (len(TEXT),) int64
        self.starts = range(0, len(ids) - CONTEXT, STRIDE)     # every start has a y

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = self.starts[i]
        return self.ids[s:s + CONTEXT], self.ids[s + 1:s + CONTEXT + 1]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(),
                                 nn.Linear(4 * D_MODEL, D_MODEL))

    def forward(self, x):                                       # x: (b, t, d)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)         # 3 x (b, t, d)
        q, k, v = (z.view(b, t, N_HEADS, d // N_HEADS).transpose(1, 2)
                   for z in (q, k, v))                          # 3 x (b, h, t, d/h)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))  # (b, t, d)
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Embeddings, N_LAYERS blocks, final LayerNorm and a head: (b, t) ids -> logits."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), D_MODEL)
        self.pos = nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.Sequential(*[Block() for _ in range(N_LAYERS)])
        self.ln = nn.LayerNorm(D_MODEL)
        # Head not tied to self.tok: tied weights would be one tensor under two names,
        # which complicates sharding parameters by name for no gain at this size.
        self.head = nn.Linear(D_MODEL, len(VOCAB))

    def forward(self, ids):                                     # ids: (b, t) int64
        pos = torch.arange(ids.shape[1], device=ids.device)     # (t,)
        x = self.tok(ids) + self.pos(pos)                       # (b, t, d)
        return self.head(self.ln(self.blocks(x)))               # (b, t, vocab) logits


def build_model() -> nn.Module:
    return CharGPT()


def build_dataset() -> CharWindows:
    return CharWindows(encode(TEXT))


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-character cross-entropy over all b * CONTEXT positions."""
    x, y = batch                                                # (b, t), (b, t)
    logits = model(x)                                           # (b, t, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def generate(model, prompt="def ", n_chars=200, temperature=0.8, seed=0) -> str:
    """Sample n_chars after prompt; a private generator makes the sample repeatable."""
    gen = torch.Generator().manual_seed(seed)
    ids = encode(prompt).unsqueeze(0)                           # (1, t)
    for _ in range(n_chars):
        logits = model(ids[:, -CONTEXT:])[0, -1] / temperature  # (vocab,)
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return decode(ids[0].tolist())


def finish(model: nn.Module, prompt: str = "def ", n_chars: int = 200) -> None:
    """Print the n_chars characters the trained model writes after the prompt: a header
    line that names both, then the prompt and the sample."""
    model.eval()
    print(f"char_transformer: sample (vocab {len(VOCAB)}), {n_chars} characters after "
          f"{prompt!r}:\n{generate(model, prompt, n_chars)}")
