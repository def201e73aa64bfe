"""Traces at the edges: unsampled orders beside sampled ones, a retried order's answer,
an append message whose call fails, a record whose bytes imitate a traceparent. Found
by helper-86's review; each test failed on the code before its fix. Real store, engine
runner, gateway; the SDK's in-memory exporter as the other tracing tests use it
(tests/test_telemetry.py)."""

from __future__ import annotations

import contextlib
import random
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from engine import commands as cm
from engine import wire
from engine.constants import Side
from engine.exchange_config import DEMO_CONFIG, init_events, parse
from engine.lease import FileLease
from engine.runner import EngineRunner, RunnerConfig
from geo.replication.messages import Append, AppendReply, Entry
from geo.tracing import ReplicationObserver
from store import records
from store.client import StoreClient, new_event
from tests.support.store import run, running_store, wait_until
from tests.test_engine_trace import _exchange
from tests.test_telemetry import Otel, _child_of, otel  # noqa: F401 (fixture)
from xdc import telemetry
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc

APPEND_STREAM = "xdc.v1.EventStore/AppendStream"
INPUT = wire.input_stream("crypto")
OUTPUT = wire.output_stream("crypto")


def _upstream(sampled: bool) -> SpanContext:
    """An order's context as its upstream (a trading client) decided it."""
    return SpanContext(random.getrandbits(127) + 1, random.getrandbits(63) + 1,
                       is_remote=True, trace_flags=TraceFlags(
                           TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT))


def _order(i: int, upstream: SpanContext, account: str = "bob") -> pb.ProposedEvent:
    """A resting order `o-i` (bob sells, alice buys, never crossing), its traceparent the
    upstream's (as the gateway injects the context of its SubmitOrder span, a child of
    the caller's)."""
    side, price = (Side.SELL, 50_000 + i) if account == "bob" else (Side.BUY, 40_000 + i)
    with trace.use_span(NonRecordingSpan(upstream)):
        return wire.command_event("crypto", cm.NewOrder(
            0, "BTC-USD", account, f"o-{i}", side, 1, price), f"o-{i}",
            metadata=telemetry.inject({}))


@contextlib.asynccontextmanager
async def _store_and_engine(tmp_path: Path, warm: bool = False,
                            ) -> AsyncIterator[tuple[StoreClient, EngineRunner, FileLease]]:
    """A store with the demo exchange's setup (bob holds BTC) and a primary engine runner
    that has emitted the setup's outputs. `warm`: the test then takes the lease from it
    (the lock file replaced, as an operator's cleanup would: FileLease.held) and holds it
    (the returned lease) until it releases it; the runner is then a warm instance."""
    config = parse(tomllib.loads(DEMO_CONFIG))
    async with running_store(tmp_path / "store") as (server, client):
        setup = (await client.append(INPUT, [
            *init_events(config.group("crypto")),
            wire.command_event("crypto", cm.Deposit(0, "alice", "USD", 10**12), "d1"),
            wire.command_event("crypto", cm.Deposit(0, "bob", "BTC", 10**9), "d2")])
        ).last_position
        holder = FileLease(tmp_path / "lease", "crypto", "holder")
        runner = EngineRunner(RunnerConfig("crypto", "a", (server.address,)),
                              FileLease(tmp_path / "lease", "crypto", "a"))
        await runner.start()
        try:
            await wait_until(lambda: runner.primary, 10, "primary")
            await wait_until(lambda: _committed(runner, setup), 10, "the setup's outputs")
            if warm:
                holder.path.unlink()
                assert await holder.try_acquire()
                await wait_until(lambda: not runner.primary, 10, "the runner demoted")
            yield client, runner, holder
        finally:
            await holder.release()
            await runner.stop()


def _processed(runner: EngineRunner, position: int) -> bool:
    return runner.consumer.position >= position


def _committed(runner: EngineRunner, position: int) -> bool:
    return runner.consumer.position >= position and runner.consumer.committed_input >= position


# ---- 1. engine: an unsampled order's outputs -----------------------------------------------

def test_an_unsampled_orders_output_append_makes_no_trace(otel: Otel,  # noqa: F811
                                                          tmp_path: Path) -> None:
    """An order its upstream did not sample: nothing of its processing is recorded (the
    CONSUMER span follows its parent, unsampled), so its output append must not be either.
    It is: the runner keeps only *recording* CONSUMER spans for _emit (runner.py
    `_batch_spans`), so the output append runs under an empty context and becomes a new
    root trace (recorded by the default parent-based sampler): an `AppendStream` trace
    with its server span and group commit that leads to no order."""
    async def body() -> tuple[SpanContext, SpanContext]:
        async with _store_and_engine(tmp_path) as (client, runner, _):
            otel.exporter.clear()
            unsampled, sampled = _upstream(False), _upstream(True)
            with trace.use_span(NonRecordingSpan(unsampled)):
                u = (await client.append(INPUT, _order(1, unsampled))).last_position
            await wait_until(lambda: _committed(runner, u), 10, "the unsampled order's outputs")
            # A sampled order after it: once its output append is exported, the unsampled
            # one's (answered before it) would have been too.
            with trace.use_span(NonRecordingSpan(sampled)):
                s = (await client.append(INPUT, _order(2, sampled))).last_position
            await wait_until(lambda: _committed(runner, s), 10, "the sampled order's outputs")

            def sampled_output_exported() -> bool:
                return any(sp.context.trace_id == sampled.trace_id
                           and sp.attributes.get("messaging.destination.name") == OUTPUT
                           and sp.kind == SpanKind.CLIENT for sp in otel.spans())
            await wait_until(sampled_output_exported, 10, "the sampled order's output append")
            return unsampled, sampled

    _unsampled, sampled = run(body, timeout_s=60)
    outputs = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.CLIENT
               and s.attributes.get("messaging.destination.name") == OUTPUT]
    strays = [s for s in outputs if s.context.trace_id != sampled.trace_id]
    assert strays == [], (
        f"{len(strays)} output append span(s) recorded for an unsampled order, each a "
        f"root of a trace of its own: parents {[s.parent for s in strays]}, "
        f"links {[len(s.links) for s in strays]}")


def test_an_output_event_never_carries_another_orders_context(otel: Otel,  # noqa: F811
                                                               tmp_path: Path) -> None:
    """Two batches, alice's order U (unsampled upstream) then bob's order S (sampled),
    emitted in one output append (here a warm instance's backlog at its takeover, which
    also puts both in one output event; the same holds for any append made while the
    previous one is in flight). The runner knows only S's CONSUMER span (U's did not
    record: `_batch_spans`), so `_traced_events` takes the one-span branch and stamps the
    output event holding U's outputs with S's CONSUMER span: the gateway's `deliver` span
    of alice's StreamExecutions message (U's reports only) then hangs in bob's order's
    trace, under S's processing. With both recorded, that event would carry the "emit"
    span linked to both batches."""
    async def body() -> tuple[list[pb.RecordedEvent], int, int, SpanContext, SpanContext]:
        # (U's order may share an output event with S's: then it must carry a context
        # that is not S's own processing, e.g. the "emit" span linked to both.)
        async with _store_and_engine(tmp_path, warm=True) as (client, runner, holder):
            unsampled, sampled = _upstream(False), _upstream(True)
            with trace.use_span(NonRecordingSpan(unsampled)):
                u = (await client.append(INPUT, _order(1, unsampled, "alice"))).last_position
            await wait_until(lambda: _processed(runner, u), 10, "U processed (warm)")
            with trace.use_span(NonRecordingSpan(sampled)):
                s = (await client.append(INPUT, _order(2, sampled))).last_position
            await wait_until(lambda: _processed(runner, s), 10, "S processed (warm)")
            assert not runner.primary
            await holder.release()  # the takeover: both batches' outputs go out now
            await wait_until(lambda: runner.primary and _committed(runner, s), 15,
                             "the outputs emitted by the new primary")
            return (await client.read(OUTPUT, start=1, limit=1000), u, s, unsampled, sampled)

    outputs, u, _s, _unsampled, sampled = run(body, timeout_s=60)
    consumer_of_s = [sp for sp in otel.spans(f"process {INPUT}")
                     if sp.context.trace_id == sampled.trace_id]
    assert consumer_of_s, "S's processing was recorded"

    def holding(position: int) -> pb.RecordedEvent:
        (event,) = [e for e in outputs
                    if (b := wire.decode_output(e.data)).first_input <= position <= b.last_input]
        return event
    out_u = holding(u)  # (the warm instance may have put both batches' outputs in one)
    tp_u = out_u.metadata.get("traceparent", "")
    assert not tp_u.startswith(f"00-{sampled.trace_id:032x}-"), (
        f"U's output event (position {out_u.position}) carries S's trace context {tp_u}: "
        f"U's execution report would be delivered in S's trace")


# ---- 2. gateway: the deliver span of an answer repeated to a retry -------------------------

def test_a_retried_orders_deliver_span_starts_within_its_request(otel: Otel,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """A client retries SubmitOrder (same client_order_id, same fields, wait): the
    gateway answers it from the outputs it already has. Its `deliver` span, the retry's
    SERVER span's child, starts at the feed's receipt of the output event
    (Received.at_ns, gateway.delivered), which was during the *first* request: the child
    starts before its parent, and the span claims the whole time between the two calls
    as the answer's way to gRPC."""
    async def body() -> None:
        async with _exchange(tmp_path) as (_, gateway):
            otel.exporter.clear()
            async with grpc.aio.insecure_channel(gateway.address) as ch:
                stub = xpb_grpc.OrderGatewayStub(ch)
                req = xpb.SubmitOrderRequest(
                    symbol="BTC-USD", account="bob", client_order_id="o-1", side=xpb.SELL,
                    qty=3, price=50_000, wait=True, wait_timeout_ms=10_000)
                first = await stub.SubmitOrder(req, timeout=15)
                assert not first.timed_out and first.reports
                await wait_until(lambda: len(otel.spans(f"deliver {OUTPUT}")) >= 1, 10,
                                 "the first answer's deliver span")
                again = await stub.SubmitOrder(req, timeout=15)
                assert again.duplicate and again.input_position == first.input_position
            await wait_until(lambda: len(otel.spans(f"deliver {OUTPUT}")) >= 2, 10,
                             "the retry's deliver span")

    run(body, timeout_s=60)
    by_id = {s.context.span_id: s for s in otel.spans()}
    waits = [s for s in otel.spans(f"deliver {OUTPUT}")
             if s.attributes.get("xdc.gateway.delivery") == "wait"]
    assert len(waits) == 2
    for deliver in waits:
        parent = by_id[deliver.parent.span_id]
        assert "SubmitOrder" in parent.name and _child_of(deliver, parent)
        assert parent.start_time <= deliver.start_time, (
            f"deliver span starts {(parent.start_time - deliver.start_time) / 1e6:.1f} ms "
            f"before its parent SubmitOrder span")


# ---- 3. store: an AppendStream message whose handler fails ---------------------------------

def test_a_failed_append_message_still_ends_its_server_span(
        otel: Otel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The AppendStream handler fails after the write (the store's own failpoint
    XDC_FAILPOINT_APPEND_FAIL_AFTER_COMMIT; any exception but a StoreError there does the
    same): `_finish_message` ends the message's SERVER span only on its normal path, so
    the span is never exported, with no ERROR, and the group commit made under it is an
    orphan whose parent never exists. The client's CLIENT span (ended as "stream reset")
    then has no server child either."""
    import store.service as service
    monkeypatch.setattr(service, "_FAIL_AFTER_COMMIT", [1])

    async def body() -> None:
        async with running_store(tmp_path / "store") as (_, client):
            with otel.producer.start_as_current_span("order"):
                r = await client.append("orders", new_event("O", metadata=telemetry.inject({})))
            assert r.last_position >= 1 and service._FAIL_AFTER_COMMIT[0] == 0

            def both_commits() -> bool:  # the first attempt's and the retry's
                return len(otel.spans("xdc.group_commit")) >= 2
            await wait_until(both_commits, 10, "the group commit spans")

    run(body, timeout_s=60)
    by_id = {s.context.span_id: s for s in otel.spans()}
    orphans = [g for g in otel.spans("xdc.group_commit")
               if g.parent is not None and g.parent.span_id not in by_id]
    servers = [s for s in otel.spans(APPEND_STREAM) if s.kind == SpanKind.SERVER]
    assert orphans == [], (
        f"{len(orphans)} group commit span(s) whose parent (the failed message's SERVER "
        f"span) was never exported; SERVER spans exported: "
        f"{[(s.status.status_code.name, s.attributes.get('xdc.append.result')) for s in servers]}")


# ---- 4. replication: a producer context read from the wrong bytes --------------------------

def test_replication_spans_take_the_producer_from_the_records_traceparent(
        otel: Otel, tmp_path: Path) -> None:  # noqa: F811
    """geo/tracing.record_contexts finds a record's producer by searching its stored bytes
    for `traceparent` + length 55, anywhere: in another metadata entry's value (stored
    before `traceparent`: the store re-serializes metadata in key order), in the type, or
    in the data of an event with no traceparent. Any client can so put its record's
    `xdc.replicate` / `xdc.replica.append` spans under a context of its choosing (another
    order's span, another trace), while the engine (which decodes the metadata) links the
    record to its real producer. The record here is one a real store accepted and stored;
    the leader's observer is fed it as the replicator ships it."""
    real, other = _upstream(True), _upstream(True)
    forged = (b"traceparent\x12\x37"
              + f"00-{other.trace_id:032x}-{other.span_id:016x}-01".encode())
    with trace.use_span(NonRecordingSpan(real)):
        md = telemetry.inject({})
    md["note"] = "forwarded " + forged.decode()  # a value before `traceparent` in key order

    async def body() -> bytes:
        async with running_store(tmp_path / "store") as (server, client):
            last = (await client.append("orders", new_event("O", metadata=md))).last_position
            (stored,) = server.node.log.read_all(last, 1, last)
            return stored

    stored = run(body, timeout_s=30)
    assert telemetry.contexts_of([records.decode(stored).metadata])[0] == [
        telemetry.span_context(md["traceparent"])]  # what the engine reads: the real one
    position = records.position_of(stored)
    leader = ReplicationObserver("l1", lambda: position, lambda: True)
    leader.on_send(Append("l1", "f1", 3, position - 1, 3,
                          (Entry(position, 3, stored),), position - 1))
    leader.observe(AppendReply("f1", "l1", 3, True, match=position), {})
    leader.stop()
    (shipped,) = otel.spans("xdc.replicate")
    assert shipped.context.trace_id == real.trace_id, (
        f"xdc.replicate of the record put in trace {shipped.context.trace_id:032x} "
        f"(the forged one's: {shipped.context.trace_id == other.trace_id}), not its "
        f"producer's {real.trace_id:032x}")
