"""Membership: who is in the cluster, which incarnation, and who has gone silent.

Every process that registers gets an **incarnation**: a number never given out
twice in a run. Every message a worker sends carries it. A member silent for longer
than ``dead_after_s`` is declared dead (the Paranoid Pirate pattern: liveness is
judged from heartbeats and any other traffic, never from a socket's state) and its
incarnation is **fenced**: servers refuse it from then on, so a process that was
paused and wakes up cannot push stale work. A replacement registers afresh and gets
a new incarnation under the same worker id.

After a scheduler restart (``ps.reliability.scheduler_restart``) the members are rebuilt from the journal
but not yet **confirmed**: a request from one is refused with ``Error.REREGISTER``
until it registers again with the incarnation it has (``register_again``). Incarnations
go on from above every one in the journal, so none is ever handed out twice.

Pure bookkeeping; the scheduler feeds it the time.
"""
from __future__ import annotations

from dataclasses import dataclass

from ps.wire.protocol import DEAD_AFTER_S, Error, ProtocolError


@dataclass
class Member:
    role: str                  # "server" | "worker"
    index: int                 # shard index or worker id
    inc: int                   # incarnation
    last_seen: float
    alive: bool = True
    confirmed: bool = True     # False: known from the journal, not re-registered yet


class Membership:
    def __init__(self, dead_after_s: float = DEAD_AFTER_S, next_inc: int = 1):
        self.dead_after_s = dead_after_s
        self.members: dict[tuple[str, int], Member] = {}
        self.fenced: list[list[int]] = []     # [worker id, incarnation] of every retired worker
        self._next_inc = next_inc

    def join(self, role: str, index: int, now: float) -> Member:
        """A (re)registration: a fresh incarnation for (role, index)."""
        member = Member(role, index, self._next_inc, now)
        self._next_inc += 1
        self.members[(role, index)] = member
        return member

    def restore(self, role: str, index: int, inc: int, now: float) -> Member:
        """A member known from the journal: alive, its silence timed from ``now``, and
        unconfirmed until it registers again."""
        member = Member(role, index, inc, now, confirmed=False)
        self.members[(role, index)] = member
        self._next_inc = max(self._next_inc, inc + 1)
        return member

    def register_again(self, role: str, index: int, inc: int, now: float) -> Member:
        """A member registers again with its incarnation (the scheduler restarted)."""
        member = self.members.get((role, index))
        if member is None or member.inc != inc or not member.alive:
            raise ProtocolError(Error.FENCED, f"{role} {index} incarnation {inc} is not a live member")
        member.confirmed, member.last_seen = True, now
        return member

    def seen(self, role: str, index: int, inc: int, now: float) -> Member:
        """Any message from a member: it is alive. A retired incarnation is refused; one
        a restarted scheduler has not heard from yet is asked to register again."""
        member = self.members.get((role, index))
        if member is None or member.inc != inc or not member.alive:
            raise ProtocolError(Error.FENCED, f"{role} {index} incarnation {inc} is not a live member")
        if not member.confirmed:
            raise ProtocolError(Error.REREGISTER, f"the scheduler restarted: {role} {index} "
                                                  f"must register again (incarnation {inc})")
        member.last_seen = now
        return member

    def overdue(self, now: float) -> list[Member]:
        """Live members silent for longer than dead_after_s."""
        return [m for m in self.members.values()
                if m.alive and now - m.last_seen > self.dead_after_s]

    def retire(self, member: Member) -> None:
        member.alive = False
        if member.role == "worker":
            self.fenced.append([member.index, member.inc])

    def live(self, role: str) -> list[int]:
        return sorted(m.index for m in self.members.values() if m.role == role and m.alive)

    def is_fenced(self, role: str, index: int, inc: int) -> bool:
        member = self.members.get((role, index))
        return member is None or member.inc != inc or not member.alive
