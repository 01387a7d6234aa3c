"""examples/gpt.py, single process, at GPT_TINY=1: the model and the recipe it declares.

The job is loaded as a worker loads it (``worker.job.load_job``), after GPT_TINY=1 is set,
so every test runs on the 15k-parameter model and a 20 KB corpus in well under a second.
Each check has an independent answer: causality by editing a later token, the tied head
by recomputing the logits from the final LayerNorm's output, the schedule at points where
the cosine has a known value, param_groups through the framework's own validator.
"""
import math
import pathlib
import re

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import default_collate

from ps.core.tasks import steps_per_epoch
from worker.job import flat_groups, load_job

pytestmark = pytest.mark.timeout(60)    # the whole file takes a few seconds

JOB = pathlib.Path(__file__).resolve().parent.parent / "examples" / "gpt.py"
SEED = 0


@pytest.fixture
def gpt(monkeypatch):
    """The tiny job's module; torch pinned to one thread, as a worker is."""
    monkeypatch.setenv("GPT_TINY", "1")       # read at import: must be set before loading
    monkeypatch.delenv("GPT_AUTOCAST", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_job(str(JOB)).module
    torch.set_num_threads(threads)


def model_and_batch(gpt, n=8):
    torch.manual_seed(SEED)
    model, dataset = gpt.build_model(), gpt.build_dataset()
    return model, default_collate([dataset[i] for i in range(n)])   # (n, t), (n, t)


def test_tiny_is_tiny_and_windows_are_shifted_by_one(gpt):
    assert (gpt.CONTEXT, gpt.D_MODEL, gpt.N_LAYERS) == (16, 32, 1)
    dataset = gpt.build_dataset()
    x, y = dataset[len(dataset) - 1]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (gpt.CONTEXT,)
    assert torch.equal(x[1:], y[:-1])
    assert gpt.VOCAB[-1] == gpt.UNKNOWN and gpt.VOCAB[:-1] == sorted(gpt.VOCAB[:-1])
    # Training windows end before the validation split begins: no held-out character leaks.
    assert dataset.starts[-1] + gpt.CONTEXT + 1 <= gpt.SPLIT


def test_model_is_causal(gpt):
    model, (x, _) = model_and_batch(gpt)
    k = gpt.CONTEXT // 2
    edited = x.clone()
    edited[:, k] = (edited[:, k] + 1) % len(gpt.VOCAB)
    with torch.no_grad():
        before, after = model(x), model(edited)                 # (b, t, vocab) each
    assert torch.allclose(before[:, :k], after[:, :k], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, k:], after[:, k:])      # the edit is seen from k on


def test_head_is_the_token_embedding(gpt):
    model, (x, _) = model_and_batch(gpt)
    hidden = []
    model.ln_f.register_forward_hook(lambda mod, inp, out: hidden.append(out))
    with torch.no_grad():
        logits = model(x)                                       # (b, t, vocab)
    assert torch.allclose(logits, hidden[0] @ model.tok.weight.T, atol=1e-6)
    named = dict(model.named_parameters())
    shaped_like_head = [n for n, p in named.items() if p.shape == (len(gpt.VOCAB), gpt.D_MODEL)]
    assert shaped_like_head == ["tok.weight"]                   # one matrix, one name
    assert set(model.state_dict()) == set(named)                # no buffers (no causal mask)
    assert all(p.dtype == torch.float32 for p in named.values())


def test_init_is_nanogpt_scaled(gpt):
    model, (x, y) = model_and_batch(gpt)
    block = model.blocks[0]
    residual_std = 0.02 / math.sqrt(2 * gpt.N_LAYERS)
    assert abs(block.fc.weight.std().item() / 0.02 - 1) < 0.1
    assert abs(block.mlp_out.weight.std().item() / residual_std - 1) < 0.1
    assert abs(model.tok.weight.std().item() / 0.02 - 1) < 0.1
    # Small weights make every logit near 0: the first loss is that of a uniform guess.
    with torch.no_grad():
        assert abs(gpt.loss_fn(model, (x, y)).item() - math.log(len(gpt.VOCAB))) < 0.1


def test_param_groups_cover_every_parameter_once_and_decay_2d_only(gpt):
    model = gpt.build_model()
    groups = gpt.param_groups(model)
    named = dict(model.named_parameters())
    listed = [n for g in groups for n in g["params"]]
    assert sorted(listed) == sorted(named) and len(listed) == len(set(listed))
    for group in groups:
        decayed = all(named[n].dim() >= 2 for n in group["params"])
        assert all((named[n].dim() >= 2) == decayed for n in group["params"])
        assert group["weight_decay"] == (0.1 if decayed else 0.0)
    assert {"tok.weight", "pos.weight", "blocks.0.qkv.weight"} <= set(groups[0]["params"])
    assert {"ln_f.weight", "ln_f.bias"} <= set(groups[1]["params"])
    flat_groups(groups, model, gpt.OPTIMIZER)        # the framework accepts them, too


def test_lr_warms_up_then_follows_the_cosine_to_min_lr(gpt, monkeypatch):
    lr, low = gpt.OPTIMIZER["lr"], gpt.MIN_LR
    assert 0 < low < lr
    # The real schedule: near 0 at step 0, the peak right after warmup, MIN_LR at the end
    # of a plain run, whose length is the framework's, not a guess.
    plain = steps_per_epoch(len(gpt.build_dataset()), gpt.BATCH_SIZE) * gpt.EPOCHS
    assert gpt.LR_DECAY_STEPS == plain
    assert gpt.lr_at(0) < 0.2 * lr and gpt.lr_at(gpt.WARMUP_STEPS) == lr
    assert gpt.lr_at(plain) == pytest.approx(low, rel=1e-12)
    assert isinstance(gpt.lr_at(3), float)
    # Round numbers, where cos(pi * ratio) is known: ratio 1/4, 1/2, 1.
    monkeypatch.setattr(gpt, "WARMUP_STEPS", 10)
    monkeypatch.setattr(gpt, "LR_DECAY_STEPS", 110)
    assert gpt.lr_at(0) == pytest.approx(lr / 11)
    assert gpt.lr_at(9) == pytest.approx(lr * 10 / 11)
    assert gpt.lr_at(10) == pytest.approx(lr)
    assert gpt.lr_at(35) == pytest.approx(low + (lr - low) * (1 + math.sqrt(0.5)) / 2)
    assert gpt.lr_at(60) == pytest.approx((lr + low) / 2)
    assert gpt.lr_at(110) == pytest.approx(low)
    assert gpt.lr_at(10_000) == low
    lrs = [gpt.lr_at(s) for s in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))     # rising through warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))     # never rising after


def test_adamw_with_the_recipe_lowers_the_loss_on_one_batch(gpt):
    model, batch = model_and_batch(gpt, n=gpt.BATCH_SIZE)
    named = dict(model.named_parameters())
    groups = [{**g, "params": [named[n] for n in g["params"]]} for g in gpt.param_groups(model)]
    config = {k: v for k, v in gpt.OPTIMIZER.items() if k != "name"}
    opt = torch.optim.AdamW(groups, **config)
    losses = []
    for step in range(15):
        for group in opt.param_groups:
            group["lr"] = gpt.lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss = gpt.loss_fn(model, batch)
        loss.backward()
        if step == 0:       # loss_fn leaves .grad alone: a worker sums micro-batches' grads
            grads = [p.grad.clone() for p in model.parameters()]
            gpt.loss_fn(model, batch)
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), gpt.CLIP_GRAD_NORM)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_loss_under_bfloat16_autocast_is_close_to_float32(gpt):
    model, batch = model_and_batch(gpt)
    with torch.no_grad():
        exact = gpt.loss_fn(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = gpt.loss_fn(model, batch)
    assert low.dtype == torch.float32 and abs(low.item() - exact.item()) < 0.05


def test_finish_prints_the_validation_loss_and_a_repeatable_sample(gpt, capsys):
    model, _ = model_and_batch(gpt)
    gpt.finish(model)
    first = capsys.readouterr().out
    match = re.search(r"^gpt: validation loss (\d+\.\d{4}) \((\d+) windows\)$", first, re.M)
    assert match, first
    windows = gpt.validation_windows()
    assert int(match.group(2)) == len(windows) > 0
    # The oracle: the same mean cross-entropy, computed in one batch here.
    x, y = (torch.stack(z) for z in zip(*(windows[i] for i in range(len(windows)))))
    with torch.no_grad():
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert float(match.group(1)) == pytest.approx(expected, abs=1e-4)
    assert gpt.validation_loss(model) == pytest.approx(expected, rel=1e-5)
    gpt.finish(model)
    assert capsys.readouterr().out == first                     # same loss, same sample
