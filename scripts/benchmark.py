"""Benchmarks: how fast the data path moves parameters, how fast the cluster trains.

    python scripts/benchmark.py [SUITE] [options] [--tiny] [--out FILE]
    python scripts/benchmark.py SUITE --help          # a suite's options

defaults    (the suite run when none is named) the two headline ratios with every flag
            at its default: 2 workers x 2 servers on a 10M MLP against torch DDP, and
            work stealing against static dealing with one worker 3x slow
            (scripts/bench/defaults.py)
transport   pull+push of 1M, 10M and 25M float32 through 1 or 2 servers, beside raw
            pyzmq moving the same bytes between two processes (scripts/bench/transport.py)
modes       the MLP example, 2 workers x 2 servers, in BSP, SSP(2) and ASP
            (scripts/bench/modes.py)
stragglers  work stealing vs static dealing: a 3x slow worker, no slow worker, and
            jitter in BSP/SSP/ASP (scripts/bench/stragglers.py)
train       samples/s of one model, side by side: our cluster in BSP with 2 workers,
            torch DistributedDataParallel (gloo) with 2 processes, and two PyTorch RPC
            parameter servers with 2 trainers, a batch-synchronous one and the RPC
            tutorial's design (scripts/bench/train.py)
scale       step time against model size (1M-100M), servers (1-4) and workers (1-4),
            and each server's memory per parameter byte (scripts/bench/scale.py)
diloco      DiLoCo against BSP: bytes per sample at H = 8 and 32, and wall time and
            validation loss of the GPT example on links shaped to 1000 and 100 Mbit/s
            (scripts/bench/diloco.py)
cost        a step's cost model for BSP, DiLoCo and ring all-reduce, fitted to runs at 1-4
            servers and workers on shaped links, checked against DiLoCo and torch DDP runs,
            and its prediction for 64 workers x 16 servers (scripts/bench/cost.py)
sparse      sparse tables: rows per second and bytes per step against a dense embedding,
            server memory per row, a worker's RSS at 10^5 and 2 x 10^7 rows, and 2 x 10^7
            rows x 32 floats on 4 servers (scripts/bench/sparse.py)
clip        what clipping's norm agreement adds to a BSP step: 10M and 50M parameters on
            2 and 4 servers, with and without CLIP_GRAD_NORM (scripts/bench/clip.py)
ray         the Ray engine against the local launcher: start-up and samples/s, with a
            throwaway Ray and on a simulated 6-node cluster, and the time from a node's
            removal to training resuming (root: network namespaces) (scripts/bench/onray.py)

Each suite prints a markdown table and writes JSON (default bench/<suite>.json): the
suite, the command, the machine and one row per measurement. --tiny runs a suite in a
few seconds at a tiny size, to show it works (CI); its numbers mean nothing.
1 GB here is 1e9 bytes; 1M parameters is 1,000,000 float32.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from bench import (clip, common, cost, defaults, diloco, modes, onray, scale, sparse, stragglers,
                   train, transport)

SUITES = {"defaults": (defaults, "the headline ratios at default flags: ours vs DDP, stealing "
                                 "vs static"),
          "transport": (transport, "pull+push round trips vs raw pyzmq on the same bytes"),
          "modes": (modes, "samples/s of the MLP example in BSP, SSP(2) and ASP"),
          "stragglers": (stragglers, "work stealing vs static dealing: a slow worker, jitter"),
          "train": (train, "samples/s: our BSP cluster vs torch DDP (gloo) vs two torch "
                           "RPC parameter servers"),
          "scale": (scale, "step time vs model size, servers and workers; server memory"),
          "clip": (clip, "the cost of clipping's norm agreement per BSP step"),
          "diloco": (diloco, "DiLoCo vs BSP: bytes per sample, time and loss on shaped links"),
          "cost": (cost, "a cost model of BSP, DiLoCo and ring all-reduce steps, fitted here; "
                         "its prediction for 64 workers x 16 servers"),
          "sparse": (sparse, "sparse tables against a dense embedding: rows/s, bytes, memory "
                             "per row, 2 x 10^7 rows on 4 servers"),
          "ray": (onray, "the Ray engine vs the local launcher: start-up, samples/s, and "
                         "resuming after a node is removed")}


def parse_args(argv=None):
    doc_head, doc_rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=doc_head,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc_rest)
    sub = p.add_subparsers(dest="suite", required=True, metavar="{" + ",".join(SUITES) + "}")
    for name, (module, help_text) in SUITES.items():
        s = sub.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0],
                           epilog=module.__doc__.split("\n\n", 1)[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(s)
        s.add_argument("--tiny", action="store_true",
                       help="a few-second smoke run at a tiny size (for CI)")
        s.add_argument("--out", "--json", dest="out", default=None,
                       help=f"JSON output file (default bench/{name}.json)")
    r = sub.add_parser("raw-peer")          # internal: the transport suite's echo process
    transport.add_raw_peer_arguments(r)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*SUITES, "raw-peer", "-h", "--help"):
        argv = ["defaults", *argv]          # no suite named: the headline ratios
    args = p.parse_args(argv)
    if args.suite in SUITES:
        SUITES[args.suite][0].resolve(args, sub.choices[args.suite])
        args.out = args.out or os.path.join("bench", f"{args.suite}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "raw-peer":
        return transport.raw_peer(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally blocks
    rows, table = SUITES[args.suite][0].run(args)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"suite": args.suite, "command": sys.argv, "machine": common.machine(),
                   "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
