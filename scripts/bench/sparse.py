"""Suite ``sparse``: sparse tables against a dense embedding, memory per row, and scale.

On scripts/jobs/sparse_ctr.py: a batch of B samples, each a bag of 16 ids drawn uniformly
from the id space, pooled by a table of 32 floats a row (Adagrad), read by a dense layer.

throughput   2 workers x 2 servers, 2048 samples a step, id spaces of 200k and 1M: the
             sparse table against the same model with a dense ``nn.EmbeddingBag`` (pulled
             and pushed whole every step, SGD): step time (from the trace), rows pulled
             and pushed per second (the servers' counts over the run's wall time), and
             payload bytes per step (the workers' counts: ids and rows of the tables).
scale        4 servers x 2 workers, 4096 samples a step (65,536 ids, nearly all new: an id
             space of 10^12), ``--scale-steps`` steps: at least 2 x 10^7 materialised rows
             x 32 floats (2.6 GB of rows and as much Adagrad state). Every role's peak RSS
             (VmHWM, polled); each server's bytes per row: its RSS over the rows it holds,
             against the row and its state (256 bytes), and the index's own bytes per
             row (``index_bytes``, a sorted id array and row numbers: the target is at most
             24 bytes of index overhead). The same run with an id space of 10^5 (the table
             stays at 10^5 rows) gives the worker's RSS for comparison: it must not grow
             with the table (within 10%).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from .common import ROOT, RoleMemory, launch_run, markdown, step_end_times, timed_step_s

JOB = os.path.join(ROOT, "scripts", "jobs", "sparse_ctr.py")
DIM = 32
ROW_AND_STATE = 2 * 4 * DIM       # a row and its Adagrad sum, float32
THROUGHPUT_IDS = (200_000, 1_000_000)
THROUGHPUT_STEPS, WARMUP = 12, 2
SCALE_STEPS = 320                 # 320 x 65,536 ids of 10^12: 2.1 x 10^7 rows
POLL_S = 0.5


def ctr_run(out: str, ids: int, batch: int, steps: int, servers: int, dense: bool = False,
            trace: bool = False) -> dict:
    env = {"SPARSE_CTR_IDS": str(ids), "SPARSE_CTR_BATCH": str(batch),
           "SPARSE_CTR_DENSE": "1" if dense else "0"}
    argv = ["--job", JOB, "--servers", str(servers), "--workers", "2", "--steps", str(steps),
            "--device", "cpu", "--dead-after-s", "60"] + ["--trace"] * trace
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                 # the roles inherit it
    try:
        with RoleMemory(out, poll_s=POLL_S) as memory:
            summary = launch_run(argv, out, f"{'dense' if dense else 'sparse'} {ids:,} ids",
                                 lenient=True, timeout_s=1800)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"summary": summary, "peak_rss": memory.peak, "last_rss": memory.last}


def run(args) -> tuple[list[dict], str]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps-bench-sparse-") as tmp:
        for ids in args.ids:
            for dense in (False, True):
                name = f"{'dense' if dense else 'sparse'}-{ids}"
                r = ctr_run(os.path.join(tmp, name), ids, args.batch, args.steps, 2, dense, True)
                s = r["summary"]
                step_s = timed_step_s(step_end_times(os.path.join(tmp, name, "trace.json")), WARMUP)
                table = s.get("sparse", {}).get("rows", {})
                per_server = table.get("per_server", [])
                rows.append({"part": "throughput", "ids": ids, "dense": dense, "step_s": step_s,
                             "wall_s": s["wall_s"], "steps": s["steps"],
                             "bytes_per_step": (s["bytes_pushed"] + s["bytes_pulled"]) / s["steps"],
                             "rows_pulled_per_s": sum(p.get("rows_pulled", 0) for p in per_server)
                             / s["wall_s"] if per_server else None,
                             "rows_pushed_per_s": sum(p.get("rows_pushed", 0) for p in per_server)
                             / s["wall_s"] if per_server else None,
                             "rows": table.get("rows")})
                print(f"  {name}: {step_s * 1e3:.0f} ms a step", file=sys.stderr, flush=True)
        for ids in (args.small_ids, args.big_ids):
            out = os.path.join(tmp, f"scale-{ids}")
            t0 = time.monotonic()
            r = ctr_run(out, ids, args.scale_batch, args.scale_steps, 4)
            s = r["summary"]
            table = s["sparse"]["rows"]
            servers = []
            for p in table["per_server"]:
                rss = r["last_rss"].get(f"server{p['server']}", 0)
                servers.append({**p, "rss_bytes": rss, "peak_rss_bytes":
                                r["peak_rss"].get(f"server{p['server']}", 0),
                                "rss_per_row": rss / max(1, p["rows"]),
                                "index_per_row": p.get("index_bytes", 0) / max(1, p["rows"])})
            rows.append({"part": "scale", "ids": ids, "steps": s["steps"], "rows": table["rows"],
                         "wall_s": s["wall_s"], "launcher_s": time.monotonic() - t0,
                         "peak_rss": r["peak_rss"], "servers": servers})
            print(f"  scale {ids:,}: {table['rows']:,} rows in {s['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    return rows, table_text(rows, args)


def table_text(rows, args) -> str:
    tp = [r for r in rows if r["part"] == "throughput"]
    first = markdown(["id space", "table", "ms/step", "rows pulled/s", "rows pushed/s",
                      "MB moved/step", "sparse bytes / dense"],
                     [[f"{r['ids']:,}", "dense nn.EmbeddingBag" if r["dense"] else "sparse",
                       f"{r['step_s'] * 1e3:.0f}",
                       f"{r['rows_pulled_per_s']:,.0f}" if r["rows_pulled_per_s"] else "-",
                       f"{r['rows_pushed_per_s']:,.0f}" if r["rows_pushed_per_s"] else "-",
                       f"{r['bytes_per_step'] / 1e6:.1f}",
                       "" if r["dense"] else "{:.3f}".format(r["bytes_per_step"] / next(
                           d["bytes_per_step"] for d in tp if d["dense"] and d["ids"] == r["ids"]))]
                      for r in tp])
    scale = [r for r in rows if r["part"] == "scale"]
    lines = []
    for r in scale:
        srv = r["servers"]
        lines.append([f"{r['ids']:,}", f"{r['rows']:,}", f"{r['wall_s']:.0f}",
                      f"{max(r['peak_rss'].get(w, 0) for w in ('worker0', 'worker1')) / 1e6:,.0f}",
                      f"{max(s['peak_rss_bytes'] for s in srv) / 1e6:,.0f}",
                      f"{r['peak_rss'].get('scheduler', 0) / 1e6:,.0f}",
                      f"{max(s['rss_per_row'] for s in srv):,.0f}",
                      f"{max(s['index_per_row'] for s in srv):.1f}"])
    second = markdown(["id space", "rows", "wall s", "worker peak RSS MB", "server peak RSS MB",
                       "scheduler peak RSS MB", "server RSS / row (row + state: 256)",
                       "index bytes / row"], lines)
    small, big = scale[0], scale[-1]
    w = [max(r["peak_rss"].get(k, 0) for k in ("worker0", "worker1")) for r in (small, big)]
    return (f"**throughput** (2 workers x 2 servers, {args.batch} samples a step, bags of 16)"
            f"\n\n{first}\n\n**scale** (4 servers x 2 workers, {args.scale_batch} samples a step, "
            f"{args.scale_steps} steps)\n\n{second}\n\nworker peak RSS, {big['rows']:,} rows "
            f"against {small['rows']:,}: {w[1] / max(1, w[0]):.3f}x (target: within 1.10x)")


def add_arguments(p) -> None:
    p.add_argument("--scale-steps", type=int, default=None,
                   help=f"steps of the scale runs (default {SCALE_STEPS})")


def resolve(args, p) -> None:
    args.ids = (2000,) if args.tiny else THROUGHPUT_IDS
    args.batch = 64 if args.tiny else 2048
    args.steps = 4 if args.tiny else THROUGHPUT_STEPS
    args.scale_batch = 64 if args.tiny else 4096
    args.scale_steps = args.scale_steps or (4 if args.tiny else SCALE_STEPS)
    args.small_ids = 1000 if args.tiny else 100_000
    args.big_ids = 10 ** 12
