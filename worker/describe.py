"""The size of a job's model, for a launcher that does not import torch.

    python -m worker.describe --job examples/gpt.py
    124412 4    # parameters, bytes per parameter on a server (float32)

The Ray engine (``ps.launch.ray_engine``) asks a server's memory from Ray by its shard's
size; the launcher is numpy only, so it runs this once, in a process of its own.
"""
from __future__ import annotations

import argparse

from worker.job import load_job


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m worker.describe",
                                description="Print a job's parameter count (and 4: float32 on the servers).")
    p.add_argument("--job", required=True, help="job file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, _ = load_job(args.job).build(args.seed)
    print(sum(p.numel() for p in model.parameters()), 4)


if __name__ == "__main__":
    main()
