"""One order is one trace: gateway SERVER span -> the order's input event carries its
traceparent -> the engine's CONSUMER span links to it (and, as the batch's only
producer, is its child) -> the output append is a child of the CONSUMER span, and the
output event carries that span's traceparent -> the gateway's `deliver` spans of the
answer (a waiting request's, a StreamExecutions message) end the trace. Real store, real
gateway, real engine runner, SDK in-memory exporter."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
)

from engine import commands as cm
from engine import wire
from engine.constants import Side
from engine.exchange_config import DEMO_CONFIG, init_events, parse
from engine.gateway import GatewayServer
from engine.lease import FileLease
from engine.runner import EngineRunner, RunnerConfig
from store.client import StoreClient
from tests.support.store import run, running_store, wait_until
from tests.test_telemetry import Otel, _child_of, _links_to, otel  # noqa: F401 (fixture)
from xdc import telemetry
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc


@contextlib.asynccontextmanager
async def _exchange(tmp_path: Path) -> AsyncIterator[tuple[StoreClient, GatewayServer]]:
    """A store, the demo exchange's setup (bob holds BTC), a primary engine and a gateway:
    (store client, gateway server); all stopped on the way out."""
    config = parse(tomllib.loads(DEMO_CONFIG))
    async with running_store(tmp_path / "store") as (server, client):
        await client.append(wire.input_stream("crypto"), [
            *init_events(config.group("crypto")),
            wire.command_event("crypto", cm.Deposit(0, "alice", "USD", 10**9), "d1"),
            wire.command_event("crypto", cm.Deposit(0, "bob", "BTC", 10**9), "d2")])
        runner = EngineRunner(RunnerConfig("crypto", "a", (server.address,)),
                              FileLease(tmp_path / "lease", "crypto", "a"))
        gateway = GatewayServer(config, server.address)
        await runner.start()
        await gateway.start()
        await gateway.wait_admitted()
        try:
            await wait_until(lambda: runner.primary, 10)
            yield client, gateway
        finally:
            await gateway.stop(0.5)
            await runner.stop()


def test_one_order_is_one_trace_through_gateway_store_and_engine(otel: Otel,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    async def body() -> None:
        async with _exchange(tmp_path) as (client, gateway):
            otel.exporter.clear()
            async with grpc.aio.insecure_channel(gateway.address) as ch:
                r = await xpb_grpc.OrderGatewayStub(ch).SubmitOrder(xpb.SubmitOrderRequest(
                    symbol="BTC-USD", account="bob", client_order_id="o-1", side=xpb.SELL,
                    qty=3, price=50_000, wait=True, wait_timeout_ms=10_000), timeout=15)
            assert not r.timed_out and r.reports[0].kind == "ACCEPTED"
            (stored,) = [e for e in await client.read(wire.input_stream("crypto"),
                                                      start=1, limit=100)
                         if e.position == r.input_position]
            traceparent = stored.metadata["traceparent"]

            def traced() -> bool:
                return any(s.kind == SpanKind.CONSUMER for s in otel.spans())
            await wait_until(traced, 10)

        spans = otel.spans()
        (submit,) = [s for s in spans if s.kind == SpanKind.SERVER and "SubmitOrder" in s.name]
        assert traceparent.split("-")[1] == f"{submit.context.trace_id:032x}"
        consumers = [s for s in spans if s.kind == SpanKind.CONSUMER]
        mine = [s for s in consumers if s.context.trace_id == submit.context.trace_id]
        assert mine, [s.name for s in consumers]
        consumer = mine[0]
        assert consumer.name == "process " + wire.input_stream("crypto")
        assert consumer.attributes["messaging.system"] == "xdc"
        assert consumer.attributes["messaging.consumer.group.name"] == "crypto"
        producer_span_id = int(traceparent.split("-")[2], 16)
        assert any(link.context.span_id == producer_span_id for link in consumer.links)
        assert consumer.parent is not None and consumer.parent.span_id == producer_span_id
        # The execution append: a CLIENT span under the CONSUMER span.
        appends = [s for s in spans if s.kind == SpanKind.CLIENT and _child_of(s, consumer)]
        assert appends, [(s.name, s.kind) for s in spans
                         if s.context.trace_id == consumer.context.trace_id]
        assert _links_to(consumer, submit) or any(
            link.context.trace_id == submit.context.trace_id for link in consumer.links)

    run(body, timeout_s=60)


def test_each_output_append_hangs_under_the_spans_of_the_inputs_it_carries(
        otel: Otel, tmp_path: Path) -> None:  # noqa: F811
    """Orders arriving while an output append is in flight: every CONSUMER span of the
    primary is served by exactly one output append, either as its parent (an append of
    one batch's outputs) or through an "emit" span linked to each batch it carries. Before,
    the next append was sent from the previous one's answer callback, in the context
    copied when that callback was registered: appends hung under an old, ended CONSUMER
    span (other orders' traces), and most CONSUMER spans had none."""
    orders = 40

    async def body() -> None:
        async with _exchange(tmp_path) as (_, gateway):
            async with grpc.aio.insecure_channel(gateway.address) as ch:
                stub = xpb_grpc.OrderGatewayStub(ch)
                calls = []
                for i in range(orders):  # overlapping calls, a few ms apart
                    calls.append(asyncio.ensure_future(stub.SubmitOrder(xpb.SubmitOrderRequest(
                        symbol="BTC-USD", account="bob", client_order_id=f"o-{i}",
                        side=xpb.SELL, qty=1, price=50_000 + i, wait=True,
                        wait_timeout_ms=10_000), timeout=15)))
                    await asyncio.sleep(0.004)  # pacing the load, not a sync
                answers = await asyncio.gather(*calls)
            assert not any(r.timed_out for r in answers)
            await wait_until(lambda: not any(served(otel.spans())[:2]), 10,
                             "every CONSUMER span served by an output append")

    def served(spans: list) -> tuple[list, list, dict]:  # type: ignore[type-arg]
        """(CONSUMER spans of orders with no output append, output appends whose parent
        is no span exported (yet), appends per CONSUMER span)."""
        by_id = {s.context.span_id: s for s in spans}
        out_stream = wire.output_stream("crypto")
        per: dict[int, int] = {}
        orphans = []
        for s in spans:
            if not (s.kind == SpanKind.CLIENT and "AppendStream" in s.name
                    and s.attributes.get("messaging.destination.name") == out_stream):
                continue
            parent = by_id.get(s.parent.span_id) if s.parent is not None else None
            if parent is None:
                orphans.append(s)
                continue
            if parent.kind == SpanKind.CONSUMER:
                batches = [parent.context.span_id]
            else:
                assert parent.name == f"emit {out_stream}", parent.name
                batches = [link.context.span_id for link in parent.links]
                assert len(batches) > 1 and parent.end_time >= s.end_time
            for b in batches:
                assert by_id[b].kind == SpanKind.CONSUMER
                per[b] = per.get(b, 0) + 1
        # The primary's spans of batches holding orders (linked to their producers).
        orders_consumed = [s for s in spans if s.kind == SpanKind.CONSUMER
                           and s.attributes.get("xdc.engine.primary") and s.links]
        return [s for s in orders_consumed if s.context.span_id not in per], orphans, per

    otel.exporter.clear()
    run(body, timeout_s=90)
    missing, orphans, per = served(otel.spans())
    assert not missing and not orphans, (missing, [s.parent for s in orphans])
    assert set(per.values()) == {1}, per
    # Each answer's `deliver` span: its SubmitOrder's child, linked to the context its
    # output event carries, the CONSUMER span of its batch, else the "emit" span of an
    # append of several batches.
    spans = otel.spans()
    by_id = {s.context.span_id: s for s in spans}
    submits = {s.context.span_id for s in spans if "SubmitOrder" in s.name}
    waits = [s for s in spans if s.name == f"deliver {wire.output_stream('crypto')}"]
    assert len(submits) == orders and sorted(s.parent.span_id for s in waits) == sorted(submits)
    producers = [by_id[link.context.span_id] for s in waits for link in s.links]
    assert len(producers) == orders
    assert {p.name.split()[0] for p in producers} <= {"process", "emit"}


OUTPUT = wire.output_stream("crypto")
DELIVER = f"deliver {OUTPUT}"


async def _order_streamed(gateway: GatewayServer,
                          ) -> tuple[xpb.OrderResponse, xpb.ExecutionBatch]:
    """bob streams his executions from now and submits one order with wait: (the answer,
    the stream's message of that order)."""
    async with grpc.aio.insecure_channel(gateway.address) as ch:
        stub = xpb_grpc.OrderGatewayStub(ch)
        stream = stub.StreamExecutions(xpb.StreamExecutionsRequest(account="bob"))
        await wait_until(lambda: "bob" in gateway.service.feed.exec_outlets, 10,
                         "the stream attached")
        r = await stub.SubmitOrder(xpb.SubmitOrderRequest(
            symbol="BTC-USD", account="bob", client_order_id="o-1", side=xpb.SELL,
            qty=3, price=50_000, wait=True, wait_timeout_ms=10_000), timeout=15)
        msg = await asyncio.wait_for(stream.read(), 10)
        stream.cancel()
    assert not r.timed_out and r.reports[0].kind == "ACCEPTED"
    assert isinstance(msg, xpb.ExecutionBatch)
    assert [m.input_position for m in msg.reports] == [r.input_position]
    return r, msg


def test_the_answer_to_a_waiting_order_and_its_streamed_execution_end_its_trace(
        otel: Otel, tmp_path: Path) -> None:  # noqa: F811
    """The gateway's delivery of the execution report makes a CONSUMER span `deliver
    <output stream>`, in the order's trace, after the output append committed: for the
    waiting SubmitOrder (the SERVER span's child, linked to the output's producer, the
    engine's CONSUMER span) and for the StreamExecutions message (the producer's child).
    Before, the trace ended at the engine's output append."""
    async def body() -> tuple[xpb.OrderResponse, xpb.ExecutionBatch, str]:
        async with _exchange(tmp_path) as (client, gateway):
            otel.exporter.clear()
            r, msg = await _order_streamed(gateway)
            outputs = await client.read(OUTPUT, start=1, limit=100)
            (output,) = [o for o in outputs if o.position == msg.position]
            await wait_until(lambda: len(otel.spans(DELIVER)) >= 2, 10, "deliver spans")
            return r, msg, output.metadata.get("traceparent", "")

    r, msg, output_traceparent = run(body, timeout_s=60)
    spans = otel.spans()
    (submit,) = [s for s in spans if s.kind == SpanKind.SERVER and "SubmitOrder" in s.name]
    trace_id = submit.context.trace_id
    (consumer,) = [s for s in spans if s.kind == SpanKind.CONSUMER
                   and s.name.startswith("process ") and s.context.trace_id == trace_id]
    # The output event carries the context its outputs were made in.
    assert output_traceparent.split("-")[1:3] == [f"{trace_id:032x}",
                                                  f"{consumer.context.span_id:016x}"]
    # The output append (CLIENT, the CONSUMER span's child) and its group commit.
    (out_append,) = [s for s in spans if s.kind == SpanKind.CLIENT and _child_of(s, consumer)
                     and s.attributes.get("messaging.destination.name") == OUTPUT]
    (out_server,) = [s for s in spans if s.kind == SpanKind.SERVER
                     and _child_of(s, out_append)]
    (out_commit,) = [s for s in spans if s.name == "xdc.group_commit"
                     and _child_of(s, out_server)]
    delivers = {s.attributes["xdc.gateway.delivery"]: s for s in spans if s.name == DELIVER}
    assert set(delivers) == {"wait", "stream"}, [s.attributes for s in otel.spans(DELIVER)]
    for kind, deliver in delivers.items():
        assert deliver.kind == SpanKind.CONSUMER, kind
        assert deliver.context.trace_id == trace_id, kind  # in the order's trace
        assert _links_to(deliver, consumer), kind
        assert deliver.attributes["messaging.system"] == "xdc"
        assert deliver.attributes["messaging.operation.type"] == "process"
        assert deliver.attributes["messaging.destination.name"] == OUTPUT
        assert deliver.attributes["xdc.output.position"] == msg.position
        # From the feed's receipt of the committed output to the answer handed to gRPC.
        assert out_commit.end_time <= deliver.start_time <= deliver.end_time, kind
    wait, streamed = delivers["wait"], delivers["stream"]
    assert _child_of(wait, submit) and wait.end_time <= submit.end_time
    assert wait.attributes["xdc.execution.reports"] == len(r.reports)
    assert _child_of(streamed, consumer)
    assert streamed.attributes["xdc.execution.reports"] == len(msg.reports)


def test_untraced_outputs_carry_no_context_and_the_feed_keeps_none(tmp_path: Path) -> None:
    """Tracing off: output events carry no traceparent, the feed keeps no receipts and
    streams are offered the plain message (nothing made per output for `deliver`)."""
    async def body() -> None:
        async with _exchange(tmp_path) as (client, gateway):
            _, msg = await _order_streamed(gateway)
            (output,) = [o for o in await client.read(OUTPUT, start=1, limit=100)
                         if o.position == msg.position]
            assert "traceparent" not in output.metadata
            feed = gateway.service.feed
            assert not any(g.received for g in feed.groups.values())

    run(body, timeout_s=60)


def test_each_output_event_carries_the_context_its_outputs_were_made_in() -> None:
    """An output event whose inputs were all consumed in one traced batch carries that
    batch's CONSUMER span (its traceparent); one whose inputs span several, the "emit"
    span the append was made under; none when that span is not valid."""
    def ctx() -> SpanContext:
        return SpanContext(random.getrandbits(127) + 1, random.getrandbits(63) + 1, False,
                           TraceFlags(TraceFlags.SAMPLED))
    a, b, c, emit = ctx(), ctx(), ctx(), ctx()
    runner = SimpleNamespace(config=SimpleNamespace(group="crypto", instance="a"),
                             _batch_spans=collections.deque([(1, 2, a), (3, 3, b), (4, 5, c)]))
    batches = [wire.OutputBatch(1, 2, b"\0" * 32, ()), wire.OutputBatch(3, 5, b"\0" * 32, ())]

    def carried(spans: list, emit_span: object) -> list[str]:  # type: ignore[type-arg]
        events = EngineRunner._traced_events(runner, batches, spans, emit_span)  # type: ignore[arg-type]
        return [e.metadata.get("traceparent", "") for e in events]
    tp = telemetry.traceparent_of
    assert carried([a, b, c], NonRecordingSpan(emit)) == [tp(a), tp(emit)]
    assert carried([a, b, c], INVALID_SPAN) == [tp(a), ""]
    assert carried([b], INVALID_SPAN) == [tp(b), tp(b)]
    assert all(len(t) == 55 for t in carried([a, b, c], NonRecordingSpan(emit)))


@contextlib.asynccontextmanager
async def _engine(tmp_path: Path, lease: type[FileLease] = FileLease, **options: int,
                  ) -> AsyncIterator[tuple[StoreClient, EngineRunner]]:
    """A store with the demo exchange's setup (bob holds BTC) and a primary engine
    (RunnerConfig `options`, a `lease` on a file), no gateway: (store client, runner)."""
    config = parse(tomllib.loads(DEMO_CONFIG))
    async with running_store(tmp_path / "store") as (server, client):
        await client.append(wire.input_stream("crypto"), [
            *init_events(config.group("crypto")),
            wire.command_event("crypto", cm.Deposit(0, "bob", "BTC", 10**9), "d2")])
        runner = EngineRunner(RunnerConfig("crypto", "a", (server.address,), **options),
                              lease(tmp_path / "lease", "crypto", "a"))
        await runner.start()
        try:
            await wait_until(lambda: runner.primary, 10)
            yield client, runner
        finally:
            await runner.stop()


def _order(otel: Otel, i: int) -> tuple[pb.ProposedEvent, Span]:  # noqa: F811
    """(bob's sell order `o-i`'s input event, its producer span: ended, own trace)."""
    with otel.producer.start_as_current_span(f"order {i}") as producer:
        event = wire.command_event("crypto", cm.NewOrder(
            0, "BTC-USD", "bob", f"o-{i}", Side.SELL, 1, 50_000 + i), f"o-{i}",
            metadata=telemetry.inject({}))
    return event, producer


def test_every_order_of_a_batch_past_max_links_reaches_its_processing(
        otel: Otel, tmp_path: Path) -> None:  # noqa: F811
    """Orders of more traces than MAX_LINKS delivered to the engine in one batch (one
    append here; a burst or a backlog there): every order's trace reaches the engine's
    processing, a link from the batch's CONSUMER span or from one of its link chunks
    (its children: same name and timing, MAX_LINKS links each), and through them the
    output append, the CONSUMER span's child. Before, the span linked the first 64
    orders: the others' traces stopped at the store."""
    n = 2 * telemetry.MAX_LINKS + 44
    processing = f"process {wire.input_stream('crypto')}"

    async def body() -> list[Span]:
        async with _engine(tmp_path) as (client, runner):
            otel.exporter.clear()
            orders = [_order(otel, i) for i in range(n)]
            last = (await client.append(wire.input_stream("crypto"),
                                        [e for e, _ in orders])).last_position

            def emitted() -> bool:
                return (runner.consumer.position >= last
                        and runner.consumer.committed_input >= last)
            await wait_until(emitted, 30, "the batch's outputs committed")
            return [p for _, p in orders]

    producers = run(body, timeout_s=90)
    spans = otel.spans()
    (batch,) = [s for s in otel.spans(processing) if s.parent is None
                and s.attributes.get("messaging.batch.message_count") == n]
    chunks = [s for s in otel.spans(processing) if _child_of(s, batch)]
    linked = {(lk.context.trace_id, lk.context.span_id)
              for s in (batch, *chunks) for lk in s.links}
    missing = [p.name for p in producers if (p.get_span_context().trace_id,
                                             p.get_span_context().span_id) not in linked]
    assert missing == [], f"{len(missing)} of {n} orders never reach their processing"
    assert len(chunks) == 2 and batch.attributes["xdc.links.chunks"] == 3
    for chunk in chunks:
        assert (chunk.start_time, chunk.end_time) == (batch.start_time, batch.end_time)
        assert chunk.kind == SpanKind.CONSUMER and len(chunk.links) <= telemetry.MAX_LINKS
    # The outputs of the batch: appended under its CONSUMER span, the chunks' parent.
    assert any(s.kind == SpanKind.CLIENT and _child_of(s, batch)
               and s.attributes.get("messaging.destination.name") == OUTPUT for s in spans)


def test_inputs_are_processed_while_a_snapshot_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A primary goes on processing inputs while a snapshot it took is compressed and
    appended (a task of its own), and its lease task goes on checking the lease: here the
    first snapshot's compression is held until five more orders are processed (and more
    snapshots are taken) and the lease was checked twice more, then let go. They are all
    written then, in input order (one writing task at a time: a second one
    would write the second snapshot while the first is held). Before, the consume task
    wrote each snapshot itself and stood still meanwhile (~20 ms per 100k resting
    orders), and the lease task waited for the write too."""
    import threading
    import zlib

    import engine.runner as runner_module
    started, release = threading.Event(), threading.Event()

    class HeldZlib:
        @staticmethod
        def compress(data: bytes, level: int) -> bytes:
            if not started.is_set():  # the first compression only
                started.set()
                release.wait(30)
            return zlib.compress(data, level)

    class CheckedLease(FileLease):
        checks = 0

        @property
        def held(self) -> bool:
            CheckedLease.checks += 1
            return super().held

    monkeypatch.setattr(runner_module, "zlib", HeldZlib)

    def order(i: int) -> pb.ProposedEvent:
        return wire.command_event("crypto", cm.NewOrder(
            0, "BTC-USD", "bob", f"o-{i}", Side.SELL, 1, 50_000 + i), f"o-{i}")

    async def body() -> None:
        async with _engine(tmp_path, CheckedLease, snapshot_every=5) as (client, runner):
            stream = wire.input_stream("crypto")
            try:
                for i in range(5):
                    await client.append(stream, [order(i)])
                await wait_until(started.is_set, 10, "a snapshot's compression")
                for i in range(5, 10):
                    last = (await client.append(stream, [order(i)])).last_position
                await wait_until(lambda: runner.consumer.position >= last, 10,
                                 "inputs processed while the snapshot is compressed")
                checks = CheckedLease.checks
                await wait_until(lambda: CheckedLease.checks >= checks + 2, 10,
                                 "the lease checked while the snapshot is compressed")
                assert runner.snapshot_position == 0 and runner.primary
            finally:
                release.set()

            def all_written() -> bool:  # every snapshot taken (where depends on batching)
                task = runner._flush_task
                return not runner._captures and task is not None and task.done()

            await wait_until(all_written, 10, "the snapshots written")
            written = [int(e.metadata["input_position"]) for e in
                       await client.read(wire.snapshot_stream("crypto"))]
            assert len(written) >= 2 and written == sorted(set(written)), written
            assert written[-1] == runner.snapshot_position, written
    run(body, timeout_s=60)


def test_a_snapshot_is_traced_on_its_own_not_in_an_orders_processing(
        otel: Otel, tmp_path: Path) -> None:  # noqa: F811
    """With a snapshot every few inputs and orders flowing: each snapshot written is a
    root INTERNAL span `snapshot crypto`, its append that span's child; no CONSUMER span
    of a batch holds a snapshot (neither its append nor its time). Before, the batch's
    span stayed open while the snapshot was taken and written: its append hung under
    the span (in an order's trace when the batch held one) and its time counted as the
    batch's processing."""
    every, n = 4, 24
    snapshots = wire.snapshot_stream("crypto")

    async def body() -> None:
        async with _engine(tmp_path, snapshot_every=every) as (client, runner):
            otel.exporter.clear()
            for i in range(n):  # one by one: batches of orders and committed outputs
                last = (await client.append(wire.input_stream("crypto"),
                                            [_order(otel, i)[0]])).last_position

            def settled() -> bool:  # every output committed, every snapshot taken written
                c = runner.consumer
                return c.position >= last and c.committed_input >= last \
                    and not runner._captures and (runner._flush_task is None
                                                  or runner._flush_task.done()) \
                    and runner.snapshot_position > 0
            await wait_until(settled, 30, "the snapshots written")

    def appended(spans: list) -> list:  # type: ignore[type-arg]
        return [s for s in spans if s.kind == SpanKind.CLIENT
                and s.attributes.get("messaging.destination.name") == snapshots]

    run(body, timeout_s=90)
    spans = otel.spans()
    by_id = {s.context.span_id: s for s in spans}
    appends = appended(spans)
    consumers = [s for s in spans if s.kind == SpanKind.CONSUMER]
    assert any(s.links for s in consumers)  # the orders' batches were traced
    for append in appends:
        holding = [c for c in consumers
                   if c.start_time <= append.start_time and append.end_time <= c.end_time]
        assert holding == [], "a snapshot's append inside a batch's CONSUMER span"
    roots = otel.spans("snapshot crypto")
    assert len(appends) >= 2 and len(roots) >= len(appends)
    for append in appends:
        assert append.parent is not None and by_id[append.parent.span_id] in roots
    for root in roots:
        assert root.parent is None and root.kind == SpanKind.INTERNAL
        assert root.attributes["xdc.engine.instance"] == "a"
        assert root.attributes["xdc.engine.input_position"] > 0
        assert root.attributes["xdc.snapshot.chunks"] >= 1
    for root in roots:
        assert not any(c.start_time <= root.start_time and root.end_time <= c.end_time
                       for c in consumers)

