"""The EventStore gRPC API against a real node: real LMDB files, real gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from geo.proxy import Link
from store import records
from store.client import (
    ANY,
    EXACT,
    NO_STREAM,
    SETTLE_SLICE,
    STREAM_EXISTS,
    AppendError,
    CaughtUp,
    Checkpoint,
    RawBatch,
    StoreClient,
    _Pending,
    new_event,
    new_id,
)
from store.errors import MD_ACTUAL_REVISION
from store.limits import Limits
from tests.support.store import run, running_store, wait_until
from xdc.v1 import eventstore_pb2 as pb


def ev(n: int, etype: str = "T", size: int = 16) -> pb.ProposedEvent:
    return new_event(etype, str(n).encode().ljust(size, b"."), metadata={"n": str(n)})


def test_append_then_read_stream_and_all(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            r = await c.append("orders", [ev(1), ev(2), ev(3)], NO_STREAM)
            assert (r.first_position, r.last_position, r.last_revision, r.next_revision) == (
                1, 3, 3, 4)
            assert not r.duplicate
            r = await c.append("fills", ev(4))
            assert (r.first_position, r.last_revision) == (4, 1)
            events = await c.read("orders")
            assert [(e.revision, e.position, e.stream) for e in events] == [
                (1, 1, "orders"), (2, 2, "orders"), (3, 3, "orders")]
            assert events[0].data.startswith(b"1.") and events[0].metadata["n"] == "1"
            assert all(e.term == 1 for e in events)
            stamps = [e.timestamp_ns for e in await c.read("$all")]
            assert stamps == sorted(stamps) and stamps[0] > 0
            assert [e.position for e in await c.read("$all", backwards=True)] == [4, 3, 2, 1]
            assert [e.revision for e in await c.read("orders", start=2, limit=1)] == [2]
            assert [e.revision for e in await c.read("orders", backwards=True, limit=2)] == [3, 2]
            assert [e.revision for e in await c.read("orders", start=2, backwards=True)] == [2, 1]
            assert [e.position for e in await c.read("$all", start=3, limit=10)] == [3, 4]
            assert await c.read("orders", start=10) == []
    run(body)


def test_stream_reads_across_interleaved_runs(tmp_path: Path) -> None:
    """Interleaved streams make many index runs per stream; every revision must map to
    its own position, forwards and backwards, from any starting revision."""
    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            expected: dict[str, list[int]] = {"a": [], "b": [], "c": []}
            # Sequential appends of varying sizes so runs break and continue.
            for i in range(60):
                stream = "abc"[(i * 7) % 3] if i % 5 else "a"
                n = 1 + i % 4
                r = await c.append(stream, [ev(i * 10 + k) for k in range(n)])
                expected[stream].extend(range(r.first_position, r.last_position + 1))
            for stream, positions in expected.items():
                got = [e.position for e in await c.read(stream, limit=1000)]
                assert got == positions
                for rev in (1, 2, len(positions) // 2, len(positions)):
                    fwd = await c.read(stream, start=rev, limit=1000)
                    assert [e.position for e in fwd] == positions[rev - 1:]
                    assert [e.revision for e in fwd] == list(range(rev, len(positions) + 1))
                    back = await c.read(stream, start=rev, backwards=True, limit=1000)
                    assert [e.position for e in back] == positions[:rev][::-1]
                info = await c.stream_info(stream)
                assert (info.last_revision, info.count, info.first_position,
                        info.last_position) == (len(positions), len(positions), positions[0],
                                                positions[-1])
    run(body)


def test_expected_revision_rules(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            with pytest.raises(AppendError) as e:
                await c.append("s", ev(0), STREAM_EXISTS)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            await c.append("s", ev(1), NO_STREAM)
            with pytest.raises(AppendError) as e:
                await c.append("s", ev(2), NO_STREAM)
            assert e.value.actual_last_revision == 1
            await c.append("s", ev(3), STREAM_EXISTS)
            await c.append("s", ev(4), EXACT, 2)
            with pytest.raises(AppendError) as e:
                await c.append("s", ev(5), EXACT, 2)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "expected exact(2), actual last revision 3" in e.value.message
            assert e.value.actual_last_revision == 3
            await c.append("s", ev(6), EXACT, 3)
            await c.append("t", ev(7), EXACT, 0)  # exact(0) is no_stream
            await c.append("s", ev(8), ANY)
            # The unary Append carries the actual revision in trailing metadata too.
            req = pb.AppendRequest(stream="s", expected=EXACT, expected_revision=1,
                                   events=[ev(9)])
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await c.stub.Append(req)
            assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert dict(rpc.value.trailing_metadata())[MD_ACTUAL_REVISION] == "5"
            assert [e.revision for e in await c.read("s")] == [1, 2, 3, 4, 5]
    run(body)


def test_idempotent_retry_returns_original_positions_even_after_restart(tmp_path: Path) -> None:
    batch = [ev(1), ev(2)]

    async def first() -> None:
        async with running_store(tmp_path) as (_, c):
            r1 = await c.append("s", batch, NO_STREAM)
            await c.append("other", ev(3))
            r2 = await c.append("s", batch, NO_STREAM)  # expected revision no longer holds
            assert (r2.first_position, r2.last_position, r2.last_revision) == (
                r1.first_position, r1.last_position, r1.last_revision)
            assert r2.duplicate

    async def after_restart() -> None:
        async with running_store(tmp_path) as (server, c):
            r = await c.append("s", batch)
            assert (r.first_position, r.last_position, r.duplicate) == (1, 2, True)
            assert server.node.log is not None and server.node.log.last_position == 3
            changed = pb.ProposedEvent()
            changed.CopyFrom(batch[0])
            changed.data = b"other content"
            with pytest.raises(AppendError) as e:
                await c.append("s", changed)
            assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
            assert "different content" in e.value.message
            # A retry in another trace (new traceparent) is the same event; another
            # metadata value is not.
            traced = pb.ProposedEvent()
            traced.CopyFrom(batch[0])
            traced.metadata["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
            r = await c.append("s", traced)
            assert r.duplicate and r.first_position == 1
            traced.metadata["other"] = "x"
            with pytest.raises(AppendError) as e:
                await c.append("s", traced)
            assert "different content" in e.value.message
            with pytest.raises(AppendError) as e:
                await c.append("elsewhere", batch[0])
            assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
            assert "in stream 's'" in e.value.message
            with pytest.raises(AppendError) as e:
                await c.append("s", [batch[0], ev(4)])
            assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
            assert "exactly the original events" in e.value.message
            assert server.node.log.last_position == 3
            # Events all in the log, but not as one append in this order: first..last
            # would not be their positions (found by tests/test_fuzz.py).
            five = ev(5)
            assert (await c.append("s", five)).first_position == 4
            for events, text in (([batch[1], batch[0]], "events[1].id"),
                                 ([batch[0], five], "events[1].id")):
                with pytest.raises(AppendError) as e:
                    await c.append("s", events)
                assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
                assert text in e.value.message and "not as one append" in e.value.message
            assert server.node.log.last_position == 4

    run(first)
    run(after_restart)


def test_concurrent_duplicates_in_one_group_commit_resolve_to_one_write(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (server, c):
            e = ev(1)
            results = await asyncio.gather(*(c.append("s", e) for _ in range(20)))
            assert {r.first_position for r in results} == {1}
            assert sum(not r.duplicate for r in results) == 1
            assert server.node.log is not None and server.node.log.last_position == 1
    run(body)


# ---- bad input: every limit, a clear status, nothing written --------------------------

SMALL = dict(max_event_bytes=1024, max_append_events=10, max_append_bytes=4096,
             max_stream_name_bytes=40, max_type_bytes=32, max_metadata_entries=4,
             max_metadata_key_bytes=16, max_read_count=100, max_appends_per_message=5)


def _bad_appends() -> list[tuple[str, pb.AppendRequest, str]]:
    ok = ev(1)
    cases: list[tuple[str, pb.AppendRequest, str]] = [
        ("empty stream", pb.AppendRequest(stream="", events=[ok]), "stream: empty"),
        ("stream too long", pb.AppendRequest(stream="s" * 41, events=[ok]),
         "stream: 41 bytes exceeds max_stream_name_bytes (40)"),
        ("multibyte stream too long", pb.AppendRequest(stream="é" * 21, events=[ok]),
         "42 bytes exceeds max_stream_name_bytes (40)"),
        ("control char", pb.AppendRequest(stream="a\nb", events=[ok]),
         "stream: contains a control character"),
        ("C1 control char", pb.AppendRequest(stream="a\x85b", events=[ok]),
         "stream: contains a control character"),
        ("reserved", pb.AppendRequest(stream="$all", events=[ok]), "starts with '$'"),
        ("no events", pb.AppendRequest(stream="s"), "events: empty"),
        ("too many events", pb.AppendRequest(stream="s", events=[ev(i) for i in range(11)]),
         "events: 11 events exceeds max_append_events (10)"),
        ("batch bytes", pb.AppendRequest(stream="s", events=[ev(i, size=900) for i in range(5)]),
         "exceeds max_append_bytes (4096)"),
        ("event too large", pb.AppendRequest(stream="s", events=[ok, ev(2, size=1100)]),
         "events[1]: 1"),
        ("short id", pb.AppendRequest(stream="s", events=[
            pb.ProposedEvent(id=b"123", type="T")]), "events[0].id: must be a 16-byte"),
        ("nil id", pb.AppendRequest(stream="s", events=[
            pb.ProposedEvent(id=bytes(16), type="T")]), "(nil)"),
        ("dup id", pb.AppendRequest(stream="s", events=[ok, ev(2), ok]),
         "events[2].id: duplicates events[0].id"),
        ("missing type", pb.AppendRequest(stream="s", events=[
            pb.ProposedEvent(id=uuid.uuid4().bytes)]), "events[0].type: required"),
        ("type too long", pb.AppendRequest(stream="s", events=[
            pb.ProposedEvent(id=uuid.uuid4().bytes, type="t" * 33)]),
         "exceeds max_type_bytes (32)"),
        ("content type too long", pb.AppendRequest(stream="s", events=[
            pb.ProposedEvent(id=uuid.uuid4().bytes, type="t", content_type="c" * 33)]),
         "events[0].content_type: 33 bytes exceeds max_type_bytes (32)"),
        ("metadata entries", pb.AppendRequest(stream="s", events=[pb.ProposedEvent(
            id=uuid.uuid4().bytes, type="t", metadata={str(i): "v" for i in range(5)})]),
         "5 entries exceeds max_metadata_entries (4)"),
        ("metadata key", pb.AppendRequest(stream="s", events=[pb.ProposedEvent(
            id=uuid.uuid4().bytes, type="t", metadata={"k" * 17: "v"})]),
         "exceeds max_metadata_key_bytes (16)"),
        ("revision without exact", pb.AppendRequest(stream="s", expected_revision=3,
                                                    events=[ok]),
         "expected_revision: set only with EXPECTED_EXACT"),
        ("unknown expected kind", pb.AppendRequest(stream="s", expected=9, events=[ok]),
         "expected: unknown ExpectedKind 9"),
    ]
    return cases


def test_bad_appends_are_refused_with_field_and_limit_and_write_nothing(tmp_path: Path) -> None:
    limits = Limits(**SMALL)

    async def body() -> None:
        async with running_store(tmp_path, limits) as (server, c):
            for name, req, text in _bad_appends():
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await c.stub.Append(req)
                assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                assert text in (rpc.value.details() or ""), (name, rpc.value.details())
                # The same refusal through the pipelined stream, per append.
                resp = await _append_stream_once(c, [req, pb.AppendRequest(stream="ok",
                                                                           events=[ev(0)])])
                assert resp.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                refusal = resp.results[0].error.message
                assert refusal.startswith("appends[0].") and text in refusal, (name, refusal)
                assert resp.results[1].WhichOneof("result") == "ok"
            log = server.node.log
            assert log is not None
            # Only the valid companions were written: one event each, stream "ok".
            assert [e.stream for e in await c.read("$all", limit=100)] == ["ok"] * len(
                _bad_appends())
            assert log.stream_count() == 1
            # Too many appends in one AppendStream message: test_input_limits.py.
    run(body)


async def _append_stream_once(c, appends: list[pb.AppendRequest]) -> pb.AppendStreamResponse:
    call = c.stub.AppendStream()
    await call.write(pb.AppendStreamRequest(correlation_id=7, appends=appends))
    await call.done_writing()
    responses = [r async for r in call]
    assert len(responses) == 1 and responses[0].correlation_id == 7
    return responses[0]


def test_malformed_request_bytes_get_invalid_argument(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (server, _):
            async with grpc.aio.insecure_channel(server.address) as ch:
                raw = ch.unary_unary("/xdc.v1.EventStore/Append")
                # Field 1 (stream) holding invalid UTF-8.
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await raw(b"\x0a\x02\xff\xfe")
                assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid AppendRequest" in (rpc.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await raw(b"\xff\xff\xff")
                assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert server.node.log is not None and server.node.log.last_position == 0
    run(body)


def test_bad_reads(tmp_path: Path) -> None:

    async def body() -> None:
        async with running_store(tmp_path, Limits(**SMALL)) as (_, c):
            await c.append("s", ev(1))
            for kwargs, code, text in [
                (dict(stream="missing", limit=1), grpc.StatusCode.NOT_FOUND,
                 "stream 'missing' not found"),
                (dict(stream="s", limit=0), grpc.StatusCode.INVALID_ARGUMENT,
                 "limit: 0 is outside 1..max_read_count (100)"),
                (dict(stream="s", limit=101), grpc.StatusCode.INVALID_ARGUMENT,
                 "limit: 101 is outside"),
                (dict(stream="", limit=1), grpc.StatusCode.INVALID_ARGUMENT, "stream: empty"),
                (dict(stream="s", limit=1, direction=7), grpc.StatusCode.INVALID_ARGUMENT,
                 "direction: unknown Direction 7"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    async for _ in c.stub.Read(pb.ReadRequest(**kwargs)):
                        pass
                assert rpc.value.code() == code, kwargs
                assert text in (rpc.value.details() or ""), (kwargs, rpc.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await c.stream_info("missing")
            assert rpc.value.code() == grpc.StatusCode.NOT_FOUND
            # min_position beyond the commit position waits, then says why.
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await c.read("s", limit=10, min_position=5, timeout_s=0.3)
            assert rpc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    run(body)


def test_min_position_read_waits_for_the_write(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            await c.append("s", ev(1))
            reader = asyncio.ensure_future(c.read("$all", min_position=2, timeout_s=10))
            await asyncio.sleep(0)
            assert not reader.done()
            await c.append("s", ev(2))
            assert [e.position for e in await reader] == [1, 2]
    run(body)


def test_a_read_outlives_the_client_moving_its_channel(tmp_path: Path) -> None:
    """Reads share the channel of appends; when an append stream fails over the client
    closes that channel and grpc.aio cancels every call on it. A read in flight is made
    again on the new channel (its caller's task was not cancelled, so it must not see
    CancelledError); a read whose task is cancelled still ends with CancelledError."""
    async def body() -> None:
        async with running_store(tmp_path) as (server, c):
            waiters = server.node.commit._waiters  # reads waiting for a min_position
            await c.append("s", ev(1))
            reader = asyncio.ensure_future(c.read("$all", min_position=2, timeout_s=10))
            await wait_until(lambda: len(waiters) == 1, what="the read waiting on the server")
            first = c._channel
            await c._switch()  # what a failed-over append stream does
            await wait_until(lambda: len(waiters) == 2, what="the read made again")
            await c.append("s", ev(2))  # on the new channel
            assert c._channel is not first
            assert [e.position for e in await reader] == [1, 2]
            before = len(waiters)  # the waits above are answered and gone
            doomed = asyncio.ensure_future(c.read("$all", min_position=10, timeout_s=10))
            await wait_until(lambda: len(waiters) > before, what="the read waiting")
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
    run(body)


def test_a_read_cut_after_its_first_batches_answers_unavailable(tmp_path: Path) -> None:
    """A read that has given out batches when the client moves its channel is not made
    again (its caller would see those events twice): the next step of the iteration
    raises UNAVAILABLE, and the caller reads again from where it got to. The read is far
    larger than gRPC's flow-control window, so the server is still sending when the
    channel closes."""
    limits = Limits(max_batch_events=100, max_event_bytes=64 * 1024, max_batch_bytes=64 * 1024)
    per_append, appends, size = 50, 20, 32 * 1024  # 1000 events, 32 MiB

    async def body() -> None:
        async with running_store(tmp_path, limits) as (_, c):
            for i in range(appends):
                await c.append("big", [ev(i * per_append + k, size=size)
                                       for k in range(per_append)])
            batches = c.read_batches("big", limit=per_append * appends)
            first = await anext(batches)
            got = len(first.events)
            assert 0 < got < per_append * appends
            await c._switch()  # what a failed-over append stream does
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async for b in batches:  # what gRPC buffered may still come first
                    got += len(b.events)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "moved" in (cut.value.details() or "")
            assert got < per_append * appends
            # Reading on from the last event seen gives the rest, once each.
            rest = await c.read("big", start=got + 1, limit=per_append * appends)
            assert [e.revision for e in rest] == list(range(got + 1, per_append * appends + 1))
    run(body)


def test_unary_calls_cut_by_the_client_moving_its_channel(tmp_path: Path) -> None:
    """The unary calls on the shared channel when the client moves (its server paused,
    so that each call is in flight): StreamInfo is made again on the new channel and
    answered once the server goes on; NodeInfo answers UNAVAILABLE at once (it asks the
    node the client has just left; its caller decides whether to ask again)."""
    import signal

    from store.process import ServeProcess

    async def body(node: ServeProcess) -> None:
        async with StoreClient(node.address, timeout_s=20) as c:
            await c.append("s", [ev(i) for i in range(8)])
            node.signal(signal.SIGSTOP)
            try:
                info = asyncio.ensure_future(c.stream_info("s"))
                node_info = asyncio.ensure_future(c.node_info())
                for _ in range(3):  # let each start its call (no time passes)
                    await asyncio.sleep(0)
                assert not (info.done() or node_info.done())
                old = c._channel
                await c._switch()
                assert c._channel is not old
                with pytest.raises(grpc.aio.AioRpcError) as cut:
                    await node_info
                assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
                assert not info.done()  # made again, waiting for the paused server
            finally:
                node.signal(signal.SIGCONT)
            answered = await info
            assert answered.last_revision == 8 and answered.count == 8

    with ServeProcess(str(tmp_path)) as node:
        run(lambda: body(node))


def test_large_reads_come_in_bounded_batches(tmp_path: Path) -> None:
    limits = Limits(max_batch_events=100, max_event_bytes=64 * 1024, max_batch_bytes=64 * 1024)

    async def body() -> None:
        async with running_store(tmp_path, limits) as (_, c):
            for i in range(5):
                await c.append("big", [ev(i * 100 + k, size=1000) for k in range(100)])
            batches = [b async for b in c.read_batches("big", limit=500)]
            assert sum(len(b.events) for b in batches) == 500
            assert all(len(b.events) <= 100 and b.ByteSize() <= 64 * 1024 + 1024
                       for b in batches)
            assert [e.revision for b in batches for e in b.events] == list(range(1, 501))
    run(body)


# ---- subscriptions ---------------------------------------------------------------------

def test_subscribe_catch_up_marker_then_live_without_gap_or_repeat(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            for i in range(250):
                await c.append(f"s{i % 3}", ev(i))
            seen: list[int] = []
            marker: list[int] = []
            done = asyncio.Event()

            async def consume() -> None:
                async for item in c.subscribe(after_position=10):
                    if isinstance(item, CaughtUp):
                        marker.append(item.position)
                    else:
                        seen.append(item.position)
                    # The marker may come after 750 when every live append committed
                    # before the catch-up ended: wait for both.
                    if seen and seen[-1] == 750 and marker:
                        done.set()
                        return

            task = asyncio.ensure_future(consume())
            # Live appends race the catch-up: no gap, no repeat either way.
            await asyncio.gather(*(c.append(f"s{i % 3}", ev(i)) for i in range(250, 750)))
            await asyncio.wait_for(done.wait(), 20)
            await task
            assert seen == list(range(11, 751))
            assert len(marker) == 1 and 250 <= marker[0] <= 750
    run(body)


def test_raw_subscription_hands_on_the_batches_the_server_sent(tmp_path: Path) -> None:
    """``subscribe(raw=True)`` yields each batch unparsed (RawBatch) with its first and
    last positions, read from the fields the server writes first: the same events as a
    parsed subscription, filtered or not, across several batches and live. Read's
    batches carry the same positions."""
    limits = Limits(max_batch_events=7)

    async def body() -> None:
        async with running_store(tmp_path, limits) as (_, c):
            for i in range(60):
                end = (await c.append(f"s{i % 3}", ev(i, "A" if i % 4 else "B"))).last_position

            async def batches(through: int, raw: bool, **kw) -> list:
                out = []
                async for item in c.subscribe(batches=True, raw=raw, **kw):
                    if isinstance(item, CaughtUp | Checkpoint):
                        continue
                    out.append(item)
                    if (item.last_position if raw else item.events[-1].position) >= through:
                        return out
                return out

            for kw in ({}, {"stream_prefix": "s1"}, {"event_types": ["B"], "after_position": 8}):
                # The last 10 events (every filter takes them) come live or not, as the
                # append meets the subscriptions.
                live = asyncio.ensure_future(batches(end + 10, True, **kw))
                parsed = asyncio.ensure_future(batches(end + 10, False, **kw))
                res = await c.append("s1", [ev(1000 * end + k, "B") for k in range(10)])
                assert res.last_position == end + 10
                end = res.last_position
                raws, plain = await asyncio.wait_for(asyncio.gather(live, parsed), 10)
                assert len(raws) > 1 and all(isinstance(b, RawBatch) for b in raws)
                events = [e for b in raws for e in b.parsed().events]
                assert [e.SerializeToString() for e in events] == [
                    e.SerializeToString() for b in plain for e in b.events]
                assert events[-1].position == end
                for b in raws:
                    got = b.parsed().events
                    assert (b.first_position, b.last_position) == (got[0].position,
                                                                   got[-1].position)
                    assert len(got) <= 7
            read = [b async for b in c.read_batches("$all", limit=30)]
            assert len(read) > 1 and all(
                (b.first_position, b.last_position) == (b.events[0].position,
                                                        b.events[-1].position) for b in read)
    run(body)


@pytest.mark.parametrize("from_end", [False, True])
@pytest.mark.parametrize("raw", [False, True])
def test_a_subscription_resumes_after_what_it_saw(tmp_path: Path, raw: bool,
                                                  from_end: bool) -> None:
    """A subscription whose connection is reset (a fault-injecting proxy between it and
    the node) after live batches resumes after the last batch's last position, also one
    started ``from_end`` (not from the end again): every event once, in order, those
    committed while it was cut off included (helper-79: a raw one from the end lost
    them)."""
    limits = Limits(max_batch_events=5)

    async def body() -> None:
        async with running_store(tmp_path, limits) as (node, c):
            for i in range(23):
                await c.append("s", ev(i))
            async with Link("sub", node.address) as link, StoreClient(link.address) as via:
                seen: list[int] = []
                caught_up = asyncio.Event()

                async def follow() -> None:
                    async for item in via.subscribe(batches=True, raw=raw,
                                                    from_end=from_end):
                        if isinstance(item, CaughtUp):
                            caught_up.set()
                        elif isinstance(item, RawBatch):
                            seen.extend(e.position for e in item.parsed().events)
                        elif isinstance(item, pb.RecordBatch):
                            seen.extend(e.position for e in item.events)

                task = asyncio.create_task(follow())
                try:
                    await asyncio.wait_for(caught_up.wait(), 10)
                    # Live batches (no marker after them: the resume point is the last
                    # batch's last position), then the reset.
                    await c.append("s", [ev(i) for i in range(23, 33)])
                    await wait_until(lambda: seen and seen[-1] >= 33, what="the live batches")
                    link.partition("reset")
                    for i in range(33, 39):
                        await c.append("s", ev(i))
                    link.heal()
                    await c.append("s", ev(39))
                    await wait_until(lambda: (seen and seen[-1] >= 40) or task.done(),
                                     what="the subscription to resume")
                    assert not task.done(), task
                    assert seen == list(range(24 if from_end else 1, 41))
                finally:
                    task.cancel()
    run(body)


def test_batch_span_reads_only_a_batch_with_its_positions_first() -> None:
    """A client reads a batch's positions from its first bytes only when the server put
    them there; any other message (an older server's batch, a marker, bytes cut short
    or not protobuf) is left to protobuf."""
    values = records.encode_run(5, 1, 1, 0, records.stream_field(b"s"),
                                [pb.ProposedEvent(id=bytes(16), type="T").SerializeToString()
                                 for _ in range(3)])
    msg = records.wrap_field(1, records.batch_bytes(values))
    start, first, last = records.batch_span(msg) or (0, 0, 0)
    assert (first, last) == (5, 7)
    parsed = pb.SubscribeResponse.FromString(msg)
    assert pb.RecordBatch.FromString(msg[start:]) == parsed.events
    assert [e.position for e in parsed.events.events] == [5, 6, 7]
    older = records.wrap_field(1, b"".join(values))
    caught_up = pb.SubscribeResponse(caught_up=pb.CaughtUp(position=9)).SerializeToString()
    for other in (older, caught_up, msg[:-1], msg + b"\x00", b"\x0a" + b"\xff" * 30, b""):
        assert records.batch_span(other) is None, other


def test_subscribe_filters_and_from_end(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            await c.append("orders.A", ev(1, "OrderPlaced"))
            await c.append("fills.A", ev(2, "Filled"))
            await c.append("orders.B", ev(3, "OrderCancelled"))
            await c.append("orders.B", ev(4, "OrderPlaced"))

            async def collect(n: int, **kw) -> list[tuple[str, str]]:
                out: list[tuple[str, str]] = []
                async for item in c.subscribe(**kw):
                    if isinstance(item, CaughtUp | Checkpoint):
                        continue
                    out.append((item.stream, item.type))
                    if len(out) == n:
                        return out
                return out

            assert await collect(3, stream_prefix="orders.") == [
                ("orders.A", "OrderPlaced"), ("orders.B", "OrderCancelled"),
                ("orders.B", "OrderPlaced")]
            assert await collect(2, event_types=["OrderPlaced"]) == [
                ("orders.A", "OrderPlaced"), ("orders.B", "OrderPlaced")]
            assert await collect(1, stream_prefix="orders.", event_types=["OrderCancelled"]) == [
                ("orders.B", "OrderCancelled")]
            live = asyncio.ensure_future(collect(1, from_end=True))
            await asyncio.sleep(0.05)
            await c.append("late", ev(5, "Late"))
            assert await asyncio.wait_for(live, 10) == [("late", "Late")]
    run(body)


def test_filtered_subscription_reports_checkpoints_across_long_skips(tmp_path: Path) -> None:
    from store import service

    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            for i in range(service.CHECKPOINT_EVERY // 1000 + 1):
                await c.append("noise", [ev(i * 1000 + k) for k in range(1000)])
            checkpoints: list[int] = []
            async for item in c.subscribe(stream_prefix="wanted"):
                if isinstance(item, Checkpoint):
                    checkpoints.append(item.position)
                if isinstance(item, CaughtUp):
                    break
            assert checkpoints and checkpoints[0] >= service.CHECKPOINT_EVERY
    run(body)


def test_caught_up_filtered_subscription_checkpoints_at_most_every_interval(
        tmp_path: Path) -> None:
    from store import service

    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            await c.append("noise", ev(0))
            got: list[tuple[float, int]] = []  # (loop time, checkpoint position)
            caught_up = asyncio.Event()

            async def watch() -> None:
                async for item in c.subscribe(stream_prefix="wanted"):
                    if isinstance(item, CaughtUp):
                        caught_up.set()
                    elif isinstance(item, Checkpoint):
                        got.append((asyncio.get_running_loop().time(), item.position))

            task = asyncio.ensure_future(watch())
            try:
                await asyncio.wait_for(caught_up.wait(), 10)
                # Skipped commits one after another: one checkpoint per commit before.
                t0 = asyncio.get_running_loop().time()
                last = 0
                for i in range(150):
                    last = (await c.append("noise", ev(i + 1))).last_position
                elapsed = asyncio.get_running_loop().time() - t0
                # The last one arrives once the interval has passed, without more commits.
                await wait_until(lambda: bool(got) and got[-1][1] == last, 10)
                during = [t for t, _ in got if t <= t0 + elapsed]
                assert len(during) <= elapsed / service.CHECKPOINT_INTERVAL_S + 2, (
                    len(during), elapsed)
                assert [p for _, p in got] == sorted({p for _, p in got})  # forward only
                # After a quiet spell, the next skipped commit is reported at once.
                await asyncio.sleep(service.CHECKPOINT_INTERVAL_S)
                n = len(got)
                quiet = (await c.append("noise", ev(1000))).last_position
                await wait_until(lambda: len(got) > n, 10)
                assert got[n][1] == quiet
            finally:
                task.cancel()
    run(body)


def test_a_stalled_subscriber_does_not_block_appends(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            call = c.stub.Subscribe(pb.SubscribeRequest())
            first = await call.read()  # then never read again
            assert first.WhichOneof("kind") == "caught_up"
            for i in range(40):
                await c.append("s", [ev(i * 100 + k, size=2000) for k in range(100)])
            info = await c.node_info()
            assert info.commit_position == 4000
            got = 0
            while got < 4000:
                msg = await call.read()
                got += len(msg.events.events)
            assert got == 4000
            call.cancel()
    run(body)


# ---- info, health, reflection ----------------------------------------------------------

def test_node_info_states_the_limits_the_node_enforces(tmp_path: Path) -> None:
    """A producer learns what the node refuses past (an engine sizes its output appends
    by it) from NodeInfo, and the node does refuse past it."""
    async def body() -> None:
        limits = Limits(max_event_bytes=4096, max_append_events=3, max_append_bytes=8192)
        async with running_store(tmp_path, limits) as (_, c):
            info = (await c.node_info()).limits
            assert (info.max_event_bytes, info.max_append_events, info.max_append_bytes) == (
                4096, 3, 8192)
            with pytest.raises(AppendError) as err:
                await c.append("s", [ev(k) for k in range(info.max_append_events + 1)])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_append_events (3)" in err.value.message
            await c.append("s", [ev(k) for k in range(info.max_append_events)])
    run(body)


def test_node_info_health_and_reflection(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path) as (server, c):
            await c.append("a", ev(1))
            await c.append("b", ev(2))
            info = await c.node_info()
            assert (info.role, info.term, info.commit_position, info.last_position,
                    info.stream_count) == ("standalone", 1, 2, 2, 2)
            uuid.UUID(info.cluster_id)
            d = Limits()
            assert (info.limits.max_event_bytes, info.limits.max_append_events,
                    info.limits.max_append_bytes, info.limits.max_appends_per_message,
                    info.limits.max_stream_name_bytes, info.limits.max_batch_events,
                    info.limits.max_batch_bytes) == (
                d.max_event_bytes, d.max_append_events, d.max_append_bytes,
                d.max_appends_per_message, d.max_stream_name_bytes, d.max_batch_events,
                d.max_batch_bytes)
            async with grpc.aio.insecure_channel(server.address) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                for name in ("", "xdc.v1.EventStore"):
                    resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
                    assert resp.status == health_pb2.HealthCheckResponse.SERVING
                refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                call = refl.ServerReflectionInfo()
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                resp = await call.read()
                await call.done_writing()
                names = {s.name for s in resp.list_services_response.service}
                assert "xdc.v1.EventStore" in names
    run(body)


@contextlib.asynccontextmanager
async def _node_that_reads_nothing() -> AsyncIterator[str]:
    """An EventStore whose AppendStream never reads a message nor answers: its stream's
    flow-control window fills and a client's write blocks."""
    from store.server import listen_on, new_server
    from xdc.v1 import eventstore_pb2_grpc as pb_grpc

    release = asyncio.Event()

    class Stuck(pb_grpc.EventStoreServicer):
        async def AppendStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
            await release.wait()
            return
            yield

    server = new_server()
    pb_grpc.add_EventStoreServicer_to_server(Stuck(), server)
    port = listen_on(server, "127.0.0.1:0", None)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        release.set()
        await server.stop(0)


def test_a_write_hung_on_an_abandoned_stream_does_not_hold_the_appends_behind_it(
        tmp_path: Path) -> None:
    """The client leaves a node (a leader hint, a refusal) while its sender is blocked in
    a write to that node's stream. The write is abandoned at once: the appends go to the
    next node now, not after the write timeout (seen in drills as a 2 s stall after a
    failover)."""
    from store.client import StoreClient

    async def body() -> None:
        async with _node_that_reads_nothing() as stuck, \
                running_store(tmp_path / "b") as (b, _):
            attempt = 6.0
            async with StoreClient([stuck, b.address], timeout_s=30,
                                   attempt_timeout_s=attempt) as c:
                big = [new_event("T", bytes(900_000), metadata={"n": str(i)})
                       for i in range(8)]
                appends = [asyncio.ensure_future(c.append("s", [e])) for e in big]
                await wait_until(lambda: len(c._inflight) > 0, 10,
                                 "the sender writing to the stuck node")
                t0 = time.monotonic()
                await c._switch(b.address)
                await asyncio.gather(*appends)
                took = time.monotonic() - t0
                assert took < attempt / 2, f"appends waited {took:.1f}s behind the write"
            async with StoreClient(b.address) as on_b:
                assert sorted(int(e.metadata["n"]) for e in await on_b.read("s")) == \
                    list(range(8))
    run(body)


def test_an_append_answers_deadline_exceeded_at_its_timeout_however_it_is_stuck() -> None:
    """`append(timeout_s=...)` returns by its timeout even when the node never answers
    and the stream looks alive (before: at the stream's attempt timeout, 6 s here)."""
    from store.client import StoreClient

    async def body() -> None:
        async with _node_that_reads_nothing() as stuck, \
                StoreClient(stuck, timeout_s=30, attempt_timeout_s=6.0) as c:
            t0 = time.monotonic()
            with pytest.raises(AppendError) as err:
                await c.append("s", [ev(1)], timeout_s=0.5)
            took = time.monotonic() - t0
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "outcome is unknown" in str(err.value)
            assert 0.5 <= took < 2.0, took
    run(body)


def test_client_event_ids_are_uuid7_time_ordered_unique_and_differ_after_fork() -> None:
    """new_id: version 7 and RFC 4122 variant, the current Unix millisecond in front,
    no repeats, increasing, those of one millisecond sharing their first 12 bytes (what
    the store's id runs index with one entry), and a forked child (which inherits the
    generator) does not repeat its parent's ids nor share their prefix."""
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(50_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for raw in ids[::997]:
        u = uuid.UUID(bytes=raw)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert before <= int.from_bytes(raw[:6], "big") <= after
    assert ids == sorted(ids)
    assert len({raw[6:12] for raw in ids}) == 1  # one producer prefix
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, b"".join(new_id() for _ in range(4)))
        os._exit(0)
    os.close(write)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        child = os.read(read, 64)
    finally:
        os.close(read)
    parent = [new_id() for _ in range(4)]
    # The random parts (after the millisecond) are not the parent's next ones, nor is
    # the producer prefix.
    assert [child[i * 16 + 6:i * 16 + 16] for i in range(4)] != [p[6:] for p in parent]
    assert child[6:12] != parent[0][6:12]


def _coalesced(appends: list[tuple[str, int, int, int]], limits: Limits | None = None,
               ) -> tuple[list[list[int]], pb.AppendStreamRequest]:
    """``StoreClient._coalesce`` over appends given as (stream, events, expected kind,
    expected revision): the indexes of the appends each request holds, and the message."""
    async def body() -> tuple[list[list[int]], pb.AppendStreamRequest]:
        loop = asyncio.get_running_loop()
        client = StoreClient("127.0.0.1:1", limits=limits)  # never connects
        batch = []
        for stream, n, kind, rev in appends:
            events = [new_event("T", b"%d" % i) for i in range(n)]
            batch.append(_Pending(stream, events, kind, rev, loop.create_future(), 0.0,
                                  None, n, sum(e.ByteSize() for e in events)))
        msg = pb.AppendStreamRequest()
        client._coalesce(batch, msg.appends.add)
        await client.close()
        groups: list[list[int]] = [[] for _ in msg.appends]
        for i, p in enumerate(batch):
            groups[p.slot].append(i)
        # Each append's share of its merged append: the events merged before and after it.
        for g in groups:
            sizes = [batch[i].events for i in g]
            assert [(batch[i].before, batch[i].after) for i in g] == (
                [(0, 0)] if len(g) == 1 else
                [(sum(sizes[:k]), sum(sizes[k + 1:])) for k in range(len(g))])
        return groups, msg
    return run(body)


def test_the_client_merges_a_streams_appends_up_to_a_limit_or_another_expectation() -> None:
    """Appends with expected=ANY to one stream travel as one append, in their order; an
    append to that stream with another expectation ends the merge (it must find the
    stream as the appends before it left it), and so do the store's limits."""
    groups, msg = _coalesced([("a", 1, ANY, 0), ("b", 2, ANY, 0), ("a", 3, ANY, 0),
                              ("a", 1, EXACT, 4), ("a", 1, ANY, 0), ("b", 1, ANY, 0),
                              ("a", 1, NO_STREAM, 0), ("c", 1, STREAM_EXISTS, 0),
                              ("c", 1, STREAM_EXISTS, 0)])
    assert groups == [[0, 2], [1, 5], [3], [4], [6], [7], [8]]
    assert [(r.stream, len(r.events), r.expected, r.expected_revision)
            for r in msg.appends] == [("a", 4, ANY, 0), ("b", 3, ANY, 0), ("a", 1, EXACT, 4),
                                      ("a", 1, ANY, 0), ("a", 1, NO_STREAM, 0),
                                      ("c", 1, STREAM_EXISTS, 0), ("c", 1, STREAM_EXISTS, 0)]
    # The events in the order of the appends merged.
    assert [e.data for e in msg.appends[0].events] == [b"0", b"0", b"1", b"2"]
    # At the store's limits: events per append, then bytes per append.
    groups, _ = _coalesced([("s", 2, ANY, 0)] * 5, Limits(max_append_events=5))
    assert groups == [[0, 1], [2, 3], [4]]
    one = new_event("T", b"0").ByteSize()
    groups, _ = _coalesced([("s", 1, ANY, 0)] * 5,
                           Limits(max_append_bytes=2 * one, max_event_bytes=one))
    assert groups == [[0, 1], [2, 3], [4]]


def test_merged_appends_each_get_their_own_positions_and_revisions(tmp_path: Path) -> None:
    """Each caller of a merged append gets the positions and revisions its events have
    in the log, as if it had been appended alone, duplicates included; answers still
    resolve in the order of the appends, whatever their streams."""
    async def body() -> None:
        async with running_store(tmp_path) as (_, client):
            await client.append("a", new_event("Seed"))
            sizes = [1, 3, 1, 2, 1, 1, 4]
            sent = [[new_event("T", b"%d-%d" % (i, k)) for k in range(n)]
                    for i, n in enumerate(sizes)]
            futs = [client.append_nowait("a" if i % 3 else "b", events)
                    for i, events in enumerate(sent)]
            order: list[int] = []
            for i, f in enumerate(futs):
                f.add_done_callback(lambda _f, i=i: order.append(i))
            answers = await asyncio.gather(*futs)
            assert order == list(range(len(futs)))  # in order of the appends, across streams
            by_id = {e.id: e for s in ("a", "b") for e in await client.read(s)}
            for events, answer in zip(sent, answers, strict=True):
                got = [by_id[e.id] for e in events]
                assert [e.data for e in got] == [e.data for e in events]
                assert answer.first_position == got[0].position
                assert answer.last_position == got[-1].position == (
                    got[0].position + len(events) - 1)
                assert answer.last_revision == got[-1].revision
                assert answer.next_revision == got[-1].revision + 1
                assert not answer.duplicate
            # All five appends to "a" went as one: one append, consecutive positions.
            a = [ans for i, ans in enumerate(answers) if i % 3]
            assert [x.first_position for x in a[1:]] == [x.last_position + 1 for x in a[:-1]]
            # The same appends again (a retry with the same ids), merged the same way:
            # every caller gets its original answer, marked duplicate.
            again = await asyncio.gather(*[client.append_nowait("a" if i % 3 else "b", events)
                                           for i, events in enumerate(sent)])
            assert [(x.first_position, x.last_position, x.last_revision) for x in again] == [
                (x.first_position, x.last_position, x.last_revision) for x in answers]
            assert all(x.duplicate for x in again)
            assert (await client.stream_info("a")).last_revision == 1 + sum(
                n for i, n in enumerate(sizes) if i % 3)
    run(body)


def test_a_merged_append_refused_for_one_of_its_appends_answers_each_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One bad append among appends merged into one (an event with no type, an id reused
    with other content, a retry of an append the store holds apart) costs the others
    nothing: each is sent again alone and gets its own answer; the log holds every good
    event once and nothing of the bad ones."""
    async def body() -> None:
        async with running_store(tmp_path) as (_, client):
            taken = new_event("T", b"original")
            first = await client.append("s", taken)
            lone = new_event("T", b"lone")
            lone_answer = await client.append("s", lone)
            good = [new_event("T", b"good-%d" % i) for i in range(4)]
            typeless = pb.ProposedEvent(id=new_id(), data=b"no type")
            reused = pb.ProposedEvent(id=taken.id, type="T", data=b"other content")
            futs = [client.append_nowait("s", good[0]), client.append_nowait("s", typeless),
                    client.append_nowait("s", good[1]), client.append_nowait("s", reused),
                    client.append_nowait("s", good[2]),
                    client.append_nowait("s", lone),  # an exact retry, held apart
                    client.append_nowait("s", good[3])]
            answers = await asyncio.gather(*futs, return_exceptions=True)
            assert isinstance(answers[1], AppendError)
            assert answers[1].code == grpc.StatusCode.INVALID_ARGUMENT
            assert "events[0].type" in str(answers[1])
            assert isinstance(answers[3], AppendError)
            assert answers[3].code == grpc.StatusCode.ALREADY_EXISTS
            assert "events[0].id" in str(answers[3])
            retry = answers[5]
            assert isinstance(retry, pb.AppendResponse) and retry.duplicate
            assert retry.first_position == lone_answer.first_position
            stored = await client.read("s")
            assert [e.data for e in stored] == [b"original", b"lone"] + [
                b"good-%d" % i for i in range(4)]
            assert stored[0].position == first.first_position
            for i, k in enumerate((0, 2, 4, 6)):
                answer = answers[k]
                assert isinstance(answer, pb.AppendResponse) and not answer.duplicate
                assert (answer.first_position, answer.last_revision) == (
                    stored[2 + i].position, stored[2 + i].revision)
    caplog.set_level(logging.DEBUG, logger="xdc.client")
    run(body)
    assert caplog.text.count("merged append to 's' refused") == 1


def test_an_id_sent_twice_in_one_message_is_appended_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A retry sent while its first attempt still waits to go out is not merged into the
    same append (one append cannot hold an id twice, and the store would refuse it): the
    second is answered as a duplicate with the first's positions, and no merged append
    was refused on the way."""
    caplog.set_level(logging.DEBUG, logger="xdc.client")

    async def body() -> None:
        async with running_store(tmp_path) as (_, client):
            e = new_event("T", b"once")
            other = new_event("T", b"other")
            a, b, c = await asyncio.gather(client.append_nowait("s", e),
                                           client.append_nowait("s", other),
                                           client.append_nowait("s", e))
            assert not a.duplicate and c.duplicate and not b.duplicate
            assert (c.first_position, c.last_revision) == (a.first_position, a.last_revision)
            assert [x.data for x in await client.read("s")] == [b"once", b"other"]
    run(body)
    assert "merged append to 's' refused" not in caplog.text


def test_an_id_twice_in_a_message_splits_only_the_merged_append_that_would_hold_it() -> None:
    """A message whose appends hold an event id twice (_coalesce looks for ids only
    then): the append that would put the id in its stream's merged append a second time
    starts a new one; the other streams' appends merge as in any message."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        client = StoreClient("127.0.0.1:1")  # never connects
        e, f = new_event("T", b"e"), new_event("T", b"f")
        appends = [("s", [e]), ("t", [new_event("T")]), ("s", [f]), ("t", [new_event("T")]),
                   ("s", [new_event("T"), e]), ("s", [new_event("T")]), ("u", [f])]
        batch = [_Pending(stream, events, ANY, 0, loop.create_future(), 0.0, None,
                          len(events), sum(x.ByteSize() for x in events))
                 for stream, events in appends]
        msg = pb.AppendStreamRequest()
        try:
            client._coalesce(batch, msg.appends.add)
        finally:
            await client.close()
        assert [(r.stream, [x.id for x in r.events]) for r in msg.appends] == [
            ("s", [e.id, f.id]),
            ("t", [x.id for _, events in (appends[1], appends[3]) for x in events]),
            ("s", [x.id for _, events in appends[4:6] for x in events]),
            ("u", [f.id])]
        assert [(p.slot, p.before, p.after) for p in batch] == [
            (0, 0, 1), (1, 0, 1), (0, 1, 0), (1, 1, 0), (2, 0, 1), (2, 2, 0), (3, 0, 0)]
    run(body)


def test_merged_appends_fit_the_limits_the_node_states(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A node configured below the client's limits states them (NodeInfo): once the
    client has read them, its merged appends fit, instead of each full one being refused
    and its appends sent again one by one. Before that, what is refused is still
    answered append by append."""
    caplog.set_level(logging.DEBUG, logger="xdc.client")

    async def body() -> None:
        async with running_store(tmp_path, Limits(max_append_events=3)) as (server, _):
            client = StoreClient(server.address)  # the default limits: 10,000 events
            try:
                # Before the limits are known: one merged append of 8, refused, then
                # each append alone.
                first = await asyncio.gather(*[client.append_nowait("s", new_event("T"))
                                               for _ in range(8)])
                assert "merged append to 's' refused" in caplog.text
                await wait_until(lambda: client._merge_limits[0] == 3, what="limits")
                caplog.clear()
                later = await asyncio.gather(*[client.append_nowait("s", new_event("T"))
                                               for _ in range(8)])
                assert "refused" not in caplog.text
                answers = first + later
                assert [a.last_revision for a in answers] == list(range(1, 17))
                assert (await client.stream_info("s")).last_revision == 16
            finally:
                await client.close()
    run(body)


def test_answers_of_a_large_message_resolve_in_order_in_slices_and_all_despite_cancel(
        tmp_path: Path) -> None:
    """A message's answers are settled SETTLE_SLICE at a time with a yield between
    (so a producer refills its window while the server works): in order, and every one
    of them even if the receiver is cancelled between two slices."""
    n = 3 * SETTLE_SLICE + 5

    async def body() -> None:
        async with running_store(tmp_path) as (_, client):
            order: list[int] = []
            futs = [client.append_nowait("burst", new_event("T", b"%d" % i)) for i in range(n)]
            for i, f in enumerate(futs):
                f.add_done_callback(lambda _f, i=i: order.append(i))
            results = await asyncio.gather(*futs)
            assert order == list(range(n))
            assert [r.first_position for r in results] == sorted(r.first_position
                                                                 for r in results)

            # The receiver cancelled after the first slice: the rest settle regardless.
            loop = asyncio.get_running_loop()
            batch = [_Pending("s", [], ANY, 0, loop.create_future(), 0.0, slot=i)
                     for i in range(n)]
            answers = [pb.AppendResult(ok=pb.AppendResponse(first_position=i + 1,
                                                            last_position=i + 1))
                       for i in range(n)]
            task = loop.create_task(client._settle_all(batch, answers))
            await asyncio.sleep(0)  # the task settles its first slice, then yields
            assert batch[SETTLE_SLICE - 1].future.done()
            assert not batch[SETTLE_SLICE].future.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert [p.future.result().first_position for p in batch] == list(range(1, n + 1))
    run(body)


def test_each_append_is_settled_from_the_result_of_the_append_that_held_it() -> None:
    """One message's results, read once for all the callers' appends merged into each
    (``_settle``): a merged append's callers get their shares of its positions and
    revisions (duplicate included), a lone append the result's own answer; a refusal
    fails a lone append, sends a merged one's appends again alone at once, and one with
    a retry hint goes back after it; an append already answered (its caller cancelled)
    is left as it is."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        client = StoreClient("127.0.0.1:1")  # never connects: nothing is sent here

        def pending(slot: int, events: int = 1, before: int = 0,
                    after: int = 0) -> _Pending:
            return _Pending("s", [new_event("T")] * events, ANY, 0, loop.create_future(),
                            loop.time() + 30, None, events, 10, slot=slot, before=before,
                            after=after)

        merged = [pending(0, 1, 0, 3), pending(0, 2, 1, 1), pending(0, 1, 3, 0)]
        dup = [pending(1, 2, 0, 1), pending(1, 1, 2, 0)]
        alone, invalid, shed = pending(2), pending(3), pending(5)
        refused_merged = [pending(4, 1, 0, 1), pending(4, 1, 1, 0)]
        cancelled = pending(2)
        cancelled.future.cancel()
        batch = [merged[0], invalid, *dup, merged[1], alone, *refused_merged, cancelled,
                 merged[2], shed]
        results = [
            pb.AppendResult(ok=pb.AppendResponse(first_position=10, last_position=13,
                                                 last_revision=7, next_revision=8)),
            pb.AppendResult(ok=pb.AppendResponse(first_position=3, last_position=5,
                                                 last_revision=3, next_revision=4,
                                                 duplicate=True)),
            pb.AppendResult(ok=pb.AppendResponse(first_position=20, last_position=20,
                                                 last_revision=1, next_revision=2)),
            pb.AppendResult(error=pb.AppendError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                 message="bad")),
            pb.AppendResult(error=pb.AppendError(code=grpc.StatusCode.ALREADY_EXISTS.value[0],
                                                 message="id reused")),
            pb.AppendResult(error=pb.AppendError(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="full",
                retry_after_ms=50)),
        ]
        try:
            await client._settle_all(batch, results)
            answers = [p.future.result() for p in merged]
            assert [(a.first_position, a.last_position, a.last_revision, a.next_revision,
                     a.duplicate) for a in answers] == [(10, 10, 4, 5, False),
                                                        (11, 12, 6, 7, False),
                                                        (13, 13, 7, 8, False)]
            assert [(a.first_position, a.last_position, a.last_revision, a.duplicate)
                    for a in (p.future.result() for p in dup)] == [(3, 4, 2, True),
                                                                   (5, 5, 3, True)]
            assert alone.future.result() == results[2].ok
            assert cancelled.future.cancelled()
            exc = invalid.future.exception()
            assert isinstance(exc, AppendError)
            assert (exc.code, exc.message) == (grpc.StatusCode.INVALID_ARGUMENT, "bad")
            # Sent again: the merged append's appends alone at once, ahead of the one
            # refused with a hint (after its backoff).
            assert not any(p.future.done() for p in [*refused_merged, shed])
            assert [p.solo for p in refused_merged] == [True, True]
            assert list(client._retrying) == [refused_merged, [shed]]
            assert client._hold is not None and not client._hold.done()
        finally:
            await client.close()
        assert all(p.future.done() for p in batch)
    run(body)


def test_an_event_with_unknown_fields_is_refused_as_they_would_override_the_records(
        tmp_path: Path) -> None:
    """A record is the store's header and stream field, then the event's bytes: fields
    6..10 sent as unknown fields of a ProposedEvent are RecordedEvent's stream, revision,
    position, term and time, and the last copy of a field wins when a reader parses it.
    Kept, they made an event appended to stream `a` read back as stream `orders.BTC` at
    another position (a review found it; a live subscriber then failed on a position
    going backwards). They are refused, naming the event and the field numbers, and
    nothing of the append is written."""
    async def body() -> None:
        async with running_store(tmp_path / "d") as (_, client):
            good = pb.ProposedEvent(id=uuid.uuid4().bytes, type="T", data=b"x")
            forged = pb.ProposedEvent.FromString(
                pb.ProposedEvent(id=uuid.uuid4().bytes, type="T", data=b"y").SerializeToString()
                + pb.RecordedEvent(stream="orders.BTC", revision=77, position=1 << 62,
                                   term=999).SerializeToString())  # fields 6..9 only
            assert forged.ByteSize() > good.ByteSize() + 10
            with pytest.raises(AppendError) as refused:
                await client.append("a", [good, forged])
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "events[1]: unknown field number(s) 6, 7, 8, 9" in refused.value.message
            with pytest.raises(grpc.aio.AioRpcError):
                await client.read("a")  # nothing written
            ok = await client.append("a", [good])
            (e,) = await client.read("a")
            assert (e.stream, e.revision, e.position) == ("a", ok.last_revision,
                                                          ok.last_position)
    run(body)


def test_prepared_bodies_are_the_events_canonical_bytes() -> None:
    """`prepare` reads an event's metadata map only when its bytes hold more than the
    id, type, content type and data (reading an empty map costs protobuf an arena, and
    its allocator trims the whole heap every 10,000 of them): whatever the field sizes
    (one-, two- and three-byte lengths), non-ASCII types, a map in any insertion order
    the body is the event's deterministic serialization."""
    from store.validation import prepare
    sizes = (0, 1, 127, 128, 16_383, 16_384, 70_000)
    events = [pb.ProposedEvent(id=uuid.uuid4().bytes, type=t, content_type=ct, data=b"d" * n)
              for t in ("T", "é" * 40, "t" * 200) for ct in ("", "c" * 130) for n in sizes]
    for keys in (("b", "a", "traceparent"), ("traceparent", "a", "b")):
        e = pb.ProposedEvent(id=uuid.uuid4().bytes, type="T", data=b"x")
        for k in keys:
            e.metadata[k] = k.upper()
        events.append(e)
    req = pb.AppendRequest.FromString(pb.AppendRequest(stream="s", events=events)
                                      .SerializeToString())
    prepared = prepare(req, Limits())
    assert prepared.bodies == [e.SerializeToString(deterministic=True) for e in events]
    # The same map inserted in two orders: the same bytes after the (different) ids.
    assert prepared.bodies[-2][18:] == prepared.bodies[-1][18:]


# ---- reading a whole stream, the blocking client's close, the README's example -----------

def test_reads_page_past_max_read_count_to_the_end_or_the_limit(tmp_path: Path) -> None:
    """A node serves at most max_read_count events a request (100 here): `read_batches`
    and `read` read on from where each request ended, to the end (`limit=None`) or to a
    limit past max_read_count, either way, a stream or "$all". `read()` returns at most
    1000 by default. Before, `limit=None` could not be given and a limit above
    max_read_count was refused (INVALID_ARGUMENT): the CLI printed the first 1000."""
    limits = Limits(max_read_count=100, max_batch_events=30)

    async def body() -> None:
        async with running_store(tmp_path, limits) as (_, c):
            for i in range(21):
                await c.append("s", [ev(i * 50 + k) for k in range(50)])
            await c.append("other", ev(0))

            async def revisions(stream: str = "s", **kw) -> list[int]:  # type: ignore[no-untyped-def]
                return [e.position if stream == "$all" else e.revision
                        async for b in c.read_batches(stream, **kw) for e in b.events]

            assert await revisions(limit=None) == list(range(1, 1051))
            assert await revisions(limit=None, backwards=True) == list(range(1050, 0, -1))
            assert await revisions(limit=250) == list(range(1, 251))
            assert await revisions(start=901, limit=None) == list(range(901, 1051))
            assert await revisions(start=120, limit=None, backwards=True) == list(
                range(120, 0, -1))
            assert await revisions("$all", limit=None) == list(range(1, 1052))
            assert len(await c.read("s")) == 1000  # the default: documented, not an error
            assert [e.revision for e in await c.read("s", limit=None)] == list(range(1, 1051))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await c.read("missing", limit=None)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    run(body)


def test_the_blocking_client_closes_with_no_task_left_on_its_loop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After `Client.close()` nothing is pending on its loop, and nothing is said when what
    it held is collected. Before, the append stream's tasks and gRPC's status handler of
    the call close() had cancelled were still pending when the loop was closed: about one
    `xdc append` in ten printed "Task was destroyed but it is pending!" at exit."""
    import gc

    from store.client import Client
    from tests.support.store import in_thread

    with caplog.at_level(logging.ERROR, logger="asyncio"), \
            in_thread(lambda: running_store(tmp_path)) as ((server, _), _thread):
        for i in range(5):
            client = Client(server.address)
            client.append("s", ev(i))
            assert client.read("s")[-1].revision == i + 1
            client.node_info()
            loop = client._loop
            client.close()
            assert not asyncio.all_tasks(loop), asyncio.all_tasks(loop)
            del client, loop
            gc.collect()
    destroyed = [r.getMessage() for r in caplog.records if "destroyed" in r.getMessage()]
    assert not destroyed, destroyed


def test_the_readmes_python_example_runs_and_hands_its_loop_only_events(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "From Python" example, run as written (only the address replaced),
    after 10,000 events of another stream: its filtered subscription meets a Checkpoint
    during the catch-up, and the example's loop hands `handle` the two `orders.` events
    only. Before, the README said the iterator yields RecordedEvents and one CaughtUp, and
    its loop did not tell a Checkpoint from an event."""
    import textwrap

    from store import service
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("\nFrom Python:\n"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    yielded: list[type] = []
    subscribe = StoreClient.subscribe

    async def recording(self: StoreClient, **kw):  # type: ignore[no-untyped-def]
        async for item in subscribe(self, **kw):
            yielded.append(type(item))
            yield item

    monkeypatch.setattr(StoreClient, "subscribe", recording)

    class Enough(Exception):
        pass

    handled: list[object] = []

    def handle(item: object) -> None:
        handled.append(item)
        if len(handled) == 2:
            raise Enough

    async def body() -> None:
        async with running_store(tmp_path) as (server, c):
            for i in range(service.CHECKPOINT_EVERY // 5000):
                await c.append("noise", [ev(i * 5000 + k) for k in range(5000)])
            source = code.replace('"127.0.0.1:7000"', repr(server.address))
            namespace: dict[str, object] = {}
            exec(compile("async def example(handle):\n" + textwrap.indent(source, "    "),
                         "README.md", "exec"), namespace)
            with pytest.raises(Enough):
                await asyncio.wait_for(namespace["example"](handle), 30)  # type: ignore[operator]
    run(body)
    assert Checkpoint in yielded and CaughtUp not in yielded[:yielded.index(Checkpoint)]
    assert [(type(e), e.stream, e.revision) for e in handled] == [  # type: ignore[attr-defined]
        (pb.RecordedEvent, "orders.BTC-USD", 1), (pb.RecordedEvent, "orders.BTC-USD", 2)]

