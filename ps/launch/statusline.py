"""The launcher's live status line, drawn from the scheduler's STATUS replies.

``ps.launch.launcher.run`` asks the scheduler for STATUS a few times a second and shows
``status_line`` of the answer through ``StatusLine``: redrawn in place on a
terminal, or one line every LOG_STATUS_INTERVAL_S into a log. ``Cluster`` calls
``end`` before it prints, so a message never lands in the middle of the line.
"""
from __future__ import annotations

import sys
import time

LOG_STATUS_INTERVAL_S = 5.0      # when stderr is not a terminal, one status line this often


def status_line(s: dict, mode: str) -> str:
    """The text of the line for one STATUS reply."""
    if s["phase"] == "forming":
        return f"[{mode}] forming the cluster: waiting for every server and worker to register"
    loss = f"{s['loss']:.4f}" if s.get("loss") is not None else "-"
    return (f"[{mode}] step {s.get('step', 0)}/{s.get('steps', '?')}  loss {loss}  "
            f"{s.get('samples_per_s', 0.0):,.0f} samples/s  max staleness {s.get('max_staleness', 0)}")


class StatusLine:
    """One line redrawn in place on a terminal; a line every few seconds into a log."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last, self.last_t, self.drawn = "", 0.0, False

    def show(self, text: str) -> None:
        if self.quiet or text == self.last:
            return
        if self.tty:
            print(f"\r{text:<90}", end="", file=sys.stderr, flush=True)
            self.drawn = True
        elif time.monotonic() - self.last_t >= LOG_STATUS_INTERVAL_S:
            print(text, file=sys.stderr, flush=True)
            self.last_t = time.monotonic()
        self.last = text

    def end(self) -> None:
        if self.drawn:
            print(file=sys.stderr)
            self.drawn = False
