"""OTLP trace export requests written straight in protobuf's wire format.

The OTLP exporter's own encoder builds a protobuf object per span, per attribute and per
value through keyword arguments: about 26 us a span on this machine, on the exporting
thread, which shares the GIL with the request path. `encode_spans` writes the same
`ExportTraceServiceRequest` as bytes (about a third of that), and hands the spans to the
exporter's encoder when it meets an attribute value it does not write itself (anything
but None, bool, str, int, float, bytes, and lists or tuples of those), so the result is
always the stock encoder's message (a test compares the two).

`SpanExporter` is the OTLP/gRPC span exporter with this encoder; xdc/telemetry.py uses it
whenever OTLP over gRPC is configured.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as stock_encode
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from store.records import varint as _varint

_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_FIXED32 = struct.Struct("<I").pack
_KIND = {SpanKind.INTERNAL: b"\x30\x01", SpanKind.SERVER: b"\x30\x02",
         SpanKind.CLIENT: b"\x30\x03", SpanKind.PRODUCER: b"\x30\x04",
         SpanKind.CONSUMER: b"\x30\x05"}
# Span.flags / Link.flags: "has is_remote", plus "is_remote" for a remote context.
_FLAGS_LOCAL = b"\x85\x01" + _FIXED32(0x100)
_FLAGS_REMOTE = b"\x85\x01" + _FIXED32(0x300)
_LINK_FLAGS_LOCAL = b"\x35" + _FIXED32(0x100)
_LINK_FLAGS_REMOTE = b"\x35" + _FIXED32(0x300)
_EMPTY_STATUS = b"\x7a\x00"
# Encoded keys (KeyValue.key with its tag and length), by key: a process uses few.
_KEYS: dict[str, bytes] = {}
_MAX_KEYS = 1024
# Attributes with a string value, whole, by (field tag, key, value).
_STRING_KVS: dict[tuple[bytes, str, str], bytes] = {}
# AnyValue field (tag 0x12, its length) then int_value's tag, by the varint's length.
_VALUE_INT = [b""] + [bytes((0x12, n + 1, 0x18)) for n in range(1, 11)]


class _Unsupported(Exception):
    """A value this module does not write: the stock encoder takes the whole request."""


def _delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _string(tag: bytes, text: str) -> bytes:
    return _delimited(tag, text.encode())


def _any_value(v: Any) -> bytes:
    """An AnyValue message's bytes, in the stock encoder's order of checks."""
    if v is None:
        return b""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, str):
        return _string(b"\x0a", v)
    if isinstance(v, int):
        if not -(1 << 63) <= v < (1 << 63):
            raise _Unsupported  # the stock encoder's error, not ours
        return b"\x18" + _varint(v if v >= 0 else v + (1 << 64))
    if isinstance(v, float):
        return b"\x21" + _DOUBLE(v)
    if isinstance(v, bytes):
        return _delimited(b"\x3a", v)
    if isinstance(v, (list, tuple)):
        return _delimited(b"\x2a", b"".join(_delimited(b"\x0a", _any_value(x)) for x in v))
    raise _Unsupported


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue message's bytes."""
    k = _KEYS.get(key)
    if k is None:
        k = _string(b"\x0a", key)
        if len(_KEYS) < _MAX_KEYS:
            _KEYS[key] = k
    if type(value) is int and 0 <= value < 1 << 63:  # most values: counts, positions
        v = _varint(value)
        return k + _VALUE_INT[len(v)] + v
    return k + _delimited(b"\x12", _any_value(value))


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue field `tag`. A key and a string value seen before are written
    from a cache (spans repeat the same few: rpc.system = grpc...)."""
    if not attributes:
        return b""
    parts = []
    for key, value in attributes.items():
        if type(value) is not str:
            parts.append(_delimited(tag, _key_value(key, value)))
            continue
        kv = _STRING_KVS.get((tag, key, value))
        if kv is None:
            kv = _delimited(tag, _key_value(key, value))
            if len(_STRING_KVS) < _MAX_KEYS:
                _STRING_KVS[(tag, key, value)] = kv
        parts.append(kv)
    return b"".join(parts)


def _span(span: ReadableSpan) -> bytes:
    ctx = span.context
    parent = span.parent
    out = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08",
           ctx.span_id.to_bytes(8, "big")]
    if ctx.trace_state:
        out.append(_string(b"\x1a", ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())))
    if parent is not None:
        out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    if span.name:
        out.append(_string(b"\x2a", span.name))
    out.append(_KIND[span.kind])
    if span.start_time:
        out += (b"\x39", _FIXED64(span.start_time))
    if span.end_time:
        out += (b"\x41", _FIXED64(span.end_time))
    out.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        out += (b"\x50", _varint(span.dropped_attributes))
    for event in span.events:
        body = [b"\x09", _FIXED64(event.timestamp)] if event.timestamp else []
        if event.name:
            body.append(_string(b"\x12", event.name))
        body.append(_attributes(b"\x1a", event.attributes))
        if event.dropped_attributes:
            body += (b"\x20", _varint(event.dropped_attributes))
        out.append(_delimited(b"\x5a", b"".join(body)))
    if span.dropped_events:
        out += (b"\x60", _varint(span.dropped_events))
    for link in span.links:
        lc = link.context
        body = [b"\x0a\x10", lc.trace_id.to_bytes(16, "big"), b"\x12\x08",
                lc.span_id.to_bytes(8, "big"), _attributes(b"\x22", link.attributes)]
        if link.dropped_attributes:
            body += (b"\x28", _varint(link.dropped_attributes))
        body.append(_LINK_FLAGS_REMOTE if lc.is_remote else _LINK_FLAGS_LOCAL)
        out.append(_delimited(b"\x6a", b"".join(body)))
    if span.dropped_links:
        out += (b"\x70", _varint(span.dropped_links))
    status = span.status
    if status is not None:
        code = status.status_code.value
        if not code and not status.description:
            out.append(_EMPTY_STATUS)
        else:
            body = [_string(b"\x12", status.description)] if status.description else []
            if code:
                body += (b"\x18", _varint(code))
            out.append(_delimited(b"\x7a", b"".join(body)))
    out.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(out)


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    body = b""
    if scope.name:
        body += _string(b"\x0a", scope.name)
    if scope.version:
        body += _string(b"\x12", scope.version)
    return body + _attributes(b"\x1a", scope.attributes)


def _resource_spans(resource: Any, scopes: dict[Any, list[bytes]]) -> bytes:
    body = [_delimited(b"\x0a", _attributes(b"\x0a", resource.attributes))]
    for scope, spans in scopes.items():
        scope_body = [_delimited(b"\x0a", _scope(scope))]
        scope_body += (_delimited(b"\x12", s) for s in spans)
        if scope is not None and scope.schema_url:
            scope_body.append(_string(b"\x1a", scope.schema_url))
        body.append(_delimited(b"\x12", b"".join(scope_body)))
    if resource.schema_url:
        body.append(_string(b"\x1a", resource.schema_url))
    return _delimited(b"\x0a", b"".join(body))


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialized ExportTraceServiceRequest for `spans`, grouped by resource and
    then by instrumentation scope as the stock encoder groups them."""
    grouped: dict[Any, dict[Any, list[bytes]]] = {}
    try:
        for span in spans:
            scopes = grouped.setdefault(span.resource, {})
            scopes.setdefault(span.instrumentation_scope or None, []).append(_span(span))
    except _Unsupported:
        return stock_encode(spans).SerializeToString()
    return b"".join(_resource_spans(r, scopes) for r, scopes in grouped.items())


class SpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter (every option and OTEL_* variable of its own), with
    its request encoded by encode_spans."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest.FromString(encode_spans(data))
