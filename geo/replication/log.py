"""The read-only log interface the state machine needs, and an in-memory disk for tests/sim."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Protocol

from geo.replication.messages import Entry, Persist


class InvariantError(AssertionError):
    """A protocol invariant does not hold: a bug (or a deliberately broken variant).

    Raised explicitly (not with ``assert``) so that ``python -O`` keeps the checks.
    """


def check(cond: bool, what: str) -> None:
    if not cond:
        raise InvariantError(what)


class LogView(Protocol):
    """Read-only view of the node's durable log (LMDB ``log`` database in the shell).

    It must reflect every :class:`Persist` the shell has acknowledged with ``on_persisted``;
    it may already reflect later writes (applied but not yet acknowledged), never a write
    out of order. The machine masks not-yet-acknowledged positions with its own copy.
    """

    def last_position(self) -> int:
        """Highest position in the log, 0 when empty."""
        ...

    def term_at(self, position: int) -> int:
        """Term of the entry at ``position`` (1 <= position <= last); 0 for position 0."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int) -> Sequence[Entry]:
        """Entries ``lo..hi`` (inclusive, 1 <= lo <= hi <= last) in order, stopping before
        the first one that would take the payload total above ``max_bytes`` (but always
        at least one)."""
        ...


_PAYLOAD = operator.attrgetter("payload")


def within_bytes(entries: list[Entry], max_bytes: int) -> list[Entry]:
    """The longest prefix of ``entries`` whose payloads total at most ``max_bytes``, but
    at least one entry. Usually all of them, found in one C-level pass."""
    if sum(map(len, map(_PAYLOAD, entries))) <= max_bytes:
        return entries
    total = 0
    for i, e in enumerate(entries):
        total += len(e.payload)
        if i and total > max_bytes:
            return entries[:i]
    return entries


class MemoryLog:
    """A :class:`LogView` over a list, plus the durable metadata the shell keeps in ``meta``.

    ``apply`` executes a :class:`Persist` effect atomically; the simulator uses one per node
    as its "disk" and loses only the writes it had not applied yet when a node crashes.
    """

    __slots__ = ("_entries", "commit", "promised_term", "promised_to", "rejoin_term")

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self.promised_term = 0
        self.promised_to = ""  # meta.promised_to: "" when not known (e.g. a wiped voter)
        self.commit = 0
        self.rejoin_term = 0  # meta.rejoin_term: set by the shell for a wiped voter

    def last_position(self) -> int:
        return len(self._entries)

    def term_at(self, position: int) -> int:
        if position == 0:
            return 0
        if not 1 <= position <= len(self._entries):
            raise InvariantError(f"term_at({position}) out of range")
        return self._entries[position - 1].term

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        if not 1 <= lo <= hi <= len(self._entries):
            raise InvariantError(f"entries({lo}, {hi}) out of range")
        return within_bytes(self._entries[lo - 1 : hi], max_bytes)

    def entry(self, position: int) -> Entry:
        return self._entries[position - 1]

    def apply(self, p: Persist) -> None:
        check(p.promised_term >= self.promised_term, "promised_term decreased on disk")
        check(p.promised_term > self.promised_term or p.promised_to == self.promised_to
              or not self.promised_to,
              f"term {p.promised_term} promised to {self.promised_to!r}, then to "
              f"{p.promised_to!r}")
        if p.truncate_after is not None:
            check(p.truncate_after >= self.commit, "truncating below the persisted commit")
            del self._entries[p.truncate_after :]
        for e in p.entries:
            check(e.position == len(self._entries) + 1, "gap in persisted entries")
            self._entries.append(e)
        self.promised_term = p.promised_term
        self.promised_to = p.promised_to
