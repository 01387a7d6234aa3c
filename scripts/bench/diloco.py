"""Suite ``diloco``: what DiLoCo saves in bytes and in time on links of real bandwidth.

The GPT example (examples/gpt.py, 349k parameters, nanoGPT's recipe):

bytes   2 workers x 2 servers, STEPS steps, unshaped: payload bytes pushed and pulled per
        sample (the summary's ``bytes_pushed + bytes_pulled`` over ``samples``), BSP
        against ``--mode diloco`` at H = 8 and 32. Target: H / 1.2 times fewer.
links   4 workers x 2 servers, LINK_STEPS steps, each role in its network namespace
        (``--netns``) unshaped, then shaped to 1000 and 100 Mbit/s each way
        (``--link-mbps``): wall time and the validation loss the final parameters reach
        (the job's ``validation_loss``: equal steps, so equal samples), BSP against
        DiLoCo at H = 8, synchronous and ``--async`` (staleness 2 rounds, the launcher's
        default). Needs root for the namespaces; without, only the unshaped rows.

straggler  the same 4 workers x 2 servers, unshaped, with worker 1 slowed 3x (``--slow
        1=3``, each task made to take 3x its compute): BSP (stealing on), sync DiLoCo
        (whose rounds wait for the slow worker's H steps) and async DiLoCo (whose slow
        worker's rounds are shorter: Dynamic Local Updates). Wall time, validation loss,
        and each worker's mean inner steps a round.

The outer optimizer is the example's OUTER_OPTIMIZER (plain averaging, lr 1: see
examples/gpt.py for what DiLoCo's default, Nesterov with lr 0.7 and momentum 0.9, gives;
async, each push is applied as 1/M of a round) and the inner one the job's recipe.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

import numpy as np

from .common import ROOT, launch_run, markdown

JOB = os.path.join(ROOT, "examples", "gpt.py")
STEPS = 64                 # bytes: 64 steps, 2 rounds at H = 32
LINK_STEPS = 160           # links: 160 steps of 32 samples, 20 rounds at H = 8
LINKS = (None, 1000, 100)  # Mbit/s; None: unshaped


def validation_loss(params_npz: str) -> float:
    """The GPT example's validation loss at the parameters a run wrote."""
    import torch
    spec = importlib.util.spec_from_file_location("gpt_bench", JOB)
    gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpt)
    model = gpt.build_model()
    saved = np.load(params_npz)
    model.load_state_dict({k: torch.from_numpy(saved[k]) for k in saved.files})
    return gpt.validation_loss(model)


def one_run(out: str, mode: str, inner: int, workers: int, steps: int, mbps,
            extra: tuple = ()) -> dict:
    """``mode``: bsp, diloco or diloco-async."""
    argv = ["--job", JOB, "--workers", str(workers), "--servers", "2", "--steps", str(steps),
            "--device", "cpu", *extra]
    if mode.startswith("diloco"):
        argv += ["--mode", "diloco", "--inner-steps", str(inner)] + ["--async"] * (mode != "diloco")
    if mbps is not None:
        argv += ["--netns", "--link-mbps", str(mbps)]
    summary = launch_run(argv, out, f"{mode} H={inner} {mbps or 'unshaped'}", lenient=True)
    moved = summary["bytes_pushed"] + summary["bytes_pulled"]
    return {"mode": mode, "inner_steps": inner if mode != "bsp" else 1, "mbps": mbps,
            "workers": workers, "steps": summary["steps"], "samples": summary["samples"],
            "wall_s": summary["wall_s"], "bytes_pushed": summary["bytes_pushed"],
            "bytes_pulled": summary["bytes_pulled"], "bytes_per_sample": moved / summary["samples"],
            "final_loss": summary["final_loss"], "max_staleness": summary.get("max_staleness"),
            "rounds": summary.get("rounds"),
            "inner_steps_per_round": [w["tasks"] / w["pushes"] if w.get("pushes") else None
                                      for w in summary["per_worker"]],
            "validation_loss": validation_loss(os.path.join(out, "params.npz"))}


def namespaces_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def run(args) -> tuple[list[dict], str]:
    rows = []
    if args.tiny:
        os.environ["GPT_TINY"] = "1"           # the roles inherit it: a 15k-parameter model
    with tempfile.TemporaryDirectory(prefix="ps-bench-diloco-") as tmp:
        for mode, inner in (("bsp", 1), ("diloco", 8), ("diloco", 32)):
            r = one_run(os.path.join(tmp, f"bytes-{mode}-{inner}"), mode, inner, 2, args.steps,
                        None)
            rows.append({"part": "bytes", **r})
            print(f"  bytes: {mode} H={inner}: {r['bytes_per_sample']:,.0f} B/sample",
                  file=sys.stderr, flush=True)
        links = [m for m in args.links if m is None or (namespaces_available() and not args.tiny)]
        for mbps in links:
            for mode, inner in (("bsp", 1), ("diloco", 8), ("diloco-async", 8)):
                r = one_run(os.path.join(tmp, f"link-{mbps}-{mode}"), mode, inner, args.workers,
                            args.link_steps, mbps)
                rows.append({"part": "links", **r})
                print(f"  {mbps or 'unshaped'}: {mode}: {r['wall_s']:.1f} s, validation loss "
                      f"{r['validation_loss']:.4f}", file=sys.stderr, flush=True)
        for mode, inner in (("bsp", 1), ("diloco", 8), ("diloco-async", 8)):
            r = one_run(os.path.join(tmp, f"straggler-{mode}"), mode, inner, args.workers,
                        args.link_steps, None, ("--slow", "1=3"))
            rows.append({"part": "straggler", **r})
            print(f"  straggler: {mode}: {r['wall_s']:.1f} s, validation loss "
                  f"{r['validation_loss']:.4f}", file=sys.stderr, flush=True)
    return rows, table(rows, args)


def table(rows: list[dict], args) -> str:
    bsp = next(r for r in rows if r["part"] == "bytes" and r["mode"] == "bsp")
    first = markdown(["mode", "bytes/sample", "fewer than BSP", "target"],
                     [[f"{r['mode']}" + (f", H = {r['inner_steps']}" if r["mode"] == "diloco" else ""),
                       f"{r['bytes_per_sample']:,.0f}",
                       f"{bsp['bytes_per_sample'] / r['bytes_per_sample']:.1f}x",
                       f">= {r['inner_steps'] / 1.2:.1f}x" if r["mode"] == "diloco" else "-"]
                      for r in rows if r["part"] == "bytes"])
    link_rows = [r for r in rows if r["part"] == "links"]
    lines = []
    for r in link_rows:
        base = next(b for b in link_rows if b["mbps"] == r["mbps"] and b["mode"] == "bsp")
        lines.append([f"{r['mbps']} Mbit/s" if r["mbps"] else "unshaped",
                      r["mode"] + (f", H = {r['inner_steps']}" if r["mode"] != "bsp" else ""),
                      f"{r['wall_s']:.1f}", f"{r['wall_s'] / base['wall_s']:.2f}",
                      f"{r['validation_loss']:.4f}",
                      f"{100 * (r['validation_loss'] / base['validation_loss'] - 1):+.1f}%"])
    second = markdown(["link", "mode", "wall s", "of BSP's time", "validation loss",
                       "against BSP's"], lines)
    slow = [r for r in rows if r["part"] == "straggler"]
    base = next(r for r in slow if r["mode"] == "bsp")
    third = markdown(["mode", "wall s", "of BSP's time", "validation loss", "against BSP's",
                      "inner steps a round, per worker"],
                     [[r["mode"] + (f", H = {r['inner_steps']}" if r["mode"] != "bsp" else ""),
                       f"{r['wall_s']:.1f}", f"{r['wall_s'] / base['wall_s']:.2f}",
                       f"{r['validation_loss']:.4f}",
                       f"{100 * (r['validation_loss'] / base['validation_loss'] - 1):+.1f}%",
                       ", ".join(f"{x:.1f}" for x in r["inner_steps_per_round"])
                       if r["mode"] == "diloco-async" else "-"] for r in slow])
    return (f"**bytes per sample** (2 workers x 2 servers, {args.steps} steps)\n\n{first}\n\n"
            f"**links** ({args.workers} workers x 2 servers, {args.link_steps} steps, equal "
            f"samples)\n\n{second}\n\n**a straggler** (worker 1 3x slow, unshaped, "
            f"{args.workers} workers x 2 servers, {args.link_steps} steps)\n\n{third}")


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=None, help=f"steps of a bytes run (default {STEPS})")
    p.add_argument("--link-steps", type=int, default=None,
                   help=f"steps of a links run (default {LINK_STEPS})")
    p.add_argument("--workers", type=int, default=4, help="workers of a links run (default 4)")
    p.add_argument("--links", type=lambda t: [None if x == "unshaped" else float(x)
                                              for x in t.split(",")],
                   default=list(LINKS), help="link speeds in Mbit/s, or unshaped "
                                             "(default unshaped,1000,100)")


def resolve(args, p) -> None:
    args.steps = args.steps or (32 if args.tiny else STEPS)
    args.link_steps = args.link_steps or (8 if args.tiny else LINK_STEPS)
    if args.tiny:
        args.workers = 2
