"""OpenTelemetry for xdc: tracer and meter providers from the standard `OTEL_*` variables,
W3C trace context in event metadata and gRPC metadata, the shared span rules, metrics.

Nothing is exported unless the environment asks for it: with no `OTEL_*` variable set,
`tracer()` is a no-op tracer (every span it starts is the shared non-recording
INVALID_SPAN) and `tracing()` is False, so hot paths skip their telemetry work behind one
check. Spans are batch-level on the ingest path (one per AppendStream message, one per
group commit, one per replicated batch and follower), never one per event.

Providers are this module's, not OpenTelemetry's process-wide globals (which can be set
only once): `install()` swaps them at any time, which is how tests put an in-memory
exporter in place. `setup_from_env()` also sets the globals, once, for third-party code.

The API for producers and consumers of events (the order gateway, the matching engine):

    telemetry.inject(event_metadata)            # producer: traceparent/tracestate of the
                                                # current span into the event's metadata
    with telemetry.consumer_span(stream, [e.metadata for e in batch]) as span:
        ...                                     # CONSUMER span linked to each producer

Inject once, when the event is created. The store's idempotency sets `traceparent` and
`tracestate` aside (store/log.same_event), so a retry in another trace is still the same
event; but bytes that feed a determinism check (the engine's chain hash, over an output
event's data) must not carry them, since two engine instances would differ there. The
engine's output events carry a `traceparent` in their metadata, outside that hash
(engine/runner.py, `_emit`); the gateway's `deliver` spans hang under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import itertools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("xdc.telemetry")

INSTRUMENTATION = "xdc"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Links per span at most: the SDK's default limit (past which the SDK drops them). A span
# made for more producer contexts (open_span) carries the first MAX_LINKS and gets
# children of the same name, kind, attributes and timing linking the next MAX_LINKS each
# ("link chunks"), so every order of a batch reaches the batch's span.
MAX_LINKS = 128
# Distinct producer contexts one batch-level span links at most, across its chunks (16
# spans): what one unit of work holds with the default limits, a delivered subscription
# batch (store max_batch_events, 2000), a replicated batch (2048 entries), an AppendStream
# message (1024 appends). Past it the rest are not linked: the cost stays bounded.
MAX_LINKED = 16 * MAX_LINKS
# Latency buckets in seconds: a loopback append is ~0.3 ms, a WAN round trip ~100 ms, a
# failover seconds. (The SDK's default buckets are meant for milliseconds.)
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Span attribute names: OpenTelemetry semantic conventions where one exists.
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_BATCH_COUNT = "messaging.batch.message_count"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"
# On a span whose links were split (MAX_LINKS): its chunk (0: the span itself, which
# the work's other spans hang under; 1..: its children) and how many it was split into.
LINK_CHUNK = "xdc.links.chunk"
LINK_CHUNKS = "xdc.links.chunks"
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_STATUS = "rpc.grpc.status_code"
PEER_ADDRESS = "network.peer.address"
SYSTEM = "xdc"

_W3C = TraceContextTextMapPropagator()


# ---- providers --------------------------------------------------------------------------

@dataclass(slots=True)
class Instruments:
    """The metrics xdc records, created on the current meter provider."""

    append_duration: Histogram         # server: one AppendStream message or Append call
    client_append_duration: Histogram  # client: one AppendStream message, send to answer
    commit_duration: Histogram         # cluster leader: durable locally -> quorum commit
    follower_commit_lag: Histogram     # leader: a batch shipped -> that follower holds it
    failover_duration: Histogram       # vacancy or lease loss -> new term, -> open


@dataclass(slots=True, frozen=True)
class _Recorder:
    """What open_span needs of an SDK tracer provider, read once when it is installed."""

    processor: Any  # the provider's span processor(s): on_end(ReadableSpan)
    readable: Any   # the SDK's ReadableSpan class (imported once, not per span)
    sampler: Any
    # The SDK's default sampler (parentbased_always_on, the very object the SDK uses when
    # OTEL_TRACES_SAMPLER is unset): its decision is taken inline, without the call.
    default_sampler: bool
    id_generator: Any
    resource: Any
    scope: Any      # InstrumentationScope(INSTRUMENTATION)


@dataclass(slots=True)
class _State:
    tracing: bool
    tracer: Tracer
    meter: Meter
    instruments: Instruments
    tracer_provider: Any = None  # what shutdown() flushes: SDK providers we installed
    meter_provider: Any = None
    metering: bool = False  # a meter provider is installed (metrics are collected)
    recorder: _Recorder | None = None  # open_span's: set when `tracing`
    # The span exporters setup_from_env made: shutdown() stops them when a flush overruns.
    span_exporters: tuple[Any, ...] = ()


def _instruments(meter: Meter) -> Instruments:
    def hist(name: str, description: str) -> Histogram:
        return meter.create_histogram(name, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
    return Instruments(
        append_duration=hist("xdc.append.duration",
                             "server time of one append message (durable and committed)"),
        client_append_duration=hist("xdc.client.append.duration",
                                    "client time of one append message, sent to answered"),
        commit_duration=hist("xdc.commit.duration",
                             "leader: locally durable to committed by a quorum"),
        follower_commit_lag=hist("xdc.replication.follower.commit_lag",
                                 "leader: records shipped to a follower until it holds "
                                 "them durably, per follower (xdc.peer)"),
        failover_duration=hist("xdc.failover.duration",
                               "lease loss or observed vacancy until a new term "
                               "(xdc.failover.phase=elected) or writes open (=open)"),
    )


# Gauge sources: callables returning (value, attributes) observations, registered by
# running components (a cluster node's replication lag, a store's subscriptions). They run
# on the metric reader's thread: they must only read, and copy what they iterate.
GaugeSource = Callable[[], Iterable[tuple[float, Mapping[str, Any]]]]
GAUGES: dict[str, tuple[str, str]] = {
    "xdc.replication.lag.records": (
        "{record}", "leader: last position minus what the follower acknowledged (xdc.peer)"),
    "xdc.replication.lag.seconds": (
        "s", "leader: age of the oldest batch shipped to the follower and not acknowledged"),
    "xdc.subscription.lag.records": (
        "{record}", "commit position minus what a live subscription has delivered"),
}
_sources: dict[str, dict[int, GaugeSource]] = {name: {} for name in GAUGES}
_source_ids = itertools.count(1)
_sources_lock = threading.Lock()


def add_gauge_source(gauge: str, source: GaugeSource) -> int:
    """Registers a source of observations for one of GAUGES; returns its handle."""
    assert gauge in GAUGES, f"unknown gauge {gauge!r}"
    handle = next(_source_ids)
    with _sources_lock:
        _sources[gauge][handle] = source
    return handle


def remove_gauge_source(gauge: str, handle: int) -> None:
    with _sources_lock:
        _sources[gauge].pop(handle, None)


def _gauge_callback(gauge: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        with _sources_lock:
            sources = list(_sources[gauge].values())
        out = []
        for source in sources:
            try:
                out.extend(Observation(value, dict(attrs)) for value, attrs in source())
            except Exception:  # a component stopping under us: skip it this round
                log.debug("gauge source of %s failed", gauge, exc_info=True)
        return out
    return observe


def _recorder(provider: Any) -> _Recorder:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.sampling import DEFAULT_ON
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    # The one private attribute used: where the provider's add_span_processor() puts the
    # processors. Checked here so that an SDK that renames it fails at start, loudly.
    processor = getattr(provider, "_active_span_processor", None)
    if processor is None or not callable(getattr(processor, "on_end", None)):
        raise RuntimeError("opentelemetry-sdk: TracerProvider._active_span_processor is gone; "
                           "xdc.telemetry.open_span needs updating for this SDK version")
    return _Recorder(processor, ReadableSpan, provider.sampler, provider.sampler is DEFAULT_ON,
                     provider.id_generator, provider.resource,
                     InstrumentationScope(INSTRUMENTATION, ""))  # as get_tracer(name)


def _make_state(tracer_provider: Any, meter_provider: Any, owned: bool) -> _State:
    tracing = False
    recorder = None
    if tracer_provider is not None:  # the SDK is imported only when a provider is given
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        tracing = isinstance(tracer_provider, SdkTracerProvider)
        if tracing:
            recorder = _recorder(tracer_provider)
    tracer = (tracer_provider.get_tracer(INSTRUMENTATION) if tracer_provider is not None
              else trace.NoOpTracer())
    meter = (meter_provider.get_meter(INSTRUMENTATION) if meter_provider is not None
             else otel_metrics.NoOpMeter(INSTRUMENTATION))
    if meter_provider is not None:
        for name, (unit, description) in GAUGES.items():
            meter.create_observable_gauge(name, [_gauge_callback(name)], unit=unit,
                                          description=description)
    return _State(tracing, tracer, meter, _instruments(meter),
                  tracer_provider if owned else None, meter_provider if owned else None,
                  meter_provider is not None, recorder)


_state = _make_state(None, None, owned=False)


def install(tracer_provider: Any = None, meter_provider: Any = None, *,
            owned: bool = False, span_exporters: Sequence[Any] = ()) -> None:
    """Makes these providers the ones xdc uses (None: no-op). Tests pass SDK providers
    with in-memory exporters; components built afterwards (servers, clients) use them.
    With `owned`, shutdown() flushes and shuts them down; `span_exporters` are those
    behind the tracer provider's processors, which it stops if a flush overruns."""
    global _state
    _state = _make_state(tracer_provider, meter_provider, owned)
    if owned:
        _state.span_exporters = tuple(span_exporters)


def tracing() -> bool:
    """True when spans are recorded: the one check a hot path makes before span work."""
    return _state.tracing


def active() -> bool:
    """True when spans are recorded or metrics collected: the check for bookkeeping that
    feeds either (with neither, nothing would ever read it)."""
    return _state.tracing or _state.metering


def tracer() -> Tracer:
    return _state.tracer


def metrics() -> Instruments:
    return _state.instruments


def _exporters(variable: str, default_endpoint_vars: Sequence[str],
               env: Mapping[str, str]) -> list[str]:
    """The exporters named by OTEL_{TRACES,METRICS}_EXPORTER. Unset means `otlp` when an
    OTLP endpoint is configured, else none: nothing is exported by default."""
    value = env.get(variable)
    if value is None:
        return ["otlp"] if any(env.get(v) for v in default_endpoint_vars) else []
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    return [] if "none" in names else names


def _protocol(signal: str, env: Mapping[str, str]) -> str:
    return (env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()


def _otlp_options(signal: str, protocol: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Endpoint options from `env` when it is not the process environment (which the
    exporters read themselves), e.g. a benchmark exporting to its own receiver."""
    if env is os.environ:
        return {}
    endpoint = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint is None and base is not None:
        # The generic endpoint is a base URL for HTTP (the signal's path is added).
        endpoint = (f"{base.rstrip('/')}/v1/{signal.lower()}" if protocol != "grpc"
                    else base)
    if endpoint is None:
        return {}
    if protocol == "grpc":
        return {"endpoint": endpoint, "insecure": endpoint.startswith("http://")}
    return {"endpoint": endpoint}


# (signal, OTLP protocol) -> the exporter class, imported only when configured.
_OTLP_EXPORTERS = {
    ("TRACES", "grpc"): ("xdc.otlp_spans", "SpanExporter"),  # OTLPSpanExporter's subclass
    ("TRACES", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                                  "OTLPSpanExporter"),
    ("METRICS", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
                          "OTLPMetricExporter"),
    ("METRICS", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http.metric_exporter",
                                   "OTLPMetricExporter"),
}
_CONSOLE_EXPORTERS = {"TRACES": ("opentelemetry.sdk.trace.export", "ConsoleSpanExporter"),
                      "METRICS": ("opentelemetry.sdk.metrics.export", "ConsoleMetricExporter")}


def _exporter(signal: str, name: str, env: Mapping[str, str]) -> Any:
    """The exporter `name` of OTEL_{signal}_EXPORTER."""
    if name == "console":
        module, cls = _CONSOLE_EXPORTERS[signal]
        # stderr: stdout carries `xdc serve`'s ready line.
        return getattr(importlib.import_module(module), cls)(out=sys.stderr)
    if name == "otlp":
        protocol = _protocol(signal, env)
        if (signal, protocol) not in _OTLP_EXPORTERS:
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported "
                             "(grpc, http/protobuf)")
        module, cls = _OTLP_EXPORTERS[(signal, protocol)]
        return getattr(importlib.import_module(module), cls)(
            **_otlp_options(signal, protocol, env))
    raise ValueError(f"OTEL_{signal}_EXPORTER: unknown exporter {name!r} "
                     "(otlp, console, none)")


_globals_set = False


def _hashed_once(resource: Any) -> Any:
    """The same resource, hashed once. The OTLP encoders group every exported span (and
    metric) by resource, and the SDK's Resource hashes itself by serializing all its
    attributes to JSON on every call: a quarter of the exporter thread's time per span
    here. A resource never changes once the providers hold it."""
    from opentelemetry.sdk.resources import Resource

    class HashedResource(Resource):
        def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedResource(resource.attributes, resource.schema_url)


def setup_from_env(service_name: str, attributes: Mapping[str, Any] | None = None,
                   env: Mapping[str, str] | None = None) -> bool:
    """Configures tracing and metrics from the standard variables: OTEL_SDK_DISABLED,
    OTEL_SERVICE_NAME (overrides `service_name`), OTEL_RESOURCE_ATTRIBUTES,
    OTEL_TRACES_EXPORTER and OTEL_METRICS_EXPORTER (otlp, console, none; comma-separated),
    OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL (grpc, the default, or http/protobuf),
    and what the SDK and the exporters read themselves (OTEL_EXPORTER_OTLP_ENDPOINT,
    _HEADERS, _TIMEOUT, OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_METRIC_EXPORT_INTERVAL...).
    Returns whether anything is exported. Raises ValueError on an unknown exporter."""
    global _globals_set
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        install(None, None)
        return False
    traces = _exporters("OTEL_TRACES_EXPORTER", ("OTEL_EXPORTER_OTLP_ENDPOINT",
                                                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), env)
    metrics_ = _exporters("OTEL_METRICS_EXPORTER", ("OTEL_EXPORTER_OTLP_ENDPOINT",
                                                    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"), env)
    if not traces and not metrics_:
        install(None, None)
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = _hashed_once(Resource.create({
        **(attributes or {}), SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or service_name}))
    tracer_provider = meter_provider = None
    span_exporters: list[Any] = []
    if traces:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = TracerProvider(resource=resource)
        for name in traces:
            span_exporters.append(_exporter("TRACES", name, env))
            # Batched: the export runs on the processor's thread, never on the request path.
            tracer_provider.add_span_processor(
                BatchSpanProcessor(_BatchReleased(span_exporters[-1])))  # type: ignore[arg-type]
    if metrics_:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        interval = env.get("OTEL_METRIC_EXPORT_INTERVAL") if env is not os.environ else None
        meter_provider = MeterProvider(resource=resource, metric_readers=[
            PeriodicExportingMetricReader(_exporter("METRICS", name, env),
                                          float(interval) if interval else None)
            for name in metrics_])
    install(tracer_provider, meter_provider, owned=True, span_exporters=span_exporters)
    if not _globals_set:  # the globals take one value per process
        _globals_set = True
        if tracer_provider is not None:
            trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            otel_metrics.set_meter_provider(meter_provider)
    return True


class _BatchReleased:
    """A span exporter that empties the batch list once `inner`'s export returns, and
    counts the exports that failed (``failed_exports``). An OTLP export that fails leaves
    its frames in a reference cycle (the export's result holds the error, whose traceback
    holds the exporter's frames, which hold their callers' frames, the batch processor's
    among them with its local list of the batch), and the batch's spans with them, until
    a cyclic collection: one the engine's GC freezer puts off by freezing whatever is
    alive, the batch of an export under way included (engine.book.GcFreezer; measured:
    ~0.7 MB per 25k inputs with the collector unreachable). Emptied, the spans go by
    reference counting. What the cycle still holds, the export request built from the
    batch (~20% of the batch's memory), is left to the freezer's next full collection,
    which a failed export makes due. The list is the processor's own, made for this one
    call (BatchProcessor._export), so emptying it takes nothing from the processor."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._shutdown_timeout = "timeout_millis" in inspect.signature(
            inner.shutdown).parameters

    def export(self, spans: Sequence[Any]) -> Any:
        global _failed_exports
        batch = spans if isinstance(spans, list) else list(spans)
        try:
            result = self.inner.export(batch)
        except BaseException:
            _failed_exports += 1
            raise
        finally:
            batch.clear()
        if getattr(result, "name", "") != "SUCCESS":
            _failed_exports += 1
        return result

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        if self._shutdown_timeout:
            self.inner.shutdown(timeout_millis=timeout_millis)
        else:
            self.inner.shutdown()


_failed_exports = 0


def failed_exports() -> int:
    """Span exports that failed in this process so far (each may have left a reference
    cycle behind: see _BatchReleased)."""
    return _failed_exports


def _in_thread(call: Callable[[], Any], what: str) -> threading.Event:
    """Runs `call` on a daemon thread; the event is set when it returns. One that is not
    waited for to the end is left to finish, or to die with the process."""
    done = threading.Event()

    def run() -> None:
        try:
            call()
        except Exception:
            log.warning("telemetry: %s failed", what, exc_info=True)
        finally:
            done.set()

    threading.Thread(target=run, name=f"xdc-telemetry-{what}", daemon=True).start()
    return done


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# What a short-lived command (`xdc append`, `tail`, `order`: the CLI's "xdc-cli") gives
# its telemetry at exit, instead of a server's 5 s: a collector that is down cost every
# `xdc append` ~5 s and a screenful of exporter retries.
CLI_EXPORT_TIMEOUT_S = 0.5


def shutdown(timeout_s: float = 5.0, *, quiet: bool = False) -> None:
    """Flushes and stops the providers setup_from_env (or install(owned=True)) made:
    spans still buffered are exported before a process exits. Returns within
    `timeout_s`: what an unreachable collector has not taken by then is dropped.
    `quiet` (a command about to exit): the exporters' own log lines (each retry, each
    call after their shutdown) are silenced from here on, and a collector that did not
    take the spans in time is one warning line.

    The bound is kept here because the SDK does not keep it: this version's force_flush
    ignores its timeout and exports the whole queue, each batch retried for up to
    OTEL_EXPORTER_OTLP_TIMEOUT (10 s), which held `xdc serve` ~35 s after SIGTERM with
    the collector down. So the flush runs on a thread of its own, the metrics' shutdown
    alongside (each signal gets the whole budget), and on overrun the span exporters are
    shut down: that ends their retries and closes their channels, after which the
    processors' own shutdown drains the queue at once (every export fails fast)."""
    st = _state
    if quiet:  # for good: their threads may still log after this returns
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    start = time.monotonic()
    deadline = start + timeout_s
    # Kept back from the flush for stopping the exporters and processors after it.
    flush_deadline = deadline - min(1.0, timeout_s / 5)
    metrics_done = None
    if st.meter_provider is not None:
        # Bounded by the SDK itself: each reader's thread is joined with the timeout,
        # then its exporter is shut down (which ends an export's retries).
        meter, budget_ms = st.meter_provider, (flush_deadline - start) * 1000
        metrics_done = _in_thread(lambda: meter.shutdown(timeout_millis=budget_ms),
                                  "metrics-shutdown")
    if st.tracer_provider is not None:
        provider = st.tracer_provider
        if not _in_thread(provider.force_flush, "flush").wait(_left(flush_deadline)):
            log.warning("telemetry: spans not exported within %.1f s (is the collector "
                        "reachable?): the rest are dropped", flush_deadline - start)
            for exporter in st.span_exporters:
                try:
                    exporter.shutdown()
                except Exception:
                    log.warning("telemetry: span exporter shutdown failed", exc_info=True)
        _in_thread(provider.shutdown, "traces-shutdown").wait(_left(deadline))
    if metrics_done is not None:
        metrics_done.wait(_left(deadline))
    install(None, None)


# ---- trace context in metadata ---------------------------------------------------------

def inject(metadata: MutableMapping[str, str], context: Context | None = None,
           ) -> MutableMapping[str, str]:
    """Puts the W3C `traceparent` (and `tracestate`) of the current span (or of
    `context`) into `metadata` (an event's metadata map, a gRPC metadata dict) and returns
    it. Does nothing when there is no span (an unsampled one's context goes, flagged
    unsampled). Call it once when an event is created and re-send the same event on
    retries (the store ignores these two keys when it compares a retried event with the
    stored one)."""
    _W3C.inject(metadata, context)
    return metadata


def extract(metadata: Mapping[str, str] | None) -> Context:
    """The context carried by `traceparent`/`tracestate` in `metadata` (empty Context
    when absent or malformed): pass it as `context=` to start a child span. A lone
    traceparent of the usual form (every AppendStream message carries one) is parsed
    here; anything else goes through the W3C propagator."""
    if not metadata or TRACEPARENT not in metadata:
        return Context()
    if TRACESTATE not in metadata:
        sc = span_context(metadata[TRACEPARENT])
        if sc is not None:
            return trace.set_span_in_context(NonRecordingSpan(sc), Context())
    return _W3C.extract(metadata, Context())


# A traceparent of 55 characters (version 00's length), as the W3C propagator reads it.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def span_context(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """A remote SpanContext from a W3C traceparent header, or None when it is not valid.
    Parsed by hand: the consumer path reads one per event."""
    if not traceparent or len(traceparent) != 55:
        return None
    m = _TRACEPARENT.fullmatch(traceparent)
    if m is None or m[1] == "ff":
        return None
    tid, sid, fl = int(m[2], 16), int(m[3], 16), int(m[4], 16)
    if not tid or not sid:
        return None
    state = TraceState.from_header([tracestate]) if tracestate else None
    return SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(fl),
                       trace_state=state)


def contexts_of(metadatas: Iterable[Mapping[str, str]],
                limit: int = MAX_LINKED) -> tuple[list[SpanContext], int]:
    """The distinct producer contexts in events' metadata (at most `limit`), and how many
    metadata maps were read."""
    seen: dict[str, SpanContext] = {}
    n = 0
    for md in metadatas:
        n += 1
        tp = md.get(TRACEPARENT)
        if tp and tp not in seen and len(seen) < limit:
            sc = span_context(tp, md.get(TRACESTATE))
            if sc is not None:
                seen[tp] = sc
    return list(seen.values()), n


def current_span_context() -> SpanContext | None:
    """The current span's context if it is valid: what a queued request remembers of its
    caller (cheap: one context-variable read; nothing at all with tracing off)."""
    if not _state.tracing:
        return None
    if _CURRENT_CONTEXT is not None:
        # The API's own path made five Python calls per queued append (~1 us); this one
        # reads the same context variable and key. Appends made outside any span (the
        # common case of a producer loop) stop at the first read.
        span = _CURRENT_CONTEXT.get().get(_SPAN_KEY)
        if span is None:
            return None
    else:
        span = trace.get_current_span()
    sc = span.get_span_context()
    return sc if sc.is_valid else None


def _current_context_var() -> contextvars.ContextVar[Context] | None:
    """The context variable behind opentelemetry.context.get_current() when the runtime
    context is the default contextvars one (None otherwise: then the public API is used)."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, contextvars.ContextVar) else None


_CURRENT_CONTEXT = _current_context_var()


def set_destination(attrs: dict[str, Any], appends: Sequence[Any]) -> None:
    """Sets `messaging.destination.name` when every append of a message (anything with a
    `.stream`) goes to one stream. One pass that stops at the first other stream: a set
    of the streams would hash every name, and this runs for every message on the
    single-append path."""
    if appends:
        first = appends[0].stream
        if all(p.stream == first for p in appends):
            attrs[MESSAGING_DESTINATION] = first


def parent_and_links(contexts: Sequence[SpanContext | None],
                     ambient: bool = False) -> tuple[Context, list[Link]]:
    """The span rule for work done for several callers at once (a coalesced message, a
    group commit, a replicated batch): one distinct caller context becomes the parent, so
    a lone order's trace holds the span as a child; several become links (the messaging
    conventions' batch rule), under the ambient context or a new root: at most
    MAX_LINKED distinct ones, which open_span splits over MAX_LINKS per span."""
    distinct: dict[tuple[int, int], SpanContext] = {}
    for sc in contexts:
        if sc is not None and (sc.trace_id, sc.span_id) not in distinct:
            distinct[(sc.trace_id, sc.span_id)] = sc
            if len(distinct) >= MAX_LINKED:
                break
    base = otel_context.get_current() if ambient else Context()
    if len(distinct) == 1:
        only = next(iter(distinct.values()))
        return trace.set_span_in_context(NonRecordingSpan(only), base), []
    return base, [Link(sc) for sc in distinct.values()]


@contextlib.contextmanager
def serving(contexts: Sequence[SpanContext], name: str) -> Iterator[Span]:
    """Makes current, for the block, what work done for the spans `contexts` hangs under
    (parent_and_links' rule): the one context itself, or, for several, an INTERNAL span
    `name` linked to each, yielded for the caller to end once the work is done (a
    span that is already ended or INVALID_SPAN otherwise). With none, an empty context:
    never whatever happens to be current (a callback's, copied when it was registered,
    would put the work in an unrelated trace). With tracing off: nothing at all."""
    if not _state.tracing:
        yield INVALID_SPAN
        return
    parent, links = parent_and_links(contexts)
    span: Span = INVALID_SPAN
    if links:
        span = open_span(name, context=parent, links=links)
        parent = trace.set_span_in_context(span, Context())
    token = otel_context.attach(parent)
    try:
        yield span
    finally:
        otel_context.detach(token)


# ---- batch-level spans ------------------------------------------------------------------
# The SDK's Span cleans every attribute value through its abstract-type checks and a lock
# as it is set, and runs the sampler, its own metrics and the processors' on_start: about
# 16 us a span on this machine, and the ingest path makes three per message (client,
# server, group commit). open_span keeps the attributes in a plain dict and builds the
# ReadableSpan the exporters read in one step at the end (about 3 us). What it leaves out
# is what those spans never need: attribute values are the ints and short strings xdc sets
# (no cleaning, no truncation, far fewer than the SDK's 128), and span processors see a
# span at its end only (on_start, which the batch and simple processors ignore, is not
# called). Links past MAX_LINKS are not dropped as the SDK would: they go to link chunks,
# children made at the end (OpenSpan._end_chunks).

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


class OpenSpan(Span):
    """A recording span from open_span: an API Span (use_span, carrier_of and the rest
    take it) whose data stays in plain fields until end() hands it to the processors."""

    __slots__ = ("_attributes", "_context", "_ended", "_events", "_kind", "_links", "_name",
                 "_overflow", "_parent", "_recorder", "_start_ns", "_status")

    def __init__(self, recorder: _Recorder, name: str, kind: SpanKind, context: SpanContext,
                 parent: SpanContext | None, links: Sequence[Link],
                 attributes: dict[str, Any], start_ns: int,
                 chunks: Sequence[Sequence[Link]] = ()) -> None:
        self._recorder = recorder
        self._name = name
        self._kind = kind
        self._context = context
        self._parent = parent
        self._links = links
        self._attributes = attributes
        self._start_ns = start_ns
        self._events: list[Any] = []
        self._status = Status(StatusCode.UNSET)
        self._ended = False
        self._overflow = chunks  # links past MAX_LINKS: the link chunks to make

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._ended:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self._ended:
            self._attributes.update(attributes)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        from opentelemetry.sdk.trace import Event

        if not self._ended:
            self._events.append(Event(name, dict(attributes or {}), timestamp))

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode,
                   description: str | None = None) -> None:
        # As the SDK: OK is final; a description goes with ERROR only.
        if self._ended or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description if status is StatusCode.ERROR else None)
        self._status = status

    def record_exception(self, exception: BaseException,
                         attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        import traceback

        self.add_event("exception", {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped), **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        end_ns = end_time if end_time is not None else time.time_ns()
        r = self._recorder
        r.processor.on_end(r.readable(
            self._name, self._context, self._parent, r.resource, self._attributes,
            self._events, self._links, self._kind, None, self._status, self._start_ns,
            end_ns, r.scope))
        if self._overflow:
            self._end_chunks(end_ns)

    def _end_chunks(self, end_ns: int) -> None:
        """The link chunks: children of this span with its name, kind, attributes (as
        they are at its end), status and timing, each linked to the next MAX_LINKS
        contexts (open_span left out those whose contexts are all unsampled). Asked of
        the sampler as any child."""
        context = trace.set_span_in_context(self, Context())
        for k, links in enumerate(self._overflow, 1):
            attrs = dict(self._attributes)
            attrs[LINK_CHUNK] = k
            chunk = open_span(self._name, context, self._kind, attrs, links, self._start_ns)
            if self._status.status_code is StatusCode.ERROR:
                chunk.set_status(self._status)
            chunk.end(end_ns)


def _first_sampled(links: Sequence[Link]) -> SpanContext | None:
    for link in links:
        if link.context.trace_flags.sampled:
            return link.context
    return None


def open_span(name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
              attributes: dict[str, Any] | None = None, links: Sequence[Link] = (),
              start_time: int | None = None) -> Span:
    """Starts a span as tracer().start_span would (parent from `context`, the configured
    sampler decides), for the batch-level spans of the hot paths. The caller owns
    `attributes` (kept, not copied) and ends the span once. A span the sampler drops is a
    NonRecordingSpan that still carries its context on; with tracing off, INVALID_SPAN.

    One rule beyond the SDK's: a span with links and no parent (work done for several
    callers, parent_and_links) is decided as the child of its first sampled link, if
    any. A parent-based sampler would otherwise decide it as a new root, and a ratio
    root sampler would drop the store, replication and engine spans of orders whose
    traces were all sampled. The sampler still decides (ALWAYS_OFF drops it).

    And one on links: past MAX_LINKS (up to MAX_LINKED) they are split in chunks, the
    span itself linking the first MAX_LINKS and, when it ends, one child per further
    chunk (OpenSpan._end_chunks); both carry LINK_CHUNK and LINK_CHUNKS. The sampler
    decides the span on all of them."""
    r = _state.recorder
    if r is None:
        return INVALID_SPAN
    parent = trace.get_current_span(context).get_span_context()
    if not parent.is_valid:
        parent = None
        trace_id = r.id_generator.generate_trace_id()
        random_id = r.id_generator.is_trace_id_random()
    else:
        trace_id = parent.trace_id
        random_id = parent.trace_flags.random_trace_id
    attrs = attributes if attributes is not None else {}
    if r.default_sampler:
        # ParentBased(ALWAYS_ON): a root is sampled, a child follows its parent's flag, and
        # the parent's trace state goes on; no attributes are added.
        recording = parent is None or parent.trace_flags.sampled
        trace_state = parent.trace_state if parent is not None else None
    else:
        decide_in = context
        linked = None
        if parent is None and links:
            linked = _first_sampled(links)
            if linked is not None:
                decide_in = trace.set_span_in_context(NonRecordingSpan(linked), Context())
        result = r.sampler.should_sample(decide_in, trace_id, name, kind, attributes, links)
        recording = result.decision.is_sampled()
        trace_state = result.trace_state
        if linked is not None and trace_state is linked.trace_state:
            # A parent-based sampler hands on its parent's trace state: the link's here,
            # vendor data of another trace, not of the new one this span starts.
            trace_state = None
        if result.decision.is_recording() and result.attributes:
            attrs.update(result.attributes)
        # RECORD_ONLY (recorded, not sampled) is not exported by the SDK's processors: it
        # is dropped here at once.
    flags = _SAMPLED if recording else _NOT_SAMPLED
    if random_id:
        flags = TraceFlags(flags | TraceFlags.RANDOM_TRACE_ID)
    span_context = SpanContext(trace_id, r.id_generator.generate_span_id(), is_remote=False,
                               trace_flags=flags, trace_state=trace_state)
    if not recording:
        return NonRecordingSpan(span_context)
    chunks: list[Sequence[Link]] = []
    if len(links) > MAX_LINKS:
        # A chunk whose contexts are all unsampled is not made: their traces are not
        # exported, nothing would lead to it. LINK_CHUNKS counts the spans made.
        rest = links[MAX_LINKS:MAX_LINKED]
        links = links[:MAX_LINKS]
        chunks = [c for c in (rest[i:i + MAX_LINKS] for i in range(0, len(rest), MAX_LINKS))
                  if _first_sampled(c) is not None]
        attrs[LINK_CHUNK] = 0
        attrs[LINK_CHUNKS] = 1 + len(chunks)
    return OpenSpan(r, name, kind, span_context, parent, links, attrs,
                    start_time if start_time is not None else time.time_ns(), chunks)


def carrier_of(span: Span) -> dict[str, str]:
    """The W3C headers of `span`, for a message field that carries trace context:
    written here as the W3C propagator writes them (one per AppendStream message). A span
    the sampler dropped has them too, flagged unsampled: a parent-based sampler
    downstream then drops its children as well, instead of starting traces of its own."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return {}
    carrier = {TRACEPARENT: traceparent_of(sc)}
    if sc.trace_state:
        carrier[TRACESTATE] = sc.trace_state.to_header()
    return carrier


def traceparent_of(sc: SpanContext) -> str:
    """The W3C traceparent of a valid span context (55 characters, version 00)."""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"


@contextlib.contextmanager
def consumer_span(stream: str, metadatas: Iterable[Mapping[str, str]], *,
                  consumer_group: str | None = None, name: str | None = None,
                  attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A CONSUMER span ("process <stream>") for processing a batch of events, made
    current for the block, following the messaging semantic conventions: it links to the
    producer context (`traceparent`) of each event (distinct ones, at most MAX_LINKED,
    MAX_LINKS per span: open_span's link chunks, children of the span yielded, carry the
    others); when the whole batch comes from one producer context it is also that context's
    child, so one order is one trace. With tracing off it yields INVALID_SPAN and reads
    no metadata. Exceptions are recorded and set the span's status to ERROR."""
    if not _state.tracing:
        yield INVALID_SPAN
        return
    contexts, n = contexts_of(metadatas)
    parent, _ = parent_and_links(contexts, ambient=True)
    attrs: dict[str, Any] = {
        MESSAGING_SYSTEM: SYSTEM, MESSAGING_OPERATION_TYPE: "process",
        MESSAGING_OPERATION_NAME: "process", MESSAGING_DESTINATION: stream,
        MESSAGING_BATCH_COUNT: n}
    if consumer_group:
        attrs[MESSAGING_CONSUMER_GROUP] = consumer_group
    if attributes:
        attrs.update(attributes)
    # open_span, not the SDK tracer: its sampling rule for linked batches (a batch of
    # several sampled orders under a ratio sampler) is what keeps them in their traces.
    span = open_span(name or f"process {stream}", context=parent, kind=SpanKind.CONSUMER,
                     links=[Link(sc) for sc in contexts], attributes=attrs)
    with trace.use_span(span, end_on_exit=True):
        yield span


def set_status_code(span: Span, code: grpc.StatusCode, message: str = "") -> None:
    span.set_attribute(RPC_STATUS, code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}" if message
                               else code.name))


# ---- streaming calls: SERVER spans made by their handlers ------------------------------
# ServerInterceptor leaves streaming RPCs alone (a span per call would last as long as
# the call). A handler that wants a span for a bounded part of one (a Read, a
# subscription's catch-up) makes it with server_span, only when tracing() (its one check
# per call), and ends it with end_server_span.

def call_context(context: grpc.aio.ServicerContext) -> Context:
    """The trace context a caller sent in a call's gRPC metadata (`traceparent`,
    `tracestate`), read as ServerInterceptor reads it: the parent of the call's SERVER
    span. An empty Context when there is none (the span is then a new root)."""
    return extract({k: v for k, v in (context.invocation_metadata() or ())
                    if isinstance(v, str)})


def server_span(service: str, method: str, context: grpc.aio.ServicerContext,
                attributes: dict[str, Any] | None = None) -> Span:
    """A SERVER span "<service>/<method>" of a streaming call, named and attributed as
    ServerInterceptor's (rpc.system, rpc.service, rpc.method, network.peer.address, then
    `attributes`), child of the caller's context (call_context); open_span's, so the
    sampler decides and the span is cheap. Call it when tracing() only."""
    attrs = _server_attributes(service, method, context)
    if attributes:
        attrs.update(attributes)
    return open_span(f"{service}/{method}", context=call_context(context),
                     kind=SpanKind.SERVER, attributes=attrs)


def _server_attributes(service: str, method: str,
                       context: grpc.aio.ServicerContext) -> dict[str, Any]:
    """A SERVER span's RPC attributes (ServerInterceptor's and server_span's)."""
    return {RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: method,
            PEER_ADDRESS: context.peer()}


def end_server_span(span: Span, context: grpc.aio.ServicerContext,
                    failure: BaseException | None = None) -> None:
    """Ends a streaming call's SERVER span with the call's outcome as far as `failure`
    tells it: none, OK; the handler's abort (grpc.aio.AbortError), the status it aborted
    with; the call cancelled (the client went away, or the server stopped: the handler's
    generator closed, or cancelled while it waited), CANCELLED; anything else, recorded,
    UNKNOWN (what gRPC answers). A span already ended is left as it is."""
    if not span.is_recording():
        return
    if failure is None:
        set_status_code(span, grpc.StatusCode.OK)
    elif isinstance(failure, grpc.aio.AbortError):
        code = context.code()
        set_status_code(span, code if isinstance(code, grpc.StatusCode)
                        else grpc.StatusCode.UNKNOWN, context.details() or "")
    elif isinstance(failure, (GeneratorExit, asyncio.CancelledError)):
        set_status_code(span, grpc.StatusCode.CANCELLED)
    else:
        span.record_exception(failure)
        set_status_code(span, grpc.StatusCode.UNKNOWN, repr(failure))
    span.end()


def with_trace_context(metadata: Sequence[tuple[str, str]] | None = None,
                       ) -> Sequence[tuple[str, str]] | None:
    """A streaming call's metadata with the current span's `traceparent` (and
    `tracestate`) added: what the client interceptor does for unary calls (it leaves
    streaming ones untouched), for a client that starts a Read or a Subscribe inside a
    span, so the server's span is its child. `metadata` itself when tracing is off or no
    span is current."""
    sc = current_span_context()
    if sc is None:
        return metadata
    carrier = carrier_of(NonRecordingSpan(sc))
    return (*(metadata or ()), *carrier.items())


# ---- gRPC instrumentation (unary RPCs) ---------------------------------------------------
# Streaming RPCs are long-lived here (AppendStream, Subscribe, the peer streams): one span
# per call would last as long as the connection. Their handlers make one span per message
# instead, with the trace context inside the message (AppendStreamRequest.trace_context,
# PeerMessage.trace_context). These interceptors cover the unary RPCs, with W3C trace
# context in the call's metadata.

def _split_method(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


# Health checks and reflection: polled all the time, nothing to see in a trace.
_UNTRACED = ("/grpc.health.", "/grpc.reflection.")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per unary-unary call, child of the `traceparent` in its metadata."""

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if (handler is None or handler.request_streaming or handler.response_streaming
                or details.method.startswith(_UNTRACED)):
            return handler
        behavior = handler.unary_unary
        method = details.method
        service, name = _split_method(method)

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _state.tracer.start_as_current_span(
                    f"{service}/{name}", context=call_context(context), kind=SpanKind.SERVER,
                    attributes=_server_attributes(service, name, context),
                    record_exception=False,
                    set_status_on_exception=False) as span:
                try:
                    response = await behavior(request, context)
                except grpc.aio.AbortError:
                    set_status_code(span, context.code() or grpc.StatusCode.UNKNOWN,
                                    context.details() or "")
                    raise
                except Exception as exc:
                    span.record_exception(exc)
                    set_status_code(span, grpc.StatusCode.UNKNOWN, repr(exc))
                    raise
                set_status_code(span, context.code() or grpc.StatusCode.OK)
                return response

        return grpc.unary_unary_rpc_method_handler(
            traced, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What a server built now installs: nothing when tracing is off (no per-call cost)."""
    return [ServerInterceptor()] if _state.tracing else []


class ClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """A CLIENT span per unary-unary call; its context travels in the call's metadata."""

    async def intercept_unary_unary(self, continuation: Callable[..., Any],
                                    details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) \
            else details.method
        service, name = _split_method(method)
        span = _state.tracer.start_span(
            f"{service}/{name}", kind=SpanKind.CLIENT,
            attributes={RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: name})
        carrier = carrier_of(span)
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for k, v in carrier.items():
            metadata[k] = v
        details = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                             details.credentials, details.wait_for_ready)
        try:
            call = await continuation(details, request)
            code = await call.code()  # waits for the end of the call, raises nothing
            set_status_code(span, code, await call.details() or "")
            return call
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, repr(exc)))
            raise
        finally:
            span.end()


def client_interceptors() -> list[grpc.aio.ClientInterceptor] | None:
    """Interceptors for a channel opened now: none when tracing is off. Only a unary-unary
    interceptor: grpc.aio then leaves streaming calls untouched (no per-message hop)."""
    return [ClientInterceptor()] if _state.tracing else None
