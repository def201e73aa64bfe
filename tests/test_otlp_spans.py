"""xdc/otlp_spans.py writes the same OTLP export request as the exporter's own encoder."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as stock_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from xdc import otlp_spans, telemetry

REMOTE = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED),
                     trace_state=TraceState([("vendor", "v1"), ("other", "x")]))
LOCAL = SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _spans(resource: Resource) -> list[ReadableSpan]:
    """Spans of every shape xdc makes, through both the SDK tracer and open_span."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install(provider)
    try:
        remote_parent = set_span_in_context(NonRecordingSpan(REMOTE))
        attrs = {"s": "text", "empty": "", "t": True, "f": False, "zero": 0, "i": 42,
                 "neg": -7, "big": (1 << 63) - 1, "x": 1.5, "b": b"\x00\x01",
                 "strs": ["a", "b"], "ints": (1, -2), "none_in": [None], "unicode": "é"}
        for kind in SpanKind:
            telemetry.open_span(f"open {kind.name}", context=remote_parent, kind=kind,
                                attributes=dict(attrs), links=[Link(LOCAL), Link(REMOTE)]
                                ).end()
        sdk = telemetry.tracer().start_span("sdk", attributes=attrs,
                                            links=[Link(REMOTE, {"why": "batch"})])
        sdk.add_event("noted", {"n": 1})
        sdk.record_exception(ValueError("poison"))
        sdk.set_status(StatusCode.ERROR, "failed")
        sdk.end()
        child = telemetry.open_span("child", context=set_span_in_context(sdk))
        child.set_status(StatusCode.OK)
        child.end()
        with telemetry.tracer().start_as_current_span("root"):
            pass
        other = provider.get_tracer("other-scope", "1.2", schema_url="https://s/1")
        other.start_span("scoped", kind=SpanKind.CONSUMER).end()
    finally:
        telemetry.install(None, None)
        provider.shutdown()
    return list(exporter.get_finished_spans())


def test_same_request_as_the_stock_encoder() -> None:
    spans = _spans(Resource.create({"service.name": "a", "list": ["x", "y"]}))
    spans += _spans(Resource({"service.name": "b"}, schema_url="https://r/1"))
    assert len(spans) > 10
    for span in spans:  # written here, not handed to the stock encoder
        assert otlp_spans._span(span), span.name
    want = stock_encode(spans)
    got = ExportTraceServiceRequest.FromString(otlp_spans.encode_spans(spans))
    assert got == want
    assert len(got.resource_spans) == 2 and got.resource_spans[1].schema_url == "https://r/1"
    # One at a time as well (the empty status, flags and kinds of single spans).
    for span in spans:
        assert ExportTraceServiceRequest.FromString(otlp_spans.encode_spans([span])) \
            == stock_encode([span]), span.name
    assert otlp_spans.encode_spans([]) == stock_encode([]).SerializeToString() == b""


def test_values_it_does_not_write_go_to_the_stock_encoder() -> None:
    span = ReadableSpan("odd", context=LOCAL, resource=Resource({}),
                        attributes={"map": {"k": "v"}, "huge": 1 << 70, "ok": 1})
    got = ExportTraceServiceRequest.FromString(otlp_spans.encode_spans([span]))
    assert got == stock_encode([span])


def test_otlp_grpc_traces_use_this_encoder() -> None:
    exporter = telemetry._exporter("TRACES", "otlp", {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    try:
        assert isinstance(exporter, otlp_spans.SpanExporter)
        spans = _spans(Resource({"service.name": "c"}))
        assert exporter._translate_data(spans) == stock_encode(spans)
    finally:
        exporter.shutdown()
