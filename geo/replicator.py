"""The writer of a clustered store node: one thread that owns the replication state
machine (geo/replication/core.py) and every LMDB write transaction.

Each cycle takes everything queued (peer messages, ticks, election events, client
appends), steps the machine, and executes its Persist effects in one write transaction
with one fsync (group commit): client appends are sequenced against that transaction,
proposed, and written in it too. Sends, commits and role changes go to the event loop.
Running the machine and the disk writes on one thread keeps Persist effects in order
without any locking.

Parking: while a node is about to lead (the target of a planned switchover, or a
candidate between winning the key and its term-start commit), appends it receives are
held, not refused, until `park_until` (monotonic, set by the node; at most PARK_MAX_S
ahead): once the term opens they are proposed first, in arrival order; if parking ends
first they get the usual not-leader answer. Clients sent over by the old leader then
wait once at the next leader instead of bouncing between the two (each bounce a new
connection) and retrying on a timer. Parked appends stay counted in the writer's load,
so the queue limit bounds them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import lmdb

from geo.replication.core import Limits as CoreLimits
from geo.replication.core import Node
from geo.replication.log import within_bytes
from geo.replication.messages import (
    ENTRY_PAYLOAD,
    Accepted,
    Committed,
    Effect,
    Entry,
    Message,
    Persist,
    Rejoined,
    Send,
    entries_of,
)
from store import records
from store.errors import StoreError, node_failed, shutting_down
from store.limits import Limits
from store.log import Appended, Log, PreparedAppend, Sequenced
from store.writer import QueueLoad, Results, emit_group_span
from xdc import telemetry
from xdc.v1 import eventstore_pb2 as pb

TERM_START_TYPE = "$term-start"


def term_stream(term: int) -> str:
    """Every term-start record opens a stream of its own: revision 1, whatever log
    the recovery adopts."""
    return f"$term.{term}"


# How a term began, as its term-start record tells (term_began): the target of a planned
# switchover, or an election after a failover. "" while the record is not known.
HANDOVER = "handover"
ELECTION = "election"


def term_start_record(term: int, leader: str, now_ns: int, planned: bool = False) -> bytes:
    """The record a new leader appends (DESIGN §4). Its position is patched in when it
    is written (store/records.index_fields), since recovery decides it. Its id is
    random: one derived from (cluster, term), which NodeInfo tells any client, could be
    appended by a client first, and the term-start record would then take over that
    client's id in the index (a retry answered ALREADY_EXISTS, or, once the record was
    truncated, written twice). `planned`: the leader is the target of a planned
    switchover (the old leader handed over): what lets servers in front of the store
    tell a handover from a failover (engine/matching_health.py)."""
    fields: dict[str, object] = {"term": term, "leader": leader}
    if planned:
        fields["planned"] = True
    body = pb.ProposedEvent(
        id=uuid.uuid4().bytes, type=TERM_START_TYPE,
        content_type="application/json",
        data=json.dumps(fields, sort_keys=True).encode())
    return records.encode(0, term, 1, now_ns, records.stream_field(term_stream(term).encode()),
                          body.SerializeToString(deterministic=True))


def term_began(record: bytes) -> str:
    """HANDOVER or ELECTION, by a term-start record (records without `planned`, written
    before it existed, read as elections)."""
    body = pb.ProposedEvent.FromString(records.body_of(record))
    assert body.type == TERM_START_TYPE, body.type
    return HANDOVER if json.loads(body.data).get("planned") is True else ELECTION


log = logging.getLogger("xdc.replicator")
# Longest the persisted commit position waits for a write to ride along with.
COMMIT_PERSIST_S = 0.2
# Test failpoint, 0 (off) unless the environment sets it: a leader holds each write
# transaction this long after shipping its new entries, before its own fsync, so that a
# test can SIGKILL it while followers hold records its disk will never have
# (tests/test_cluster_faults.py). Read once, at import.
STALL_AFTER_SHIP_S = float(os.environ.get("XDC_FAILPOINT_STALL_AFTER_SHIP_MS", "0")) / 1000
# Test failpoint, 0 (off) unless the environment sets it: a new leader's machine learns
# this long late that the write of its term-start record is durable (and every write of
# its after it, until then), as if that fsync were slow, while its writer goes on:
# heartbeats, replies, ticks and queries as usual. Its term so opens this much later
# (NodeInfo role "candidate", Tiers "failover") while the other voters already follow it
# and hold the record, so that a test can hold that state for seconds
# (tests/test_cluster_faults.py: an engine primary beside such a leader keeps its lease).
# Read once, at import.
HOLD_TERM_START_S = float(os.environ.get("XDC_FAILPOINT_HOLD_TERM_START_MS", "0")) / 1000
# Longest a node holds appends while it is about to lead (module docstring): well under a
# client's attempt timeout, so a switchover that fails costs a client no more than that.
PARK_MAX_S = 0.5
# Peer messages queued for the writer thread while it is busy (a slow fsync, a stalled
# disk): past either bound a delivery is dropped, as a lossy network would drop it. The
# protocol tolerates loss (a leader resends from its followers' acknowledged positions),
# and without a bound a stalled follower would buffer everything its leader ships.
MAX_QUEUED_DELIVERIES = 4_096
MAX_QUEUED_ENTRY_BYTES = 256 * 1024 * 1024


# Entries the writer wrote last, kept for the machine's reads: a leader ships what it
# just wrote, and reading it back from LMDB (and re-parsing each record's term) cost it
# more than a tenth of its time under load.
RECENT_ENTRIES = 32_768


class LmdbLogView:
    """The machine's read-only view of the LMDB log (geo/replication/log.LogView). It
    reads through the writer's open transaction when there is one, so it also sees
    writes not yet durable (allowed: never out of order). The last entries written
    (`wrote`) are served from memory."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.txn: lmdb.Transaction | None = None
        # Consecutive entries ending at the log's last position (or empty).
        self._recent: list[Entry] = []

    def wrote(self, truncate_after: int | None, entries: Sequence[Entry]) -> None:
        """What a Persist wrote (the writer thread, after write_records)."""
        recent = self._recent
        if truncate_after is not None and recent:
            del recent[max(0, truncate_after + 1 - recent[0].position):]
        if recent and entries and entries[0].position != recent[-1].position + 1:
            recent.clear()
        recent.extend(entries)
        if len(recent) > 2 * RECENT_ENTRIES:
            del recent[:len(recent) - RECENT_ENTRIES]
        assert not recent or recent[-1].position == self.log.last_position, \
            "recent entries must end at the log's last position"

    def _cached(self, lo: int, hi: int) -> list[Entry] | None:
        recent = self._recent
        if not recent or lo < recent[0].position or hi > recent[-1].position:
            return None
        base = recent[0].position
        return recent[lo - base:hi - base + 1]

    def _get_range(self, lo: int, hi: int) -> list[bytes]:
        if self.txn is not None:
            return self._scan(self.txn, lo, hi)
        with self.log.env.begin() as txn:
            return self._scan(txn, lo, hi)

    def _scan(self, txn: lmdb.Transaction, lo: int, hi: int) -> list[bytes]:
        cur = txn.cursor(self.log.log_db)
        out: list[bytes] = []
        if cur.set_key(records.position_key(lo)):
            for value in cur.iternext(keys=False):
                out.append(value)
                if len(out) == hi - lo + 1:
                    break
        assert len(out) == hi - lo + 1, f"log positions {lo}..{hi} missing"
        return out

    def last_position(self) -> int:
        return self.log.last_position

    def term_at(self, position: int) -> int:
        if position == 0:
            return 0
        cached = self._cached(position, position)
        if cached is not None:
            return cached[0].term
        return records.term_of(self._get_range(position, position)[0])

    def entries(self, lo: int, hi: int, max_bytes: int) -> Sequence[Entry]:
        """Entries lo..hi, cut where they pass `max_bytes` of payload (at least one)."""
        got = self._cached(lo, hi)
        if got is None:
            values = self._get_range(lo, hi)
            got = entries_of(lo, map(records.term_of, values), values)
        return within_bytes(got, max_bytes)


@dataclass(slots=True)
class _Group:
    reqs: list[PreparedAppend]
    future: asyncio.Future[Results]
    caller: Any = None  # the submitter's span context, when tracing
    load: tuple[int, int] = (0, 0)  # (events, bytes): counted once, at admission


# Posted to the loop after each cycle: effects for the loop, and client results.
EffectsHook = Callable[[list[Effect], list[tuple[asyncio.Future[Results], Results]]], None]


class Replicator:
    """Same seam as store.writer.Writer (submit/stop), plus the replication inputs."""

    def __init__(self, log: Log, limits: Limits, loop: asyncio.AbstractEventLoop, *,
                 node_id: str, voters: Sequence[str], standbys: Sequence[str],
                 on_effects: EffectsHook, leader_address: Callable[[str | None], str],
                 core_limits: CoreLimits | None = None) -> None:
        self.log = log
        self.limits = limits
        self.loop = loop
        self.view = LmdbLogView(log)
        core_limits = core_limits or CoreLimits(
            max_propose_entries=limits.max_group_events,
            max_unpersisted_entries=4 * limits.max_group_events)
        # A voter that lost its disk starts rejoining (geo/node.py persisted the fence).
        self.core = Node(node_id, voters, standbys, self.view, promised_term=log.promised_term,
                         promised_to=log.promised_to, commit=log.commit_position,
                         rejoin_term=log.rejoin_term, limits=core_limits)
        self.node_id = node_id
        self.on_effects = on_effects
        self.leader_address = leader_address
        self._cond = threading.Condition()
        self._inputs: collections.deque[tuple[str, Any]] = collections.deque()
        self._load = QueueLoad()
        # Peer deliveries queued in _inputs, and the entry payload bytes they carry.
        self._queued_deliveries = 0
        self._queued_entry_bytes = 0
        self.dropped_deliveries = 0
        self._stopping = False
        self._commit_to_persist = 0
        self._meta_written_at = 0.0  # monotonic time of the last commit position written
        # Set during a planned switchover: appends are refused and sent to this member.
        self.redirect_to: str | None = None
        # Monotonic time until which appends are parked, not refused (module docstring):
        # written by the loop thread, read by the writer thread.
        self.park_until = 0.0
        self._parked: list[_Group] = []  # writer thread only
        # The HOLD_TERM_START_S failpoint (writer thread only): the last write whose
        # durability the machine has not been told, and when it is told; the last term
        # whose start was held (each is held once).
        self._held_ack: tuple[int, float] | None = None
        self._held_term = 0
        self.fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="xdc-replicator", daemon=True)
        self._thread.start()

    # ---- inputs (loop thread) -------------------------------------------------------

    def _check_running(self) -> None:
        if self._stopping:
            raise shutting_down()

    def _put(self, kind: str, arg: Any) -> None:
        if self.fatal is not None:
            return  # the writer thread is gone: nothing would take it (stop, ticks, peers)
        with self._cond:
            self._check_running()
            self._inputs.append((kind, arg))
            self._cond.notify()

    @property
    def pending_events(self) -> int:
        return self._load.events

    def submit(self, reqs: list[PreparedAppend]) -> asyncio.Future[Results]:
        # Groups of at most max_group_events events: one cycle proposes at most that
        # many (the machine refuses more, and a refusal would come back on every retry).
        # Each append stays whole; the groups are queued together, in order.
        caller = telemetry.current_span_context()
        groups = [_Group([], self.loop.create_future(), caller)]
        n = size = 0  # of the last group
        for r in reqs:
            if groups[-1].reqs and n + len(r.ids) > self.limits.max_group_events:
                groups[-1].load = (n, size)
                groups.append(_Group([], self.loop.create_future(), caller))
                n = size = 0
            groups[-1].reqs.append(r)
            n += len(r.ids)
            size += r.size
        groups[-1].load = (n, size)
        # One critical section: the stopping check, admission, the count (the writer
        # thread decrements it under the same lock) and the queueing, so a refusal
        # never leaves the count raised.
        with self._cond:
            self._check_running()
            self._load.admit_counted(sum(g.load[0] for g in groups),
                                     sum(g.load[1] for g in groups), self.limits)
            self._inputs.extend(("appends", g) for g in groups)
            self._cond.notify()
        if len(groups) == 1:
            return groups[0].future
        return _joined([g.future for g in groups], self.loop)

    def deliver(self, msgs: list[Message]) -> None:
        size = sum(sum(map(len, map(ENTRY_PAYLOAD, m.entries))) for m in msgs
                   if getattr(m, "entries", None))
        with self._cond:
            self._check_running()
            # (One delivery larger than the byte bound still goes into an empty queue.)
            if (self._queued_deliveries >= MAX_QUEUED_DELIVERIES
                    or (self._queued_deliveries
                        and self._queued_entry_bytes + size > MAX_QUEUED_ENTRY_BYTES)):
                self.dropped_deliveries += 1
                if self.dropped_deliveries % 1000 == 1:
                    log.warning("%s: writer busy, %d peer deliveries (%d entry bytes) "
                                "queued: dropping (%d so far)", self.node_id,
                                self._queued_deliveries, self._queued_entry_bytes,
                                self.dropped_deliveries)
                return
            self._queued_deliveries += 1
            self._queued_entry_bytes += size
            self._inputs.append(("msgs", (msgs, size)))
            self._cond.notify()

    def tick(self) -> None:
        self._put("tick", None)

    def become_leader(self, term: int, payload: bytes) -> None:
        self._put("lead", (term, payload))

    def step_down(self, reason: str) -> None:
        self._put("down", reason)

    def query(self, fn: Callable[[Node], Any]) -> asyncio.Future[Any]:
        """Runs fn(core) on the writer thread (the machine is not thread-safe)."""
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._put("query", (fn, fut))
        return fut

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    # ---- the writer thread ------------------------------------------------------------

    def _take(self) -> list[tuple[str, Any]] | None:
        with self._cond:
            while not self._inputs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                # Answer what is queued or parked: the node is going away.
                left = [("appends", g) for g in self._parked] + list(self._inputs)
                self._parked.clear()
                self._inputs.clear()
                err = shutting_down()
                out = [(g.future, [err] * len(g.reqs)) for k, g in left if k == "appends"]
                if out:
                    self.loop.call_soon_threadsafe(self.on_effects, [], out)
                return None
            # A prefix of the queue holding at most max_group_events appended events
            # (one proposal; the machine refuses larger ones): the rest waits for the
            # next cycle instead of the whole queue being refused, again and again.
            taken = []
            events = 0
            while self._inputs:
                kind, arg = self._inputs[0]
                if kind == "appends":
                    if taken and events + arg.load[0] > self.limits.max_group_events:
                        break
                    events += arg.load[0]
                elif kind == "msgs":
                    self._queued_deliveries -= 1
                    self._queued_entry_bytes -= arg[1]
                taken.append(self._inputs.popleft())
            return taken

    def _run(self) -> None:
        taken: list[tuple[str, Any]] | None = None
        try:
            while (taken := self._take()) is not None:
                self._cycle(taken)
                taken = None  # answered
        except BaseException as exc:  # a disk or invariant failure: this node must stop
            log.exception("replicator thread failed")
            self.fatal = exc
            # As the standalone Writer does: every append it holds (the failed cycle's,
            # those queued, those parked) is answered "outcome unknown", and no more are
            # taken; else their callers wait for a thread that is gone.
            with self._cond:
                self._stopping = True
                left = [*(taken or ()), *self._inputs]
                self._inputs.clear()
                groups = [arg for kind, arg in left if kind == "appends"] + self._parked
                self._parked = []
            err = node_failed(exc, self.node_id)
            self.loop.call_soon_threadsafe(
                self.on_effects, [], [(g.future, [err] * len(g.reqs)) for g in groups])

    def _cycle(self, taken: list[tuple[str, Any]]) -> None:
        core = self.core
        groups: list[_Group] = []
        queries = []
        for kind, arg in taken:
            if kind == "msgs":
                for m in arg[0]:
                    core.step(m)
            elif kind == "tick":
                core.tick()
            elif kind == "appends":
                groups.append(arg)
            elif kind == "lead":
                core.become_leader(*arg)
            elif kind == "down":
                core.step_down(arg)
            elif kind == "query":
                queries.append(arg)
        if groups or self._parked:
            if (not core.is_open and self.redirect_to is None
                    and time.monotonic() < self.park_until):
                self._parked.extend(groups)  # still counted in the load: not released
                groups = []
            elif self._parked:
                groups = self._parked + groups  # in arrival order
                self._parked = []
        if self._held_ack is not None and time.monotonic() >= self._held_ack[1]:
            seq, self._held_ack = self._held_ack[0], None
            core.on_persisted(seq)  # the failpoint's hold ends (its effects go out below)
        out: list[Effect] = []
        answers: list[tuple[asyncio.Future[Results], Results]] = []
        effects = core.drain()
        propose = bool(groups)
        traced = propose and telemetry.tracing()
        written_after, start_ns = self.log.last_position, time.time_ns()
        while True:
            # The commit position rides along with the next write; alone it is written
            # (one more fsync) only when it has waited COMMIT_PERSIST_S: a restart then
            # serves a little less until the leader tells it more, which is safe.
            lagging = (self._commit_to_persist > self.log.commit_position
                       and time.monotonic() - self._meta_written_at >= COMMIT_PERSIST_S)
            # The end of a rejoin is written at once: kept lazily, a node killed in the
            # next COMMIT_PERSIST_S came back rejoining, a voter that does not vote (with
            # the leader lost meanwhile, an election it was needed for could not be held).
            if not (propose or lagging
                    or any(isinstance(e, (Persist, Rejoined)) for e in effects)):
                out.extend(effects)
                break
            last_seq = 0
            try:
                with self.log.write() as txn:
                    self.view.txn = txn
                    last_seq = self._apply(txn, effects, out)
                    if propose:
                        last_seq = max(last_seq, self._propose(txn, groups, out, answers))
                    self.log.set_meta(txn, commit_position=min(self._commit_to_persist,
                                                               self.log.last_position),
                                      rejoin_term=self.core.rejoin_term)
                    self._meta_written_at = time.monotonic()
                    # The machine's sends may leave before its writes are durable (what
                    # depends on durability, acks and promise replies, it emits only after
                    # on_persisted): a leader ships new entries while its own fsync runs,
                    # so a commit costs max(local fsync, RTT + follower fsync), not the sum.
                    if self._send_early(out) and propose and STALL_AFTER_SHIP_S:
                        time.sleep(STALL_AFTER_SHIP_S)  # the test failpoint below
            finally:
                self.view.txn = None
            propose = False
            if last_seq:
                self._persisted(last_seq)
            effects = core.drain()
        # The span is made on the loop thread from these timestamps, in the wake-up that
        # carries the effects (one call_soon_threadsafe per cycle, not two).
        span = ([g.caller for g in groups], sum(len(g.reqs) for g in groups), core.term,
                start_ns, time.time_ns(), written_after + 1,
                self.log.last_position) if traced else None
        for e in out:
            if isinstance(e, Committed):
                self._commit_to_persist = max(self._commit_to_persist, e.upto)
        for fn, fut in queries:
            try:
                result = fn(core)
                self.loop.call_soon_threadsafe(_settle, fut, result, None)
            except Exception as exc:
                self.loop.call_soon_threadsafe(_settle, fut, None, exc)
        with self._cond:
            for g in groups:
                self._load.release(*g.load)
        self.loop.call_soon_threadsafe(self._effects, out, answers, span)

    def _persisted(self, seq: int) -> None:
        """Tells the machine that write `seq` (and every one before it) is durable, unless
        the HOLD_TERM_START_S failpoint holds it: the write of a new term-start record (the
        machine leads a term that is not open yet) and every write after it, until the
        hold ends (at the first cycle past it)."""
        core = self.core
        if HOLD_TERM_START_S:
            if self._held_ack is not None:
                self._held_ack = (max(seq, self._held_ack[0]), self._held_ack[1])
                return
            if core.term_start and not core.is_open and core.term > self._held_term:
                self._held_term = core.term
                self._held_ack = (seq, time.monotonic() + HOLD_TERM_START_S)
                log.warning("%s: test failpoint: the term-start record of term %d is "
                            "durable, the machine learns it in %.0f ms", self.node_id,
                            core.term, HOLD_TERM_START_S * 1000)
                return
        core.on_persisted(seq)

    def _send_early(self, out: list[Effect]) -> bool:
        """Hands the machine's sends to the loop now; True if there were any."""
        sends = [e for e in out if isinstance(e, Send)]
        if sends:
            out[:] = [e for e in out if not isinstance(e, Send)]
            self.loop.call_soon_threadsafe(self.on_effects, sends, [])
        return bool(sends)

    def _effects(self, out: list[Effect], answers: list[tuple[asyncio.Future[Results], Results]],
                 span: tuple[Any, ...] | None) -> None:
        self.on_effects(out, answers)
        if span is not None:
            emit_group_span(*span)

    def _apply(self, txn: lmdb.Transaction, effects: list[Effect], out: list[Effect],
               seq: Sequenced | None = None) -> int:
        """Writes the Persist effects in `txn`; passes every other effect on. Returns the
        last Persist seq written (0 if none)."""
        last_seq = 0
        for e in effects:
            if isinstance(e, Persist):
                first = e.entries[0].position if e.entries else self.log.last_position + 1
                entries: Sequence[Entry] = e.entries
                if seq is not None and entries and first == seq.first:
                    # Our own proposal: the records and their index spans are at hand.
                    self.log.write_records(txn, seq.values, first, seq.spans, seq.stream_rows,
                                           truncate_after=e.truncate_after)
                else:
                    payloads = list(map(ENTRY_PAYLOAD, entries))
                    stored = self.log.write_records(txn, payloads, first,
                                                    truncate_after=e.truncate_after)
                    if stored is not payloads:
                        # A patched term-start record: the view serves what is stored.
                        entries = [x if v is x.payload else Entry(x.position, x.term, v)
                                   for v, x in zip(stored, entries, strict=True)]
                self.view.wrote(e.truncate_after, entries)
                self.log.set_meta(txn, promised_term=e.promised_term,
                                  promised_to=e.promised_to)
                last_seq = e.seq
            else:
                out.append(e)
        return last_seq

    def _propose(self, txn: lmdb.Transaction, groups: list[_Group], out: list[Effect],
                 answers: list[tuple[asyncio.Future[Results], Results]]) -> int:
        core = self.core
        reqs = [r for g in groups for r in g.reqs]
        refusal: StoreError | None = None
        results: list[Appended | StoreError] = []
        last_seq = 0
        if self.redirect_to is not None:
            refusal = self._not_leader(self.redirect_to)
        elif not core.is_open:
            refusal = self._not_leader(core.leader if core.leader != self.node_id else None)
        else:
            assert self.log.last_position == core.tip().position, "log and machine disagree"
            seq = self.log.sequence(txn, reqs, self.log.last_position + 1, core.term,
                                    time.time_ns())
            results = seq.results
            if seq.values:
                accepted = core.propose(seq.values)
                if isinstance(accepted, Accepted):
                    assert (accepted.first, accepted.last) == (
                        seq.first, seq.first + len(seq.values) - 1), "positions must agree"
                    last_seq = self._apply(txn, core.drain(), out, seq)
                else:
                    refusal = (self._not_leader(accepted.leader)
                               if accepted.reason in ("not_leader", "not_open")
                               else StoreError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                               f"replication backlog ({accepted.reason}); "
                                               "retry shortly", retry_after_ms=50))
                    # Refuse everything that points into this unwritten group: its new
                    # appends and the retries answered from inside it (Log.sequence
                    # answers an in-group duplicate with positions in the group).
                    # Duplicates of records already in the log keep their answer.
                    results = [refusal if isinstance(r, Appended)
                               and r.last_position >= seq.first else r for r in results]
                    refusal = None
        i = 0
        for g in groups:
            n = len(g.reqs)
            answers.append((g.future, [refusal] * n if refusal else results[i:i + n]))
            i += n
        return last_seq

    def _not_leader(self, leader: str | None) -> StoreError:
        address = self.leader_address(leader)
        if not address:
            where = "no leader is known yet"
        elif leader is None:  # the address is the seat's holder as etcd last named it
            where = f"the leader was last seen at {address}"
        else:
            where = f"the leader is {leader} at {address}"
        return StoreError(grpc.StatusCode.UNAVAILABLE, f"this node does not accept writes: "
                          f"{where}", leader=address, retry_after_ms=25)


def _joined(parts: list[asyncio.Future[Results]],
            loop: asyncio.AbstractEventLoop) -> asyncio.Future[Results]:
    """One future for the results of several groups, in order."""
    out: asyncio.Future[Results] = loop.create_future()

    def done(_: asyncio.Future[Results]) -> None:
        if out.done() or not all(p.done() for p in parts):
            return
        for p in parts:
            if p.cancelled() or p.exception() is not None:
                out.set_exception(p.exception() if not p.cancelled()
                                  else asyncio.CancelledError())
                return
        out.set_result([r for p in parts for r in p.result()])
    for p in parts:
        p.add_done_callback(done)
    return out


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
