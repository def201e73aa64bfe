"""One order is one trace: gateway SERVER span -> the order's input event carries its
traceparent -> the engine's CONSUMER span links to it (and, as the batch's only
producer, is its child) -> the output append is a child of the CONSUMER span. Real
store, real gateway, real engine runner, SDK in-memory exporter."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from opentelemetry.trace import SpanKind

from engine import commands as cm
from engine import wire
from engine.exchange_config import DEMO_CONFIG, init_events, parse
from engine.gateway import GatewayServer
from engine.lease import FileLease
from engine.runner import EngineRunner, RunnerConfig
from store.client import StoreClient
from tests.support.store import run, running_store, wait_until
from tests.test_telemetry import Otel, _child_of, _links_to, otel  # noqa: F401 (fixture)
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc


@contextlib.asynccontextmanager
async def _exchange(tmp_path: Path) -> AsyncIterator[tuple[StoreClient, str]]:
    """A store, the demo exchange's setup (bob holds BTC), a primary engine and a gateway:
    (store client, gateway address); all stopped on the way out."""
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
            yield client, gateway.address
        finally:
            await gateway.stop(0.5)
            await runner.stop()


def test_one_order_is_one_trace_through_gateway_store_and_engine(otel: Otel,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    async def body() -> None:
        async with _exchange(tmp_path) as (client, address):
            otel.exporter.clear()
            async with grpc.aio.insecure_channel(address) as ch:
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
        async with _exchange(tmp_path) as (_, address):
            async with grpc.aio.insecure_channel(address) as ch:
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
