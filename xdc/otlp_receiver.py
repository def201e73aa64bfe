"""A small OTLP receiver (traces and metrics, over gRPC and HTTP/protobuf) built on
`opentelemetry-proto`: no trace backend can be installed on these machines, so the tests
and the tracing benchmark check what the real exporters send against this.

It listens on loopback ports chosen by the OS and runs in a background thread (its own
event loop for the grpc.aio server, a threading HTTP server beside it), so blocking code
(a test driving a child process, a benchmark) can use it as well as asyncio code.
`OtlpReceiverProcess` runs one in a process of its own, as a collector runs beside the
services it serves: a benchmark's client then does not share its interpreter (and GIL)
with the receiver's decoding of every export.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import multiprocessing
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Self

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mpb_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tpb_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from store.limits import Limits
from store.server import new_server


def value_of(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    """OTLP KeyValues as a plain dict (scalar values)."""
    return {kv.key: value_of(kv.value) for kv in kvs}


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    resource: dict[str, Any]
    span: Any  # opentelemetry.proto.trace.v1.Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attrs(self) -> dict[str, Any]:
        return attributes(self.span.attributes)


@dataclass(slots=True)
class _Store:
    keep: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: list[tuple[str, Any]] = field(default_factory=list)  # (service, Metric)
    span_count: int = 0
    trace_requests: int = 0
    metric_requests: int = 0

    def add_traces(self, req: tpb.ExportTraceServiceRequest) -> None:
        got = []
        n = 0
        for rs in req.resource_spans:
            if not self.keep:  # a counting sink (benchmarks): decode nothing
                n += sum(len(ss.spans) for ss in rs.scope_spans)
                continue
            resource = attributes(rs.resource.attributes)
            service = str(resource.get("service.name", ""))
            for ss in rs.scope_spans:
                n += len(ss.spans)
                got.extend(ReceivedSpan(service, resource, s) for s in ss.spans)
        with self.lock:
            self.trace_requests += 1
            self.span_count += n
            self.spans.extend(got)

    def add_metrics(self, req: mpb.ExportMetricsServiceRequest) -> None:
        got = []
        for rm in req.resource_metrics if self.keep else ():
            service = str(attributes(rm.resource.attributes).get("service.name", ""))
            for sm in rm.scope_metrics:
                got.extend((service, m) for m in sm.metrics)
        with self.lock:
            self.metric_requests += 1
            if self.keep:
                self.metrics.extend(got)


class _TraceService(tpb_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    async def Export(self, request: tpb.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> tpb.ExportTraceServiceResponse:
        self.store.add_traces(request)
        return tpb.ExportTraceServiceResponse()


class _MetricsService(mpb_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    async def Export(self, request: mpb.ExportMetricsServiceRequest,
                     context: grpc.aio.ServicerContext) -> mpb.ExportMetricsServiceResponse:
        self.store.add_metrics(request)
        return mpb.ExportMetricsServiceResponse()


# An OTLP/HTTP body, compressed or not, is at most what a gRPC export may carry.
MAX_BODY_BYTES = Limits().max_message_bytes
_HTTP_MESSAGES = {"/v1/traces": (tpb.ExportTraceServiceRequest, tpb.ExportTraceServiceResponse),
                  "/v1/metrics": (mpb.ExportMetricsServiceRequest,
                                  mpb.ExportMetricsServiceResponse)}


def _gunzip(body: bytes, limit: int) -> bytes | None:
    """The decompressed body, or None past `limit` bytes (a small body can inflate to
    gigabytes)."""
    inflate = zlib.decompressobj(wbits=31)  # gzip framing
    out = inflate.decompress(body, limit + 1)
    return None if len(out) > limit or inflate.unconsumed_tail else out


def _http_handler(store: _Store) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            messages = _HTTP_MESSAGES.get(self.path)
            if messages is None:
                self.send_error(404)
                return
            length = self.headers.get("Content-Length", "0")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                self.send_error(413 if length.isdigit() else 400,
                                f"Content-Length: {length[:32]!r}, at most {MAX_BODY_BYTES}")
                return
            body: bytes | None = self.rfile.read(int(length))
            if self.headers.get("Content-Encoding") == "gzip":
                try:
                    body = _gunzip(body, MAX_BODY_BYTES)  # type: ignore[arg-type]
                except zlib.error as exc:
                    self.send_error(400, f"not gzip: {exc}")
                    return
                if body is None:
                    self.send_error(413, f"decompressed body over {MAX_BODY_BYTES} bytes")
                    return
            request, response = messages
            try:
                parsed = request.FromString(body)
            except DecodeError as exc:
                self.send_error(400, f"not a valid {request.DESCRIPTOR.name}: {exc}")
                return
            if self.path == "/v1/traces":
                store.add_traces(parsed)
            else:
                store.add_metrics(parsed)
            answer = response().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler


class _Counted:
    """What both receivers share: the context manager, the gRPC endpoint, and waiting on
    the spans and metric exports counted."""

    host: str
    grpc_port: int
    span_count: int
    metric_requests: int

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def grpc_endpoint(self) -> str:
        return f"http://{self.host}:{self.grpc_port}"

    def wait(self, predicate: Callable[[Self], bool], timeout_s: float = 20.0,
             what: str = "spans") -> None:
        """Polls `predicate(self)` until true (exports arrive on the exporters' schedule)."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"OTLP receiver: no {what} within {timeout_s}s "
                                   f"({self.span_count} spans, {self.metric_requests} "
                                   "metric exports so far)")
            time.sleep(0.02)


class OtlpReceiver(_Counted):
    """`with OtlpReceiver() as r:` then point an exporter at `r.grpc_endpoint` or
    `r.http_endpoint`. With keep=False it only counts (a benchmark's sink)."""

    def __init__(self, host: str = "127.0.0.1", keep: bool = True) -> None:
        self.host = host
        self._store = _Store(keep)
        self.grpc_port = 0
        self.http_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._http: http.server.ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    def start(self) -> OtlpReceiver:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_grpc())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="otlp-receiver", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        self._http = http.server.ThreadingHTTPServer((self.host, 0), _http_handler(self._store))
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever,
                                             name="otlp-receiver-http", daemon=True)
        self._http_thread.start()
        return self

    async def _start_grpc(self) -> None:
        # Not traced: its own spans would be exported to it, without end.
        server = new_server()
        tpb_grpc.add_TraceServiceServicer_to_server(_TraceService(self._store), server)
        mpb_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self._store), server)
        self.grpc_port = server.add_insecure_port(f"{self.host}:0")
        await server.start()
        self._server = server

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._loop is not None and self._server is not None:
            server = self._server
            asyncio.run_coroutine_threadsafe(server.stop(0), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    @property
    def http_endpoint(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    # ---- what arrived ----------------------------------------------------------------

    @property
    def span_count(self) -> int:
        with self._store.lock:
            return self._store.span_count

    @property
    def metric_requests(self) -> int:
        with self._store.lock:
            return self._store.metric_requests

    def spans(self, service: str | None = None) -> list[ReceivedSpan]:
        with self._store.lock:
            got = list(self._store.spans)
        return [s for s in got if service is None or s.service == service]

    def metrics(self, service: str | None = None) -> list[Any]:
        with self._store.lock:
            got = list(self._store.metrics)
        return [m for s, m in got if service is None or s == service]


class OtlpReceiverProcess(_Counted):
    """A counting `OtlpReceiver` (keep=False) in a child process: the endpoints and
    counts of an OtlpReceiver, read over a pipe. A spawned child, not a forked one: the
    parent may have gRPC running already, which does not survive fork."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.grpc_port = 0
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None

    def start(self, timeout_s: float = 30.0) -> OtlpReceiverProcess:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_counts, args=(child, self.host),
                                 name="otlp-receiver", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout_s):
            self.stop()
            raise TimeoutError(f"OTLP receiver process not listening within {timeout_s}s")
        self.grpc_port = parent.recv()
        return self

    def _ask(self, what: str) -> Any:
        assert self._conn is not None, "receiver process not started"
        self._conn.send(what)
        return self._conn.recv()

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError, EOFError):
                self._ask("stop")
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():  # by PID: this child only
                self._proc.kill()
                self._proc.join(10)
            self._proc = None

    @property
    def span_count(self) -> int:
        return int(self._ask("spans"))

    @property
    def metric_requests(self) -> int:
        return int(self._ask("metrics"))


def _serve_counts(conn: Connection, host: str) -> None:
    """The child of OtlpReceiverProcess: answers the parent's questions until "stop" or
    until the parent is gone."""
    with OtlpReceiver(host, keep=False) as receiver:
        conn.send(receiver.grpc_port)
        while True:
            try:
                what = conn.recv()
            except EOFError:
                return
            if what == "stop":
                conn.send(None)
                return
            conn.send(receiver.span_count if what == "spans" else receiver.metric_requests)
