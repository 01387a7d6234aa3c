"""Finishing: the end of a run, as methods of the scheduler (mixed into ``Scheduler``).

Training ends when every live worker has said DONE and no task is left: their DONE
replies, held until then, are answered at once, and one of them (the lowest live id) is
the *finisher*, which writes the final parameters and says FINISHED; the scheduler then
tells the servers to stop (``Scheduler.on_heartbeat``), and exits once every server and
every live worker has said bye (``_leave_when_all_said_bye``). A run can also end early: a
worker's report that the job's own code raised (JOB_ERROR, ``ps.scheduler.joberror``)
fails it at once. Either way ``_summary`` is what ``summary.json`` holds.
"""
from __future__ import annotations

import time

from ps.faults import messages
from ps.scheduler import joberror, registration, summary
from ps.scheduler.config import crash_at
from ps.wire.protocol import Error, Kind, ProtocolError

DONE_GRACE_S = 0.75        # after answering DONE, the least time to stay: 3 Lazy Pirate resends


class Finishing:
    """DONE, FINISHED, JOB_ERROR and the summary (mixed into ``Scheduler``)."""

    def on_done(self, ident, header) -> None:
        self._check_training(header)
        if self.phase == "finishing":       # asked again of a restarted scheduler: answered
            return self.reply(ident, Kind.OK, header["rid"], finisher=header["worker"] == self.finisher)
        self.run.done(header["worker"])
        self.done_waiting.append((ident, header["rid"], header["worker"]))
        self._release_done()

    def _release_done(self) -> None:
        """Once every live worker is done and no task is left (a dead worker's tasks may
        have been dealt again to workers already waiting here), answer their DONE; one
        of them finishes the run."""
        if (self.phase != "training" or not self.done_waiting or not self.run.all_done()
                or self.dealer.unfinished()):
            return
        self.run.finish()
        waiting = {w for _, _, w in self.done_waiting}
        self.finisher = min(w for w in self.members.live("worker") if w in waiting)
        self.journal.phase("finishing", finisher=self.finisher, t_end=self.run.t_end)
        crash_at(self.config, "finishing")
        for ident, rid, worker in self.done_waiting:
            self.reply(ident, Kind.OK, rid, finisher=worker == self.finisher)
        self.done_waiting.clear()
        self.done_at = time.monotonic()
        self.phase = "finishing"
        self.deadline = time.monotonic() + self.config.timeout_s

    def on_finished(self, ident, header) -> None:
        if self.phase != "finishing" or header["worker"] != self.finisher:
            raise ProtocolError(Error.NOT_READY, f"FINISHED from worker {header['worker']} "
                                                 f"in phase {self.phase}")
        self.run.note_bytes(header["worker"], header["inc"], *registration.bytes_moved(header))
        self.journal.phase("stopping")
        self.reply(ident, Kind.OK, header["rid"])
        self.phase = "stopping"
        self.deadline = time.monotonic() + self.config.timeout_s

    def _leave_when_all_said_bye(self) -> None:
        """Once every server said bye, exit: at once if every live worker said bye too
        (each heard its DONE answer), else DONE_GRACE_S after answering DONE (a worker
        whose answer was lost asks again, and must find it answered)."""
        if self.phase != "stopping" or len(self.byes) < self.config.servers:
            return
        workers = self.members.members
        gone = all((w, workers[("worker", w)].inc) in self.worker_byes
                   for w in self.members.live("worker"))
        self.exit_at = time.monotonic() if gone else max(time.monotonic(), self.done_at + DONE_GRACE_S)

    def on_job_error(self, ident, header) -> None:
        """A worker's job code raised: the first report ends the run (``ps.scheduler.joberror``)."""
        record = joberror.admit(header, self.config.workers, self.phase, self.failure,
                                self.members)
        if record is not None:
            self.job_error = record
            self.fail(joberror.describe(record), linger_s=joberror.LINGER_S)
        self.reply(ident, Kind.OK, header["rid"], first=record is not None)

    def _summary(self) -> dict:
        """The run's summary.json (one that failed before it formed: the settings and why)."""
        if self.run is None:
            return summary.unformed(self.config, self.failure, self.job_error)
        return summary.build(
            self.config, self.run, self.dealer, self.shard_stats, failure=self.failure,
            deaths=self.failover.deaths, rejoins=self.failover.rejoins, recovery=self.recovery,
            restarts=self.reform.restarts if self.reform else [], job_error=self.job_error,
            net_faults=summary.net_faults(messages.counts(), self.shard_stats,
                                          self.worker_net_faults))
