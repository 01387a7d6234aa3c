"""Suite ``transport``: pull+push round trips of the parameter server beside raw pyzmq.

A scheduler and S servers run as subprocesses; this process is the only worker (numpy,
no torch) of a model of N float32 and times round trips as a BSP worker makes them (one
task per step, SGD with lr 0): push all shards with the next step's pull right behind
(``then_pull``), then take that pull's replies into the flat buffer. Alternating with it
block by block, so machine noise hits all alike, two more systems move the same bytes
between two processes:

raw        a DEALER sends 4N bytes as 8 MiB frames (copy=False), a ROUTER peer
           (``benchmark.py raw-peer``) answers with 4N bytes: pyzmq and nothing else
echo+work  the same, but the peer does the per-byte work of a server before it answers
           (``raw-peer --work``: the NaN/Inf scan and the optimizer step of ``ps.core.optim``
           with the previous version kept, on the received frames), and the sender
           copies the answer into a flat buffer, as a worker copies a pull into its model

The best block of each counts (noise only slows a block down). "ps / raw" prices all
the parameter server adds; "echo+work / raw" its per-byte work alone (the scan, the
update with the previous version kept for exact replay, the copy into the model: each
a pass over the bytes at memory speed, like the transfer's own copies); "ps /
echo+work" the rest: headers and checks, acknowledgements, S connections instead of one.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import zmq

from .common import (EXIT_TIMEOUT_S, REQUEST_TIMEOUT_S, ROLE_TIMEOUT_S, SCRIPT,
                     START_TIMEOUT_S, Children, count, counts, ints, markdown)

from ps.wire import transport, validation                        # noqa: E402  (common put ROOT on the path)
from ps.wire.client import Peer, ShardClient, ShardInfo     # noqa: E402
from ps.core.optim import make_optimizer                    # noqa: E402
from ps.wire.protocol import Kind                           # noqa: E402

BLOCK_BYTES = 1.6e9       # bytes a timed block moves by default: ~1-2 s, long enough to swamp
                          # jitter, short enough for the default suite to take ~30 s on 2 cores
WARMUP_ROUNDS = 2         # untimed round trips first: connections, page faults, allocator
REPEATS = 3               # alternating raw/ps blocks per row


# -- raw pyzmq -----------------------------------------------------------------------
def raw_peer(args) -> int:
    """The echo peer: answer every message with as many bytes, 8 MiB frames. ``--work``:
    first do a server's per-byte work on the received float32 frames (the NaN/Inf scan,
    then an SGD step with lr 0 that keeps the previous version, as a BSP step completed
    by one push runs it) and answer with the updated parameters."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    transport.write_endpoint(args.endpoint_file, sock.getsockopt_string(zmq.LAST_ENDPOINT))
    reply = np.zeros(0, dtype=np.float32)                  # (n,) what we answer with
    keep, optimizer = None, None                           # --work: the kept version, SGD
    try:
        while sock.poll(int(args.timeout_s * 1000)):
            ident, *payload = sock.recv_multipart(copy=False)
            nbytes = sum(len(f.buffer) for f in payload)
            if nbytes == 0:
                return 0                                   # the client's "stop"
            if reply.nbytes != nbytes:
                reply = np.ones(nbytes // 4, dtype=np.float32)
                if args.work:
                    keep = np.empty_like(reply)
                    optimizer = make_optimizer({"name": "sgd", "lr": 0.0}, reply.size)
            if args.work:
                chunks = [np.frombuffer(f.buffer, dtype=np.float32) for f in payload]
                if not validation.finite(chunks):
                    raise RuntimeError("a non-finite gradient")
                optimizer.step(reply, chunks, keep=keep)
            # Sent without copy or tracking: the sender waits for this answer before it
            # sends again, so nothing writes the buffer while zmq may still read it.
            sock.send_multipart([ident, *transport.split(reply)], copy=False)
        return 1                                           # idle past the deadline: give up
    finally:
        sock.close(linger=0)
        ctx.term()


def raw_block(sock: zmq.Socket, frames: list, nbytes: int, rounds: int,
              into: np.ndarray | None = None) -> float:
    """Seconds for ``rounds`` round trips of ``nbytes`` out and ``nbytes`` back; with
    ``into``, each answer is copied into it (as a worker copies a pull into its model)."""
    t0 = time.perf_counter()
    for _ in range(rounds):
        sock.send_multipart(frames, copy=False)
        if not sock.poll(int(REQUEST_TIMEOUT_S * 1000)):
            raise TimeoutError(f"raw peer silent for {REQUEST_TIMEOUT_S:.0f} s")
        answer = sock.recv_multipart(copy=False)
        got = sum(len(f.buffer) for f in answer)
        if got != nbytes:
            raise RuntimeError(f"raw peer answered {got} bytes, expected {nbytes}")
        if into is not None:
            transport.copy_into(into, [np.frombuffer(f.buffer, dtype=np.float32) for f in answer])
    return time.perf_counter() - t0


# -- the parameter server ------------------------------------------------------------
def ps_cluster(ctx, children: Children, n: int, servers: int, steps: int):
    """Start a scheduler and S servers; register as worker 0 of an n-float model."""
    common = ["--bind", "tcp://127.0.0.1:*", "--timeout-s", str(ROLE_TIMEOUT_S)]
    # This process sends no heartbeats while it times round trips: a liveness deadline as
    # long as the run keeps the scheduler from declaring it dead.
    sched_ep = children.start("scheduler", ["-m", "ps.scheduler", "--servers", str(servers),
                                            "--workers", "1", "--mode", "bsp",
                                            "--steps", str(steps), *common,
                                            "--dead-after-s", str(ROLE_TIMEOUT_S)])
    for k in range(servers):
        children.start(f"server{k}", ["-m", "ps.server", "--scheduler", sched_ep,
                                      "--shard", str(k), *common])
    scheduler = Peer(ctx, sched_ep, "scheduler")
    # One sample per step and one task per step: the push of task t completes step t, and
    # lr 0 keeps every value fixed however many steps run.
    reply, _ = scheduler.request(
        Kind.REGISTER, START_TIMEOUT_S, role="worker", worker=0, layout=[["w", [n]]],
        dataset_size=steps, batch_size=1, shuffle=False, optimizer={"name": "sgd", "lr": 0.0},
        epochs=None, seed=0)
    shards = [ShardInfo(s["index"], s["endpoint"], s["lo"], s["hi"]) for s in reply["shards"]]
    client = ShardClient(ctx, shards, worker=0, timeout_s=REQUEST_TIMEOUT_S,
                         incarnation=reply["inc"])
    return scheduler, client


def ps_block(client: ShardClient, flat: np.ndarray, grad: np.ndarray, step: int,
             rounds: int) -> float:
    """Seconds for ``rounds`` BSP steps from ``step`` on, each a push of all shards and
    the pull of the version it makes, sent behind it (as a worker does: the pull's
    reply leaves each server the moment its step completes). The block starts and ends
    holding version ``step``, then ``step + rounds``."""
    t0 = time.perf_counter()
    for t in range(step, step + rounds):
        client.push(grad, t, tasks=[t], samples=1, step_tasks=1, then_pull=t + 1)
        versions = client.pull_into(flat, t + 1, pending=client.ahead)
    elapsed = time.perf_counter() - t0
    if versions != [step + rounds] * len(client.shards):
        raise RuntimeError(f"shards at versions {versions}, expected {step + rounds}")
    return elapsed


def echo_peer(ctx, children: Children, name: str, work: bool) -> zmq.Socket:
    """A DEALER connected to a new ``raw-peer`` process (``--work``: echo+work)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(children.start(name, [SCRIPT, "raw-peer", "--timeout-s", str(ROLE_TIMEOUT_S),
                                       *(["--work"] if work else [])]))
    return sock


def transport_row(n: int, servers: int, rounds: int, repeats: int) -> dict:
    """One table row: raw, echo+work and ps blocks alternating on the same bytes, best of
    each."""
    steps = WARMUP_ROUNDS + repeats * rounds
    nbytes = 4 * n
    children, ctx = Children(), zmq.Context()
    try:
        raw = echo_peer(ctx, children, "raw_peer", work=False)
        work = echo_peer(ctx, children, "work_peer", work=True)
        scheduler, client = ps_cluster(ctx, children, n, servers, steps)
        flat = np.zeros(n, dtype=np.float32)               # (n,) the worker's parameters
        grad = np.ones(n, dtype=np.float32)                # (n,) the gradient it pushes
        client.init(flat)
        client.pull_into(flat, 0)                          # version 0, as a worker starts
        frames = transport.split(grad)                          # 8 MiB views, like a push
        raw_block(raw, frames, nbytes, WARMUP_ROUNDS)
        raw_block(work, frames, nbytes, WARMUP_ROUNDS, into=flat)
        ps_block(client, flat, grad, 0, WARMUP_ROUNDS)
        seconds, step = {"raw": [], "work": [], "ps": []}, WARMUP_ROUNDS
        for _ in range(repeats):
            seconds["raw"].append(raw_block(raw, frames, nbytes, rounds))
            seconds["work"].append(raw_block(work, frames, nbytes, rounds, into=flat))
            seconds["ps"].append(ps_block(client, flat, grad, step, rounds))
            step += rounds
        raw.send(b"")                                      # stop the echo peers
        work.send(b"")
        scheduler.request(Kind.DONE, REQUEST_TIMEOUT_S, worker=0, inc=client.inc)
        scheduler.request(Kind.FINISHED, REQUEST_TIMEOUT_S, worker=0, inc=client.inc)
        children.wait(["raw_peer", "work_peer", "scheduler",
                       *(f"server{k}" for k in range(servers))], EXIT_TIMEOUT_S)
    finally:
        ctx.destroy(linger=0)
        children.stop()
    moved = 2 * nbytes * rounds                            # per block: 4N pulled + 4N pushed
    best = {name: min(s) for name, s in seconds.items()}
    row = {"params": n, "servers": servers, "bytes_per_round": 2 * nbytes, "rounds": rounds,
           "repeats": repeats}
    for name in seconds:
        row[f"{name}_round_trips_per_s"] = rounds / best[name]
        row[f"{name}_gb_per_s"] = moved / best[name] / 1e9
        row[f"{name}_block_s"] = seconds[name]
    row.update(ps_over_raw=best["raw"] / best["ps"], work_over_raw=best["raw"] / best["work"],
               ps_over_work=best["work"] / best["ps"])
    return row


def run(args) -> tuple[list[dict], str]:
    rows = []
    for n in args.sizes:
        rounds = args.rounds or max(3, round(BLOCK_BYTES / (8 * n)))
        for servers in args.servers:
            rows.append(transport_row(n, servers, rounds, args.repeats))
            print(f"  {count(n)} x {servers} servers done", file=sys.stderr, flush=True)
    table = markdown(
        ["params", "servers", "MB / round trip", "rounds", "ps round trips/s", "ps GB/s",
         "raw GB/s", "echo+work GB/s", "ps / raw", "echo+work / raw", "ps / echo+work"],
        [[count(r["params"]), r["servers"], f"{r['bytes_per_round'] / 1e6:g}", r["rounds"],
          f"{r['ps_round_trips_per_s']:.1f}", f"{r['ps_gb_per_s']:.2f}",
          f"{r['raw_gb_per_s']:.2f}", f"{r['work_gb_per_s']:.2f}", f"{r['ps_over_raw']:.2f}",
          f"{r['work_over_raw']:.2f}", f"{r['ps_over_work']:.2f}"] for r in rows])
    note = (f"Best of {args.repeats} alternating raw / echo+work / ps blocks per row; a round "
            "trip moves 2 x 4N bytes (pull N float32 + push N float32). echo+work: the echo "
            "peer scans and updates the bytes as a server does, the sender copies the answer "
            "as a worker does; the ratio to it is what the protocol itself costs.")
    return rows, table + "\n\n" + note


def add_arguments(p) -> None:
    p.add_argument("--sizes", type=counts, default=None,
                   help="parameter counts, float32 (default 1M,10M,25M; --tiny: 100K)")
    p.add_argument("--servers", type=ints, default=[2], help="server counts (default 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"round trips per timed block (default: ~{BLOCK_BYTES / 1e9:.1f} GB "
                        "worth, at least 3; --tiny: 3)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"alternating timed blocks per row (default {REPEATS}; --tiny: 1)")


def resolve(args, p) -> None:
    args.sizes = args.sizes or ([100_000] if args.tiny else [10**6, 10**7, 25 * 10**6])
    args.rounds = args.rounds or (3 if args.tiny else None)
    args.repeats = args.repeats or (1 if args.tiny else REPEATS)


def add_raw_peer_arguments(p) -> None:
    p.add_argument("--endpoint-file", required=True)
    p.add_argument("--timeout-s", type=float, default=ROLE_TIMEOUT_S)
    p.add_argument("--work", action="store_true",
                   help="scan and update the received floats as a server does before answering")
