"""Records exchanged by the replication state machine: log entries, peer messages, effects.

Everything here is plain, immutable data (frozen dataclasses; entries are named tuples)
so that the shell can map it one-to-one onto protobuf messages and the simulator can copy,
drop, duplicate and reorder it freely. See :mod:`geo.replication.core` for the rules that
produce and consume them.

Conventions shared by all peer messages:

* ``src`` / ``dst`` are node ids (strings, as in the cluster configuration).
* ``term`` is the term of the *request* the message belongs to (a reply echoes the term of the
  request it answers, so a leader can drop replies from another of its terms).
* ``higher_term`` on a reply is 0, or the responder's promised term when the request was
  fenced: above ``term``, or equal to it when the responder promised that term to another
  node (the term was granted twice, see ``core`` rule 1). Either way the requester must
  step down.
* ``rejoining`` on a reply: the responder is a voter that lost its disk and has not caught
  up yet (see ``core``): its ack and its promise must not be counted.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

NodeId = str


class Entry(NamedTuple):
    """One log record: dense ``position`` from 1, the ``term`` it was first appended in.
    A tuple, not a frozen dataclass: one is made per record on every node, and a tuple
    is made in half the time."""

    position: int
    term: int
    payload: bytes


# Entry fields for C-level passes over many entries: map(ENTRY_TERM, entries).
ENTRY_POSITION = operator.itemgetter(0)
ENTRY_TERM = operator.itemgetter(1)
ENTRY_PAYLOAD = operator.itemgetter(2)


def entries_of(first: int, terms: Iterable[int], payloads: Iterable[bytes]) -> list[Entry]:
    """Entries at positions first.. (as many as both iterables hold), made without a
    Python call per entry (tuple.__new__ over zipped fields: 110 ns each, not 280)."""
    return list(map(tuple.__new__, itertools.repeat(Entry),
                    zip(itertools.count(first), terms, payloads)))


@dataclass(slots=True, frozen=True)
class Tip:
    """The last (term, position) of a log; ordered the way elections compare logs."""

    term: int
    position: int

    def key(self) -> tuple[int, int]:
        return (self.term, self.position)


# --------------------------------------------------------------------------------------------
# peer messages


@dataclass(slots=True, frozen=True)
class Promise:
    """New leader of ``term`` -> voter: persist ``promised_term = term`` and
    ``promised_to = src``, then reply."""

    src: NodeId
    dst: NodeId
    term: int


@dataclass(slots=True, frozen=True)
class PromiseReply:
    """Voter -> leader, sent only once the promise is durable. ``tip`` is the voter's log."""

    src: NodeId
    dst: NodeId
    term: int
    ok: bool
    tip: Tip
    higher_term: int = 0
    rejoining: bool = False


@dataclass(slots=True, frozen=True)
class Append:
    """Leader -> follower: ``entries`` follow (prev_pos, prev_term); also carries ``commit``.

    With no entries it is a heartbeat (and a commit-position carrier).
    """

    src: NodeId
    dst: NodeId
    term: int
    prev_pos: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(slots=True, frozen=True)
class AppendReply:
    """Follower -> leader.

    ``ok``: the follower's log matches the leader's up to ``match`` and that prefix is durable.
    not ``ok``: (prev_pos, prev_term) did not match; ``rejected`` echoes prev_pos and
    (hint_pos, hint_term) is the follower's last position whose term is <= prev_term, so the
    leader can back up over a whole divergent term in one round trip (etcd-raft's
    findConflictByTerm).
    """

    src: NodeId
    dst: NodeId
    term: int
    ok: bool
    match: int = 0
    rejected: int = 0
    hint_pos: int = 0
    hint_term: int = 0
    higher_term: int = 0
    rejoining: bool = False


@dataclass(slots=True, frozen=True)
class Fetch:
    """Recovering leader -> the promiser with the most up-to-date log: send what follows
    (prev_pos, prev_term), at most ``max_entries`` / ``max_bytes``."""

    src: NodeId
    dst: NodeId
    term: int
    prev_pos: int
    prev_term: int
    max_entries: int
    max_bytes: int


@dataclass(slots=True, frozen=True)
class FetchReply:
    """Answer to :class:`Fetch`; same hint semantics as :class:`AppendReply`."""

    src: NodeId
    dst: NodeId
    term: int
    ok: bool
    prev_pos: int
    entries: tuple[Entry, ...] = ()
    hint_pos: int = 0
    hint_term: int = 0
    higher_term: int = 0


Message = Promise | PromiseReply | Append | AppendReply | Fetch | FetchReply


# --------------------------------------------------------------------------------------------
# effects (outputs the shell executes)


@dataclass(slots=True, frozen=True)
class Send:
    """Deliver ``msg`` to ``msg.dst``. Best effort: loss, duplication and reordering are fine."""

    msg: Message


@dataclass(slots=True, frozen=True)
class Persist:
    """One atomic, durable write (one LMDB write transaction ending in fsync).

    In this order, all-or-nothing: if ``truncate_after`` is not None delete every position
    above it; append ``entries`` (their positions follow on gaplessly); set
    ``promised_term`` and ``promised_to`` (the node that term is promised to, "" when not
    known yet: Raft's votedFor; it changes only with the term, or from ""). Writes must be
    applied in ``seq`` order; when the write with ``seq`` is durable, call
    ``Node.on_persisted(seq)`` (acknowledgements are cumulative: one call acknowledges every
    lower seq too, so consecutive writes may share one transaction).
    """

    seq: int
    truncate_after: int | None
    entries: tuple[Entry, ...]
    promised_term: int
    promised_to: NodeId = ""


@dataclass(slots=True, frozen=True)
class Committed:
    """Every position <= ``upto`` is committed by a quorum and durable on this node.

    Leader: answer the clients whose proposals are at positions <= upto. Everyone: reads and
    subscriptions may now see positions <= upto. The value may be persisted lazily in meta.
    """

    upto: int


@dataclass(slots=True, frozen=True)
class LeaderOpen:
    """The term-start record at ``start_position`` is committed: accept client writes."""

    term: int
    start_position: int


@dataclass(slots=True, frozen=True)
class SteppedDown:
    """This node stopped leading ``term``: refuse writes, fail every client proposal not yet
    answered with an 'unknown outcome' status (it may still commit under the next leader),
    and resign the etcd key / revoke the lease if still held."""

    term: int
    reason: str


@dataclass(slots=True, frozen=True)
class Rejoined:
    """A rejoining voter is whole again: it durably holds the committed log up to
    ``position``, whose entry is of ``term`` (>= the term it was fenced at). From now on it
    acks and promises as a voter. Persist the end of the rejoin (lazily: until then a
    restart recomputes it from the log)."""

    position: int
    term: int


@dataclass(slots=True, frozen=True)
class LeaderKnown:
    """Follower learned (or changed) who leads ``term``: use it to redirect client writes."""

    term: int
    leader: NodeId


Effect = Send | Persist | Committed | LeaderOpen | SteppedDown | LeaderKnown | Rejoined


# --------------------------------------------------------------------------------------------
# results of Node.propose


@dataclass(slots=True, frozen=True)
class Accepted:
    """Proposal appended at ``first..last`` in ``term``; answer only after Committed(>=last)."""

    first: int
    last: int
    term: int


@dataclass(slots=True, frozen=True)
class Refused:
    """Proposal not appended. ``reason``: 'not_leader', 'not_open', 'backpressure',
    'too_large'. ``leader`` is the known leader (for redirects), if any."""

    reason: str
    leader: NodeId | None = None


ProposeResult = Accepted | Refused
