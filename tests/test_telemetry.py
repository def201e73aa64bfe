"""OpenTelemetry spans and metrics (xdc/telemetry.py): the SDK's in-memory exporter and
metric reader against a real store server, a real 3-node cluster on real etcd, and the
real OTLP exporters of a real `xdc serve` process against a small OTLP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanContext, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from geo.etcd_server import free_ports
from geo.replication.messages import Append, AppendReply, Entry
from geo.tracing import ReplicationObserver
from store import records
from store.client import CaughtUp, StoreClient, new_event
from store.process import ServeProcess
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import run, running_store, wait_until
from xdc import telemetry
from xdc.otlp_receiver import OtlpReceiver, OtlpReceiverProcess, ReceivedSpan
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc

APPEND_STREAM = "xdc.v1.EventStore/AppendStream"


class Otel:
    """In-memory providers installed as xdc's for one test."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        # The test's own producer (the order gateway's role).
        self.producer = self.tracer_provider.get_tracer("test-gateway")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def metrics(self) -> dict[str, list[Any]]:
        """Metric name -> its data points, from one collection."""
        out: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.setdefault(m.name, []).extend(m.data.data_points)
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    telemetry.install(o.tracer_provider, o.meter_provider)
    try:
        yield o
    finally:
        telemetry.install(None, None)
        o.tracer_provider.shutdown()
        o.meter_provider.shutdown()


def _child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return (span.parent is not None and span.parent.span_id == parent.context.span_id
            and span.context.trace_id == parent.context.trace_id)


def _links_to(span: ReadableSpan, target: ReadableSpan) -> bool:
    return any(link.context.span_id == target.context.span_id
               and link.context.trace_id == target.context.trace_id for link in span.links)


def _traceparent(span: ReadableSpan) -> str:
    ctx = span.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


# ---- helpers without a server --------------------------------------------------------------

def test_nothing_is_exported_without_otel_variables() -> None:
    assert telemetry.setup_from_env("xdc-test", env={}) is False
    assert not telemetry.tracing()
    assert telemetry.server_interceptors() == [] and telemetry.client_interceptors() is None
    with telemetry.tracer().start_as_current_span("x") as span:
        assert not span.is_recording()
        assert telemetry.inject({}) == {}  # no recording span: no traceparent
    with telemetry.consumer_span("orders", [{"traceparent": "garbage"}]) as span:
        assert not span.is_recording()
    assert telemetry.setup_from_env("xdc-test", env={"OTEL_TRACES_EXPORTER": "none",
                                                     "OTEL_METRICS_EXPORTER": "none"}) is False
    # An OTLP endpoint alone means OTLP for both signals; "none" turns one off.
    endpoint_vars = ("OTEL_EXPORTER_OTLP_ENDPOINT",)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert telemetry._exporters("OTEL_TRACES_EXPORTER", endpoint_vars, env) == ["otlp"]
    assert telemetry._exporters("OTEL_TRACES_EXPORTER", endpoint_vars,
                                {**env, "OTEL_TRACES_EXPORTER": "none"}) == []
    assert telemetry._exporters("OTEL_TRACES_EXPORTER", endpoint_vars,
                                {"OTEL_TRACES_EXPORTER": "console,otlp"}) == ["console", "otlp"]
    # W3C traceparent parsing: the consumer path reads one per event.
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    sc = telemetry.span_context(good, "vendor=x")
    assert sc is not None and sc.is_remote and sc.span_id == 0xB7AD6B7169203331
    assert sc.trace_state.get("vendor") == "x"
    for bad in ("", good[:-1], "ff" + good[2:], good.replace("0af7", "zzzz"),
                "00-" + "0" * 32 + good[35:], good.upper(), good.replace("0af7", "_af7"),
                good.replace("-b7ad", "+b7ad")[:55]):
        assert telemetry.span_context(bad) is None, bad
    # extract parses a lone traceparent itself: the same context as the W3C propagator,
    # for good and bad headers, with and without a tracestate.
    w3c = TraceContextTextMapPropagator()
    for carrier in ({"traceparent": good}, {"traceparent": good, "tracestate": "a=1"},
                    {"traceparent": "01" + good[2:]}, {"traceparent": good + "-x"},
                    {"traceparent": "01" + good[2:] + "-x"}, {"traceparent": good.upper()},
                    {"traceparent": "ff" + good[2:]}, {}):
        mine = trace.get_current_span(telemetry.extract(carrier)).get_span_context()
        theirs = trace.get_current_span(w3c.extract(carrier)).get_span_context()
        assert mine == theirs and mine.trace_state == theirs.trace_state, carrier
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        telemetry.setup_from_env("xdc-test", env={"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="PROTOCOL"):
        telemetry.setup_from_env("xdc-test", env={"OTEL_TRACES_EXPORTER": "otlp",
                                                  "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    telemetry.install(None, None)


def test_a_failed_otlp_export_leaves_no_span_to_the_cyclic_collector(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed OTLP export leaves a reference cycle behind (its result holds the error,
    whose traceback holds the exporter's frames and their callers'); the batch's spans
    are not in it: the batch list is emptied after each export, and the failure counted
    (telemetry._BatchReleased).
    Before, every span of the batch was in it, and an engine that had frozen them alive
    (engine.book.GcFreezer) never freed them: ~0.7 MB per 25k inputs with the collector
    unreachable."""
    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")  # read by the exporter
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
    assert telemetry.setup_from_env("xdc-test", env=env)
    provider = telemetry._state.tracer_provider
    failed = telemetry.failed_exports()
    gc.collect()
    gc.disable()  # what the failed export leaves stays uncollected until the check
    try:
        for i in range(50):
            with telemetry.tracer().start_as_current_span(f"order {i}"):
                pass
        provider.force_flush(10_000)  # the export, failed, has returned
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        telemetry.shutdown()
    assert any(isinstance(o, grpc.RpcError) for o in garbage), "no failed export seen"
    assert not [o for o in garbage if isinstance(o, ReadableSpan)]
    # Counted: the engine's GC freezer takes it as a sign of cyclic garbage.
    assert telemetry.failed_exports() > failed


def test_console_exporter_from_env(capfd: pytest.CaptureFixture[str]) -> None:
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "xdc-console-test"}
    assert telemetry.setup_from_env("ignored", env=env)
    try:
        assert telemetry.tracing()
        with telemetry.tracer().start_as_current_span("hello"):
            pass
    finally:
        telemetry.shutdown()
    err = capfd.readouterr().err  # stderr: stdout carries `xdc serve`'s ready line
    assert '"name": "hello"' in err and "xdc-console-test" in err
    assert not telemetry.tracing()


def test_exported_resource_is_hashed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OTLP encoders hash the resource for every span they export; the providers'
    resource is the SDK's (equal, same hash) but never serializes itself again."""
    import opentelemetry.sdk.resources as resources

    sdk = resources.Resource.create({"service.name": "xdc-hash-test", "xdc.region": "r1"})
    hashed = telemetry._hashed_once(sdk)
    assert hashed == sdk and hash(hashed) == hash(sdk)
    assert dict(hashed.attributes) == dict(sdk.attributes)
    calls = 0
    real_dumps = resources.dumps

    def counting_dumps(*args: Any, **kwargs: Any) -> str:
        nonlocal calls
        calls += 1
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(resources, "dumps", counting_dumps)
    hash(sdk)
    assert calls == 1, "the SDK's resource serializes itself per hash (what this avoids)"
    for _ in range(3):
        hash(hashed)
    assert calls == 1
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "xdc-hash-test"}
    assert telemetry.setup_from_env("ignored", env=env)
    try:
        resource = telemetry._state.tracer_provider.resource
        assert resource.attributes["service.name"] == "xdc-hash-test"
        calls = 0
        for _ in range(3):
            hash(resource)
        assert calls == 0
    finally:
        telemetry.shutdown()


def test_inject_extract_and_consumer_links(otel: Otel) -> None:
    with otel.producer.start_as_current_span("order-1") as o1:
        md1 = telemetry.inject({"client": "a"})
    with otel.producer.start_as_current_span("order-2"):
        md2 = telemetry.inject({})
    assert md1["traceparent"] == _traceparent(o1) and md1["client"] == "a"
    ctx = telemetry.extract(md1)
    with telemetry.tracer().start_as_current_span("child", context=ctx):
        pass
    # One producer: the CONSUMER span is its child (one order, one trace) and links to it.
    with telemetry.consumer_span("orders-BTC", [md1, md1, {}], consumer_group="engine-1"):
        pass
    # Several producers: links to each, under the ambient context.
    with telemetry.consumer_span("orders-BTC", [md1, md2, {"traceparent": "bad"}]):
        pass
    [o1_s] = otel.spans("order-1")
    [o2_s] = otel.spans("order-2")
    assert _child_of(otel.spans("child")[0], o1_s)
    single, batch = otel.spans("process orders-BTC")
    assert single.kind == SpanKind.CONSUMER and _child_of(single, o1_s) and _links_to(single, o1_s)
    assert dict(single.attributes or {}) == {
        "messaging.system": "xdc", "messaging.operation.type": "process",
        "messaging.operation.name": "process", "messaging.destination.name": "orders-BTC",
        "messaging.batch.message_count": 3, "messaging.consumer.group.name": "engine-1"}
    assert batch.parent is None and _links_to(batch, o1_s) and _links_to(batch, o2_s)
    assert len(batch.links) == 2
    # An exception inside the block is recorded on the consumer span.
    with pytest.raises(RuntimeError), telemetry.consumer_span("s", [md1]):
        raise RuntimeError("book invariant")
    assert otel.spans("process s")[0].status.status_code == StatusCode.ERROR


def test_current_span_context_reads_what_the_api_reads(otel: Otel) -> None:
    """What a queued append remembers of its caller: the current span's context, None
    outside any span or under an invalid one. telemetry reads the context variable
    directly (the API's path cost ~1 us per append); it must agree with the API."""
    assert telemetry._CURRENT_CONTEXT is not None, "the fast path is in use here"

    def api() -> SpanContext | None:
        sc = trace.get_current_span().get_span_context()
        return sc if sc.is_valid else None

    assert telemetry.current_span_context() is None and api() is None
    with otel.producer.start_as_current_span("order") as span:
        assert telemetry.current_span_context() == span.get_span_context() == api()
        with trace.use_span(trace.INVALID_SPAN):
            assert telemetry.current_span_context() is None and api() is None
        remote = telemetry.extract(telemetry.inject({}))
        token = otel_context.attach(remote)  # a context received from another process
        try:
            got = telemetry.current_span_context()
            assert got is not None and got == api() and got.is_remote
            assert got.span_id == span.get_span_context().span_id
        finally:
            otel_context.detach(token)
    assert telemetry.current_span_context() is None


def test_open_span_exports_what_the_sdk_tracer_would(otel: Otel) -> None:
    """The hot paths' spans (telemetry.open_span) reach the exporters as the SDK's own:
    name, kind, parent, links, attributes, times, status, scope and resource."""
    with otel.producer.start_as_current_span("order") as order:
        parent = trace.set_span_in_context(order)
    link = trace.Link(SpanContext(0xABC, 0xDEF, is_remote=True))
    sdk = telemetry.tracer().start_span("batch", context=parent, kind=SpanKind.SERVER,
                                        links=[link], attributes={"a": 1}, start_time=10)
    sdk.set_attributes({"b": "x"})
    sdk.end(end_time=20)
    fast = telemetry.open_span("batch", context=parent, kind=SpanKind.SERVER, links=[link],
                               attributes={"a": 1}, start_time=10)
    assert isinstance(fast, telemetry.OpenSpan) and fast.is_recording()
    fast.set_attributes({"b": "x"})
    fast.end(end_time=20)
    fast.set_attribute("late", 1)  # after end: ignored, as by the SDK
    fast.end(end_time=30)          # a second end: ignored
    want, got = otel.spans("batch")
    for field in ("name", "kind", "parent", "start_time", "end_time", "resource",
                  "instrumentation_scope"):
        assert getattr(got, field) == getattr(want, field), field
    assert dict(got.attributes) == dict(want.attributes) == {"a": 1, "b": "x"}
    assert [lk.context for lk in got.links] == [lk.context for lk in want.links]
    assert got.status.status_code is StatusCode.UNSET
    assert got.context.trace_id == order.get_span_context().trace_id
    assert got.context.trace_flags == want.context.trace_flags
    assert got.context.span_id not in (want.context.span_id, order.get_span_context().span_id)
    # A root span gets a trace of its own; the carrier is the span's own context, as the
    # W3C propagator writes it (with a trace state too).
    root = telemetry.open_span("root")
    traced = telemetry.open_span("stated", context=trace.set_span_in_context(
        trace.NonRecordingSpan(SpanContext(5, 6, True, trace.TraceFlags(1),
                                           trace.TraceState([("k", "v"), ("a", "b")])))))
    for span in (root, traced, fast, trace.INVALID_SPAN):
        w3c: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(w3c, trace.set_span_in_context(span))
        assert telemetry.carrier_of(span) == w3c
    assert "tracestate" in telemetry.carrier_of(traced)
    traced.end()
    root.end()
    assert otel.spans("root")[0].parent is None


def _contexts(n: int, sampled: bool = True) -> list[SpanContext]:
    """`n` distinct remote contexts (producers of a batch), each in a trace of its own."""
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
    return [SpanContext(0x1000 + i, 0x2000 + i, is_remote=True, trace_flags=flags)
            for i in range(n)]


def test_open_span_splits_links_past_max_links_into_chunks(otel: Otel) -> None:
    """A span serving more producer contexts than MAX_LINKS links the first MAX_LINKS;
    at its end each further MAX_LINKS go to a child of the same name, kind, attributes
    (as they were at the end), status and timing, so every context reaches the work.
    Past MAX_LINKED, the rest are not linked (16 spans at most). Before, the contexts
    past the 64th were dropped: their traces never reached the batch's span."""
    per, n = telemetry.MAX_LINKS, 2 * telemetry.MAX_LINKS + 44
    contexts = _contexts(n)
    span = telemetry.open_span("batch", kind=SpanKind.CONSUMER, attributes={"a": 1},
                               links=[trace.Link(sc) for sc in contexts], start_time=10)
    span.set_attribute("b", 2)
    span.set_status(trace.Status(StatusCode.ERROR, "refused"))
    span.end(end_time=20)
    (first,) = [s for s in otel.spans("batch") if s.parent is None]
    chunks = sorted((s for s in otel.spans("batch") if s.parent is not None),
                    key=lambda s: s.attributes["xdc.links.chunk"])
    assert [len(s.links) for s in [first, *chunks]] == [per, per, 44]
    assert [lk.context for s in [first, *chunks] for lk in s.links] == contexts
    assert dict(first.attributes) == {"a": 1, "b": 2, "xdc.links.chunk": 0,
                                      "xdc.links.chunks": 3}
    for k, chunk in enumerate(chunks, 1):
        assert _child_of(chunk, first)
        assert (chunk.kind, chunk.start_time, chunk.end_time) == (SpanKind.CONSUMER, 10, 20)
        assert dict(chunk.attributes) == {**first.attributes, "xdc.links.chunk": k}
        assert chunk.status.status_code is StatusCode.ERROR
        assert chunk.status.description == "refused"
    # A batch's spans are bounded: MAX_LINKED contexts at most, MAX_LINKS per span.
    otel.exporter.clear()
    many = _contexts(telemetry.MAX_LINKED + 100)
    telemetry.open_span("huge", links=[trace.Link(sc) for sc in many]).end()
    huge = otel.spans("huge")
    assert len(huge) == telemetry.MAX_LINKED // per and {len(s.links) for s in huge} == {per}
    assert [lk.context.span_id for s in sorted(huge, key=lambda s: s.attributes[
        "xdc.links.chunk"]) for lk in s.links] == [sc.span_id for sc in many[:telemetry.MAX_LINKED]]
    # At MAX_LINKS or fewer, one span as before, without the chunk attributes.
    otel.exporter.clear()
    telemetry.open_span("small", links=[trace.Link(sc) for sc in contexts[:per]]).end()
    (small,) = otel.spans("small")
    assert len(small.links) == per and "xdc.links.chunks" not in small.attributes


def test_batch_spans_link_every_producer_past_max_links(otel: Otel) -> None:
    """The rules that gather a batch's producer contexts keep up to MAX_LINKED of them
    (before: MAX_LINKS, 64): the engine's CONSUMER span (consumer_span), and
    parent_and_links (an AppendStream message, a group commit, the leader's replicate
    span, an emit span), whose span open_span then splits."""
    contexts = _contexts(300)
    metadatas = [{"traceparent": telemetry.traceparent_of(sc)} for sc in contexts]
    with telemetry.consumer_span("orders", metadatas) as span:
        assert len(telemetry.contexts_of(metadatas)[0]) == 300
    spans = otel.spans("process orders")
    assert len(spans) == 3 and all(s.kind == SpanKind.CONSUMER for s in spans)
    assert {lk.context.span_id for s in spans for lk in s.links} == \
        {sc.span_id for sc in contexts}
    (first,) = [s for s in spans if s.parent is None]
    assert first.context.span_id == span.get_span_context().span_id  # the one yielded
    assert all(_child_of(s, first) for s in spans if s is not first)
    _, links = telemetry.parent_and_links([*contexts, *contexts[:10], None])
    assert [lk.context for lk in links] == contexts  # distinct, in order
    with telemetry.serving(contexts, "emit out") as emit:
        pass
    emit.end()
    assert len(otel.spans("emit out")) == 3


def test_open_span_status_and_exceptions_as_the_sdk(otel: Otel) -> None:
    """ERROR keeps its description, OK is final; an exception raised under use_span is
    recorded as an event and sets ERROR."""
    span = telemetry.open_span("s")
    span.set_status(StatusCode.ERROR, "first")
    span.set_status(trace.Status(StatusCode.OK))
    span.set_status(StatusCode.ERROR, "after ok")
    span.end()
    with pytest.raises(ValueError), trace.use_span(telemetry.open_span("e"),
                                                   end_on_exit=True):
        raise ValueError("poison")
    (s,) = otel.spans("s")
    assert s.status.status_code is StatusCode.OK
    (e,) = otel.spans("e")
    assert e.status.status_code is StatusCode.ERROR and "poison" in (e.status.description or "")
    (event,) = e.events
    assert event.name == "exception" and event.attributes["exception.type"] == "ValueError"
    assert "poison" in event.attributes["exception.stacktrace"]


def test_open_span_default_sampler_decides_as_the_sdk(otel: Otel) -> None:
    """open_span decides for the SDK's default sampler inline: the same flags and trace
    state as the sampler itself, for a root, a sampled parent and an unsampled one."""
    from opentelemetry.sdk.trace.sampling import DEFAULT_ON
    from opentelemetry.trace import NonRecordingSpan, TraceFlags, TraceState

    assert otel.tracer_provider.sampler is DEFAULT_ON
    assert telemetry._state.recorder is not None and telemetry._state.recorder.default_sampler
    state = TraceState([("vendor", "v")])
    for parent in (None, SpanContext(7, 8, True, TraceFlags(TraceFlags.SAMPLED), state),
                   SpanContext(7, 8, True, TraceFlags(TraceFlags.DEFAULT), state)):
        ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
        span = telemetry.open_span("decided", context=ctx)
        sdk = telemetry.tracer().start_span("decided", context=ctx)
        got, want = span.get_span_context(), sdk.get_span_context()
        assert (got.trace_flags, got.trace_state) == (want.trace_flags, want.trace_state)
        assert span.is_recording() == sdk.is_recording()
        if parent is not None:
            assert got.trace_id == want.trace_id == 7
        span.end()
        sdk.end()


def test_open_span_honours_the_sampler() -> None:
    """A span the configured sampler drops is not exported, and its context goes on
    flagged unsampled, as the W3C propagator writes it (a parent-based sampler downstream
    drops the children too); tracing off gives INVALID_SPAN."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install(provider)
    try:
        span = telemetry.open_span("dropped", attributes={"a": 1})
        assert not span.is_recording() and span.get_span_context().is_valid
        assert not span.get_span_context().trace_flags.sampled
        carrier = telemetry.carrier_of(span)
        w3c: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(w3c, trace.set_span_in_context(span))
        span.end()
    finally:
        telemetry.install(None, None)
        provider.shutdown()
    assert carrier == w3c and not int(carrier["traceparent"][-2:], 16) & 1  # unsampled
    # Downstream (the store receiving the message), under the default parent-based
    # sampler: the child of an unsampled context is not recorded either.
    downstream = TracerProvider()
    downstream.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install(downstream)
    try:
        child = telemetry.open_span("child", context=telemetry.extract(carrier))
        assert not child.is_recording()
        assert child.get_span_context().trace_id == span.get_span_context().trace_id
        child.end()
    finally:
        telemetry.install(None, None)
        downstream.shutdown()
    assert exporter.get_finished_spans() == ()
    assert telemetry.open_span("off") is trace.INVALID_SPAN


class _Deciding(Sampler):
    """A sampler that answers `decision` and adds an attribute when it records."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def should_sample(self, parent_context: Any, trace_id: int, name: str,
                      kind: Any = None, attributes: Any = None, links: Any = None,
                      trace_state: Any = None) -> SamplingResult:
        return SamplingResult(self.decision, {"sampler.decided": self.decision.name})

    def get_description(self) -> str:
        return f"Deciding({self.decision.name})"


def test_open_span_asks_a_custom_sampler_and_keeps_its_attributes() -> None:
    """RECORD_AND_SAMPLE: exported with the sampler's attributes beside the caller's.
    RECORD_ONLY (recorded, never exported by the SDK's processors): dropped at once, its
    context flagged unsampled, as DROP."""
    exporter = InMemorySpanExporter()
    spans = {}
    for decision in (Decision.RECORD_AND_SAMPLE, Decision.RECORD_ONLY, Decision.DROP):
        provider = TracerProvider(sampler=_Deciding(decision))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        telemetry.install(provider)
        try:
            spans[decision] = span = telemetry.open_span(decision.name, attributes={"a": 1})
            span.end()
        finally:
            telemetry.install(None, None)
            provider.shutdown()
    (kept,) = exporter.get_finished_spans()
    assert kept.name == "RECORD_AND_SAMPLE"
    assert dict(kept.attributes or {}) == {"a": 1, "sampler.decided": "RECORD_AND_SAMPLE"}
    assert kept.context.trace_flags.sampled
    for decision in (Decision.RECORD_ONLY, Decision.DROP):
        span = spans[decision]
        assert not span.is_recording() and span.get_span_context().is_valid
        assert not span.get_span_context().trace_flags.sampled


# ---- a real store server and client ------------------------------------------------------

def test_append_spans_parent_child_and_stored_traceparent(otel: Otel, tmp_path: Path) -> None:
    async def body() -> Any:
        async with running_store(tmp_path / "store") as (server, client):
            with otel.producer.start_as_current_span("submit-order") as order:
                event = new_event("OrderPlaced", b"{}", metadata=telemetry.inject({}))
                r = await client.append("orders-BTC", event)
            # A refused append: wrong expected revision.
            with pytest.raises(Exception, match="FAILED_PRECONDITION"):
                await client.append("orders-BTC", new_event("X"), pb.EXPECTED_NO_STREAM)
            stored = (await client.read("orders-BTC"))[0]
            assert stored.metadata["traceparent"] == _traceparent(order)
            # Unary Append over an instrumented channel: context in the gRPC metadata.
            async with grpc.aio.insecure_channel(
                    server.address, interceptors=telemetry.client_interceptors()) as ch:
                stub = pb_grpc.EventStoreStub(ch)
                with otel.producer.start_as_current_span("unary-caller"):
                    await stub.Append(pb.AppendRequest(stream="u", events=[new_event("T")]))
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.Append(pb.AppendRequest(
                            stream="u", expected=pb.EXPECTED_NO_STREAM, events=[new_event("T")]))
            await client.node_info()
            await wait_until(lambda: len(otel.spans(APPEND_STREAM)) >= 4, what="stream spans")
            return r

    r = run(body)
    order_s = otel.spans("submit-order")[0]
    clients = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.CLIENT]
    servers = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.SERVER]
    assert len(clients) == 2 and len(servers) == 2
    client_ok = next(s for s in clients if _child_of(s, order_s))
    server_ok = next(s for s in servers if _child_of(s, client_ok))
    assert dict(client_ok.attributes or {})["xdc.append.result"] == "ok"
    assert dict(client_ok.attributes or {})["messaging.destination.name"] == "orders-BTC"
    attrs = dict(server_ok.attributes or {})
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.method"] == "AppendStream"
    assert attrs["messaging.destination.name"] == "orders-BTC"
    assert attrs["messaging.batch.message_count"] == 1 and attrs["xdc.append.count"] == 1
    assert attrs["xdc.append.result"] == "ok"
    assert attrs["xdc.position.first"] == attrs["xdc.position.last"] == r.last_position
    # The group commit (one write transaction, one fsync) is the server span's child.
    group = next(s for s in otel.spans("xdc.group_commit") if _child_of(s, server_ok))
    assert group.kind == SpanKind.INTERNAL
    assert dict(group.attributes or {})["messaging.batch.message_count"] == 1
    # The refused append: its own client and server spans, result "refused".
    refused = next(s for s in servers if s is not server_ok)
    assert dict(refused.attributes or {})["xdc.append.result"] == "refused"
    client_refused = dict(next(s for s in clients if s is not client_ok).attributes or {})
    assert client_refused["xdc.append.result"] == "refused"
    assert client_refused["xdc.append.refused"] == 1
    assert "xdc.append.refused" not in dict(client_ok.attributes or {})
    # Unary calls: CLIENT span (interceptor) -> SERVER span (interceptor), child via the
    # traceparent in the call's metadata; the failed one carries the gRPC status.
    caller_s = otel.spans("unary-caller")[0]
    unary_clients = [s for s in otel.spans("xdc.v1.EventStore/Append")
                     if s.kind == SpanKind.CLIENT]
    unary_servers = [s for s in otel.spans("xdc.v1.EventStore/Append")
                     if s.kind == SpanKind.SERVER]
    assert len(unary_clients) == 2 and all(_child_of(s, caller_s) for s in unary_clients)
    assert all(any(_child_of(srv, c) for c in unary_clients) for srv in unary_servers)
    failed = next(s for s in unary_servers if s.status.status_code == StatusCode.ERROR)
    assert dict(failed.attributes or {})["rpc.grpc.status_code"] == 9  # FAILED_PRECONDITION
    assert dict(failed.attributes or {})["xdc.append.result"] == "refused"
    ok = next(s for s in unary_servers if s is not failed)
    assert dict(ok.attributes or {})["messaging.destination.name"] == "u"
    assert any(_child_of(g, ok) for g in otel.spans("xdc.group_commit"))
    node_info = otel.spans("xdc.v1.EventStore/NodeInfo")
    assert {s.kind for s in node_info} == {SpanKind.CLIENT, SpanKind.SERVER}


def test_coalesced_appends_link_to_each_caller(otel: Otel, tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path / "store", linger_s=0.05) as (_, client):
            futures = []
            for i in range(3):  # 1, 2 and 3 events: 6 in the message
                with otel.producer.start_as_current_span(f"caller-{i}"):
                    futures.append(client.append_nowait(
                        f"s{i}", (new_event("T") for _ in range(i + 1))))
            await asyncio.gather(*futures)
            await wait_until(lambda: otel.spans("xdc.group_commit"), what="group commit")

    run(body)
    callers = [otel.spans(f"caller-{i}")[0] for i in range(3)]
    [client_span] = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.CLIENT]
    assert client_span.parent is None  # three callers in one message: links, new trace
    assert all(_links_to(client_span, c) for c in callers)
    assert dict(client_span.attributes or {})["xdc.append.count"] == 3
    assert dict(client_span.attributes or {})["messaging.batch.message_count"] == 6
    [server_span] = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.SERVER]
    assert _child_of(server_span, client_span)
    # Three streams: no one destination.
    assert "messaging.destination.name" not in dict(server_span.attributes or {})
    assert "messaging.destination.name" not in dict(client_span.attributes or {})


def test_a_message_of_many_callers_links_each_of_them(otel: Otel, tmp_path: Path) -> None:
    """More callers in one AppendStream message than MAX_LINKS: the message's CLIENT span
    and its link chunks (its children) link every caller, so each caller's trace reaches
    the message and, under it, the server span and the group commit. Before, the
    callers past the 64th had no link to any span of the store."""
    n = 2 * telemetry.MAX_LINKS + 44

    async def body() -> None:
        async with running_store(tmp_path / "store", linger_s=0.05) as (_, client):
            await client.append("warm", new_event("T"))
            otel.exporter.clear()
            futures = []
            for i in range(n):
                with otel.producer.start_as_current_span(f"caller-{i}"):
                    futures.append(client.append_nowait(f"s{i}", new_event("T")))
            await asyncio.gather(*futures)
            await wait_until(lambda: otel.spans("xdc.group_commit"), what="group commit")

    run(body)
    clients = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.CLIENT]
    (message,) = [s for s in clients if s.parent is None]
    assert message.attributes["xdc.append.count"] == n, "one message for every caller"
    linked = {lk.context.span_id for s in clients for lk in s.links}
    callers = [otel.spans(f"caller-{i}")[0] for i in range(n)]
    assert [c.name for c in callers if c.context.span_id not in linked] == []
    chunks = [s for s in clients if s is not message]
    assert len(chunks) == 2 and all(_child_of(c, message) for c in chunks)
    [server_span] = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.SERVER]
    assert _child_of(server_span, message)


def test_merged_appends_are_counted_as_callers_and_as_sent(otel: Otel, tmp_path: Path
                                                           ) -> None:
    """Appends to one stream in one message travel merged (store/client.py _coalesce):
    the client span counts its callers' appends and the appends sent, which is the
    server span's count; both carry every event."""
    async def body() -> None:
        async with running_store(tmp_path / "store", linger_s=0.05) as (_, client):
            futures = [client.append_nowait("m", new_event("T")) for _ in range(4)]
            futures.append(client.append_nowait("other", new_event("T")))
            await asyncio.gather(*futures)

    run(body)
    [client_span] = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.CLIENT]
    [server_span] = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.SERVER]
    client_attrs = dict(client_span.attributes or {})
    server_attrs = dict(server_span.attributes or {})
    assert client_attrs["xdc.append.count"] == 5 and client_attrs["xdc.append.sent"] == 2
    assert server_attrs["xdc.append.count"] == 2
    assert client_attrs["messaging.batch.message_count"] == 5
    assert server_attrs["messaging.batch.message_count"] == 5


def test_metrics_append_latency_and_subscription_lag(otel: Otel, tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path / "store") as (_, client):
            for i in range(5):
                await client.append("m", new_event("T", b"%d" % i))
            # A subscription that stops reading after catching up lags behind new appends.
            sub = client.subscribe(batches=True)
            async for item in sub:
                if isinstance(item, CaughtUp):
                    break
            lag0 = otel.metrics()["xdc.subscription.lag.records"][0].value
            assert lag0 == 0
            await asyncio.gather(*(client.append("m", new_event("T")) for _ in range(50)))
            # Closing the subscription ends its call: the server stops counting it.
            await sub.aclose()
            await wait_until(lambda: "xdc.subscription.lag.records" not in otel.metrics(),
                             what="closed subscription leaves the gauge")

    run(body)
    m = otel.metrics()
    server = m["xdc.append.duration"]
    assert sum(p.count for p in server) >= 6
    assert {p.attributes["rpc.method"] for p in server} == {"AppendStream"}
    assert all(p.attributes["xdc.append.result"] == "ok" for p in server)
    assert sum(p.count for p in m["xdc.client.append.duration"]) >= 6


# ---- replication in a real 3-node cluster --------------------------------------------------

def test_cluster_replication_spans_follow_the_order(otel: Otel, etcd: EtcdCluster,
                                                   tmp_path: Path) -> None:
    async def body() -> tuple[str, list[str]]:
        cluster = LocalCluster.make(etcd.endpoints, tmp_path)
        await cluster.start()
        try:
            leader = await cluster.leader()
            followers = sorted(n.id for n in cluster.nodes.values() if n is not leader)
            async with StoreClient(leader.address, timeout_s=10) as client:
                await client.append("warmup", new_event("T"))
                await cluster.converged()
                otel.exporter.clear()
                with otel.producer.start_as_current_span("submit-order"):
                    event = new_event("OrderPlaced", metadata=telemetry.inject({}))
                    r = await client.append("orders-ETH", event)
                await cluster.converged()

                def acked_by_both() -> bool:
                    done = [s for s in otel.spans("xdc.replica.append")
                            if dict(s.attributes or {})["xdc.position.last"] >= r.last_position]
                    return len({dict(s.attributes or {})["xdc.node"] for s in done}) == 2
                await wait_until(acked_by_both, what="both followers' replica spans")
                # Metrics: follower commit lag per follower, replication lag gauges.
                m = otel.metrics()
                lag_peers = {p.attributes["xdc.peer"]
                             for p in m["xdc.replication.follower.commit_lag"]}
                assert lag_peers == set(followers)
                records = {p.attributes["xdc.peer"]: p.value
                           for p in m["xdc.replication.lag.records"]}
                assert set(records) == set(followers) and all(v == 0 for v in records.values())
                assert {p.attributes["xdc.peer"] for p in m["xdc.replication.lag.seconds"]} \
                    == set(followers)
                assert sum(p.count for p in m["xdc.commit.duration"]) >= 1
                # Failover: a graceful stop of the leader; the next term is timed.
                await cluster.stop(leader.id)
                await cluster.leader()
                await wait_until(lambda: len(otel.spans("xdc.failover")) >= 2,
                                 timeout_s=15, what="failover spans")
            return leader.id, followers
        finally:
            await cluster.stop()

    leader_id, followers = run(body, timeout_s=90)
    order = otel.spans("submit-order")[0]
    client = next(s for s in otel.spans(APPEND_STREAM)
                  if s.kind == SpanKind.CLIENT and _child_of(s, order))
    server = next(s for s in otel.spans(APPEND_STREAM)
                  if s.kind == SpanKind.SERVER and _child_of(s, client))
    assert any(_child_of(g, server) for g in otel.spans("xdc.group_commit"))
    commit = next(s for s in otel.spans("xdc.commit") if _child_of(s, server))
    assert dict(commit.attributes or {})["xdc.node"] == leader_id
    # Leader: one CLIENT span per follower for the batch holding the order, in the
    # order's trace (its only producer), acknowledged by that follower.
    position = dict(server.attributes or {})["xdc.position.last"]
    replicate = [s for s in otel.spans("xdc.replicate")
                 if dict(s.attributes or {})["xdc.position.last"] >= position
                 and dict(s.attributes or {})["xdc.position.first"] <= position]
    assert {dict(s.attributes or {})["xdc.peer"] for s in replicate} == set(followers)
    for s in replicate:
        assert s.kind == SpanKind.CLIENT and _child_of(s, order)
        assert s.status.status_code != StatusCode.ERROR
        assert dict(s.attributes or {})["xdc.match"] >= position
    # Follower: a SERVER span, child of the leader's span for it (context carried in the
    # PeerMessage), linked to the producer through the record's own traceparent.
    for f in followers:
        theirs = [s for s in otel.spans("xdc.replica.append")
                  if dict(s.attributes or {})["xdc.node"] == f
                  and dict(s.attributes or {})["xdc.position.last"] >= position]
        assert theirs, f"no replica span on {f}"
        span = theirs[0]
        assert span.kind == SpanKind.SERVER and _links_to(span, order)
        mine = next(s for s in replicate if dict(s.attributes or {})["xdc.peer"] == f)
        assert _child_of(span, mine)
        assert span.context.trace_id == order.context.trace_id  # one order, one trace
    # The failover after the leader's stop: elected and opened, timed.
    failovers = otel.spans("xdc.failover")
    events = {e.name for s in failovers for e in s.events}
    assert {"elected", "open"} <= events
    phases = {p.attributes["xdc.failover.phase"]
              for p in otel.metrics().get("xdc.failover.duration", [])}
    assert {"elected", "open"} <= phases


# ---- the real exporters of a real process, over the wire -----------------------------------

def _otel_env(endpoint: str, protocol: str, service: str) -> dict[str, str]:
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": service, "OTEL_METRIC_EXPORT_INTERVAL": "200"}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_real_process_exports_spans_over_otlp(otel: Otel, tmp_path: Path,
                                              protocol: str) -> None:
    with OtlpReceiver() as receiver:
        service = f"xdc-store-{protocol.split('/')[0]}"
        proc = ServeProcess(str(tmp_path / "data"), env={
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            **_otel_env(receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint,
                        protocol, service)})
        with proc:
            async def append() -> None:
                async with StoreClient(proc.address) as client:
                    with otel.producer.start_as_current_span("producer"):
                        await client.append("wire", new_event("T", metadata=telemetry.inject(
                            {})))
            run(append)
            # Metrics come every 200 ms; spans are batched (5 s by default) and flushed
            # when the process exits on SIGTERM.
            receiver.wait(lambda r: any(m.name == "xdc.append.duration"
                                        for m in r.metrics(service)), what="metrics")
            proc.signal(signal.SIGTERM)
            assert proc.proc is not None and proc.proc.wait(20) == 0
        receiver.wait(lambda r: any(s.name == APPEND_STREAM for s in r.spans(service)))
        spans: list[ReceivedSpan] = receiver.spans(service)
    assert all(s.resource["service.name"] == service for s in spans)
    client = next(s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.CLIENT)
    server = next(s for s in spans if s.name == APPEND_STREAM)
    # The server span (in the child process) is the child of the client span (here).
    assert int.from_bytes(server.span.trace_id, "big") == client.context.trace_id
    assert int.from_bytes(server.span.parent_span_id, "big") == client.context.span_id
    assert server.attrs["xdc.append.result"] == "ok"
    assert any(s.name == "xdc.group_commit" for s in spans)


def test_receiver_in_its_own_process_counts_what_a_real_exporter_sends(tmp_path: Path) -> None:
    # The tracing benchmark's sink: a collector's process beside the service, not in it.
    with OtlpReceiverProcess() as receiver:
        assert receiver.span_count == 0
        proc = _serve_with_otel(tmp_path, _otel_env(receiver.grpc_endpoint, "grpc",
                                                    "xdc-store-counted"))
        with proc:
            _append_three(proc.address, "counted")
            receiver.wait(lambda r: r.metric_requests > 0, what="metrics")
            proc.signal(signal.SIGTERM)
            assert proc.proc is not None and proc.proc.wait(20) == 0
        # Each append: its server span and its group commit (flushed at SIGTERM).
        receiver.wait(lambda r: r.span_count >= 6)
        child = receiver._proc
        assert child is not None and child.is_alive()
    assert not child.is_alive()


# ---- a collector that is down ------------------------------------------------------------

@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    """An OTLP endpoint that refuses connections: a loopback port bound, never listening
    (held for the test, so nothing else can take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_shutdown_returns_within_its_timeout_with_the_collector_down(
        refusing_endpoint: str) -> None:
    """The SDK's force_flush ignores its timeout and retries every queued batch (~8 s
    each against a refusing collector): shutdown keeps the bound itself."""
    assert telemetry.setup_from_env("xdc-test", env={
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": refusing_endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "60000"})
    for _ in range(2000):  # four export batches queued
        telemetry.open_span("xdc.group_commit").end()
    telemetry.metrics().append_duration.record(0.001)
    start = time.monotonic()
    telemetry.shutdown(timeout_s=2.0)
    assert time.monotonic() - start < 2.0 + 2.0
    assert not telemetry.tracing() and not telemetry.active()


def test_serve_exits_promptly_after_sigterm_with_the_collector_down(
        tmp_path: Path, refusing_endpoint: str) -> None:
    """A real `xdc serve` exporting both signals to a collector that is down exits
    within telemetry.shutdown's 5 s of SIGTERM (it took ~8 s a queued batch)."""
    proc = _serve_with_otel(tmp_path, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": refusing_endpoint,
        # A batch per span: every span queued is an export retried for ~8 s.
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1"})
    with proc:
        _append_three(proc.address, "down")
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(30)
        took = time.monotonic() - start
        assert proc.proc.poll() == 0, f"still running {took:.1f} s after SIGTERM"
    assert took < 5.0 + 2.0


def test_cli_append_caps_its_export_with_the_collector_down(
        tmp_path: Path, refusing_endpoint: str) -> None:
    """A real `xdc append` exporting to a collector that is down gives its telemetry
    telemetry.CLI_EXPORT_TIMEOUT_S (0.5 s), not a server's 5 s, and says so in one line at
    most. Before, every `xdc append` took ~4 s more (5.7 s in all) and printed the
    exporters' retries and shutdown notices (4 lines)."""
    import json

    from tests.support.cli import xdc_cli

    with ServeProcess(str(tmp_path / "data")) as node:
        argv = ("append", "s", "T", "x", "--target", node.address)
        start = time.monotonic()
        plain = xdc_cli(*argv, env={"OTEL_SDK_DISABLED": "true"})
        baseline = time.monotonic() - start
        assert plain.returncode == 0, plain.stderr
        start = time.monotonic()
        r = xdc_cli(*argv, env={"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp",
                                "OTEL_METRICS_EXPORTER": "otlp",
                                "OTEL_EXPORTER_OTLP_ENDPOINT": refusing_endpoint})
        took = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["last_revision"] == 2
    lines = r.stderr.splitlines()
    assert len(lines) <= 1 and all(line.startswith("telemetry: ") for line in lines), lines
    assert took < baseline + telemetry.CLI_EXPORT_TIMEOUT_S + 1.5, (took, baseline)


# ---- the replication observer alone ------------------------------------------------------

def _record(position: int, producer: ReadableSpan | None = None) -> Entry:
    """A stored record at `position` carrying `producer`'s traceparent."""
    md = {"traceparent": _traceparent(producer)} if producer is not None else {}
    body = new_event("T", metadata=md).SerializeToString()
    return Entry(position, 3, records.encode(position, 3, 1, 0, records.stream_field(b"s"),
                                             body))


def test_replica_span_ends_when_a_later_term_is_promised(otel: Otel) -> None:
    """A follower's xdc.replica.append span ends when it answers its leader with the
    later term it promised meanwhile: the deferred ack (core._release) names no rejected
    position. The same leader's batches of the promised term go on."""
    obs = ReplicationObserver("f1", lambda: 0, lambda: False)
    carrier = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    obs.observe(Append("L1", "f1", 3, 10, 3, (_record(11), _record(12)), 10), carrier)
    obs.observe(Append("L1", "f1", 4, 12, 3, (_record(13),), 10), carrier)  # L1 won term 4
    obs.on_send(AppendReply("f1", "L1", 3, False, higher_term=4))
    (fenced,) = otel.spans("xdc.replica.append")
    assert dict(fenced.attributes or {})["xdc.term"] == 3
    assert fenced.status.status_code is StatusCode.ERROR
    assert "promised term 4" in (fenced.status.description or "")
    obs.on_send(AppendReply("f1", "L1", 4, True, match=13))
    assert len(otel.spans("xdc.replica.append")) == 2 and not obs._inbound
    obs.stop()


def test_replica_spans_end_when_the_node_becomes_leader(otel: Otel) -> None:
    obs = ReplicationObserver("f1", lambda: 13, lambda: True)
    obs.observe(Append("L1", "f1", 3, 10, 3, (_record(11),), 10), {})
    assert not otel.spans("xdc.replica.append")
    obs.on_send(Append("f1", "f2", 4, 11, 3, (_record(12),), 11))  # this node leads term 4
    (ended,) = otel.spans("xdc.replica.append")
    assert "became leader" in (ended.status.description or "") and not obs._inbound
    obs.stop()


def test_replicated_batches_link_every_producer(otel: Otel) -> None:
    """A shipped batch of records from more producers than MAX_LINKS: the leader's
    `xdc.replicate` span and the follower's `xdc.replica.append` link each producer
    (with their link chunks). Before, the producers past the 64th were not linked."""
    n = telemetry.MAX_LINKS + 72
    for i in range(n):
        with otel.producer.start_as_current_span(f"order-{i}"):
            pass
    producers = [otel.spans(f"order-{i}")[0] for i in range(n)]
    entries = tuple(_record(11 + i, p) for i, p in enumerate(producers))
    leader = ReplicationObserver("l1", lambda: 10 + n, lambda: True)
    carrier = leader.on_send(Append("l1", "f1", 3, 10, 3, entries, 10))
    leader.observe(AppendReply("f1", "l1", 3, True, match=10 + n), {})
    follower = ReplicationObserver("f1", lambda: 0, lambda: False)
    follower.observe(Append("l1", "f1", 3, 10, 3, entries, 10), carrier or {})
    follower.on_send(AppendReply("f1", "l1", 3, True, match=10 + n))
    leader.stop()
    follower.stop()
    for name in ("xdc.replicate", "xdc.replica.append"):
        spans = otel.spans(name)
        assert sorted(len(s.links) for s in spans) == [72, telemetry.MAX_LINKS], name
        linked = {lk.context.span_id for s in spans for lk in s.links}
        assert all(p.context.span_id in linked for p in producers), name
    (shipped,) = [s for s in otel.spans("xdc.replicate") if s.parent is None]
    (received,) = [s for s in otel.spans("xdc.replica.append") if _child_of(s, shipped)]
    assert all(_child_of(s, received) for s in otel.spans("xdc.replica.append")
               if s is not received)


def test_reset_forgets_the_producers_of_positions(otel: Otel) -> None:
    """A new leader may truncate this node's log and write other records at the same
    positions: after a step-down, the records' own producers are read again."""
    with otel.producer.start_as_current_span("order-a"):
        pass
    with otel.producer.start_as_current_span("order-b"):
        pass
    a, b = otel.spans("order-a")[0], otel.spans("order-b")[0]
    obs = ReplicationObserver("l1", lambda: 12, lambda: True)
    obs.on_send(Append("l1", "f1", 3, 10, 3, (_record(11, a), _record(12, a)), 10))
    obs.reset("stepped down: test")
    obs.on_send(Append("l1", "f1", 5, 10, 3, (_record(11, b), _record(12, b)), 10))
    obs.stop()
    first, second = otel.spans("xdc.replicate")
    assert _child_of(first, a) and _child_of(second, b)


def _serve_with_otel(tmp_path: Path, otel_env: dict[str, str]) -> ServeProcess:
    """An `xdc serve` whose OTEL_* environment is `otel_env` alone."""
    return ServeProcess(str(tmp_path / "data"), env={
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **otel_env})


def _append_three(address: str, prefix: str) -> None:
    async def append() -> None:
        async with StoreClient(address) as client:
            for i in range(3):
                await client.append(f"{prefix}-{i}", new_event("T"))
    run(append)
