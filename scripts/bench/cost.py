"""Suite ``cost``: a cost model of a step, fitted to this machine, and what it predicts.

The model (docs/performance.md#a-cost-model derives it). P parameters (4P bytes), M
workers, S servers, every role's link B bytes/s each way and L seconds one way, C the
compute of a worker's part of a step:

    BSP (this parameter server)   T = C + a P/S + 2 V (1/B_loop + g/B) + 2 L + t0,
                                  V = 4P max(1, M/S), the bytes on the busiest link (a
                                  server's when M > S) in each of the push and the pull
    DiLoCo, per inner step        T = C + (a P/S + 2 V (1/B_loop + g/B) + 2 L + t0) / H
    ring all-reduce (DDP)         T = C + 2 (M-1)/M 4P (1/B_loop + g/B) + 2 (M-1) L

``a`` (the server's update, seconds per parameter) is timed directly: the job's
optimizer stepping a shard of 4M parameters in this process, best of 5. ``1/B_loop``
(what moving a byte costs with no shaping: copies, kernel, zmq), ``g`` (how much of a
shaped link's rate a transfer gets; 1 ideal) and ``t0`` (fixed per step) are fitted by
least squares on relative error, none negative, to BSP runs on the sized MLP
(scripts/jobs/mlp10m.py at --params): S and M in 1, 2, 4 unshaped, and on links shaped
to 1000 and 100 Mbit/s (--netns). (Fitted too, ``a`` came out 3.0 and 0.0 ns in two
runs: at 1M parameters the update is 1-3 ms of a step, within the runs' noise.) The
latency term is counted, not fitted: a BSP step crosses a link one way twice in sequence (the push, and the pull's
answer, its request riding behind the push; the next lease is asked ahead), a ring
2 (M - 1) times. This machine's kernel has no netem (``--link-delay-ms`` fails with
"Specified qdisc kind is unknown"), so no run here adds latency.
DiLoCo runs and torch DDP (gloo, a ring) are then *predicted* with those numbers and
compared with what they measure: a check of the model, not a fit. C is measured: the
summary's compute seconds per step of the slowest worker; DDP's is its one-process step
(its optimizer update included) x max(1, M / CORES) / M, each rank computing 1/M of the
batch on CORES shared cores.

Then the model predicts 64 workers x 16 servers at 10 and 100 Gbit/s for GPT-2 small and
a 1.3B model, with C from an assumed GPU throughput (and BSP with 64 servers beside it),
and says which method is fastest.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

from .common import ROOT, launch_run, markdown, run_group, step_end_times, timed_step_s
from .scale import sized_job

PARAMS = 1_000_000
BSP_CROSSINGS = 2               # one-way link crossings in sequence per BSP step (counted)
BATCH = 64
STEPS, WARMUP = 4, 1            # BSP: timed steps after a warm-up step
H = 8                           # DiLoCo's rounds: 3 (the first is warm-up)
DEAD_AFTER_S = 60.0             # a 2-core machine with 9 processes: no false deaths
UNSHAPED = [(s, m) for s in (1, 2, 4) for m in (1, 2, 4)]
SHAPED = [(1, 1), (1, 4), (2, 2), (4, 4)]            # at each of LINKS
LINKS = (1000.0, 100.0)                              # Mbit/s
DILOCO = [((2, 2), None), ((2, 2), 100.0), ((1, 4), 100.0)]
DDP_PROCS = (1, 2, 4)
CORES = os.cpu_count() or 1
# The prediction: GPT-2 small and a 1.3B model; C = 6 P tokens / throughput, 16k tokens a
# worker a step, 300 TFLOP/s (an H100 in bf16 at about 30% of its peak).
PREDICT_MODELS = {"GPT-2 small (124M)": 124e6, "1.3B": 1.3e9}
TOKENS, FLOPS = 16384, 300e12
PREDICT_CLUSTER = (64, 16)     # workers, servers
PREDICT_LINKS = (10e9, 100e9)  # bit/s
PREDICT_LATENCY = 10e-6        # one way, in a data centre
PREDICT_H = (8, 32)


def link_bytes(params: int, servers: int, workers: int) -> float:
    """V: bytes on the busiest link in one direction, in each of a step's push and pull."""
    return 4.0 * params * max(1.0, workers / servers)


def bsp_run(tmp: str, job: str, servers: int, workers: int, mbps, delay_ms: float,
            mode: str = "bsp", steps: int = WARMUP + STEPS) -> dict:
    name = f"{mode}-s{servers}-m{workers}-{mbps or 'loop'}-{delay_ms}"
    out = os.path.join(tmp, name)
    argv = ["--job", job, "--servers", str(servers), "--workers", str(workers), "--steps",
            str(steps), "--trace", "--dead-after-s", str(DEAD_AFTER_S), "--device", "cpu",
            "--tasks-per-step", str(workers), "--no-steal"]
    if mode == "diloco":
        argv += ["--mode", "diloco", "--inner-steps", str(H)]
    if mbps is not None:
        argv += ["--netns", "--link-mbps", str(mbps)] + (
            ["--link-delay-ms", str(delay_ms)] if delay_ms else [])
    summary = launch_run(argv, out, name, lenient=True)
    ends = step_end_times(os.path.join(out, "trace.json"))    # BSP: steps; DiLoCo: rounds
    step_s = timed_step_s(ends, 1) / (H if mode == "diloco" else 1)
    compute = max(w["compute_s"] for w in summary["per_worker"]) / summary["steps"]
    return {"mode": mode, "servers": servers, "workers": workers, "mbps": mbps,
            "delay_ms": delay_ms, "one_way_s": 2e-3 * delay_ms,   # both ends' qdiscs delay
            "step_s": step_s, "compute_s": compute}


def ddp_run(tmp: str, job: str, procs: int) -> dict:
    result = os.path.join(tmp, f"ddp{procs}.json")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench", "ddp_baseline.py"), "--job", job,
           "--procs", str(procs), "--steps", "8", "--warmup", "2", "--threads", "1",
           "--batch", str(BATCH), "--out", result]
    rc, _, stderr = run_group(cmd, f"ddp x {procs}")
    if rc != 0:
        raise RuntimeError(f"ddp x {procs} failed ({rc}):\n{stderr[-2000:]}")
    with open(result) as f:
        return {"mode": "ring", "workers": procs, "servers": 0, "mbps": None, "delay_ms": 0.0,
                "one_way_s": 0.0, "step_s": json.load(f)["step_s"]}


def update_s_per_param(optimizer: dict, size: int = 4_000_000, repeats: int = 5) -> float:
    """``a``: seconds per parameter of one optimizer step on a shard (ps.core.optim), the
    best of ``repeats`` after one warm-up step."""
    import time

    from ps.core.optim import make_optimizer
    opt = make_optimizer(optimizer, size)
    params = np.zeros(size, np.float32)
    grad = np.full(size, 1e-3, np.float32)
    opt.step(params, grad, divide_by=64)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step(params, grad, divide_by=64)
        best = min(best, time.perf_counter() - t0)
    return best / size


def features(row: dict, params: int) -> list[float]:
    """The BSP model's fitted terms, whose coefficients are [1/B_loop, g, t0]."""
    v2 = 2 * link_bytes(params, row["servers"], row["workers"])
    shaped = v2 / (row["mbps"] * 1e6 / 8) if row["mbps"] else 0.0
    return [v2, shaped, 1.0]


def fit(rows: list[dict], params: int, a: float) -> dict:
    """The model's coefficients, ``a`` (timed) given."""
    x = np.array([features(r, params) for r in rows])
    y = np.array([r["step_s"] - r["compute_s"] - BSP_CROSSINGS * r["one_way_s"]
                  - a * params / r["servers"] for r in rows])
    # Relative errors are minimised (each row weighted by 1 / its step time): a 16 ms
    # loopback step and a 3 s one at 100 Mbit/s count alike. Every coefficient >= 0 (a
    # cost is never negative): one that comes out negative is fixed at 0 and the rest
    # refitted, until none is.
    w = 1 / np.array([r["step_s"] for r in rows])
    free = np.ones(x.shape[1], bool)
    while True:
        coef = np.zeros(x.shape[1])
        coef[free], *_ = np.linalg.lstsq(x[:, free] * w[:, None], y * w, rcond=None)
        if (coef >= 0).all():
            break
        free &= coef > 0
    inv_loop, g, t0 = (float(c) for c in coef)
    residual = np.abs(x @ coef - y) / np.array([r["step_s"] for r in rows])
    return {"a_s_per_param": a, "loop_bytes_per_s": 1 / inv_loop if inv_loop > 0 else float("inf"),
            "inv_loop": inv_loop, "link_efficiency_g": g, "t0_s": t0,
            "median_error": float(np.median(residual)), "max_error": float(residual.max())}


def predict(m: dict, mode: str, params: float, servers: int, workers: int, compute: float,
            bytes_per_s: float | None, one_way: float, inner: int = H,
            loop: bool = True) -> float:
    """A step's time by the model (``loop`` False: no loopback cost, a real network's
    transfers are the link's alone; None bandwidth: unshaped)."""
    inv_b = (m["inv_loop"] if loop else 0.0) + (m["link_efficiency_g"] / bytes_per_s
                                                if bytes_per_s else 0.0)
    if mode == "ring":        # the update is in C: each rank's own, on its own device
        return (compute + 2 * (workers - 1) / workers * 4 * params * inv_b
                + 2 * (workers - 1) * one_way)
    sync = (m["a_s_per_param"] * params / servers
            + 2 * link_bytes(params, servers, workers) * inv_b
            + BSP_CROSSINGS * one_way + m["t0_s"])
    return compute + sync / (inner if mode == "diloco" else 1)


def run(args) -> tuple[list[dict], str]:
    rows = []
    can_shape = os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc") and not args.tiny
    with tempfile.TemporaryDirectory(prefix="ps-bench-cost-") as tmp:
        job = sized_job(tmp, args.params, BATCH)
        sys.path.insert(0, os.path.join(ROOT, "scripts", "jobs"))
        import mlp10m
        rows.append({"part": "update", "optimizer": mlp10m.OPTIMIZER,
                     "a_s_per_param": update_s_per_param(mlp10m.OPTIMIZER)})
        plan = [((s, m), None, 0.0) for s, m in args.unshaped]
        if can_shape:
            plan += [(sm, mbps, 0.0) for mbps in LINKS for sm in SHAPED]
        for i, ((s, m), mbps, delay) in enumerate(plan):
            r = bsp_run(tmp, job, s, m, mbps, delay)
            rows.append({"part": "fit", **r})
            print(f"  [{i + 1}/{len(plan)}] bsp S={s} M={m} {mbps or 'unshaped'}"
                  f"{f' +{delay} ms' if delay else ''}: {r['step_s'] * 1e3:.0f} ms/step "
                  f"(compute {r['compute_s'] * 1e3:.0f})", file=sys.stderr, flush=True)
        for (s, m), mbps in DILOCO if can_shape else DILOCO[:1]:
            r = bsp_run(tmp, job, s, m, mbps, 0.0, mode="diloco", steps=3 * H)
            rows.append({"part": "check", **r})
        for procs in args.ddp:
            rows.append({"part": "check", **ddp_run(tmp, job, procs)})
    return model_rows(rows, args)


def model_rows(rows: list[dict], args) -> tuple[list[dict], str]:
    """Fit the model to the measured rows, predict the check rows and the large cluster."""
    update = next(r for r in rows if r["part"] == "update")
    a = update["a_s_per_param"]
    rows = [r for r in rows if r["part"] in ("fit", "check")]
    model = fit([r for r in rows if r["part"] == "fit"], args.params, a)
    single = next((r["step_s"] for r in rows if r["mode"] == "ring" and r["workers"] == 1), None)
    for r in rows:
        if r["mode"] == "ring":      # DDP's compute: 1/M of the one-process step, cores shared
            r["compute_s"] = single * max(1, r["workers"] / CORES) / r["workers"]
        bps = r["mbps"] * 1e6 / 8 if r["mbps"] else None
        r["model_s"] = predict(model, r["mode"], args.params, r["servers"], r["workers"],
                               r["compute_s"], bps, r["one_way_s"])
    predictions = []
    for name, params in PREDICT_MODELS.items():
        compute = 6 * params * TOKENS / FLOPS
        workers, servers = PREDICT_CLUSTER
        for bits in PREDICT_LINKS:
            row = {"model": name, "params": params, "workers": workers, "servers": servers,
                   "gbit_s": bits / 1e9, "compute_s": compute}
            row["bsp_s"] = predict(model, "bsp", params, servers, workers, compute, bits / 8,
                                   PREDICT_LATENCY, loop=False)
            row["bsp_wide_s"] = predict(model, "bsp", params, workers, workers, compute, bits / 8,
                                        PREDICT_LATENCY, loop=False)     # S = M servers
            row["ring_s"] = predict(model, "ring", params, servers, workers, compute, bits / 8,
                                    PREDICT_LATENCY, loop=False)
            for h in PREDICT_H:
                row[f"diloco{h}_s"] = predict(model, "diloco", params, servers, workers, compute,
                                              bits / 8, PREDICT_LATENCY, inner=h, loop=False)
            predictions.append(row)
    rows.append(update)
    rows.append({"part": "model", **model})
    rows += [{"part": "prediction", **p} for p in predictions]
    return rows, table(rows, model, predictions, args)


def table(rows, model, predictions, args) -> str:
    measured = [r for r in rows if r["part"] in ("fit", "check")]
    lines = [[r["part"], r["mode"], r["servers"] or "-", r["workers"],
              (f"{r['mbps']:g} Mbit/s" if r["mbps"] else "unshaped")
              + (f" +{2 * r['delay_ms']:g} ms" if r["delay_ms"] else ""),
              f"{r['compute_s'] * 1e3:.0f}", f"{r['step_s'] * 1e3:.0f}", f"{r['model_s'] * 1e3:.0f}",
              f"{100 * (r['model_s'] / r['step_s'] - 1):+.0f}%"] for r in measured]
    first = markdown(["part", "method", "S", "M", "link", "compute ms", "measured ms/step",
                      "model ms/step", "model error"], lines)
    fitted = (f"a = {model['a_s_per_param'] * 1e9:.2f} ns/parameter (timed), B_loop = "
              f"{model['loop_bytes_per_s'] / 1e9:.2f} GB/s, g = {model['link_efficiency_g']:.2f}, "
              f"t0 = {model['t0_s'] * 1e3:.1f} ms; fit rows' error: median "
              f"{100 * model['median_error']:.0f}%, largest {100 * model['max_error']:.0f}%")
    plines = []
    for p in predictions:
        times = {"BSP": p["bsp_s"], f"BSP, S = {p['workers']}": p["bsp_wide_s"], "ring": p["ring_s"],
                 **{f"DiLoCo H={h}": p[f"diloco{h}_s"] for h in PREDICT_H}}
        plines.append([p["model"], f"{p['gbit_s']:g} Gbit/s", f"{p['compute_s'] * 1e3:.0f}",
                       *[f"{t * 1e3:,.0f}" for t in times.values()], min(times, key=times.get)])
    second = markdown(["model", "link", "compute ms", "BSP (PS) ms",
                       f"BSP, S = {PREDICT_CLUSTER[0]} ms", "ring ms",
                       *[f"DiLoCo H={h} ms" for h in PREDICT_H], "fastest"], plines)
    w, s = PREDICT_CLUSTER
    return (f"**measured and modelled** (the sized MLP, {args.params:,} parameters, batch "
            f"{BATCH}; fit rows fit the model, check rows are predicted)\n\n{first}\n\n"
            f"fitted: {fitted}\n\n**predicted**, {w} workers x {s} servers, one-way latency "
            f"{PREDICT_LATENCY * 1e6:.0f} us, compute 6 P x {TOKENS} tokens at "
            f"{FLOPS / 1e12:.0f} TFLOP/s\n\n{second}")


def add_arguments(p) -> None:
    p.add_argument("--params", type=int, default=None, help=f"model size (default {PARAMS:,})")


def resolve(args, p) -> None:
    args.params = args.params or (100_000 if args.tiny else PARAMS)
    args.unshaped = [(1, 1), (2, 2), (1, 2)] if args.tiny else UNSHAPED
    args.ddp = (1, 2) if args.tiny else DDP_PROCS
