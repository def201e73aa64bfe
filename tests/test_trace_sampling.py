"""Sampling of the spans that serve several callers at once (a coalesced AppendStream
message, a group commit, a replicated batch, an engine's CONSUMER span of a batch):
they have links and no parent, and are recorded when any linked caller was sampled, so
a sampled order's trace keeps its store, replication and engine spans under a
parent-based ratio sampler. The configured sampler still decides otherwise. SDK
in-memory exporter, a real store server and client."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from store.client import new_event
from tests.support.store import run, running_store, wait_until
from xdc import telemetry

APPEND_STREAM = "xdc.v1.EventStore/AppendStream"
# A ratio of 0: no new root is ever sampled, so whatever is recorded is recorded because
# a caller's trace was sampled (deterministic, where a ratio of 0.01 would be random).
RATIO_0 = ParentBased(TraceIdRatioBased(0.0))


@contextlib.contextmanager
def _installed(sampler: Sampler | None) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install(provider)
    try:
        yield exporter
    finally:
        telemetry.install(None, None)
        provider.shutdown()


def _upstream(sampled: bool) -> SpanContext:
    """An order's context as its upstream (the trading client) decided it."""
    return SpanContext(random.getrandbits(127) + 1, random.getrandbits(63) + 1, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled
                                              else TraceFlags.DEFAULT))


def _traceparent(sc: SpanContext) -> dict[str, str]:
    return {"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"}


def _served(span: ReadableSpan, target: SpanContext) -> bool:
    """`span` is the child of `target` or links to it."""
    return ((span.parent is not None and span.parent.span_id == target.span_id
             and span.context.trace_id == target.trace_id)
            or any(link.context.span_id == target.span_id for link in span.links))


def test_batched_sampled_orders_keep_their_store_spans(tmp_path: Path) -> None:
    """Orders sampled upstream whose appends the client coalesces into one message: each
    keeps a client span (linked), its server span and a group commit. Orders unsampled
    upstream get none (a ratio of 0 never samples the new root)."""
    orders: list[tuple[SpanContext, bool]] = []

    async def body(exporter: InMemorySpanExporter) -> None:
        producer = telemetry.tracer()  # the order gateway's role
        async with running_store(tmp_path / "store", linger_s=0.02) as (_, client):
            await client.append("warm", new_event("T"))
            exporter.clear()
            for message in range(6):
                sampled = message % 3 != 2  # messages 2 and 5: orders unsampled upstream
                futures = []
                for _ in range(4):
                    up = trace.set_span_in_context(NonRecordingSpan(_upstream(sampled)))
                    with producer.start_as_current_span("SubmitOrder", context=up,
                                                        kind=SpanKind.SERVER) as order:
                        assert order.is_recording() == sampled
                        orders.append((order.get_span_context(), sampled))
                        futures.append(client.append_nowait(
                            f"orders-{message}", new_event("O", metadata=telemetry.inject({}))))
                await asyncio.gather(*futures)

            def committed() -> bool:  # the writer's spans are made after the answer
                commits = _named(exporter, "xdc.group_commit")
                return all(any(_served(g, s.context) for g in commits)
                           for s in _named(exporter, APPEND_STREAM)
                           if s.kind == SpanKind.SERVER)
            await wait_until(committed, what="the group commit spans")

    with _installed(RATIO_0) as exporter:
        run(lambda: body(exporter))
        spans = exporter.get_finished_spans()
    clients = [s for s in spans if s.name == APPEND_STREAM and s.kind == SpanKind.CLIENT]
    servers = [s for s in spans if s.name == APPEND_STREAM and s.kind == SpanKind.SERVER]
    commits = [s for s in spans if s.name == "xdc.group_commit"]
    for order, sampled in orders:
        mine = [c for c in clients if _served(c, order)]
        if not sampled:
            assert mine == [], "an unsampled order's message was recorded"
            continue
        assert mine, "a sampled order lost its client span"
        (client_span,) = mine
        (server_span,) = [s for s in servers if _served(s, client_span.context)]
        assert any(_served(g, server_span.context) for g in commits), \
            "a sampled order lost its group commit span"
    assert any(len(c.links) > 1 for c in clients)  # coalesced: several callers, links
    # Nothing but the sampled orders' messages, each recorded once on either side.
    assert len(clients) == len(servers)
    assert all(any(_served(c, o) for o, sampled in orders if sampled) for c in clients)


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_consumer_and_serving_spans_follow_a_sampled_link() -> None:
    """The engine's CONSUMER span of a batch of several orders, and the span serving()
    makes for several: recorded when any linked order is sampled, in a trace of their
    own (no parent, no trace state of another trace), and dropped when none is."""
    sampled = SpanContext(random.getrandbits(127) + 1, 7, is_remote=True,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED),
                          trace_state=trace.TraceState([("vendor", "v1")]))
    unsampled = _upstream(False)
    with _installed(RATIO_0) as exporter:
        with telemetry.consumer_span("orders", [_traceparent(unsampled),
                                                {**_traceparent(sampled),
                                                 "tracestate": "vendor=v1"}]) as span:
            assert span.is_recording()
        with telemetry.consumer_span("orders", [_traceparent(unsampled),
                                                _traceparent(_upstream(False))]) as span:
            assert not span.is_recording()
        with telemetry.consumer_span("orders", [_traceparent(sampled)]) as span:
            assert span.is_recording()  # one order: its child, as before
        with telemetry.serving([unsampled, sampled], "emit out") as span:
            assert span.is_recording()
        span.end()
        with telemetry.serving([unsampled, _upstream(False)], "emit out") as span:
            assert not span.is_recording()
        span.end()
        dropped = telemetry.open_span("batch", links=[Link(unsampled)])
        assert not dropped.is_recording()
    batch, single = _named(exporter, "process orders")
    assert batch.parent is None and len(batch.links) == 2
    assert batch.context.trace_id not in (sampled.trace_id, unsampled.trace_id)
    assert not batch.context.trace_state  # the link's vendor state stays in its trace
    assert batch.kind == SpanKind.CONSUMER
    assert single.parent is not None and single.parent.span_id == sampled.span_id
    (emit,) = _named(exporter, "emit out")
    assert emit.parent is None and len(emit.links) == 2


def test_link_chunks_follow_the_sampling_of_their_links() -> None:
    """A batch span past MAX_LINKS (open_span's link chunks): decided on all its links,
    so one sampled order past the first MAX_LINKS records it; a chunk is made only when
    one of its links is sampled (the others lead to traces that are not exported).
    Before, orders past the 64th were not linked at all: a sampled one there neither
    kept the batch recorded nor reached it."""
    per = telemetry.MAX_LINKS
    sampled = _upstream(True)
    orders = [_upstream(False) for _ in range(3 * per)]
    orders[per + 5] = sampled  # in the second chunk
    with _installed(RATIO_0) as exporter:
        with telemetry.consumer_span("orders", [_traceparent(o) for o in orders]) as span:
            assert span.is_recording()
        with telemetry.consumer_span("orders", [_traceparent(o) for o in orders
                                                if o is not sampled]) as span:
            assert not span.is_recording()
    first, chunk = sorted(_named(exporter, "process orders"),
                          key=lambda s: s.attributes["xdc.links.chunk"])
    assert first.parent is None and first.context.trace_id != sampled.trace_id
    # The spans made: the third chunk, with no sampled link, is not (nor counted).
    assert first.attributes["xdc.links.chunks"] == 2 and len(first.links) == per
    assert chunk.attributes["xdc.links.chunk"] == 1
    assert chunk.parent is not None and chunk.parent.span_id == first.context.span_id
    assert _served(chunk, sampled) and len(chunk.links) == per


def test_the_configured_sampler_still_decides() -> None:
    """A sampled link makes a span the child of that link for the sampler, nothing more:
    ALWAYS_OFF and a sampler that ignores parents still drop it; the default sampler
    records it, a root, as before, whatever its links."""
    links = [Link(_upstream(True)), Link(_upstream(True))]
    metadatas = [_traceparent(link.context) for link in links]
    for sampler in (ALWAYS_OFF, TraceIdRatioBased(0.0)):
        with _installed(sampler) as exporter:
            assert not telemetry.open_span("batch", links=links).is_recording()
            with telemetry.consumer_span("orders", metadatas) as span:
                assert not span.is_recording()
        assert exporter.get_finished_spans() == ()
    with _installed(None) as exporter:
        assert telemetry._state.recorder is not None
        assert telemetry._state.recorder.default_sampler
        telemetry.open_span("batch", links=[Link(_upstream(False))]).end()
        with telemetry.consumer_span("orders", metadatas):
            pass
    assert len(exporter.get_finished_spans()) == 2


def test_the_gateways_deliver_spans_follow_the_orders_sampling() -> None:
    """The gateway's `deliver` span of a waiting request's answer is that request's
    span's child (linked to the output's producer): recorded when the request is
    sampled. A streamed message's is the producer's child: recorded when the producer
    is. Under a ratio of 0, nothing else is."""
    import time
    import tomllib

    from engine.exchange_config import DEMO_CONFIG, parse
    from engine.gateway import GatewayLimits, OutputFeed, Received, deliver_span

    request, quiet = _upstream(True), _upstream(False)  # the waiting requests' spans
    producer, unsampled_producer = _upstream(True), _upstream(False)
    with _installed(RATIO_0) as exporter:
        feed = OutputFeed(parse(tomllib.loads(DEMO_CONFIG)), None,  # type: ignore[arg-type]
                          GatewayLimits())
        group = feed.groups["crypto"]
        out = Received(5, 7, 100, producer, time.time_ns() - 1_000_000)
        group.received.extend([out, Received(8, 8, 101, unsampled_producer, time.time_ns())])
        with trace.use_span(NonRecordingSpan(request)):
            feed.delivered("crypto", 6, 2)  # recorded: the request is sampled
        with trace.use_span(NonRecordingSpan(quiet)):
            feed.delivered("crypto", 6, 2)  # dropped with its request
        for received in group.received:  # the producer's child: recorded if it is sampled
            deliver_span(group.stream, received, "stream", 1,
                         telemetry.parent_and_links([received.producer])[0])
    wait, stream = _named(exporter, f"deliver {group.stream}")
    assert wait.kind == stream.kind == SpanKind.CONSUMER
    assert wait.attributes["xdc.gateway.delivery"] == "wait"
    assert wait.parent is not None and wait.parent.span_id == request.span_id
    assert wait.context.trace_id == request.trace_id
    assert [link.context for link in wait.links] == [producer]
    assert wait.start_time == out.at_ns and wait.attributes["xdc.output.position"] == 100
    assert wait.attributes["xdc.execution.reports"] == 2
    assert stream.attributes["xdc.gateway.delivery"] == "stream"
    assert stream.parent is not None and stream.parent.span_id == producer.span_id
    assert stream.context.trace_id == producer.trace_id
