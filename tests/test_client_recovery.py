"""The store client when things go wrong around its appends: closing with appends in
every stage, malformed appends among good ones, messages at the limits, a stream reset
with appends in flight, a follower refusing a large message, and appends outliving
their timeout behind a paused node. Real gRPC servers: real `xdc` nodes, and in-process
EventStore servers that answer in one fixed way (never, or refusing appends) to reach
each case on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from geo.proxy import Link
from store import client as client_module
from store.client import ANY, EXACT, SETTLE_SLICE, AppendError, CaughtUp, StoreClient, new_event
from store.limits import Limits
from tests.support.store import refusing_port, run, running_store, streams_opened, wait_until
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc


@contextlib.asynccontextmanager
async def _node(answer: str, leader: str = "", retry_after_ms: int = 0
                ) -> AsyncIterator[tuple[str, list[int]]]:
    """An EventStore that never answers an AppendStream message (`answer="never"`),
    refuses every append of each (`"refuse"`: UNAVAILABLE, naming `leader`, with
    `retry_after_ms`), refuses all but the first (`"first-ok"`), or answers each out of
    protocol (`"garble"`: no result). Yields its address and the number of appends of
    each message it received."""
    from store.server import listen_on, new_server

    release = asyncio.Event()
    seen: list[int] = []

    class Node(pb_grpc.EventStoreServicer):
        async def NodeInfo(self, request, context):  # type: ignore[no-untyped-def]
            return pb.NodeInfoResponse()

        async def AppendStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
            if answer == "never":
                await release.wait()
                return
            async for msg in request_iterator:
                seen.append(len(msg.appends))
                resp = pb.AppendStreamResponse(correlation_id=msg.correlation_id)
                if answer == "garble":
                    yield resp
                    continue
                for i, _ in enumerate(msg.appends):
                    if answer == "first-ok" and i == 0:
                        resp.results.add().ok.CopyFrom(pb.AppendResponse(
                            first_position=1, last_position=1, last_revision=1,
                            next_revision=2))
                        continue
                    resp.results.add().error.CopyFrom(pb.AppendError(
                        code=grpc.StatusCode.UNAVAILABLE.value[0], message="not the leader",
                        leader=leader, retry_after_ms=retry_after_ms))
                yield resp

    server = new_server()
    pb_grpc.add_EventStoreServicer_to_server(Node(), server)
    port = listen_on(server, "127.0.0.1:0", None)
    await server.start()
    try:
        yield f"127.0.0.1:{port}", seen
    finally:
        release.set()
        await server.stop(0)


def _events(n: int, size: int = 16) -> list[pb.ProposedEvent]:
    return [new_event("T", bytes(size), metadata={"n": str(i)}) for i in range(n)]


def _cancelled(fut: asyncio.Future) -> bool:  # type: ignore[type-arg]
    exc = fut.exception() if fut.done() and not fut.cancelled() else None
    return isinstance(exc, AppendError) and exc.code == grpc.StatusCode.CANCELLED


def test_close_answers_every_append_it_holds() -> None:
    """Closing fails, with CANCELLED, an append in flight, one the sender took and holds
    while it waits for a free slot, one still queued, and one waiting out a refusal's
    retry hint. Before, the one the sender held and the one in its backoff were never
    answered: their callers waited forever."""
    async def body() -> None:
        async with _node("never") as (stuck, _):
            c = StoreClient(stuck, timeout_s=30, max_inflight_messages=1, max_batch_appends=1)
            futs = [c.append_nowait(f"s{i}", _events(1)) for i in range(3)]
            await wait_until(lambda: len(c._inflight) == 1
                             and len(c._outbox) + len(c._pending) == 1, 10,
                             "one append in flight, one held by the sender, one queued")
            await c.close()
            await asyncio.wait(futs, timeout=2)
            assert all(_cancelled(f) for f in futs), futs
        async with _node("refuse", retry_after_ms=5_000) as (busy, seen):
            c = StoreClient(busy, timeout_s=30)
            fut = c.append_nowait("s", _events(1))
            await wait_until(lambda: bool(seen) and c._hold is not None, 10,
                             "the refusal's backoff")
            await c.close()
            await asyncio.wait([fut], timeout=2)
            assert _cancelled(fut), fut
    run(body)


def test_a_malformed_append_fails_alone_among_good_ones(tmp_path: Path) -> None:
    """An expected revision, expectation or stream the client cannot even put in a
    message fails that append with INVALID_ARGUMENT naming the field; the appends that
    would have shared its message are written. Before, building the message raised for
    all of them, again and again until their deadline. An append of no event joins no
    merged append: the store refuses it alone."""
    async def body() -> None:
        async with running_store(tmp_path, linger_s=0.02) as (_, c):
            bad = [c.append_nowait("s", _events(1), EXACT, -1),
                   c.append_nowait("s", _events(1), EXACT, 1.5),  # type: ignore[arg-type]
                   c.append_nowait("s", _events(1), "any"),  # type: ignore[arg-type]
                   c.append_nowait(5, _events(1))]  # type: ignore[arg-type]
            good = [c.append_nowait("s", _events(1)) for _ in range(3)]
            empty = c.append_nowait("s", [])
            good.append(c.append_nowait("s", _events(1)))
            answers = await asyncio.wait_for(asyncio.gather(*good), 10)
            assert [a.last_revision for a in answers] == [1, 2, 3, 4]
            for f, field in zip(bad, ["expected_revision", "expected_revision", "expected",
                                      "stream"], strict=True):
                err = f.exception()
                assert isinstance(err, AppendError), err
                assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
                assert err.message.startswith(f"{field}:"), err
            with pytest.raises(AppendError) as refused:
                await empty
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "events" in refused.value.message
            assert len(await c.read("s")) == 4
    run(body)


def test_messages_fit_the_message_size_and_the_nodes_appends_per_message(
        tmp_path: Path) -> None:
    """A message holds at most the bytes of one append (the node's message limit is that
    plus room for framing) and at most the appends per message the node states. Before,
    30 appends of 900 kB made one 27 MB message that gRPC refused whole, and a node
    configured for 4 appends a message ended the stream of a client sending 50."""
    async def body() -> None:
        async with running_store(tmp_path / "a", linger_s=0.05) as (_, c):
            futs = [c.append_nowait("s", _events(1, 900_000)) for _ in range(30)]
            answers = await asyncio.wait_for(asyncio.gather(*futs), 30)
            assert [a.last_revision for a in answers] == list(range(1, 31))
        limits = Limits(max_appends_per_message=4)
        async with running_store(tmp_path / "b", limits=limits, linger_s=0.05) as (_, c):
            await c.append("warm", _events(1))
            await wait_until(lambda: c._message_appends == 4, 10, "the node's limits read")
            futs = [c.append_nowait(f"s{i}", _events(1)) for i in range(50)]
            await asyncio.wait_for(asyncio.gather(*futs), 10)
    run(body)


def test_appends_retried_after_a_reset_land_before_appends_made_later(
        tmp_path: Path) -> None:
    """A stream reset puts the appends in flight back, and the client sends nothing else
    until they are sent again: appends made during the backoff land after them. Before,
    those went out at once on the new stream and landed first (in this test: every
    time), so appends to one stream were written in another order than made."""
    from geo.proxy import Link

    async def body() -> None:
        async with running_store(tmp_path) as (server, _), \
                Link("front", server.address) as front:
            c = StoreClient(front.address, timeout_s=30, attempt_timeout_s=5)
            try:
                await c.append("s", _events(1))  # the stream is open
                front.partition("blackhole")  # the next appends stay in the proxy...
                first = [c.append_nowait("s", _events(1)) for _ in range(10)]
                await wait_until(lambda: bool(c._inflight), 10, "first appends in flight")
                front.partition("reset")  # ...which then drops them and the connection
                await wait_until(lambda: c._call is None, 10, "the stream reset")
                front.heal()
                later = [c.append_nowait("s", _events(1)) for _ in range(10)]
                first_ok = await asyncio.wait_for(asyncio.gather(*first), 20)
                later_ok = await asyncio.wait_for(asyncio.gather(*later), 20)
                assert max(a.last_position for a in first_ok) < \
                    min(a.last_position for a in later_ok), (first_ok, later_ok)
                assert [a.last_revision for a in first_ok + later_ok] == list(range(2, 22))
            finally:
                await c.close()
    run(body)


def test_a_follower_refusing_a_large_message_moves_the_client_to_its_leader_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A follower refuses every append of a 1000-append message, naming the leader: the
    client moves to the leader once, and every append lands there. Before, each append
    got a retry of its own: the first moved the client, the others, refused 'by' the
    leader they were already on, moved it on to the next node, and back (10 moves in a
    reproduction); each move is a stream reset."""
    async def body() -> None:
        async with running_store(tmp_path) as (leader, _), \
                _node("refuse", leader=leader.address) as (follower, _), \
                _node("refuse", leader=leader.address) as (other, _), \
                StoreClient([follower, leader.address, other], timeout_s=30,
                            linger_s=0.05) as c:
            futs = [c.append_nowait("s", _events(1), ANY) for _ in range(1000)]
            answers = await asyncio.wait_for(asyncio.gather(*futs), 30)
            assert answers[-1].last_revision == 1000
        opened = streams_opened(caplog)
        assert opened == [f"append stream to {follower} opened",
                          f"append stream to {leader.address} opened"], opened

    with caplog.at_level(logging.DEBUG, logger="xdc.client"):
        run(body)


def test_a_node_answering_out_of_protocol_is_left_like_a_failed_one(tmp_path: Path) -> None:
    """An answer without a result per append (a bug, or not an xdc node at that address)
    drops the stream and sends the appends elsewhere; with nowhere else, they fail at
    their deadline. Before, an assert ended the task reading answers, and an append whose
    message was the only one in flight was never answered."""
    async def body() -> None:
        async with _node("garble") as (garbling, seen):
            c = StoreClient(garbling, timeout_s=1.0)
            try:
                fut = c.append_nowait("s", _events(1))
                await asyncio.wait([fut], timeout=5)
                assert fut.done() and isinstance(fut.exception(), AppendError), fut
                assert fut.exception().code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert len(seen) >= 2  # sent again until its deadline
            finally:
                await c.close()
            async with running_store(tmp_path) as (store, _), \
                    StoreClient([garbling, store.address], timeout_s=10) as c:
                answer = await c.append("s", _events(1))
                assert answer.last_revision == 1
    run(body)


def test_closing_fails_appends_about_to_be_retried_with_cancelled() -> None:
    """Appends refused with a retry hint and settled while the client closes fail with
    CANCELLED ("client closed"), like every other append the close finds. Before, they
    failed with the refusal that was to be retried (UNAVAILABLE "not the leader"), as if
    the store had answered them so. The close comes between two slices of one message's
    answers (SETTLE_SLICE): the first append's answer wakes this task before the rest are
    settled."""
    async def body() -> None:
        async with _node("first-ok", retry_after_ms=5_000) as (node, _):
            c = StoreClient(node, timeout_s=30)
            try:
                # Distinct streams: one append each in a single message, not merged.
                futs = [c.append_nowait(f"s{i}", _events(1)) for i in range(3 * SETTLE_SLICE)]
                assert (await futs[0]).last_revision == 1
            finally:
                await c.close()
            await asyncio.wait(futs[1:], timeout=5)
            errors = [f.exception() for f in futs[1:]]
            assert all(isinstance(e, AppendError) and e.code == grpc.StatusCode.CANCELLED
                       and e.message == "client closed" for e in errors), {
                repr(e) for e in errors}
    run(body)


def test_append_nowait_fails_at_its_timeout_behind_a_paused_node(tmp_path: Path) -> None:
    """Appends to a paused `xdc serve` (SIGSTOP) fail with DEADLINE_EXCEEDED by their own
    timeout wherever they wait: in flight, held by the sender for a free slot, queued,
    and one with a shorter timeout queued behind them. Before, `append_nowait`'s futures
    were failed only where the client retried (the stream's attempt timeout, 5 s here).
    Once the node goes on, what it wrote of them is found by retrying with the same ids:
    answered as duplicates with the original positions, each event stored once."""
    from store.process import ServeProcess

    async def body(node: ServeProcess) -> None:
        loop = asyncio.get_running_loop()
        async with StoreClient(node.address, timeout_s=30, attempt_timeout_s=5,
                               max_inflight_messages=1, max_batch_appends=1) as c:
            await c.append("s", _events(1))  # the stream is open, the limits known
            node.signal(signal.SIGSTOP)
            try:
                sent = [_events(1) for _ in range(4)]
                timeouts = [0.6, 0.6, 0.6, 0.3]
                t0 = loop.time()
                ended: dict[int, float] = {}
                futs = []
                for i, (events, timeout) in enumerate(zip(sent, timeouts, strict=True)):
                    futs.append(c.append_nowait("s", events, timeout_s=timeout))
                    futs[-1].add_done_callback(lambda _, i=i: ended.setdefault(
                        i, loop.time() - t0))
                await wait_until(lambda: len(c._inflight) == 1 and len(c._outbox) == 2, 5,
                                 "one append in flight, one held by the sender, two queued")
                await asyncio.wait(futs, timeout=10)
                for i, (f, timeout) in enumerate(zip(futs, timeouts, strict=True)):
                    err = f.exception()
                    assert isinstance(err, AppendError), (i, f)
                    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, (i, err)
                    assert "outcome is unknown" in err.message
                    # The margin absorbs a loaded machine's loop lag; without the
                    # deadline sweep they end at the 5 s attempt timeout.
                    assert timeout <= ended[i] < timeout + 1.0, (i, ended)
            finally:
                node.signal(signal.SIGCONT)
            # The one in flight was written after its timeout; retries must find it.
            await wait_until(lambda: _count(c, "s", 2), 10, "the paused append written")
            answers = [await c.append("s", events, timeout_s=10) for events in sent]
            assert answers[0].duplicate, answers[0]
            stored = await c.read("s")
            assert len({e.id for e in stored}) == len(stored) == 5, stored
            revision = {e.id: e.revision for e in stored}
            assert [a.last_revision for a in answers] == [revision[e[0].id] for e in sent]
            assert (await c.append("s", _events(1))).last_revision == 6

    with ServeProcess(str(tmp_path)) as node:
        run(lambda: body(node))


async def _count(c: StoreClient, stream: str, n: int) -> bool:
    return len(await c.read(stream)) >= n


async def _stored(c: StoreClient, stream: str) -> int:
    """The events of `stream` on the node of `c` (0: no such stream)."""
    try:
        return len(await c.read(stream))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return 0


def test_a_stream_reset_moves_the_appends_in_flight_to_the_next_node_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A node whose connection breaks with appends in flight (RST through a proxy) is
    left for the next target, and the appends land there. Before, the appends were put
    back only after the move, as refused by the node moved to: their backoff then moved
    the client on once more, past a node that had never been tried (the appends landed
    on the third target)."""
    from geo.proxy import Link

    async def body() -> None:
        async with running_store(tmp_path / "a") as (a, _), \
                running_store(tmp_path / "b") as (b, on_b), \
                running_store(tmp_path / "c") as (c3, on_c), \
                Link("front", a.address) as front:
            c = StoreClient([front.address, b.address, c3.address], timeout_s=30,
                            attempt_timeout_s=5)
            try:
                await c.append("s", _events(1))  # the stream to the proxied node is open
                front.partition("blackhole")
                futs = [c.append_nowait("s", _events(1)) for _ in range(10)]
                await wait_until(lambda: bool(c._inflight), 10, "the appends in flight")
                front.partition("reset")
                answers = await asyncio.wait_for(asyncio.gather(*futs), 20)
                assert [x.last_revision for x in answers] == list(range(1, 11)), answers
            finally:
                await c.close()
            assert [await _stored(on, "s") for on in (on_b, on_c)] == [10, 0]
        opened = streams_opened(caplog)
        assert opened == [f"append stream to {front.address} opened",
                          f"append stream to {b.address} opened"], opened

    with caplog.at_level(logging.DEBUG, logger="xdc.client"):
        run(body)


def test_an_append_past_its_deadline_when_its_stream_resets_fails_in_doubt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append in flight whose deadline passed before the deadline sweep came round to
    it (sweeps are at least EXPIRY_SWEEP_S apart) fails, when its stream is reset, with
    DEADLINE_EXCEEDED "outcome unknown": it was sent, it may have been written. Before,
    it failed with the transport's error (UNAVAILABLE "Connection reset"), as if the
    store had refused it. The sweep is set far apart so that the reset, made right after
    the deadline, comes first every time; an append with a longer timeout lands on the
    next node."""
    from geo.proxy import Link

    monkeypatch.setattr(client_module, "EXPIRY_SWEEP_S", 30.0)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with running_store(tmp_path / "a") as (a, _), \
                running_store(tmp_path / "b") as (b, _), \
                Link("front", a.address) as front:
            c = StoreClient([front.address, b.address], timeout_s=30, attempt_timeout_s=5)
            try:
                await c.append("s", _events(1))  # the stream to the proxied node is open
                front.partition("blackhole")
                swept = c.append_nowait("s", _events(1), timeout_s=0.3)
                unswept = c.append_nowait("s", _events(1), timeout_s=0.4)
                deadline = loop.time() + 0.4  # no earlier than `unswept`'s
                lasting = c.append_nowait("s", _events(1), timeout_s=30)
                await wait_until(lambda: bool(c._inflight), 10, "the appends in flight")
                await wait_until(swept.done, 10, "the first deadline swept")
                await wait_until(lambda: loop.time() > deadline, 10,
                                 "the second deadline past, unswept")
                assert not unswept.done()
                front.partition("reset")
                await asyncio.wait([unswept], timeout=10)
                ended = loop.time() - deadline
                for f in (swept, unswept):
                    err = f.exception()
                    assert isinstance(err, AppendError), f
                    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
                    assert "outcome is unknown" in err.message, err
                assert ended < 2.0, ended  # at the reset, not at a sweep 30 s on
                assert (await asyncio.wait_for(lasting, 20)).last_revision == 1
            finally:
                await c.close()

    run(body)


# ---- appends that never reached a node, and appends that may have -------------------------

def test_an_append_no_node_could_be_reached_fails_not_sent_naming_why() -> None:
    """Every attempt failed to connect: nothing can have been written, so the append fails
    with UNAVAILABLE naming the target and the transport's error, not "outcome unknown".
    It is retried until shortly before its timeout (a node coming up meanwhile takes it:
    the next test), or for `connect_timeout_s` of failed connects. Before: DEADLINE_EXCEEDED
    "its outcome is unknown", after the whole timeout, whatever `connect_timeout_s`."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        with refusing_port() as closed:
            async with StoreClient(closed, timeout_s=1.0) as c:
                t0 = loop.time()
                with pytest.raises(AppendError) as failed:
                    await c.append("s", _events(1))
                took = loop.time() - t0
                err = failed.value
                assert err.code == grpc.StatusCode.UNAVAILABLE, err
                assert err.message.startswith(f"append not sent: no connection to {closed} "
                                              "(failed to connect to all addresses"), err
                assert "Connection refused" in err.message, err
                assert "; this call appended nothing" in err.message, err
                # Retried until its last attempt could end before the deadline.
                assert 1.0 - 0.05 - client_module.LAST_ATTEMPT_S - 0.1 <= took < 1.0, took
                fut = c.append_nowait("s", _events(1), timeout_s=0.5)
                await asyncio.wait([fut], timeout=5)
                assert fut.exception().code == grpc.StatusCode.UNAVAILABLE, fut
            async with StoreClient(closed, timeout_s=30, connect_timeout_s=0.3) as c:
                t0 = loop.time()
                with pytest.raises(AppendError) as failed:
                    await c.append("s", _events(1))
                took = loop.time() - t0
                assert failed.value.code == grpc.StatusCode.UNAVAILABLE, failed.value
                assert "append not sent" in failed.value.message
                assert 0.3 <= took < 2.0, took
    run(body)


def test_an_append_made_before_its_node_is_up_lands_once_it_is(tmp_path: Path) -> None:
    """Failed connects are retried until the timeout (a node restarting, a leader not yet
    up): the append lands when the node starts listening; one that gave up before was
    never sent, then or later."""
    from store.node import StoreNode
    from store.server import StoreServer

    async def body() -> None:
        with refusing_port() as address:
            pass  # free again: the node listens there below
        async with StoreClient(address, timeout_s=30) as c:
            given_up = c.append_nowait("s", _events(1), timeout_s=0.4)
            waiting = c.append_nowait("s", _events(1))
            await asyncio.wait([given_up], timeout=5)
            assert given_up.exception().code == grpc.StatusCode.UNAVAILABLE, given_up
            server = StoreServer(StoreNode(tmp_path), address)
            await server.start()
            try:
                answer = await asyncio.wait_for(waiting, 20)
                assert answer.last_revision == 1
                assert len(await c.read("s")) == 1  # the one given up never went
            finally:
                await server.stop(grace_s=0.5)
    run(body)


def test_an_append_cut_off_in_flight_stays_in_doubt_though_its_node_then_refuses(
        tmp_path: Path) -> None:
    """An append in flight to a node that dies (SIGSTOP, then SIGKILL) may have been
    written: every attempt after it is refused, and yet it fails with DEADLINE_EXCEEDED,
    outcome unknown, never "not sent"."""
    from store.process import ServeProcess

    async def body(node: ServeProcess) -> None:
        async with StoreClient(node.address, timeout_s=30) as c:
            await c.append("s", _events(1))  # the stream is open
            node.signal(signal.SIGSTOP)
            fut = c.append_nowait("s", _events(1), timeout_s=3.0)
            await wait_until(lambda: bool(c._inflight), 5, "the append in flight")
            node.kill()
            await asyncio.wait([fut], timeout=10)
            err = fut.exception()
            assert isinstance(err, AppendError), fut
            assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
            assert "outcome is unknown" in err.message, err

    with ServeProcess(str(tmp_path)) as node:
        run(lambda: body(node))


def test_from_end_subscription_started_while_the_node_is_unreachable_starts_at_the_end(
        tmp_path: Path) -> None:
    """subscribe(from_end=True) whose first call fails (node briefly unreachable: a
    restart, a failover) resumed with from_end=False and after_position=0: it replayed
    the whole log instead of starting at the end (`first` was cleared before the first
    call had answered anything; found by helper-82's review)."""
    async def body() -> None:
        async with running_store(tmp_path) as (node, c):
            for i in range(5):
                await c.append("s", new_event("T", str(i).encode()))
            async with Link("sub", node.address) as link, StoreClient(link.address) as via:
                link.partition("reset")
                items: list[object] = []

                async def follow() -> None:
                    async for item in via.subscribe(from_end=True):
                        items.append(item)

                task = asyncio.create_task(follow())
                try:
                    # The first Subscribe call reached the proxy and was reset.
                    await wait_until(lambda: link.stats["refused"] >= 1,
                                     what="a refused connection")
                    link.heal()
                    await wait_until(lambda: any(isinstance(i, CaughtUp) for i in items)
                                     or task.done(), what="caught up")
                    await c.append("s", new_event("T", str(5).encode()))
                    await wait_until(lambda: any(getattr(i, "position", 0) == 6
                                                 for i in items if isinstance(
                                                     i, pb.RecordedEvent)) or task.done(),
                                     what="the live event")
                    events = [i.position for i in items if isinstance(i, pb.RecordedEvent)]
                    assert events == [6], f"from_end delivered history: {events}"
                finally:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task  # its channel closed
    run(body)


def test_an_append_whose_call_failed_after_it_was_written_is_answered_as_written(
        tmp_path: Path) -> None:
    """A node whose AppendStream handler fails (UNKNOWN) once the appends of a message are
    durable, before it answers them (a failpoint): the client answered them with UNKNOWN,
    a refusal, although they were written, and a caller retrying with new ids made a
    second copy (helper-82's review). Such an error may come after a write: the appends
    are in doubt and sent again with the same ids, which the node answers with the
    original positions."""
    from store.process import ServeProcess

    node = ServeProcess(str(tmp_path / "node"),
                        env={"XDC_FAILPOINT_APPEND_FAIL_AFTER_COMMIT": "1"}).start()
    try:
        async def body() -> None:
            async with StoreClient(node.address, timeout_s=10) as c:
                r = await c.append("s", new_event("T", b"once"))
                assert r.duplicate and r.first_position == 1, r
                assert [e.data for e in await c.read("s")] == [b"once"]
        run(body)
    finally:
        node.stop()
