"""Input hardening (issue 7, item 4): every server refuses malformed bytes with
INVALID_ARGUMENT, and each named limit of a request is refused with a status naming the
field and the limit, with nothing written. Real servers on loopback, real LMDB."""

from __future__ import annotations

import asyncio
import gzip
import http.client
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from geo.transport import MAX_SWITCHOVER_MS
from store.client import AppendError, StoreClient, channel_options, new_event
from store.errors import MD_RETRY_AFTER_MS
from store.limits import Limits
from store.node import StoreNode
from store.server import StoreServer
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import hold_writer, run, running_store, wait_until
from tests.test_gateway import exchange
from xdc.otlp_receiver import MAX_BODY_BYTES, OtlpReceiver
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc

GATEWAY_METHODS = {
    "/xdc.v1.OrderGateway/SubmitOrder": "unary_unary",
    "/xdc.v1.OrderGateway/CancelOrder": "unary_unary",
    "/xdc.v1.OrderGateway/ReplaceOrder": "unary_unary",
    "/xdc.v1.OrderGateway/StreamExecutions": "unary_stream",
    "/xdc.v1.OrderGateway/StreamBook": "unary_stream",
}


async def raw_call(channel: grpc.aio.Channel, method: str, shape: str, payload: bytes) -> None:
    """One call with `payload` as the request's bytes (no serializer); raises
    AioRpcError with the server's status. A stream is read to its first message."""
    if shape == "unary_unary":
        await channel.unary_unary(method)(payload, timeout=5)
    else:
        call = channel.unary_stream(method)(payload, timeout=5)
        await call.read()
        call.cancel()


def test_malformed_bytes_get_invalid_argument_on_a_generated_servicer(tmp_path: Path) -> None:
    """The gateway's servicer is generated code, whose deserializer raises on bad bytes
    (gRPC alone answers UNKNOWN): store.server.RequestGuard answers INVALID_ARGUMENT."""
    async def body() -> None:
        async with exchange(tmp_path) as x:
            async with grpc.aio.insecure_channel(x.gateway.address) as ch:
                for method, shape in GATEWAY_METHODS.items():
                    # Not protobuf at all; then field 1 (a string) holding invalid UTF-8.
                    for payload in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):
                        with pytest.raises(grpc.aio.AioRpcError) as rpc:
                            await raw_call(ch, method, shape, payload)
                        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                        assert f"not a valid request of {method}" in rpc.value.details()
            for g, n in x.init_counts.items():
                assert len(await x.inputs(g)) == n
            # The same server answers well-formed requests.
            ok = await x.stub.SubmitOrder(xpb.SubmitOrderRequest(
                symbol="BTC-USD", account="alice", client_order_id="c1", side=xpb.BUY, qty=1,
                price=50000))
            assert ok.input_position > 0
    run(body)


# ---- named limits of the EventStore ---------------------------------------------------

async def refusal(call: Any) -> grpc.aio.AioRpcError:
    """The status a streaming call ends with (it must end with an error)."""
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        async for _ in call:
            pass
    return rpc.value


def test_subscribe_filter_limits(tmp_path: Path) -> None:
    limits = Limits(max_stream_name_bytes=40, max_type_bytes=32, max_subscribe_types=3)
    inv = grpc.StatusCode.INVALID_ARGUMENT

    async def body() -> None:
        async with running_store(tmp_path, limits) as (_, c):
            for request, text in [
                (pb.SubscribeRequest(stream_prefix="p" * 41),
                 "stream_prefix: 41 bytes exceeds max_stream_name_bytes (40)"),
                (pb.SubscribeRequest(stream_prefix="é" * 21),
                 "stream_prefix: 42 bytes exceeds max_stream_name_bytes (40)"),
                (pb.SubscribeRequest(event_types=["a", "b", "c", "d"]),
                 "event_types: 4 types exceeds max_subscribe_types (3)"),
                (pb.SubscribeRequest(event_types=["a", ""]), "event_types[1]: empty"),
                (pb.SubscribeRequest(event_types=["t" * 33]),
                 "event_types[0]: 33 bytes exceeds max_type_bytes (32)"),
            ]:
                err = await refusal(c.stub.Subscribe(request))
                assert err.code() == inv and text in err.details(), (request, err.details())
            # At the limits: served (catch-up marker first).
            call = c.stub.Subscribe(pb.SubscribeRequest(stream_prefix="p" * 40,
                                                        event_types=["a", "b", "t" * 32]))
            first = await call.read()
            assert first.WhichOneof("kind") == "caught_up"
            call.cancel()
    run(body)


def test_open_subscriptions_are_bounded_by_max_subscriptions(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path, Limits(max_subscriptions=2)) as (_, c):
            calls = [c.stub.Subscribe(pb.SubscribeRequest()) for _ in range(2)]
            for call in calls:  # each is open once its catch-up marker arrived
                assert (await call.read()).HasField("caught_up")
            err = await refusal(c.stub.Subscribe(pb.SubscribeRequest()))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "subscriptions: 2 open on this node, max_subscriptions (2)" in err.details()
            assert dict(err.trailing_metadata())[MD_RETRY_AFTER_MS] == "1000"
            # A closed subscription frees its slot.
            calls[0].cancel()

            async def third_serves() -> bool:
                call = c.stub.Subscribe(pb.SubscribeRequest())
                try:
                    await call.read()
                    calls.append(call)
                    return True
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False
            await wait_until(third_serves, 10, "a slot freed by the cancelled subscription")
            for call in calls:
                call.cancel()
    run(body)


def test_too_many_appends_in_one_message_end_the_call_after_the_earlier_answers(
        tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path, Limits(max_appends_per_message=5)) as (server, c):
            call = c.stub.AppendStream()
            await call.write(pb.AppendStreamRequest(correlation_id=1, appends=[
                pb.AppendRequest(stream="ok", events=[new_event("T")])]))
            await call.write(pb.AppendStreamRequest(correlation_id=2, appends=[
                pb.AppendRequest(stream="x", events=[new_event("T")]) for _ in range(6)]))
            await call.done_writing()
            first = await call.read()
            assert first.correlation_id == 1 and first.results[0].HasField("ok")
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await call.read()
            assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("appends: 6 appends in one message exceeds max_appends_per_message (5)"
                    in rpc.value.details())
            assert [e.stream for e in await c.read("$all")] == ["ok"]
            assert server.node.log is not None and server.node.log.last_position == 1
    run(body)


def test_min_position_wait_is_bounded_by_max_read_wait_ms(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path, Limits(max_read_wait_ms=200)) as (_, c):
            await c.append("s", new_event("T"))
            # No deadline on the call: the store's limit ends the wait.
            err = await refusal(c.stub.Read(pb.ReadRequest(stream="s", limit=1,
                                                           min_position=5)))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "position 5 not committed" in err.details()
            assert "max_read_wait_ms (200)" in err.details()
    run(body)


# ---- the replication service of a cluster node ----------------------------------------

def test_replication_refusals_name_the_field_and_quote_input_cut_short(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body() -> None:
        cluster = LocalCluster.make(etcd.endpoints, tmp_path)
        await cluster.start()
        try:
            leader = await cluster.leader()
            follower = next(n for n in cluster.nodes.values() if n is not leader)
            last = leader.store.log.last_position  # type: ignore[union-attr]
            async with grpc.aio.insecure_channel(follower.member.peer,
                                                 options=channel_options()) as ch:
                stub = rpb_grpc.ReplicationStub(ch)
                huge = "n" * 100_000  # echoed whole, it would not fit in a status trailer
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await stub.Stream(iter([rpb.PeerBatch(cluster=huge, src=huge)]))
                assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "is not a member of cluster 't'" in rpc.value.details()
                assert len(rpc.value.details()) < 400
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await stub.Tip(rpb.TipRequest(cluster=huge))
                assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert len(rpc.value.details()) < 400
                # A member's batch with a message of a kind this node cannot read.
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await stub.Stream(iter([rpb.PeerBatch(cluster="t", src=leader.id, messages=[
                        rpb.PeerMessage(kind=99, src=leader.id, dst=follower.id)])]))
                assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "messages[0].kind: unknown PeerKind 99" in rpc.value.details()
                # Entries whose terms and records do not pair up (term 0: a stale message,
                # so only the decoding is tried).
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await stub.Stream(iter([rpb.PeerBatch(cluster="t", src=leader.id, messages=[
                        rpb.PeerMessage(kind=rpb.APPEND, src=leader.id, dst=follower.id,
                                        first_position=1, entry_terms=[1, 1],
                                        entry_payloads=[b"x"])])]))
                assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "messages[0]: 2 entry terms for 1 payloads" in rpc.value.details()
                for request, text in [
                    (rpb.SwitchoverRequest(target=huge), "target: 'nnnn"),
                    (rpb.SwitchoverRequest(target=follower.id, timeout_ms=MAX_SWITCHOVER_MS + 1),
                     f"timeout_ms: {MAX_SWITCHOVER_MS + 1} exceeds the maximum "
                     f"({MAX_SWITCHOVER_MS}"),
                ]:
                    with pytest.raises(grpc.aio.AioRpcError) as rpc:
                        await rpb_grpc.ReplicationStub(ch).Switchover(request)
                    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert text in rpc.value.details() and len(rpc.value.details()) < 400
            # Nothing of it reached the machine: same leader, same log, still replicating.
            assert await cluster.leader() is leader
            async with StoreClient(leader.address) as client:
                r = await client.append("after", new_event("T"))
            assert r.last_position == last + 1
            assert await cluster.converged() == last + 1
        finally:
            await cluster.stop()
    run(body, timeout_s=120)


def test_writer_queue_bytes_are_bounded_by_max_pending_bytes(tmp_path: Path) -> None:
    limits = Limits(max_event_bytes=1024, max_append_bytes=4096, max_pending_bytes=4096)

    async def body() -> None:
        node = StoreNode(tmp_path / "store", limits)
        server = StoreServer(node, "127.0.0.1:0")
        await server.start()
        hold = hold_writer(node)
        gate, held = hold.gate, hold.held
        try:
            async with grpc.aio.insecure_channel(server.address) as ch:
                stub = pb_grpc.EventStoreStub(ch)

                def append(i: int, size: int) -> asyncio.Future[Any]:
                    return asyncio.ensure_future(stub.Append(pb.AppendRequest(
                        stream=f"s{i}", events=[new_event("T", b"x" * size)]), timeout=30))

                writes = [append(0, 1)]  # taken by the writer, held in admit
                await wait_until(held.is_set, what="the writer held in admit")
                writes += [append(i, 900) for i in range(1, 5)]  # 4 x 924 bytes queued
                assert node.writer is not None
                await wait_until(lambda: node.writer.pending_events == 4,  # type: ignore
                                 what="4 appends queued")
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await append(5, 900)
                assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                queued = 4 * new_event("T", b"x" * 900).ByteSize()
                assert (f"write queue full: {queued} bytes pending, max_pending_bytes (4096)"
                        in rpc.value.details())
                assert dict(rpc.value.trailing_metadata())[MD_RETRY_AFTER_MS] == "50"
                gate.set()
                done = await asyncio.gather(*writes)
                assert sorted(r.first_position for r in done) == [1, 2, 3, 4, 5]
                assert node.log is not None and node.log.last_position == 5
                assert node.writer.pending_events == 0
        finally:
            gate.set()
            await server.stop(grace_s=0.5)
    run(body)


def test_otlp_http_receiver_bounds_bodies_and_refuses_bad_ones() -> None:
    def post(conn: http.client.HTTPConnection, body: bytes, **headers: str) -> int:
        conn.request("POST", "/v1/traces", body=body, headers={
            "Content-Type": "application/x-protobuf", **headers})
        resp = conn.getresponse()
        resp.read()
        return resp.status

    valid = ExportTraceServiceRequest().SerializeToString()
    with OtlpReceiver() as receiver:
        host, port = receiver.http_endpoint.removeprefix("http://").rsplit(":", 1)
        for body, headers, status in [
            (valid, {}, 200),
            (gzip.compress(valid), {"Content-Encoding": "gzip"}, 200),
            (b"\xff\xff\xff", {}, 400),  # not protobuf
            (b"not gzip", {"Content-Encoding": "gzip"}, 400),
            # 20 KiB that inflate past the limit: refused before it is all inflated.
            (gzip.compress(bytes(MAX_BODY_BYTES + 1)), {"Content-Encoding": "gzip"}, 413),
        ]:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                assert post(conn, body, **headers) == status, (body[:16], headers)
            finally:
                conn.close()
        # A length over the limit is refused from the header, before any body is read.
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.putrequest("POST", "/v1/traces")
            conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
            conn.endheaders()
            assert conn.getresponse().status == 413
        finally:
            conn.close()


def test_read_and_subscribe_steps_hold_at_most_max_batch_bytes(tmp_path: Path) -> None:
    """Each step of a Read ($all or a stream, both ways) and of a Subscribe takes from the
    log at most max_batch_bytes (one record over at most), not max_batch_events records
    whatever their size: a stalled reader of large events holds one batch, not
    max_batch_events of them. The log's own calls are observed (they read real LMDB);
    every event is still delivered once, in order. Fails without the service passing
    max_batch_bytes down (steps of all 30 records)."""
    limits = Limits(max_event_bytes=10_000, max_batch_bytes=30_000)
    events = 30

    async def body() -> None:
        async with running_store(tmp_path, limits) as (server, c):
            await c.append("big", [new_event("T", bytes(9_000)) for _ in range(events)])
            log = server.node.log
            steps: list[int] = []
            for name in ("read_all", "read_stream"):
                real = getattr(log, name)

                def spy(*args: Any, _real: Any = real, **kw: Any) -> list[bytes]:
                    got = _real(*args, **kw)
                    steps.append(sum(map(len, got)))
                    return got  # type: ignore[no-any-return]
                setattr(log, name, spy)
            bound = limits.max_batch_bytes + limits.max_event_bytes
            for stream in ("$all", "big"):
                for backwards in (False, True):
                    steps.clear()
                    got = await c.read(stream, limit=1000, backwards=backwards)
                    assert len(got) == events
                    assert steps and max(steps) < bound, (stream, backwards, steps)
            steps.clear()
            seen = 0
            async for item in c.subscribe(batches=True):
                if isinstance(item, pb.RecordBatch):
                    seen += len(item.events)
                    assert all(len(e.data) == 9_000 for e in item.events)
                else:
                    break  # caught up
            assert seen == events
            assert len(steps) > 1 and max(steps) < bound, steps
    run(body)


def _too_big_for_one_message() -> list[pb.ProposedEvent]:
    """22 events of 1 MB: each within max_event_bytes (1 MiB), together over the gRPC
    message ceiling (max_append_bytes + 4 MiB = 20 MiB)."""
    return [new_event("T", bytes(1_000_000)) for _ in range(22)]


def test_an_append_over_the_message_ceiling_does_not_fail_written_appends_as_refused(
        tmp_path: Path) -> None:
    """An append the client could not send (over the gRPC message ceiling) failed the
    whole AppendStream call locally with INTERNAL, and every append in flight on that
    call was answered INTERNAL too: a definitive-looking refusal (not DEADLINE_EXCEEDED
    "outcome unknown"), although the node had it queued and wrote it; a caller trusting
    the refusal and appending again with new ids made a second copy (helper-82). The
    client now refuses such an append alone, before it is queued."""

    async def body() -> None:
        async with running_store(tmp_path, timeout_s=10, attempt_timeout_s=8) as (server, c):
            await c.append("warm", new_event("T", b"0"))
            hold = hold_writer(server.node)
            other = StoreClient(server.address)
            try:
                # The group the writer holds:
                blocker = other.append_nowait("b", new_event("T", b"1"))
                await wait_until(hold.held.is_set, what="the writer held")
                small = c.append_nowait("s", new_event("T", b"2"))
                await wait_until(lambda: server.node.writer.pending_events >= 1,
                                 what="the small append queued on the node")
                big = c.append_nowait("big", _too_big_for_one_message())
                with pytest.raises(AppendError) as refused:
                    await big
                assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            finally:
                hold.gate.set()
            await blocker
            await other.close()
            # The append in flight beside it is answered as written, once.
            answer = await small
            streams = [e.stream for e in await c.read("$all")]
            assert "big" not in streams and streams.count("s") == 1, streams
            assert [e.position for e in await c.read("s")] == [answer.first_position]
    run(body)


def test_an_append_over_the_message_ceiling_is_refused_naming_the_limit(
        tmp_path: Path) -> None:
    """Bad input gets INVALID_ARGUMENT naming the field and the limit (README's limits
    table): an append of 22 MB (events of 1 MB each) got INTERNAL "Internal error from
    Core", or, alone, was retried to DEADLINE_EXCEEDED "outcome unknown"."""
    async def body() -> None:
        async with running_store(tmp_path, timeout_s=3) as (_, c):
            try:
                await c.append("big", _too_big_for_one_message())
            except Exception as exc:
                err = exc
            else:
                raise AssertionError("a 22 MB append was accepted")
            assert err.code.name == "INVALID_ARGUMENT", repr(err)
            assert "max_append_bytes" in str(err), repr(err)
    run(body)


def _poison(kind: str, recorded: pb.RecordedEvent) -> tuple[str, list, int]:
    if kind == "expected_kind_out_of_enum_range":
        return "s", [new_event("T", b"1")], 1 << 40       # an int, but no int32 enum value
    if kind == "stream_not_utf8_encodable":
        return "s\ud800", [new_event("T", b"1")], 0        # a str, with a lone surrogate
    return "copy", [recorded], 0            # events read back (RecordedEvent), re-appended


@pytest.mark.parametrize("kind", ["expected_kind_out_of_enum_range",
                                  "stream_not_utf8_encodable", "recorded_events"])
def test_an_append_the_client_cannot_build_fails_alone_and_at_once(tmp_path: Path,
                                                                   kind: str) -> None:
    """README: "An append the client cannot put in a message ... fails alone with
    INVALID_ARGUMENT naming the field". append_nowait checked only the types; building
    the message (_coalesce, in the sender) raised ValueError/TypeError for these, the
    sender took that for a failed write and re-queued the batch first in line, for good:
    the bad append and every append batched with it hung until their timeout and failed
    with DEADLINE_EXCEEDED "outcome unknown", the good one never sent (helper-82)."""
    async def body() -> None:
        async with running_store(tmp_path, timeout_s=3) as (_, c):
            await c.append("warm", new_event("T", b"0"))
            recorded = (await c.read("warm"))[0]
            stream, events, expected = _poison(kind, recorded)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            bad = c.append_nowait(stream, events, expected)
            good = c.append_nowait("good", new_event("T", b"2"))
            bad_result, good_result = await asyncio.gather(bad, good, return_exceptions=True)
            assert not isinstance(good_result, Exception), (
                f"a valid append batched with a bad one failed: {good_result!r}")
            assert isinstance(bad_result, AppendError), bad_result
            assert bad_result.code == grpc.StatusCode.INVALID_ARGUMENT, bad_result
            assert loop.time() - t0 < 1.0
    run(body)
