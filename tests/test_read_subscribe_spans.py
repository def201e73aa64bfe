"""SERVER spans of the store's Read and Subscribe calls (store/service.py): one per Read,
one per subscription's start and catch-up (ended at the caught-up marker, none per live
batch), each the child of the trace context the caller sent in the call's gRPC metadata
(telemetry.with_trace_context); errors end them with an error status; nothing at all
with tracing off. The SDK's in-memory exporter against a real in-process store server,
and the real OTLP exporter of a real `xdc serve` process against xdc's OTLP receiver."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from geo.tier_supervisor import HEALTH_ALL, wait_health
from store import auth, service
from store.client import CaughtUp, StoreClient, new_event
from store.limits import Limits
from store.process import ServeProcess
from tests.support.store import run, running_store, wait_until
from xdc import telemetry
from xdc.otlp_receiver import OtlpReceiver
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc

READ = "xdc.v1.EventStore/Read"
SUBSCRIBE = "xdc.v1.EventStore/Subscribe"


class Spans:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.caller = self.provider.get_tracer("test-caller")

    def __call__(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]


@pytest.fixture
def spans() -> Iterator[Spans]:
    s = Spans()
    telemetry.install(s.provider)
    try:
        yield s
    finally:
        telemetry.install(None, None)
        s.provider.shutdown()


def _child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return (span.parent is not None and span.parent.span_id == parent.context.span_id
            and span.context.trace_id == parent.context.trace_id)


def _read_request(stream: str, start: int = 0, limit: int = 100,
                  backwards: bool = False) -> pb.ReadRequest:
    request = pb.ReadRequest(stream=stream, limit=limit,
                             direction=pb.BACKWARDS if backwards else pb.FORWARDS)
    setattr(request, "from", start)
    return request


async def _read(stub: pb_grpc.EventStoreStub, request: pb.ReadRequest) -> list[Any]:
    """The events of one Read call, the current span's context sent with it."""
    call = stub.Read(request, metadata=telemetry.with_trace_context(), timeout=10)
    return [e async for batch in call for e in batch.events]


async def _append(client: StoreClient, stream: str, n: int) -> None:
    await client.append(stream, [new_event("T", b"%d" % i) for i in range(n)])


def test_read_span_child_of_the_caller_with_what_was_read(spans: Spans,
                                                           tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path / "store") as (server, client):
            await _append(client, "orders-X", 3)
            await _append(client, "other", 2)
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.EventStoreStub(channel)
                with spans.caller.start_as_current_span("report"):
                    assert len(await _read(stub, _read_request("orders-X", limit=10))) == 3
                    got = await _read(stub, _read_request("$all", start=4, limit=2,
                                                          backwards=True))
                    assert [e.position for e in got] == [4, 3]
                # No context sent: a root span.
                assert len(await _read(stub, _read_request("orders-X", start=2))) == 2
            await wait_until(lambda: len(spans(READ)) == 3, what="three Read spans")

    run(body)
    caller = spans("report")[0]
    stream, all_, root = spans(READ)
    for span in (stream, all_, root):
        attrs = dict(span.attributes or {})
        assert span.kind == SpanKind.SERVER
        assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == "xdc.v1.EventStore"
        assert attrs["rpc.method"] == "Read" and attrs["rpc.grpc.status_code"] == 0
        assert attrs["network.peer.address"].startswith("ipv4:127.0.0.1:")
        assert span.status.status_code == StatusCode.UNSET
    assert _child_of(stream, caller) and _child_of(all_, caller)
    assert root.parent is None and root.context.trace_id != caller.context.trace_id
    attrs = dict(stream.attributes or {})
    assert attrs["messaging.destination.name"] == "orders-X"
    assert attrs["xdc.read.direction"] == "forwards"
    assert attrs["xdc.read.from"] == 0 and attrs["xdc.read.start"] == 1
    assert attrs["xdc.read.limit"] == 10 and attrs["xdc.read.count"] == 3
    assert attrs["xdc.read.commit_position"] == 5
    attrs = dict(all_.attributes or {})
    assert attrs["messaging.destination.name"] == "$all"
    assert attrs["xdc.read.direction"] == "backwards"
    assert attrs["xdc.read.from"] == attrs["xdc.read.start"] == 4
    assert attrs["xdc.read.limit"] == attrs["xdc.read.count"] == 2
    attrs = dict(root.attributes or {})
    assert attrs["xdc.read.start"] == 2 and attrs["xdc.read.count"] == 2


def test_the_client_library_sends_its_callers_context_with_read_and_subscribe(
        spans: Spans, tmp_path: Path) -> None:
    """StoreClient.read and .subscribe inside a span: the server's spans are its children
    (gRPC's client interceptor covers unary calls only); outside any span, roots."""
    async def body() -> None:
        async with running_store(tmp_path / "store") as (_server, client):
            await _append(client, "orders-X", 3)
            with spans.caller.start_as_current_span("reader"):
                assert len(await client.read("orders-X", limit=10)) == 3
                async for item in client.subscribe(stream_prefix="orders-"):
                    if isinstance(item, CaughtUp):
                        break
            assert len(await client.read("orders-X", limit=10)) == 3
            await wait_until(lambda: len(spans(READ)) == 2 and len(spans(SUBSCRIBE)) == 1,
                             what="two Read spans and a Subscribe span")

    run(body)
    caller = spans("reader")[0]
    inside, outside = spans(READ)
    assert _child_of(inside, caller) and _child_of(spans(SUBSCRIBE)[0], caller)
    assert outside.parent is None


def test_read_of_a_missing_stream_ends_its_span_with_an_error(spans: Spans,
                                                               tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path / "store") as (server, _):
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.EventStoreStub(channel)
                with spans.caller.start_as_current_span("lookup"):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await _read(stub, _read_request("nowhere"))
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                    with pytest.raises(grpc.aio.AioRpcError) as err:  # limit 0
                        await _read(stub, _read_request("nowhere", limit=0))
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await wait_until(lambda: len(spans(READ)) == 2, what="two Read spans")

    run(body)
    lookup = spans("lookup")[0]
    missing, invalid = spans(READ)
    for span, code in ((missing, grpc.StatusCode.NOT_FOUND),
                       (invalid, grpc.StatusCode.INVALID_ARGUMENT)):
        attrs = dict(span.attributes or {})
        assert _child_of(span, lookup)
        assert span.status.status_code == StatusCode.ERROR
        assert (span.status.description or "").startswith(code.name)
        assert attrs["rpc.grpc.status_code"] == code.value[0]
        assert attrs["messaging.destination.name"] == "nowhere"
        assert attrs["xdc.read.count"] == 0
    assert "nowhere" in (missing.status.description or "")


def test_subscribe_span_ends_at_caught_up_and_live_batches_make_none(
        spans: Spans, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A filtered catch-up past a checkpoint: 25 skipped records, in steps of 4, then
    # the 3 it keeps; the count must not lose what the checkpoint reset.
    monkeypatch.setattr(service, "CHECKPOINT_EVERY", 10)

    async def body() -> None:
        limits = Limits(max_batch_events=4)
        async with running_store(tmp_path / "store", limits) as (server, client):
            await _append(client, "b-1", 25)
            await _append(client, "a-1", 3)
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.EventStoreStub(channel)
                with spans.caller.start_as_current_span("consumer-start"):
                    call = stub.Subscribe(pb.SubscribeRequest(stream_prefix="a-"),
                                          metadata=telemetry.with_trace_context())
                kinds: list[str] = []
                delivered = 0
                async for msg in call:
                    kinds.append(msg.WhichOneof("kind"))
                    if kinds[-1] == "events":
                        delivered += len(msg.events.events)
                    if kinds[-1] == "caught_up":
                        assert msg.caught_up.position == 28
                        break
                assert delivered == 3 and "checkpoint" in kinds
                # Ended at the caught-up marker: while the call is still open.
                await wait_until(lambda: len(spans(SUBSCRIBE)) == 1, what="catch-up span")
                # Live: delivered, and no span for them.
                await _append(client, "a-2", 2)
                live = 0
                async for msg in call:
                    if msg.WhichOneof("kind") == "events":
                        live += len(msg.events.events)
                        if live == 2:
                            break
                call.cancel()
                # A second one, unfiltered, from the end: caught up at once, nothing
                # delivered; no context sent, so a root span.
                call = stub.Subscribe(pb.SubscribeRequest(from_end=True))
                async for msg in call:
                    assert msg.WhichOneof("kind") == "caught_up"
                    break
                call.cancel()
                await wait_until(lambda: len(spans(SUBSCRIBE)) == 2, what="second span")

    run(body)
    start = spans("consumer-start")[0]
    first, second = spans(SUBSCRIBE)
    attrs = dict(first.attributes or {})
    assert first.kind == SpanKind.SERVER and _child_of(first, start)
    assert first.status.status_code == StatusCode.UNSET
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.method"] == "Subscribe"
    assert attrs["rpc.service"] == "xdc.v1.EventStore" and attrs["rpc.grpc.status_code"] == 0
    assert attrs["messaging.system"] == "xdc"
    assert attrs["xdc.subscription.stream_prefix"] == "a-"
    assert attrs["xdc.subscription.from_position"] == 0
    assert attrs["xdc.subscription.catch_up.delivered"] == 3
    assert attrs["xdc.subscription.caught_up"] is True
    assert attrs["xdc.subscription.caught_up.position"] == 28
    attrs = dict(second.attributes or {})
    assert second.parent is None
    assert attrs["xdc.subscription.from_end"] is True
    assert attrs["xdc.subscription.from_position"] == 30
    assert attrs["xdc.subscription.catch_up.delivered"] == 0
    assert attrs["xdc.subscription.caught_up.position"] == 30
    assert "xdc.subscription.stream_prefix" not in attrs


def test_subscription_refused_before_catching_up_ends_with_an_error(
        spans: Spans, tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path / "store", Limits(max_subscriptions=1)) as (
                server, client):
            await _append(client, "s", 2)
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.EventStoreStub(channel)
                with spans.caller.start_as_current_span("bad-filter"):
                    call = stub.Subscribe(pb.SubscribeRequest(event_types=["T", ""]),
                                          metadata=telemetry.with_trace_context())
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in call:
                            pass
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                held = stub.Subscribe(pb.SubscribeRequest())
                async for msg in held:
                    if msg.WhichOneof("kind") == "caught_up":
                        break
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Subscribe(pb.SubscribeRequest(after_position=1)):
                        pass
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                held.cancel()
            await wait_until(lambda: len(spans(SUBSCRIBE)) == 3, what="three spans")

    run(body)
    bad, held, refused = sorted(spans(SUBSCRIBE), key=lambda s: s.start_time or 0)
    assert _child_of(bad, spans("bad-filter")[0])
    for span, code in ((bad, grpc.StatusCode.INVALID_ARGUMENT),
                       (refused, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        attrs = dict(span.attributes or {})
        assert span.status.status_code == StatusCode.ERROR
        assert (span.status.description or "").startswith(code.name)
        assert attrs["rpc.grpc.status_code"] == code.value[0]
        assert attrs["xdc.subscription.caught_up"] is False
        assert "xdc.subscription.caught_up.position" not in attrs
    assert dict(bad.attributes or {})["xdc.subscription.event_types"] == ("T", "")
    # The one that was let in caught up (its cancellation came later: not on its span).
    assert held.status.status_code == StatusCode.UNSET
    assert dict(held.attributes or {})["xdc.subscription.catch_up.delivered"] == 2


def test_spans_name_the_principal_when_auth_is_on(spans: Spans, tmp_path: Path) -> None:
    config = auth.loads(auth.render([
        {"name": "auditor", "token": "tok-audit-2a6f",
         "grants": [{"operations": ["append", "read", "subscribe"], "streams": ["*"]}]}]),
        "test-auth.toml")

    async def body() -> None:
        async with running_store(tmp_path / "store", auth=config,
                                 token="tok-audit-2a6f") as (server, client):
            await _append(client, "audited", 1)
            md = auth.bearer("tok-audit-2a6f")
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.EventStoreStub(channel)
                with spans.caller.start_as_current_span("audit"):
                    got = [e async for b in stub.Read(
                        _read_request("audited"), metadata=telemetry.with_trace_context(md))
                        for e in b.events]
                    assert len(got) == 1
                    call = stub.Subscribe(pb.SubscribeRequest(),
                                          metadata=telemetry.with_trace_context(md))
                async for msg in call:
                    if msg.WhichOneof("kind") == "caught_up":
                        break
                call.cancel()
            await wait_until(lambda: len(spans(READ)) == len(spans(SUBSCRIBE)) == 1,
                             what="the spans")

    run(body)
    audit = spans("audit")[0]
    for span in (spans(READ)[0], spans(SUBSCRIBE)[0]):
        assert _child_of(span, audit)
        assert dict(span.attributes or {})["xdc.principal"] == "auditor"


def test_no_span_work_when_tracing_is_off(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real = telemetry.server_span

    def counting(service_name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        made.append(method)
        return real(service_name, method, *args, **kwargs)

    monkeypatch.setattr(telemetry, "server_span", counting)

    async def calls(server: Any, client: StoreClient) -> None:
        await _append(client, "s", 2)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.EventStoreStub(channel)
            assert len(await _read(stub, _read_request("s"))) == 2
            with pytest.raises(grpc.aio.AioRpcError):
                await _read(stub, _read_request("missing"))
            call = stub.Subscribe(pb.SubscribeRequest())
            async for msg in call:
                if msg.WhichOneof("kind") == "caught_up":
                    break
            call.cancel()

    async def off() -> None:
        assert not telemetry.tracing()
        async with running_store(tmp_path / "off") as (server, client):
            await calls(server, client)

    run(off)
    assert made == []
    # The same calls traced do make them (this test sees the span work it counts).
    s = Spans()
    telemetry.install(s.provider)
    try:
        async def on() -> None:
            async with running_store(tmp_path / "on") as (server, client):
                await calls(server, client)
        run(on)
    finally:
        telemetry.install(None, None)
        s.provider.shutdown()
    assert made == ["Read", "Read", "Subscribe"]
    assert len(s(READ)) == 2 and len(s(SUBSCRIBE)) == 1


# ---- a real `xdc serve`, its real OTLP exporter --------------------------------------------

def test_real_serve_exports_read_and_catch_up_spans(spans: Spans, tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        proc = ServeProcess(str(tmp_path / "data"), env={
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_SERVICE_NAME": "xdc-reads",
            "OTEL_BSP_SCHEDULE_DELAY": "50"})
        with proc:
            async def body() -> None:
                async with StoreClient(proc.address) as client:
                    await _append(client, "wire", 4)
                    # Subscriptions are admitted once the tiers below them have settled.
                    await wait_health(health_pb2_grpc.HealthStub(client.channel), HEALTH_ALL,
                                      timeout_s=30)
                    stub = pb_grpc.EventStoreStub(client.channel)
                    with spans.caller.start_as_current_span("remote-reader"):
                        assert len(await _read(stub, _read_request("wire"))) == 4
                        call = stub.Subscribe(pb.SubscribeRequest(),
                                              metadata=telemetry.with_trace_context())
                    async for msg in call:
                        if msg.WhichOneof("kind") == "caught_up":
                            break
                    # Exported while the subscription is still open: it ended at catch-up.
                    await asyncio.to_thread(receiver.wait, lambda r: any(
                        s.name == SUBSCRIBE for s in r.spans("xdc-reads")),
                        what="the catch-up span")
                    call.cancel()

            run(body)
            receiver.wait(lambda r: any(s.name == READ for s in r.spans("xdc-reads")),
                          what="the Read span")
            proc.signal(signal.SIGTERM)
            assert proc.proc is not None and proc.proc.wait(20) == 0
        received = receiver.spans("xdc-reads")
    caller = spans("remote-reader")[0]
    read = next(s for s in received if s.name == READ)
    sub = next(s for s in received if s.name == SUBSCRIBE)
    for span in (read, sub):  # children of the span in this process
        assert int.from_bytes(span.span.trace_id, "big") == caller.context.trace_id
        assert int.from_bytes(span.span.parent_span_id, "big") == caller.context.span_id
    assert read.attrs["xdc.read.count"] == 4
    assert read.attrs["messaging.destination.name"] == "wire"
    assert sub.attrs["xdc.subscription.catch_up.delivered"] == 4
    assert sub.attrs["xdc.subscription.caught_up.position"] == 4
