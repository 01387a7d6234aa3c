"""A shard's state and rules: its parameters, the consistency gate, exactly-once pushes.

``Shard`` is the pure core of a server: no sockets, just numpy. The event loop in
``ps.server`` receives and validates a message, then calls ``push`` / ``pull_ready``
here. Invariants:

* **Exactly once**: a task's gradient is applied at most once. A push naming a task
  id this shard has already taken, or (BSP) a step it has already completed, is
  rejected and counted in ``duplicates_rejected``; nothing changes.
* **BSP**: gradients of step ``t`` are summed into one aggregation buffer; when every
  task of the step has arrived the optimizer runs once on ``sum / samples`` (the
  sample-weighted mean over the global batch) and ``version`` becomes ``t + 1``. How
  many tasks the step has is what its first push says; a later push that disagrees is
  refused. A push that holds every task of its step is not copied in: the optimizer
  reads it.
  A pull for step ``t`` is answered once ``version >= t``.
* **SSP(s)**: each push is applied on arrival as the mean over its own samples and
  moves its worker's clock to ``step + 1``. A pull at clock ``c`` is answered once
  every worker's clock is at least ``c - s``: no read misses more than s clocks.
* **ASP**: pushes applied on arrival, pulls answered at once.
* **Async DiLoCo** is SSP (or ASP) whose clocks are a worker's rounds and whose pushes
  are pseudo-gradients: each is applied as ``1 / pushes_per_round`` of a round's mean
  (the mean over its own samples, divided by the workers M), so M pushes of equal
  samples move the shard as one synchronous round's mean does.
* **Fencing**: a worker incarnation declared dead is retired; its pushes and pulls are
  refused, and (SSP) its clock no longer holds anyone back, until a new incarnation
  of that worker pushes.
* **BSP keeps the previous version, in the aggregation buffer**: if a worker dies
  after its push reached some shards but not others, a shard may complete step t
  while another waits for the task, which is then computed again on version t. The
  optimizer step leaves version t in ``grad`` (chunk by chunk, once each chunk's
  gradient is read), and a pull for it is answered from there until the first push
  of step t+1 overwrites it. That push means its worker pulled version t+1 from every
  shard, so every shard has completed step t and no task of step t is left to redo:
  a pull for version t is then answered ``gone``. Exact replay costs no extra copy.

* **A learning-rate schedule** (a job's ``lr_at``) arrives as a table, one rate per
  version (``set_schedule``); each update uses the rate of the version it starts from:
  BSP's step ``t`` the rate of ``t``, an SSP/ASP push that of the shard's update count.
* **Clipping to a global norm (BSP)**: the norm is that of the whole step's mean
  gradient, across every shard, so a complete step is not applied at once: the shard
  holds it (``norm_wait``) with its part of the squared norm (``partial_sumsq``) until
  the server has learnt the total from the scheduler (``finish_step``). Pulls of the
  next version wait meanwhile, as for any unfinished step.

Staleness of a read at step/clock ``c`` is ``c - min(worker clocks)``: how many
clocks of some worker's updates it may be missing. The largest is kept.
"""
from __future__ import annotations

import numpy as np

from ps.core.compress import add_into, decode_into, wire_dtype
from ps.core.optim import CHUNK, make_optimizer
from ps.wire.protocol import Error, ProtocolError
from ps.wire.transport import copy_into

MODES = ("bsp", "ssp", "asp")


def readable_in_place(chunks: list[np.ndarray]) -> bool:
    """May the optimizer read a push's frames as they arrived? float32, and no frame but
    the last smaller than one of its chunks: its loop runs once per chunk and at least once
    per piece, so a sender of thousands of tiny frames would otherwise multiply it."""
    return (all(c.dtype == np.float32 for c in chunks)
            and all(c.size >= CHUNK for c in chunks[:-1]))


class Shard:
    def __init__(self, size: int, optimizer: dict, mode: str, staleness: int, num_workers: int,
                 segments: list | None = None, clip: float | None = None,
                 lr_versions: int | None = None, pushes_per_round: int = 1):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.size = size
        self.mode = mode
        self.staleness = staleness
        self.params: np.ndarray | None = None            # (size,) float32, set by init()
        self.optimizer = make_optimizer(optimizer, size, segments=segments)   # segments:
                                                         # parameter groups (param_groups.Grouped)
        self.grad = np.zeros(size, dtype=np.float32)     # BSP: the step's sum; else scratch
        self.grad_is_prev = False                        # BSP: grad holds version - 1's params
        self.version = 0                                 # optimizer updates applied
        self.clocks = [0] * num_workers                  # per worker: last pushed step + 1
        self.step_tasks_seen: set[int] = set()           # BSP: task ids summed into self.grad
        self.step_total = 0                              # BSP: tasks in the step, per its first push
        self.step_samples = 0
        self.applied: set[int] = set()                   # SSP/ASP: every task id applied
        self.duplicates_rejected = 0
        self.max_staleness = 0
        self.pushes_applied = 0
        self.tasks_applied = 0                           # task ids of those pushes, each time:
                                                         # a task applied twice counts twice
        self.fenced: set[int] = set()                    # retired incarnations
        self.dead: set[int] = set()                      # workers whose clocks gate nobody
        self.fenced_rejected = 0
        self.clip = clip if mode == "bsp" else None      # BSP: the global norm's bound
        self.norm_wait: int | None = None                # BSP: the step held for its norm
        self.norm_scratch = np.empty(min(size, CHUNK) if self.clip else 0, np.float32)
        self.partial_sumsq = 0.0                         # its part of the squared norm
        self.lr_versions = lr_versions                   # a schedule's length, if the job has one
        self.lr_table: np.ndarray | None = None          # (lr_versions,) float64, once sent
        self.clipped_steps = 0                           # steps whose gradient clipping shrank
        self.pushes_per_round = pushes_per_round         # SSP/ASP: a push is this share of
                                                         # an update (async DiLoCo: M)

    # -- initial values -------------------------------------------------------------
    def init(self, chunks: list[np.ndarray]) -> bool:
        """Set initial parameters once; later calls (retries, other workers) are no-ops."""
        if self.params is not None:
            return False
        if sum(c.size for c in chunks) != self.size:
            raise ProtocolError(Error.BAD_PAYLOAD, f"initial values must have {self.size} floats")
        self.params = np.empty(self.size, dtype=np.float32)
        copy_into(self.params, chunks)
        return True

    def restore(self, params: np.ndarray, optimizer_state: dict, version: int) -> None:
        """Start from a checkpoint: parameters and optimizer state at ``version``."""
        if params.size != self.size:
            raise ValueError(f"checkpoint slice has {params.size} floats, shard holds {self.size}")
        self.params = params.astype(np.float32, copy=True)
        self.optimizer.load_state(optimizer_state)
        self.version = version
        self.clocks = [version] * len(self.clocks)
        self.grad_is_prev = False           # version - 1 is not in a checkpoint: gone
        self.norm_wait = None

    def set_schedule(self, table: np.ndarray) -> bool:
        """The job's learning rate for each version (``lr_at``), sent by every worker as
        it starts; the first sets it, a later one must be the same table."""
        if self.lr_versions is None or table.shape != (self.lr_versions,):
            raise ProtocolError(Error.BAD_FIELD, f"this run's schedule has "
                                                 f"{self.lr_versions or 0} rates, not {table.size}")
        if self.lr_table is not None:
            if not np.array_equal(self.lr_table, table):
                raise ProtocolError(Error.BAD_FIELD, "a schedule differing from the one set")
            return False
        self.lr_table = table.copy()
        return True

    def _schedule(self) -> None:
        """Before an update: the rate of the version it starts from (the last one past the
        table's end, which a run's own pushes never reach)."""
        if self.lr_table is not None:
            self.optimizer.set_lr(float(self.lr_table[min(self.version, self.lr_table.size - 1)]))

    # -- membership -----------------------------------------------------------------
    def fence(self, worker: int, incarnation: int) -> None:
        """Retire a dead incarnation: its messages are refused from now on."""
        self.fenced.add(incarnation)
        if 0 <= worker < len(self.clocks):
            self.dead.add(worker)

    def check_live(self, incarnation: int) -> None:
        if incarnation in self.fenced:
            self.fenced_rejected += 1
            raise ProtocolError(Error.FENCED, f"incarnation {incarnation} was declared dead")

    # -- pushes ---------------------------------------------------------------------
    def push(self, worker: int, step: int, tasks: list[int], samples: int, step_tasks: int,
             chunks: list[np.ndarray], incarnation: int = 0, ends_clock: bool = True,
             last: bool = False) -> bool:
        """Apply (or, in BSP, aggregate) one push. Returns False for a rejected duplicate.

        ``chunks`` are read-only views of the received frames, in order, together
        ``size`` floats (or empty when ``samples`` is 0: an SSP clock tick).
        ``ends_clock`` False: the push does not finish the sender's clock ``step``.
        ``last`` (SSP): the sender has no round of its own left (async DiLoCo's workers end
        at different clocks): from now on its clock holds nobody back, as a dead one's.
        """
        self._check(worker, tasks, samples, chunks)
        self.check_live(incarnation)
        self.dead.discard(worker)           # a live incarnation of this worker is back
        if self.mode == "bsp":
            return self._push_bsp(step, tasks, samples, step_tasks, chunks)
        if any(t in self.applied for t in tasks):
            self.duplicates_rejected += 1
            return False
        if samples:                         # the mean over the push's own samples
            self._schedule()
            self.optimizer.step(self.params, self._as_float32(chunks),
                                divide_by=samples * self.pushes_per_round)
            self.version += 1
        self.applied.update(tasks)
        self.tasks_applied += len(tasks)
        if ends_clock:                      # a task dealt again is pushed mid-clock, alone
            self.clocks[worker] = max(self.clocks[worker], step + 1)
        if last:
            self.dead.add(worker)
        self.pushes_applied += 1
        return True

    def _push_bsp(self, step, tasks, samples, step_tasks, chunks) -> bool:
        if step < self.version or any(t in self.step_tasks_seen for t in tasks):
            self.duplicates_rejected += 1
            return False
        if step > self.version:
            raise ProtocolError(Error.BAD_FIELD, f"push for step {step}, shard is at {self.version}")
        first = not self.step_tasks_seen
        if not first and step_tasks != self.step_total:     # every push of a step agrees
            raise ProtocolError(Error.BAD_FIELD, f"step {step} has {self.step_total} tasks, "
                                                 f"not {step_tasks}")
        if len(self.step_tasks_seen) + len(tasks) > step_tasks:
            raise ProtocolError(Error.BAD_FIELD, f"more than {step_tasks} tasks in step {step}")
        complete = len(self.step_tasks_seen.union(tasks)) == step_tasks   # the global batch
        if first and complete and readable_in_place(chunks) and self.clip is None:
            # The whole step in one push: the update reads the received frames where they
            # are, and the aggregation buffer is only written with the kept version. Saves
            # a pass over the shard: 1.4 ms of a 5M-float push (copy 1.4 ms, update with
            # the previous version kept 3.3 ms, one core, warm caches).
            self._count(tasks, samples, step_tasks)
            self._step_done(list(chunks))
            return True
        # Otherwise the step's first push is copied in, later ones added in place: no
        # temporaries, and no pass to zero the buffer between steps. Every check is above
        # this line: a refused push (a late duplicate of the completed step) leaves the
        # previous version intact; the first accepted one of the next step overwrites it.
        if first and chunks:
            self.grad_is_prev = False
        offset = 0
        for chunk in chunks:      # float16/bfloat16 pushes are decoded in the same pass
            part, dtype = self.grad[offset:offset + chunk.size], wire_dtype(chunk)
            decode_into(part, chunk, dtype) if first else add_into(part, chunk, dtype)
            offset += chunk.size
        self._count(tasks, samples, step_tasks)
        if complete and self.clip is not None:
            self._hold_for_norm(step)
        elif complete:
            self._step_done(self.grad)
        return True

    def _count(self, tasks, samples, step_tasks) -> None:
        """BSP: the push's tasks and samples are in the step (of ``step_tasks`` tasks)."""
        self.step_total = step_tasks
        self.step_tasks_seen.update(tasks)
        self.step_samples += samples
        self.pushes_applied += 1
        self.tasks_applied += len(tasks)

    def _hold_for_norm(self, step: int) -> None:
        """BSP with clipping: the step is complete here; hold it, with this shard's part of
        the squared norm of the mean gradient (the float32 mean the update computes,
        squared, summed in float64), until ``finish_step`` brings the total."""
        total = 0.0
        for lo in range(0, self.size, CHUNK):
            part = self.grad[lo:lo + CHUNK]
            mean = np.divide(part, self.step_samples, out=self.norm_scratch[:part.size])
            # Squares in float32, summed in float64 (numpy's own loop: np.dot would call
            # BLAS, whose threads spin and, on a machine as busy as the workers make it,
            # stalled this pass for up to a second, measured: scripts/bench/clip.py).
            total += float(np.multiply(mean, mean, out=mean).sum(dtype=np.float64))
        self.norm_wait, self.partial_sumsq = step, total

    def finish_step(self, step: int, total_norm: float, skip: bool = False) -> bool:
        """BSP with clipping: the global norm of step ``step`` is known; apply the step
        with torch's ``clip_coef = max_norm / (total_norm + 1e-6)``, clamped at 1, both in
        float32 as torch computes them. ``skip``: the norm was not finite and the servers'
        ``--nonfinite skip`` applies the step as a zero gradient. False: not the step held
        (a repeated answer)."""
        if self.norm_wait != step:
            return False
        if skip:
            self.grad.fill(0)
        coef = np.float32(self.clip) / (np.float32(total_norm) + np.float32(1e-6))
        coef = min(coef, np.float32(1.0)) if not skip else np.float32(1.0)
        self.clipped_steps += bool(coef < 1)
        self.norm_wait = None
        self._step_done(self.grad, scale=float(coef))
        return True

    def _step_done(self, grad, scale: float = 1.0) -> None:
        """BSP: the step's sum is in ``grad`` (the buffer, or one push's frames). One pass:
        the sample-weighted mean (times a clipping ``scale``), the update, and this
        version's parameters left behind in the aggregation buffer (ps.core.optim,
        ``keep``)."""
        self._schedule()
        self.optimizer.step(self.params, grad, divide_by=self.step_samples, keep=self.grad,
                            scale=scale)
        self.grad_is_prev = True
        self.step_tasks_seen.clear()
        self.step_samples = 0
        self.version += 1
        self.clocks = [self.version] * len(self.clocks)

    def _as_float32(self, chunks) -> list[np.ndarray]:
        """SSP/ASP: the push's chunks as float32 pieces: as received, or decoded (float16,
        bfloat16) or gathered (many small frames) into the scratch buffer."""
        if readable_in_place(chunks):
            return list(chunks)
        copy_into(self.grad, chunks)
        return [self.grad]

    def _check(self, worker, tasks, samples, chunks) -> None:
        """Refuse a malformed push before looking at state (cheapest, most certain first)."""
        if not 0 <= worker < len(self.clocks):
            raise ProtocolError(Error.UNKNOWN_SENDER, f"no worker {worker}")
        if samples < 0 or (samples > 0) != bool(tasks):
            raise ProtocolError(Error.BAD_FIELD, "samples must be > 0 exactly when tasks are named")
        if sum(c.size for c in chunks) != (self.size if samples else 0):
            raise ProtocolError(Error.BAD_PAYLOAD, f"a gradient of {self.size} floats must come "
                                                   "with samples > 0, and only then")
        if self.params is None:
            raise ProtocolError(Error.NOT_READY, "shard has no parameters yet")
        if self.lr_versions is not None and self.lr_table is None:
            raise ProtocolError(Error.NOT_READY, "shard has no learning-rate schedule yet")

    # -- pulls ----------------------------------------------------------------------
    def pull_ready(self, step: int) -> bool:
        """May a read at ``step`` (BSP: version wanted; SSP: the reader's clock) be answered?"""
        if self.params is None:
            return False
        if self.mode == "bsp":
            return self.version >= step
        if self.mode == "ssp":
            return self.min_clock(step) >= step - self.staleness
        return True

    def min_clock(self, default: int) -> int:
        """The slowest live worker's clock (dead workers hold nobody back)."""
        return min((c for w, c in enumerate(self.clocks) if w not in self.dead), default=default)

    def params_for(self, step: int) -> tuple[np.ndarray, int]:
        """The buffer answering a ready read at ``step``, and its version.

        BSP answers exactly version ``step``: the live buffer, or the aggregation buffer
        while it still holds the previous version (until the next step's first push).
        """
        if self.mode != "bsp" or step >= self.version:
            return self.params, self.version
        if step == self.version - 1 and self.grad_is_prev:
            return self.grad, step
        raise ProtocolError(Error.GONE, f"version {step} is gone; this shard holds version "
                                        f"{self.version}" + (" and the one before"
                                                             if self.grad_is_prev else ""))

    def unshare(self) -> int:
        """Copy-on-write, for a server whose pull replies may still be sending from this
        shard's arrays: give the parameters, and the aggregation buffer while it holds
        the previous version, fresh copies, so the next push cannot change bytes in
        flight. Returns the bytes copied."""
        self.params = self.params.copy()
        if not self.grad_is_prev:
            return self.params.nbytes
        self.grad = self.grad.copy()
        return self.params.nbytes + self.grad.nbytes

    def waiting(self, step: int) -> str:
        """Why a read at ``step`` is not answered yet, for a log line (ps.scheduler.diagnose)."""
        if self.params is None:
            return "no initial values yet (INIT)"
        if self.norm_wait is not None:
            return (f"step {self.norm_wait} complete, waiting for its global gradient norm "
                    "(NORM, from the scheduler)")
        if self.lr_versions is not None and self.lr_table is None:
            return "no learning-rate schedule yet (SCHEDULE)"
        if self.mode == "bsp":
            return (f"at version {self.version}, has tasks {sorted(self.step_tasks_seen)} of step "
                    f"{self.version}")
        behind = [w for w, c in enumerate(self.clocks)
                  if w not in self.dead and c < step - self.staleness]
        return f"clocks {self.clocks}: waiting for workers {behind} to reach clock {step - self.staleness}"

    def note_read(self, step: int) -> int:
        """Record the staleness of a read being answered now; return it."""
        stale = 0 if self.mode == "bsp" else max(0, step - self.min_clock(step))
        self.max_staleness = max(self.max_staleness, stale)
        return stale

    def state_bytes(self) -> dict[str, int]:
        """Bytes of every array this shard holds, by name: ``params``, ``aggregation``
        (BSP: the step's sum, then the previous version; SSP/ASP: a float16/bfloat16
        push, decoded), ``optimizer.<state>`` and ``scratch`` (the optimizer's, a
        constant per shard)."""
        held = {"params": self.params.nbytes if self.params is not None else 0,
                "aggregation": self.grad.nbytes}
        for name, nbytes in self.optimizer.state_bytes().items():
            held[name if name == "scratch" else f"optimizer.{name}"] = nbytes
        return held

    def stats(self) -> dict:
        return {"version": self.version, "pushes_applied": self.pushes_applied,
                "tasks_applied": self.tasks_applied,
                "duplicates_rejected": self.duplicates_rejected,
                "max_staleness": self.max_staleness, "clocks": list(self.clocks),
                "fenced_rejected": self.fenced_rejected, "dead": sorted(self.dead),
                "clipped_steps": self.clipped_steps,          # BSP: steps clipping shrank
                "step_tasks": sorted(self.step_tasks_seen),   # BSP: the current step's tasks in
                "state_bytes": self.state_bytes()}            # what this shard holds, by array
