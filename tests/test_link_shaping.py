"""Links of real bandwidth (``--netns --link-mbps N [--link-delay-ms D]``).

The kernel's token bucket shapes every role's link both ways (``ps.launch.netns``,
``shape_commands``). A BSP step of one worker and one server moves the model twice over
the shaped link, so it cannot be faster than ``2 x bytes x 8 / N``; it should not be much
slower either, or the cluster wastes the link (a reply asked for again while it is still
on its way, say). As root with network namespaces; skipped otherwise.
"""
import pytest

from cluster import launch
from ps.launch.netns import Plan, shape_commands
from test_faults_partition import clean, netns  # noqa: F401  (fixtures)

JOB = '''
import torch
from torch import nn
OPTIMIZER = {"name": "sgd", "lr": 0.01}
BATCH_SIZE = 16
SHUFFLE = False
def build_model():
    return nn.Linear(512, 512)          # 262,656 floats: 1.05 MB a push and a pull
def build_dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g)
    return torch.utils.data.TensorDataset(x, x)
def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)
'''
PARAMS = 512 * 512 + 512


def test_shaping_commands_limit_both_directions_of_every_role():
    plan = Plan("ab12", 9, ("scheduler", "server0", "worker0"))
    cmds = shape_commands(plan, 20, 0)
    assert len(cmds) == 6                                   # 3 roles x 2 directions
    assert ["ip", "netns", "exec", "ps-ab12-server0", "tc", "qdisc", "add", "dev", "eth0",
            "root", "tbf", "rate", "20mbit", "burst", "65536", "latency", "200ms"] in cmds
    assert ["tc", "qdisc", "add", "dev", plan.veth("worker0"), "root", "tbf", "rate", "20mbit",
            "burst", "65536", "latency", "200ms"] in cmds
    delayed = shape_commands(plan, 20, 5)
    assert len(delayed) == 12 and all("netem" in c for c in delayed[::2])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_shaped_link_carries_the_model_at_its_rate(tmp_path, clean):
    job = tmp_path / "linear.py"
    job.write_text(JOB)
    steps, mbps = 4, 20
    run = launch(tmp_path / "run", "--job", str(job), "--workers", "1", "--servers", "1",
                 "--steps", str(steps), "--netns", "--link-mbps", str(mbps), timeout_s=100)
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    moved = summary["bytes_pushed"] + summary["bytes_pulled"]
    assert moved == (2 * steps + 1) * 4 * PARAMS             # no reply sent twice, counted
    # The run's wall time covers the steps (the final pull is after it): at least the
    # link's time for their bytes, and not much more.
    wire_s = 2 * steps * 4 * PARAMS * 8 / (mbps * 1e6)
    assert wire_s * 0.95 <= summary["wall_s"] <= wire_s * 2 + 1.0, (summary["wall_s"], wire_s)
