"""geo/replicator.py in process on a real LMDB log.

Parking: appends that reach a node about to lead are held until its term opens (then
written first, in arrival order), or refused with the usual not-leader answer once
`park_until` passes. The view: the entries it serves from memory are the log's.

A single voter leads alone (its own durable promise is a majority), so the term opens
within a cycle or two of `become_leader`; ticks drive the writer's cycles. Waits poll a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from geo.replication.messages import Effect, Entry, LeaderOpen
from geo.replicator import LmdbLogView, Replicator, term_start_record
from store import records
from store.errors import StoreError
from store.limits import Limits
from store.log import Appended, Log
from store.validation import prepare
from xdc.v1 import eventstore_pb2 as pb


def _append(stream: str, n: int = 1) -> Any:
    req = pb.AppendRequest(stream=stream, expected_revision=pb.EXPECTED_ANY, events=[
        pb.ProposedEvent(id=uuid.uuid4().bytes, type="T", data=b"x") for _ in range(n)])
    return prepare(req, Limits())


class Harness:
    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop,
                 voters: list[str] | None = None) -> None:
        self.log = Log(str(path))
        self.opened: list[LeaderOpen] = []
        self.rep = Replicator(self.log, Limits(), loop, node_id="a", voters=voters or ["a"],
                              standbys=[], on_effects=self._on_effects,
                              leader_address=lambda leader: f"{leader}:1" if leader else "")

    def _on_effects(self, effects: list[Effect], answers: list[tuple[Any, Any]]) -> None:
        self.opened += [e for e in effects if isinstance(e, LeaderOpen)]
        for fut, results in answers:
            if not fut.done():
                fut.set_result(results)

    async def until(self, cond: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.rep.tick()  # a cycle: the writer re-examines what it holds
            await asyncio.sleep(0.005)

    async def cycled(self) -> None:
        """Returns once the writer has run a cycle past everything queued so far, and the
        answers of that cycle have reached the loop (a query is settled just before them,
        so the waiting task resumes after them)."""
        self.rep.tick()
        await self.rep.query(lambda _core: None)

    def close(self) -> None:
        self.rep.stop()
        self.log.close()


def run(body: Callable[[Harness], Any], path: Path) -> None:
    async def main() -> None:
        h = Harness(path, asyncio.get_running_loop())
        try:
            async with asyncio.timeout(30):
                await body(h)
        finally:
            h.close()
    asyncio.run(main())


def test_appends_parked_before_the_term_opens_are_written_first_in_order(
        tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.rep.park_until = time.monotonic() + 30
        first = h.rep.submit([_append("s-1", 2)])
        second = h.rep.submit([_append("s-2")])
        for _ in range(5):  # cycles while parked: nothing answered, nothing written
            await h.cycled()
        assert not first.done() and not second.done()
        assert h.rep.pending_events == 3, "parked appends stay counted in the load"
        h.rep.become_leader(7, term_start_record(7, "a", time.time_ns()))
        await h.until(lambda: first.done() and second.done(), "the parked appends")
        (a,), (b,) = first.result(), second.result()
        assert isinstance(a, Appended) and isinstance(b, Appended), (a, b)
        assert len(h.opened) == 1 and h.opened[0].term == 7
        start = h.opened[0].start_position
        # Right after the term-start record, in arrival order.
        assert (a.first_position, a.last_position) == (start + 1, start + 2)
        assert b.first_position == start + 3
        assert h.rep.pending_events == 0
    run(body, tmp_path / "log")


def test_parking_that_ends_before_the_term_opens_refuses_with_not_leader(
        tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.rep.park_until = time.monotonic() + 0.2
        parked = h.rep.submit([_append("s")])
        await h.cycled()
        assert not parked.done(), "held while the window lasts"
        await h.until(parked.done, "the window to pass", timeout_s=5)
        (r,) = parked.result()
        assert isinstance(r, StoreError) and r.code == grpc.StatusCode.UNAVAILABLE, r
        assert "does not accept writes" in str(r)
        assert h.rep.pending_events == 0
        # Without parking the refusal is immediate.
        h.rep.park_until = 0.0
        direct = h.rep.submit([_append("s")])
        await h.until(direct.done, "the refusal")
        assert isinstance(direct.result()[0], StoreError)
    run(body, tmp_path / "log")


def test_parked_appends_are_answered_when_the_node_stops(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path / "log", asyncio.get_running_loop())
        h.rep.park_until = time.monotonic() + 30
        parked = h.rep.submit([_append("s")])
        await h.cycled()
        assert not parked.done()
        await asyncio.to_thread(h.close)
        async with asyncio.timeout(5):
            (r,) = await parked
        assert isinstance(r, StoreError) and "shutting down" in str(r), r
    asyncio.run(main())


def test_the_views_recent_entries_are_what_the_log_holds(tmp_path: Path) -> None:
    """Entries written (with truncation, and records patched with their position when
    stored) are served from memory exactly as LMDB holds them."""
    log = Log(str(tmp_path / "log"))
    view = LmdbLogView(log)

    def write(truncate_after: int | None, first: int, terms: list[int]) -> None:
        # Term-start records carry position 0 until stored: the patched case.
        entries = [Entry(first + i, t, term_start_record(t, "a", 1)) for i, t in
                   enumerate(terms)]
        with log.write() as txn:
            stored = log.write_records(txn, [e.payload for e in entries], first,
                                       truncate_after=truncate_after)
        view.wrote(truncate_after, [Entry(e.position, e.term, v)
                                    for e, v in zip(entries, stored, strict=True)])

    def check() -> None:
        last = log.last_position
        with log.env.begin() as txn:
            stored = view._scan(txn, 1, last)
        for lo in range(1, last + 1):
            assert view.term_at(lo) == records.term_of(stored[lo - 1])
            for hi in range(lo, last + 1):
                got = view.entries(lo, hi, 1 << 30)
                assert [(e.position, e.term, e.payload) for e in got] == [
                    (p, records.term_of(v), v) for p, v in
                    zip(range(lo, hi + 1), stored[lo - 1:hi], strict=True)]
        capped = view.entries(1, last, 1)
        assert len(capped) == 1, "the byte cap still holds (at least one entry)"

    try:
        write(None, 1, [1, 2, 3, 4, 5])
        check()
        write(3, 4, [6, 7])  # a divergent suffix replaced
        check()
        write(None, 6, [8])
        check()
        assert view._cached(1, 6) is not None, "served from memory"
    finally:
        log.close()


def test_the_commit_position_is_persisted_with_no_other_write_to_ride_along(
        tmp_path: Path) -> None:
    """The commit position is written with the next write; with none coming, on its own
    once it has waited COMMIT_PERSIST_S (a restart then serves up to it at once)."""
    from geo.replicator import COMMIT_PERSIST_S

    async def body(h: Harness) -> None:
        h.rep.become_leader(3, term_start_record(3, "a", time.time_ns()))
        await h.until(lambda: bool(h.opened), "the term open")
        fut = h.rep.submit([_append("s", 3)])
        await h.until(fut.done, "the append")
        (a,) = fut.result()
        assert isinstance(a, Appended), a
        # No other append comes: ticks alone must get it written.
        await h.until(lambda: h.log.commit_position >= a.last_position,
                      "the commit position persisted", timeout_s=COMMIT_PERSIST_S + 2.0)
    run(body, tmp_path / "log")


class _WatchedLoop:
    """The event loop as the writer thread sees it, noting each batch of effects it
    hands over (test instrumentation: the loop itself is real)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.handed: list[list[Effect]] = []
        self.changed = threading.Condition()

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.changed:
            if args and isinstance(args[0], list):
                self.handed.append(list(args[0]))
            self.changed.notify_all()
        return self._loop.call_soon_threadsafe(fn, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def test_an_append_is_not_acknowledged_when_a_newer_leader_committed_its_position(
        tmp_path: Path) -> None:
    """Node a leads term 5 with b and writes a client's append at position 2. Before the
    loop runs the append's waiter, a newer leader's messages (term 7: a Promise, then its
    own record at 2, committed) reach a's writer, which steps down, replaces position 2
    and advances the commit to 2. The commit position then covers the append, but the
    record there is another leader's: the append must get "outcome unknown", not an
    acknowledgement (before, StoreNode.append answered by position alone and the client
    was told its record was committed at 2). A review found it (real Replicator, real
    LMDB, real StoreNode.append; the loop is held busy while the writer runs ahead, as
    a loaded loop would be)."""
    from geo.replication.messages import (
        Append,
        AppendReply,
        Committed,
        Promise,
        PromiseReply,
        SteppedDown,
        Tip,
    )
    from store.node import StoreNode

    async def body() -> None:
        node = StoreNode(tmp_path / "a", Limits(), node_id="a")
        watched: list[_WatchedLoop] = []
        inject: list[Any] = []

        def on_effects(effects: list[Effect], answers: list[tuple[Any, Any]]) -> None:
            assert node.commit is not None and node.writer is not None
            if inject and answers:
                # The newer leader's messages reach the writer while the loop is still
                # busy here: it runs ahead, steps down, writes and commits their record.
                w = watched[0]
                node.writer.deliver(inject.pop())
                with w.changed:
                    assert w.changed.wait_for(lambda: any(
                        isinstance(e, Committed) and e.upto >= 2
                        for h in w.handed for e in h), 10), "the newer leader's commit"
            for e in effects:
                if isinstance(e, Committed):
                    node.commit.advance(e.upto)
                elif isinstance(e, SteppedDown):  # as ClusterNode._on_effects does
                    node.commit.fail_waiters(StoreError(
                        grpc.StatusCode.UNAVAILABLE, "leadership lost: outcome unknown"))
            for fut, results in answers:
                if not fut.done():
                    fut.set_result(results)

        def make(log: Log, loop: asyncio.AbstractEventLoop) -> Replicator:
            watched.append(_WatchedLoop(loop))
            return Replicator(log, node.limits, watched[0], node_id="a",  # type: ignore[arg-type]
                              voters=["a", "b", "c"], standbys=[], on_effects=on_effects,
                              leader_address=lambda leader: "")
        await node.start(writer_factory=make)
        rep = node.writer
        assert isinstance(rep, Replicator) and node.commit is not None and node.log is not None

        async def cycles(n: int = 3) -> None:
            for _ in range(n):
                rep.tick()
                await rep.query(lambda core: None)
        try:
            rep.become_leader(5, term_start_record(5, "a", time.time_ns()))
            await cycles()
            rep.deliver([PromiseReply("b", "a", 5, True, Tip(0, 0))])
            await cycles()
            rep.deliver([AppendReply("b", "a", 5, True, match=1)])
            await cycles()
            assert rep.core.is_open and node.commit.position == 1
            # c leads term 7 with b; its log: 1 (a's term start, term 5), then its own.
            record = term_start_record(7, "c", time.time_ns())
            inject.append([Promise("c", "a", 7),
                           Append("c", "a", 7, 1, 5, (Entry(2, 7, record),), 2)])
            try:
                results = await node.append([_append("orders")])
                answered = results[0]
            except StoreError as err:
                answered = err
            await cycles()
            assert node.commit.position >= 2
            assert records.term_of(node.log.record(2)) == 7  # the newer leader's record
            assert isinstance(answered, StoreError), (
                f"acknowledged as {answered}, but position 2 holds term 7's record")
            assert "outcome unknown" in answered.message
        finally:
            await node.stop()
    asyncio.run(body())


def test_a_term_start_records_id_cannot_be_predicted() -> None:
    """Derived from (cluster, term), which NodeInfo tells any client, the id could be
    appended by a client ahead of that term; the term-start record then took over the
    client's id in the index (its retry answered ALREADY_EXISTS, or written twice once
    the record was truncated: a review found it). Each record's id is random."""
    ids = {records.id_of(term_start_record(7, "a", 1)) for _ in range(3)}
    assert len(ids) == 3


def test_peer_messages_queued_while_the_writer_is_busy_are_bounded(
        tmp_path: Path, monkeypatch: Any) -> None:
    """While the writer thread is held (a slow fsync, a stalled disk), peer deliveries
    past MAX_QUEUED_DELIVERIES or MAX_QUEUED_ENTRY_BYTES are dropped, as a lossy network
    would drop them, instead of queueing everything the leader ships (before, the queue
    had no bound). What was queued is applied in order once the writer runs again, and
    the leader's resend of the dropped ones fills the log up."""
    import geo.replicator as replicator
    from geo.replication.messages import Append

    monkeypatch.setattr(replicator, "MAX_QUEUED_DELIVERIES", 8)
    payloads = [records.encode(p, 1, p, 0, records.stream_field(b"s"), pb.ProposedEvent(
        id=uuid.uuid4().bytes, type="T").SerializeToString()) for p in range(1, 21)]

    def ship(first: int, last: int) -> None:
        for p in range(first, last + 1):
            h.rep.deliver([Append("b", "a", 1, p - 1, 1 if p > 1 else 0,
                                  (Entry(p, 1, payloads[p - 1]),), 0)])

    async def body() -> None:
        gate, held = threading.Event(), threading.Event()
        busy = h.rep.query(lambda _core: (held.set(), gate.wait(10)))
        await asyncio.to_thread(held.wait, 5)
        ship(1, 20)
        assert (h.rep.dropped_deliveries, h.rep._queued_deliveries) == (12, 8)
        gate.set()
        await busy
        await h.until(lambda: h.log.last_position == 8, "the queued deliveries applied")
        assert h.rep._queued_deliveries == h.rep._queued_entry_bytes == 0

        def resent() -> bool:  # as a leader resends from what its follower has
            ship(h.log.last_position + 1, 20)
            return h.log.last_position == 20
        await h.until(resent, "the resent entries applied")

        # The byte bound: three entries' worth, while the writer is held again.
        monkeypatch.setattr(replicator, "MAX_QUEUED_ENTRY_BYTES", 3 * len(payloads[0]))
        gate.clear(), held.clear()
        busy = h.rep.query(lambda _core: (held.set(), gate.wait(10)))
        await asyncio.to_thread(held.wait, 5)
        before = h.rep.dropped_deliveries
        for _ in range(5):
            ship(20, 20)  # a duplicate: the follower acknowledges it again
        assert h.rep.dropped_deliveries - before == 2
        gate.set()
        await busy

    async def main() -> None:
        nonlocal h
        h = Harness(tmp_path / "log", asyncio.get_running_loop(), voters=["a", "b"])
        try:
            async with asyncio.timeout(30):
                await body()
        finally:
            h.close()
    h: Harness
    asyncio.run(main())
