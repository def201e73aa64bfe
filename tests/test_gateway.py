"""The order gateway against a real store (real LMDB, real gRPC) and a real gRPC gateway
on loopback. Engine outputs come from tests/support/engine_driver.py, a test driver that
runs the pure matching core over the input stream (not the real consumer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine import commands as cm
from engine import wire
from engine.constants import MAX_ID_LEN, MAX_ORDER_ID, MAX_PRICE, MAX_QTY, STP, OrderType
from engine.constants import Side as ESide
from engine.constants import TimeInForce as ETif
from engine.exchange_config import ExchangeConfig, init_events, parse
from engine.gateway import GatewayLimits, GatewayServer, OutputFeed
from geo import tiers as tiers_mod
from geo.etcd_server import free_ports
from store.client import StoreClient
from store.limits import Limits
from store.node import StoreNode
from store.process import ServeProcess
from store.server import StoreServer
from tests.support.engine_driver import EngineDriver, running_driver
from tests.support.store import run, running_store, wait_until
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc

EXCHANGE = """
[[group]]
name = "g1"
  [[group.symbol]]
  name = "BTC-USD"
  base = "BTC"
  quote = "USD"
  tick_size = 1
  lot_size = 1
  band_bps = 5000
  ref_price = 50000
  [[group.symbol]]
  name = "ETH-USD"
  base = "ETH"
  quote = "USD"
  tick_size = 1
  lot_size = 1
  band_bps = 5000
  ref_price = 3000
  [[group.deposit]]
  account = "alice"
  asset = "BTC"
  amount = 1000
  [[group.deposit]]
  account = "bob"
  asset = "USD"
  amount = 100000000
  [[group.deposit]]
  account = "carol"
  asset = "USD"
  amount = 100000000

[[group]]
name = "g2"
  [[group.symbol]]
  name = "ACME"
  base = "ACME"
  quote = "USD"
  tick_size = 5
  lot_size = 100
  band_bps = 1000
  ref_price = 10000
  [[group.deposit]]
  account = "alice"
  asset = "USD"
  amount = 100000000
"""

T = 10.0  # seconds any single wait in these tests may take before it is a failure


@dataclass
class Exchange:
    store: StoreServer
    client: StoreClient
    config: ExchangeConfig
    gateway: GatewayServer
    stub: xpb_grpc.OrderGatewayStub
    drivers: dict[str, EngineDriver]
    init_counts: dict[str, int]

    async def inputs(self, group: str) -> list[Any]:
        return await self.client.read(wire.input_stream(group), limit=10_000)

    async def step(self, *groups: str) -> None:
        for g in groups or tuple(self.drivers):
            await self.drivers[g].step()

    async def fed(self, group: str = "g1") -> None:
        """Waits until the gateway has dispatched the driver's outputs so far."""
        feed = self.gateway.service.feed
        upto = self.drivers[group].last_input
        await wait_until(lambda: feed.groups[group].last_input >= upto, T, "gateway feed")


@contextlib.asynccontextmanager
async def exchange(tmp_path: Path, limits: GatewayLimits | None = None,
                   store_limits: Limits | None = None) -> AsyncIterator[Exchange]:
    config = parse(tomllib.loads(EXCHANGE))
    async with running_store(tmp_path / "store", store_limits) as (store, client):
        counts = {}
        for g in config.groups:
            events = init_events(g)
            await client.append(wire.input_stream(g.name), events)
            counts[g.name] = len(events)
        gateway = GatewayServer(config, store.address, "127.0.0.1:0", limits)
        await gateway.start()
        await gateway.wait_admitted()
        channel = grpc.aio.insecure_channel(gateway.address)
        try:
            yield Exchange(store, client, config, gateway, xpb_grpc.OrderGatewayStub(channel),
                           {g.name: EngineDriver(client, g.name) for g in config.groups},
                           counts)
        finally:
            await channel.close()
            await gateway.stop(grace_s=0.5)


def order(cid: str, side: int, qty: int, price: int = 0, account: str = "alice",
          symbol: str = "BTC-USD", **kw: Any) -> xpb.SubmitOrderRequest:
    return xpb.SubmitOrderRequest(symbol=symbol, account=account, client_order_id=cid,
                                  side=side, qty=qty, price=price, **kw)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# ---------------------------------------------------------------------- validation

GOOD = {"symbol": "BTC-USD", "account": "alice", "client_order_id": "c1", "side": xpb.BUY,
        "qty": 1, "price": 50000}
CANCEL = {"symbol": "BTC-USD", "account": "alice", "request_id": "r1", "order_id": 1}
REPLACE = {**CANCEL, "price": 50000, "qty": 1}
INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
LONG = "x" * (MAX_ID_LEN + 1)
CID_RULE = f"client_order_id: required, 1..{MAX_ID_LEN} printable ASCII characters"

SUBMIT_REFUSALS: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
    ({"client_order_id": ""}, INV, CID_RULE),
    ({"client_order_id": LONG}, INV, CID_RULE),
    ({"client_order_id": "has space"}, INV, CID_RULE),
    ({"client_order_id": "caf\u00e9"}, INV, CID_RULE),
    ({"client_order_id": "tab\there"}, INV, CID_RULE),
    ({"account": ""}, INV, f"account: required, 1..{MAX_ID_LEN} printable ASCII"),
    ({"account": LONG}, INV, "account: required"),
    ({"symbol": ""}, INV, "symbol: required"),
    ({"symbol": "DOGE-USD"}, NF, "symbol 'DOGE-USD' is not traded on this gateway"),
    ({"side": xpb.SIDE_UNSPECIFIED}, INV, "side: required, BUY or SELL"),
    ({"side": 7}, INV, "side: required, BUY or SELL, got 7"),
    ({"qty": 0}, INV, f"qty: 1..{MAX_QTY}, got 0"),
    ({"qty": -5}, INV, f"qty: 1..{MAX_QTY}, got -5"),
    ({"qty": MAX_QTY + 1}, INV, f"qty: 1..{MAX_QTY}, got {MAX_QTY + 1}"),
    ({"price": 0}, INV, f"price: 1..{MAX_PRICE} (limit orders), got 0"),
    ({"price": -1}, INV, f"price: 1..{MAX_PRICE}"),
    ({"price": MAX_PRICE + 1}, INV, f"price: 1..{MAX_PRICE}"),
    ({"order_type": xpb.MARKET, "time_in_force": xpb.IOC, "price": 50000}, INV,
     "price: 0..0 (market orders carry no price), got 50000"),
    ({"order_type": 9}, INV, "order_type: one of LIMIT, MARKET, got 9"),
    # What the engine rejects for the order's own fields: refused, its id not used up.
    ({"order_type": xpb.MARKET, "price": 0}, INV,
     "time_in_force: a market order is IOC or FOK (unset is GTC)"),
    ({"order_type": xpb.MARKET, "time_in_force": xpb.GTC, "price": 0}, INV,
     "time_in_force: a market order is IOC or FOK"),
    ({"order_type": xpb.MARKET, "time_in_force": xpb.IOC, "price": 0, "post_only": True},
     INV, "post_only: only for a GTC limit order"),
    ({"time_in_force": xpb.IOC, "post_only": True}, INV,
     "post_only: only for a GTC limit order"),
    ({"time_in_force": xpb.FOK, "post_only": True}, INV,
     "post_only: only for a GTC limit order"),
    ({"time_in_force": 9}, INV, "time_in_force: one of GTC, IOC, FOK, got 9"),
    ({"stp": 42}, INV, "stp: one of STP_NONE, STP_CANCEL_NEWEST"),
    ({"wait": True, "wait_timeout_ms": 60_001}, INV, "wait_timeout_ms: 0..60000"),
    ({"wait_timeout_ms": 3_600_000}, INV, "wait_timeout_ms: 0..60000"),
]
CANCEL_REFUSALS: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
    ({"request_id": ""}, INV, f"request_id: required, 1..{MAX_ID_LEN} printable ASCII"),
    ({"request_id": LONG}, INV, "request_id: required"),
    ({"order_id": 0}, INV, "order_id or client_order_id: one is required"),
    ({"order_id": 0, "client_order_id": "bad id"}, INV,
     f"client_order_id: 1..{MAX_ID_LEN} printable ASCII characters without spaces"),
    ({"order_id": MAX_ORDER_ID + 1}, INV, f"order_id: 0..{MAX_ORDER_ID}"),
    ({"account": ""}, INV, "account: required"),
    ({"symbol": "NOPE"}, NF, "symbol 'NOPE'"),
    ({"wait_timeout_ms": 70_000}, INV, "wait_timeout_ms: 0..60000"),
]
REPLACE_REFUSALS: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
    *CANCEL_REFUSALS,
    ({"price": 0}, INV, f"price: 1..{MAX_PRICE}, got 0"),
    ({"price": MAX_PRICE + 1}, INV, "price: 1.."),
    ({"qty": 0}, INV, f"qty: 1..{MAX_QTY}, got 0"),
    ({"qty": MAX_QTY + 1}, INV, "qty: 1.."),
]


def test_every_refusal_names_the_field_and_appends_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path) as x:
            cases = ([(x.stub.SubmitOrder, xpb.SubmitOrderRequest(**{**GOOD, **c}), code, text)
                      for c, code, text in SUBMIT_REFUSALS]
                     + [(x.stub.CancelOrder, xpb.CancelOrderRequest(**{**CANCEL, **c}), code,
                         text) for c, code, text in CANCEL_REFUSALS]
                     + [(x.stub.ReplaceOrder, xpb.ReplaceOrderRequest(**{**REPLACE, **c}), code,
                         text) for c, code, text in REPLACE_REFUSALS])
            for rpc, request, code, text in cases:
                err = await refused(rpc(request))
                where = f"{type(request).__name__} {request}"
                assert err.code() == code, (where, err.details())
                assert text in (err.details() or ""), (where, err.details())
            # Streams refuse before anything is opened.
            err = await refused(x.stub.StreamExecutions(
                xpb.StreamExecutionsRequest(account="")).read())
            assert err.code() == INV and "account: required" in (err.details() or "")
            err = await refused(x.stub.StreamBook(xpb.StreamBookRequest(symbol="NOPE")).read())
            assert err.code() == NF and "symbol 'NOPE'" in (err.details() or "")
            err = await refused(x.stub.StreamBook(
                xpb.StreamBookRequest(symbol="ACME", depth=1001)).read())
            assert err.code() == INV and "depth: 1..1000" in (err.details() or "")
            for g, n in x.init_counts.items():
                assert len(await x.inputs(g)) == n, f"group {g}: a refused request was appended"
            # A valid request goes through on the same gateway (the refusals were not luck).
            ok = await x.stub.SubmitOrder(xpb.SubmitOrderRequest(**GOOD))
            assert ok.input_position > 0 and len(await x.inputs("g1")) == x.init_counts["g1"] + 1
    run(body)


def test_the_gateway_refuses_exactly_the_flag_combinations_the_engine_rejects(
        tmp_path: Path) -> None:
    """Order type, time in force and post-only: every combination the engine's table of
    valid ones (book._NEW_FLAGS) lacks is refused by the gateway, naming the field, and
    every other one is appended (a refusal would turn away a valid order)."""
    from engine.book import _NEW_FLAGS
    from engine.gateway import ORDER_TYPES, TIFS

    async def body() -> None:
        async with exchange(tmp_path) as x:
            appended = 0
            for k, (otype, tif, post_only) in enumerate(
                    (o, t, p) for o in ORDER_TYPES for t in TIFS for p in (False, True)):
                request = xpb.SubmitOrderRequest(**{
                    **GOOD, "client_order_id": f"f{k}", "order_type": otype,
                    "time_in_force": tif, "post_only": post_only,
                    "price": 0 if ORDER_TYPES[otype] == OrderType.MARKET else 50000})
                valid = (ESide.BUY, ORDER_TYPES[otype], TIFS[tif], STP.NONE,
                         post_only) in _NEW_FLAGS
                if valid:
                    assert (await x.stub.SubmitOrder(request)).input_position > 0, request
                    appended += 1
                    continue
                err = await refused(x.stub.SubmitOrder(request))
                assert err.code() == INV and (err.details() or "").startswith(
                    ("time_in_force: ", "post_only: ")), (request, err.details())
            assert 0 < appended < 16
            assert len(await x.inputs("g1")) == x.init_counts["g1"] + appended
    run(body)


# ---------------------------------------------------------------------- idempotency

def test_retry_is_a_duplicate_and_a_changed_retry_is_already_exists(tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path) as x:
            req = order("c-1", xpb.SELL, 5, 50100, time_in_force=xpb.IOC, stp=xpb.STP_NONE,
                        post_only=False)
            first = await x.stub.SubmitOrder(req)
            again = await x.stub.SubmitOrder(req)
            assert not first.duplicate and again.duplicate
            assert again.input_position == first.input_position
            changed = order("c-1", xpb.SELL, 6, 50100, time_in_force=xpb.IOC, stp=xpb.STP_NONE)
            err = await refused(x.stub.SubmitOrder(changed))
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS
            assert ("client_order_id 'c-1' of account 'alice' was already used for a "
                    "different request") in (err.details() or "")
            # The same client order id of another account is another order.
            other = await x.stub.SubmitOrder(order("c-1", xpb.BUY, 1, 50000, account="bob"))
            assert not other.duplicate and other.input_position > first.input_position

            cancel = xpb.CancelOrderRequest(symbol="BTC-USD", account="alice", request_id="r-1",
                                            client_order_id="c-1")
            c1, c2 = await x.stub.CancelOrder(cancel), await x.stub.CancelOrder(cancel)
            assert c2.duplicate and c2.input_position == c1.input_position
            cancel.order_id = 7
            err = await refused(x.stub.CancelOrder(cancel))
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "request_id 'r-1' of account 'alice'" in (err.details() or "")
            replace = xpb.ReplaceOrderRequest(symbol="BTC-USD", account="alice",
                                              request_id="r-2", order_id=1, price=50000, qty=2)
            p1, p2 = await x.stub.ReplaceOrder(replace), await x.stub.ReplaceOrder(replace)
            assert p2.duplicate and p2.input_position == p1.input_position

            # What landed: one event per request, enums mapped to the engine's constants.
            events = (await x.inputs("g1"))[x.init_counts["g1"]:]
            assert [e.position for e in events] == [first.input_position, other.input_position,
                                                    c1.input_position, p1.input_position]
            cmds = [wire.decode_input(e.data, 0) for e in events]
            assert cmds[0] == cm.NewOrder(0, "BTC-USD", "alice", "c-1", ESide.SELL, 5, 50100,
                                          OrderType.LIMIT, ETif.IOC, False, STP.NONE)
            # UNSPECIFIED takes the defaults: LIMIT, GTC, STP cancel newest.
            assert cmds[1] == cm.NewOrder(0, "BTC-USD", "bob", "c-1", ESide.BUY, 1, 50000,
                                          OrderType.LIMIT, ETif.GTC, False, STP.CANCEL_NEWEST)
            assert cmds[2] == cm.CancelOrder(0, "BTC-USD", "alice", 0, "c-1")
            assert cmds[3] == cm.ReplaceOrder(0, "BTC-USD", "alice", 50000, 2, 1, "")
            assert [e.type for e in events] == ["NewOrder", "NewOrder", "CancelOrder",
                                                "ReplaceOrder"]
    run(body)


def test_a_request_id_names_one_cancel_or_replace(tmp_path: Path) -> None:
    """A cancel and a replace share the account's request ids: reusing one for the other
    kind is ALREADY_EXISTS naming request_id, and nothing is appended (before, both were
    appended: their event ids derived from the kind); retries keep their original answer."""
    async def body() -> None:
        async with exchange(tmp_path) as x:
            ref = {"symbol": "BTC-USD", "account": "alice", "client_order_id": "c-1"}
            cancel = xpb.CancelOrderRequest(request_id="r-1", **ref)
            c1 = await x.stub.CancelOrder(cancel)
            err = await refused(x.stub.ReplaceOrder(xpb.ReplaceOrderRequest(
                request_id="r-1", price=50000, qty=2, **ref)))
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
            assert ("request_id 'r-1' of account 'alice' was already used for a "
                    "different request") in (err.details() or "")
            replace = xpb.ReplaceOrderRequest(request_id="r-2", price=50000, qty=2, **ref)
            p1 = await x.stub.ReplaceOrder(replace)
            err = await refused(x.stub.CancelOrder(xpb.CancelOrderRequest(
                request_id="r-2", **ref)))
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
            assert ("request_id 'r-2' of account 'alice' was already used for a "
                    "different request") in (err.details() or "")
            again = [await x.stub.CancelOrder(cancel), await x.stub.ReplaceOrder(replace)]
            assert [(r.duplicate, r.input_position) for r in again] == [
                (True, c1.input_position), (True, p1.input_position)]
            # Another account's request ids are its own.
            bob = await x.stub.ReplaceOrder(xpb.ReplaceOrderRequest(
                symbol="BTC-USD", account="bob", request_id="r-1", order_id=1, price=50000,
                qty=1))
            assert not bob.duplicate
            events = (await x.inputs("g1"))[x.init_counts["g1"]:]
            assert [(e.position, e.type) for e in events] == [
                (c1.input_position, "CancelOrder"), (p1.input_position, "ReplaceOrder"),
                (bob.input_position, "ReplaceOrder")]
    run(body)


def test_orders_are_shed_while_the_store_is_down_and_admitted_in_tier_order_after(
        tmp_path: Path) -> None:
    """The gateway sheds by the store's state, as the store does: with no store, orders
    are refused before they run (tier, reason, retry hint); once a store answers the
    tiers come back in order, orders pass; when it goes away they are shed again."""
    async def body() -> None:
        address = f"127.0.0.1:{free_ports(1)[0]}"  # nobody listens on it
        config = parse(tomllib.loads(EXCHANGE))
        client = StoreClient(address, timeout_s=5.0, attempt_timeout_s=0.5)
        gateway = GatewayServer(config, address, client=client)
        await gateway.start()
        store: StoreServer | None = None
        try:
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                stub = xpb_grpc.OrderGatewayStub(channel)
                err = await refused(stub.SubmitOrder(order("c1", xpb.BUY, 1, 50000)))
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                assert "tier 'order-entry'" in (err.details() or ""), err
                md = dict(err.trailing_metadata() or ())
                assert md["xdc-tier"] == "order-entry" and int(md["xdc-retry-after-ms"]) > 0
                assert md["xdc-shed-reason"] in ("starting", "failover"), md
                store = StoreServer(StoreNode(tmp_path / "store"), address)
                await store.start()
                admitted: list[str] = []

                def progress() -> bool:
                    for t in gateway.tiers.machine.states:
                        if t.admitted and t.name not in admitted:
                            admitted.append(t.name)
                    return len(admitted) == len(gateway.tiers.machine.states)
                await wait_until(progress, 20, "every tier admitted")
                assert admitted == [t.name for t in gateway.tiers.spec.tiers], admitted
                # The store's client may still be in its reconnect backoff: the gateway
                # passes that refusal through; an idempotent retry then lands.
                await wait_until(lambda: _submits(stub, "c1"), 10, "an accepted order")
                await store.stop(grace_s=0.5)
                store = None
                await wait_until(lambda: not gateway.tiers.machine.states[2].admitted, 10,
                                 "order entry shed again")
                err = await refused(stub.SubmitOrder(order("c2", xpb.BUY, 1, 50000)))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert dict(err.trailing_metadata() or ())["xdc-shed-reason"] == "failover"
                # Shed as in a failover, but said as it is: no store target answers.
                assert f"is shed: the store does not answer ({address}: " in \
                    (err.details() or ""), err
                assert "failover in progress" not in (err.details() or ""), err
                status = gateway.tiers.status()
                assert status.cause == "failover"
                assert f"the store does not answer ({address}: " in status.tiers[2].detail
        finally:
            await gateway.stop(grace_s=0.5)
            await client.close()
            if store is not None:
                await store.stop(grace_s=0.5)
    run(body)


async def _submits(stub: xpb_grpc.OrderGatewayStub, cid: str) -> bool:
    try:
        r = await stub.SubmitOrder(order(cid, xpb.BUY, 1, 50000))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
    return r.input_position > 0


# ---------------------------------------------------------------------- wait

def kinds(resp: xpb.OrderResponse) -> list[str]:
    return [r.kind for r in resp.reports]


def test_wait_answers_with_the_engines_outputs(tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path) as x:
            await x.step()  # the engine applies the exchange's symbols and deposits
            async with running_driver(x.drivers["g1"]):
                sell = await x.stub.SubmitOrder(order("s1", xpb.SELL, 5, 50000, wait=True))
                assert not sell.timed_out and kinds(sell) == ["ACCEPTED", "BOOK"]
                level = sell.reports[1]  # the ask level it made, on its side of the book
                assert (level.side, level.price, level.qty) == (xpb.SELL, 50000, 5)
                acc = sell.reports[0]
                assert (acc.account, acc.client_order_id, acc.side, acc.price, acc.qty,
                        acc.group, acc.input_position, acc.output_index) == (
                    "alice", "s1", xpb.SELL, 50000, 5, "g1", sell.input_position, 0)
                assert acc.ts_ns > 0  # the store's timestamp of the input record

                buy = await x.stub.SubmitOrder(order("b1", xpb.BUY, 3, 50000, account="bob",
                                                     wait=True))
                assert kinds(buy)[:2] == ["ACCEPTED", "FILL"]
                fill = buy.reports[1]
                assert (fill.maker_account, fill.taker_account, fill.price, fill.qty,
                        fill.side, fill.maker_order_id) == ("alice", "bob", 50000, 3, xpb.BUY,
                                                            acc.order_id)
                assert [r.output_index for r in buy.reports] == list(range(len(buy.reports)))

                rep = await x.stub.ReplaceOrder(xpb.ReplaceOrderRequest(
                    symbol="BTC-USD", account="alice", request_id="r1", client_order_id="s1",
                    price=50010, qty=2, wait=True))
                assert kinds(rep)[0] == "REPLACED" and rep.reports[0].price == 50010
                cancel = await x.stub.CancelOrder(xpb.CancelOrderRequest(
                    symbol="BTC-USD", account="alice", request_id="r2", order_id=acc.order_id,
                    wait=True))
                assert kinds(cancel)[0] == "CANCELLED" and cancel.reports[0].qty == 2
                # The engine's deterministic rejects come back as reports too.
                bad = await x.stub.SubmitOrder(order("s2", xpb.SELL, 1, 99999, wait=True))
                assert kinds(bad) == ["REJECTED"]
                assert bad.reports[0].reason == "PRICE_OUTSIDE_BAND"
                # Its detail names the band (the engine's output leaves it empty): the
                # reference is the last trade's price, here the configured one's.
                assert bad.reports[0].detail == \
                    "price band 25000..75000 (reference price 50000, 5000 bps)"
                # A trade at 60000 moves the reference, and the band with it.
                await x.stub.SubmitOrder(order("s3", xpb.SELL, 1, 60000, wait=True))
                moved = await x.stub.SubmitOrder(order("b2", xpb.BUY, 1, 60000,
                                                       account="bob", wait=True))
                assert kinds(moved)[:2] == ["ACCEPTED", "FILL"]
                low = await x.stub.SubmitOrder(order("s4", xpb.SELL, 1, 29999, wait=True))
                assert (low.reports[0].reason, low.reports[0].detail) == (
                    "PRICE_OUTSIDE_BAND",
                    "price band 30000..90000 (reference price 60000, 5000 bps)")
                # A retry with wait gets the same answer (from the gateway's cache).
                retry = await x.stub.SubmitOrder(order("b1", xpb.BUY, 3, 50000, account="bob",
                                                       wait=True))
                assert retry.duplicate and list(retry.reports) == list(buy.reports)
    run(body)


def test_outputs_of_an_unknown_kind_are_left_out_and_the_rest_delivered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An engine at a newer output version than the gateway knows emits an event of a
    kind it cannot decode: the gateway leaves that one event out (logged once per kind)
    and reports the others of the batch, each with its own output index. Before, the
    whole output event (every input's outputs in it) was skipped: the waiter timed out
    and streams never saw its fills."""
    future = bytes([250]) + bytes(8)  # a tag no output version has (yet)
    assert not wire.known((future[0], ""))
    # Every kind the engine emits is known here: one missing would be left out silently.
    from engine.events import EVENT_CLASSES
    assert all(wire.known((tag, "")) for tag in EVENT_CLASSES)

    async def body() -> None:
        async with exchange(tmp_path) as x:
            await x.step()
            driver = x.drivers["g1"]
            driver.splice = lambda events: [events[0], future, *events[1:]]
            async with running_driver(driver):
                sell = await x.stub.SubmitOrder(order("s1", xpb.SELL, 5, 50000, wait=True))
                assert not sell.timed_out and kinds(sell) == ["ACCEPTED", "BOOK"]
                assert [r.output_index for r in sell.reports] == [0, 2]
                driver.splice = None
                buy = await x.stub.SubmitOrder(order("b1", xpb.BUY, 3, 50000, account="bob",
                                                     wait=True))
                assert kinds(buy)[:2] == ["ACCEPTED", "FILL"]
            stream = x.stub.StreamExecutions(xpb.StreamExecutionsRequest(
                account="alice", after_position=sell.input_position - 1))
            reports = [r for _ in range(2) for r in (await next_msg(stream)).reports]
            stream.cancel()
            assert [(r.kind, r.output_index) for r in reports] == [("ACCEPTED", 0),
                                                                    ("FILL", 1)]
            assert x.gateway.service.feed.unknown_outputs == {250: 1}
    with caplog.at_level(logging.ERROR, logger="xdc"):
        run(body)
    unknown = [r for r in caplog.records if "unknown to this gateway" in r.getMessage()]
    assert len(unknown) == 1 and "[250]" in unknown[0].getMessage()


def test_an_undecodable_output_event_counts_no_unknown_kind() -> None:
    """An output event skipped as undecodable (here: an unknown kind, then a truncated
    event) leaves the count of unknown kinds as it was, so the first one that is taken
    still logs its kind; that one counts it."""
    feed = OutputFeed(parse(tomllib.loads(EXCHANGE)), None,  # type: ignore[arg-type]
                      GatewayLimits())
    group = feed.groups["g1"]
    future = bytes([250]) + bytes(8)

    def event(position: int, *events: bytes) -> pb.RecordedEvent:
        blob = wire.input_blob(position, list(events))
        data = wire.OutputBatch(position, position, bytes(32), (blob,)).encode()
        return pb.RecordedEvent(stream=group.stream, position=100 + position, data=data)

    feed.on_output_event(event(5, future, bytes([1])))  # an Accepted cut short
    assert not feed.unknown_outputs and group.last_input == 0
    feed.on_output_event(event(6, future))
    assert feed.unknown_outputs == {250: 1} and group.last_input == 6


def test_an_execution_stream_is_offered_only_batches_after_its_position() -> None:
    """A stream attached to a feed that is behind it (a gateway replaying the log after
    it started) is offered only the batches after its position: the replay of those
    before it would fill its queue (the default holds 1,024) and cut it off as a slow
    consumer."""
    from engine import events as ev
    feed = OutputFeed(parse(tomllib.loads(EXCHANGE)), None,  # type: ignore[arg-type]
                      GatewayLimits(stream_queue=2))
    group = feed.groups["g1"]
    outlet = feed.open_outlet()
    outlet.after = 104
    feed.exec_outlets["alice"] = {outlet}
    for position in range(1, 7):  # one Accepted of alice per input, at 100 + input
        raw = (ev.ACCEPTED, "BTC-USD", position, "alice", f"c{position}", ESide.BUY,
               OrderType.LIMIT, ETif.GTC, 50000, 1, 1)
        data = wire.OutputBatch(position, position, bytes(32),
                                (wire.outputs_blob(position, [raw]),)).encode()
        feed.on_output_event(pb.RecordedEvent(stream=group.stream, position=100 + position,
                                              data=data))
    got = []
    while not outlet.queue.empty():
        got.append(outlet.queue.get_nowait().position)  # type: ignore[attr-defined]
    assert got == [105, 106] and not outlet.overflowed


def test_wait_times_out_without_an_engine_and_late_outputs_are_found(tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path, GatewayLimits(recent_inputs=2)) as x:
            await x.step()
            slow = await x.stub.SubmitOrder(order("w1", xpb.SELL, 1, 50000, wait=True,
                                                  wait_timeout_ms=200))
            assert slow.timed_out and not slow.reports and slow.input_position > 0
            # Outputs land before the retry's waiter exists: served from the cache.
            await x.step()
            await x.fed()
            late = await x.stub.SubmitOrder(order("w1", xpb.SELL, 1, 50000, wait=True))
            assert late.duplicate and not late.timed_out and kinds(late) == ["ACCEPTED", "BOOK"]
            # Push w1 out of the two-input cache: its outputs are read from the store.
            for i in range(4):
                await x.stub.SubmitOrder(order(f"f{i}", xpb.SELL, 1, 50001 + i))
                await x.step()
            await x.fed()
            assert ("g1", late.input_position) not in x.gateway.service.feed.recent
            old = await x.stub.SubmitOrder(order("w1", xpb.SELL, 1, 50000, wait=True))
            assert old.duplicate and list(old.reports) == list(late.reports)
            # A group whose engine is not running answers timed_out, not an error.
            acme = await x.stub.SubmitOrder(order("a1", xpb.BUY, 100, 10000, symbol="ACME",
                                                  wait=True, wait_timeout_ms=100))
            assert acme.timed_out
            assert not x.gateway.service.feed.groups["g2"].waiters  # cleaned up
    run(body)


def test_a_band_reject_read_back_from_the_store_names_its_band_as_live(
        tmp_path: Path) -> None:
    """A PRICE_OUTSIDE_BAND reject names the band it was checked against on every path:
    live (a wait, a live StreamExecutions), and read back from the store (a wait whose
    outputs left the gateway's cache, a resumed StreamExecutions), whatever trades moved
    the band since. Before, its detail was empty when read back from the store."""
    def band(lo: int, hi: int, ref: int) -> str:
        return f"price band {lo}..{hi} (reference price {ref}, 5000 bps)"

    async def body() -> None:
        async with exchange(tmp_path, GatewayLimits(recent_inputs=2)) as x:
            feed = x.gateway.service.feed
            await x.step()
            await x.fed()
            await x.fed("g2")
            live = x.stub.StreamExecutions(xpb.StreamExecutionsRequest(account="alice"))
            await wait_until(lambda: "alice" in feed.exec_outlets, T, "alice's stream")

            async def submit(*requests: xpb.SubmitOrderRequest) -> list[int]:
                positions = [(await x.stub.SubmitOrder(r)).input_position for r in requests]
                await x.step("g1")
                await x.fed()
                return positions

            # Rejected at the configured reference (the walk back ends at the
            # SymbolConfig), at a trade's, and after the last trade (the feed's band).
            first = await submit(order("x1", xpb.SELL, 1, 99999))
            await submit(order("t1", xpb.SELL, 1, 60000),
                         order("t2", xpb.BUY, 1, 60000, account="bob"))
            second = await submit(order("x2", xpb.SELL, 1, 29999))
            await submit(order("t3", xpb.SELL, 1, 55000),
                         order("t4", xpb.BUY, 1, 55000, account="bob"))
            third = await submit(order("x3", xpb.SELL, 1, 20000))
            for i in range(3):  # out of the two-input cache; they rest, the band stays
                await submit(order(f"f{i}", xpb.SELL, 1, 70000 + i))
            expected = {"x1": band(25000, 75000, 50000), "x2": band(30000, 90000, 60000),
                        "x3": band(27500, 82500, 55000)}
            for position in (*first, *second, *third):
                assert ("g1", position) not in feed.recent

            # Live, as the engine's outputs went by.
            seen: dict[str, xpb.ExecutionReport] = {}
            while len(seen) < 3:
                for r in (await next_msg(live)).reports:
                    if r.kind == "REJECTED":
                        seen[r.client_order_id] = r
            live.cancel()
            assert {k: r.detail for k, r in seen.items()} == expected
            # A retry with wait: the outputs read back from the store.
            for cid, price in (("x1", 99999), ("x2", 29999), ("x3", 20000)):
                again = await x.stub.SubmitOrder(order(cid, xpb.SELL, 1, price, wait=True))
                assert again.duplicate and list(again.reports) == [seen[cid]], again
            # A resumed stream: its catch-up reads the outputs from the store.
            resumed = x.stub.StreamExecutions(xpb.StreamExecutionsRequest(
                account="alice", after_position=1))
            read_back: dict[str, xpb.ExecutionReport] = {}
            while len(read_back) < 3:
                for r in (await next_msg(resumed)).reports:
                    if r.kind == "REJECTED":
                        read_back[r.client_order_id] = r
            resumed.cancel()
            assert read_back == seen
            await wait_until(lambda: feed.outlets == 0, T, "streams closed")
    run(body)


def test_the_gateway_follows_the_price_band_by_the_engines_rule() -> None:
    """The band the gateway follows from the outputs (engine.book.band_after, the one
    function it calls) is the engine's own after every command, through trades, band
    changes and market orders, and it is the band the engine checked each
    PRICE_OUTSIDE_BAND reject against."""
    import random

    from engine import events as ev
    from engine.book import Engine, band_after, band_edges
    from engine.constants import Reject

    rng = random.Random(5)
    engine = Engine()
    cmds: list[object] = [cm.AddSymbol(1, "S", "B", "Q", 5, 1, 400, 10_000),
                          cm.Deposit(1, "a", "Q", 10**12), cm.Deposit(1, "a", "B", 10**8),
                          cm.Deposit(1, "b", "Q", 10**12), cm.Deposit(1, "b", "B", 10**8)]
    for i in range(3_000):
        if i % 500 == 250:  # the band's width changes; the reference stays the trades'
            cmds.append(cm.UpdateSymbol(2, "S", rng.choice((100, 400, 1000)), 10_000,
                                        1_000, 10**6))
            continue
        account, side = rng.choice("ab"), rng.choice((ESide.BUY, ESide.SELL))
        if rng.random() < 0.1:
            cmds.append(cm.NewOrder(2, "S", account, "", side, rng.randint(1, 5), 0,
                                    OrderType.MARKET, ETif.IOC, False, STP.NONE))
        else:
            price = 5 * rng.randint(1_700, 2_300)  # 8500..11500: some outside the band
            cmds.append(cm.NewOrder(2, "S", account, "", side, rng.randint(1, 5), price,
                                    OrderType.LIMIT, ETif.GTC, False, STP.NONE))
    followed = None
    rejects = moves = 0
    for c in cmds:
        before = followed
        out: list[tuple] = []
        engine.process(c, out)
        for raw in out:
            if raw[0] == ev.REJECTED and raw[6] == Reject.PRICE_OUTSIDE_BAND:
                assert before is not None
                lo, hi = band_edges(before[1], before[0])
                assert not lo <= c.price <= hi  # type: ignore[attr-defined]
                rejects += 1
            followed = band_after("S", followed, raw)
        book = engine.books["S"]
        assert followed == (book.band_bps, book.ref)
        moves += followed != before
    assert rejects > 50 and moves > 100


def test_waiters_and_streams_are_bounded(tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path, GatewayLimits(max_waiters=1, max_streams=1)) as x:
            service = x.gateway.service
            # No engine runs for g2: the first waiter holds the only slot.
            first = x.stub.SubmitOrder(order("a1", xpb.BUY, 100, 10000, symbol="ACME",
                                             wait=True, wait_timeout_ms=60_000))
            await wait_until(lambda: service.waiting == 1, T, "the first waiter")
            err = await refused(x.stub.SubmitOrder(order("a2", xpb.BUY, 100, 10000,
                                                         symbol="ACME", wait=True)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many requests waiting for outputs (limit 1)" in (err.details() or "")
            # a1 only (a waiter is registered before its order's append is committed:
            # wait for a1 to land, then nothing else may be there)
            async def landed() -> bool:
                return len(await x.inputs("g2")) > x.init_counts["g2"]
            await wait_until(landed, T, "a1's input")
            inputs = (await x.inputs("g2"))[x.init_counts["g2"]:]
            assert [wire.decode_input(e.data, 0).client_order_id for e in inputs] == ["a1"]
            # Without wait the same order goes through.
            assert (await x.stub.SubmitOrder(order("a2", xpb.BUY, 100, 10000,
                                                   symbol="ACME"))).input_position
            first.cancel()  # the gateway releases the slot when the call goes away
            await wait_until(lambda: service.waiting == 0, T, "the slot released")
            assert not service.feed.groups["g2"].waiters

            one = x.stub.StreamBook(xpb.StreamBookRequest(symbol="ACME"))
            assert (await next_msg(one)).snapshot
            err = await refused(x.stub.StreamExecutions(
                xpb.StreamExecutionsRequest(account="alice")).read())
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many streaming clients (limit 1)" in (err.details() or "")
            one.cancel()
            await wait_until(lambda: service.feed.outlets == 0, T, "the stream closed")
    run(body)


# The default tiers, but with StreamExecutions in tier 0 (never shed): a started gateway
# serves it at once, while its feed still replays the log (with the default tiers it is
# admitted only after the order-entry tier settles, which a small log's replay beats; a
# gateway lagging under load shows the same window).
EXECUTIONS_FIRST = tiers_mod.loads(
    tiers_mod.DEFAULT_PATH.read_text()
    .replace('"gateway.submit", "gateway.cancel"]', '"gateway.submit"]')
    .replace('"replication", "append"]', '"replication", "append", "gateway.cancel"]'))
assert (EXECUTIONS_FIRST.resolve("gateway.cancel"), EXECUTIONS_FIRST.resolve("book")) == (
    0, tiers_mod.load().resolve("book"))


def _sell(cid: str, price: int = 50000) -> object:
    # alice's IOC sells against an empty bid side: ACCEPTED + CANCELLED, both hers.
    return wire.command_event("g1", cm.NewOrder(0, "BTC-USD", "alice", cid, ESide.SELL, 1,
                                                price, OrderType.LIMIT, ETif.IOC, False,
                                                STP.NONE), cid)


@pytest.mark.parametrize("stream_queue", [100_000, GatewayLimits().stream_queue])
def test_a_resume_past_a_lagging_gateways_feed_loses_no_execution(
        tmp_path: Path, stream_queue: int) -> None:
    """A client resumes StreamExecutions with the position of the last batch it saw,
    e.g. from another gateway, or from this one before it restarted. When this gateway's
    output feed was still behind that position, the handler asked the store where its log
    ends (_check_reachable: an await) and only then attached to the feed: every output
    event the feed dispatched meanwhile, past the client's position, was never sent to it
    (a gap in its executions, with no error: found by helper-80's review). And once
    attached, the feed's replay of the account's earlier batches filled the stream's
    queue (with the default queue, more than 1,024 of them cut it off as too slow)."""
    n_events = 1500  # output events of alice in the log: the fresh gateway replays them
    n_streams = 40
    rounds = 5

    async def body() -> None:
        async with exchange(tmp_path) as x:
            await x.step()
            for k in range(0, n_events, 250):
                await x.client.append(wire.input_stream("g1"),
                                      [_sell(f"s{i}") for i in range(k, k + 250)])
                await x.drivers["g1"].step(split=True)  # one output event per input
            gaps: list[tuple[int, int, int]] = []
            for attempt in range(rounds):  # the window is short: a few fresh gateways
                gaps = await resume_on_a_fresh_gateway(x, f"marker{attempt}")
                if gaps:
                    break
            assert not gaps, (
                f"{len(gaps)} of {n_streams} resumed streams skipped output events "
                f"(after_position, expected first, got first): {gaps[:5]}")

    async def resume_on_a_fresh_gateway(x: Exchange, marker: str
                                        ) -> list[tuple[int, int, int]]:
        outputs = await x.client.read(wire.output_stream("g1"), limit=100_000)
        truth = [e.position for e in outputs]  # each holds alice's reports
        # A fresh gateway (a restart, or another gateway the client fails over to): its
        # feed replays the output log from the start.
        second = GatewayServer(x.config, x.store.address, "127.0.0.1:0",
                               GatewayLimits(stream_queue=stream_queue),
                               tiers_spec=EXECUTIONS_FIRST)
        await second.start()
        try:
            async with grpc.aio.insecure_channel(second.address) as channel:
                stub = xpb_grpc.OrderGatewayStub(channel)
                # Clients resume at positions spread over the log as the gateway starts
                # (their previous gateway went away).
                picks = [truth[len(truth) * (j + 1) // (n_streams + 2)]
                         for j in range(n_streams)]
                calls = [stub.StreamExecutions(xpb.StreamExecutionsRequest(
                    account="alice", after_position=p)) for p in picks]

                async def first_after(call: Any) -> int:
                    msg = await asyncio.wait_for(call.read(), T)
                    assert msg is not grpc.aio.EOF
                    return int(msg.position)

                try:
                    reads = asyncio.gather(*(first_after(c) for c in calls))
                    # Then one more output event: a stream that lost the ones after its
                    # position gets this one first, instead of waiting for good.
                    feed = second.service.feed
                    await wait_until(lambda: feed.position >= truth[-1]
                                     and feed.outlets == n_streams, T, "streams open")
                    await x.client.append(wire.input_stream("g1"), [_sell(marker)])
                    await x.drivers["g1"].step()
                    got = await reads
                finally:
                    for c in calls:
                        c.cancel()
                want = [truth[truth.index(p) + 1] for p in picks]
                return [(p, w, g) for p, w, g in zip(picks, want, got, strict=True) if g != w]
        finally:
            await second.stop(grace_s=0.5)

    run(body, timeout_s=120)


def test_a_catch_up_holds_a_stream_slot_and_bad_resumes_are_refused_clearly(
        tmp_path: Path) -> None:
    """A StreamExecutions that catches up from the store takes its slot first: with the
    one slot held, another resume is refused before it is sent any history (before, each
    replayed its history on a subscription of its own, unbounded, and was refused only
    once live). A resume from past the log's end is OUT_OF_RANGE (before, it stayed
    silent for good), and a store refusing the catch-up's subscription is reported with
    the store's status (before, UNKNOWN)."""
    async def body() -> None:
        async with exchange(tmp_path, GatewayLimits(max_streams=1)) as x:
            for i in range(3):
                await x.stub.SubmitOrder(order(f"s{i}", xpb.SELL, 1, 50000 + i))
            await x.step()
            await x.fed()
            first = x.stub.StreamExecutions(
                xpb.StreamExecutionsRequest(account="alice", after_position=1))
            assert (await next_msg(first)).reports  # history, then live
            second = x.stub.StreamExecutions(
                xpb.StreamExecutionsRequest(account="alice", after_position=1))
            err = await refused(second.read())
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many streaming clients (limit 1)" in (err.details() or "")
            first.cancel()
            feed = x.gateway.service.feed
            await wait_until(lambda: feed.outlets == 0, T, "the stream closed")
            far = 10**9
            err = await refused(x.stub.StreamExecutions(
                xpb.StreamExecutionsRequest(account="alice", after_position=far)).read())
            assert err.code() == grpc.StatusCode.OUT_OF_RANGE
            assert f"after_position: {far} is past the end of the log" in (err.details() or "")
            assert feed.outlets == 0
        # The store serves one subscription: the gateway's feed has it.
        async with exchange(tmp_path / "one", store_limits=Limits(max_subscriptions=1)) as x:
            await x.stub.SubmitOrder(order("s1", xpb.SELL, 1, 50000))
            await x.step()
            await x.fed()
            err = await refused(x.stub.StreamExecutions(
                xpb.StreamExecutionsRequest(account="alice", after_position=1)).read())
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "catch-up from the store failed" in (err.details() or "")
            assert "resume with after_position=1" in (err.details() or "")
    run(body)


def test_wait_answers_before_the_callers_deadline(tmp_path: Path) -> None:
    """A wait longer than the caller's deadline ends just before it, with the order's
    position and timed_out: before, the caller got DEADLINE_EXCEEDED and never learnt
    that its order landed."""
    async def body() -> None:
        async with exchange(tmp_path) as x:
            loop = asyncio.get_running_loop()
            started = loop.time()
            # No engine runs for g2.
            r = await x.stub.SubmitOrder(order("d1", xpb.BUY, 100, 10000, symbol="ACME",
                                               wait=True, wait_timeout_ms=30_000),
                                         timeout=1.0)
            assert r.timed_out and r.input_position > 0
            assert loop.time() - started < 1.0
            inputs = await x.inputs("g2")
            assert inputs[-1].position == r.input_position
    run(body)


# ---------------------------------------------------------------------- StreamExecutions

async def next_msg(call: Any) -> Any:
    msg = await asyncio.wait_for(call.read(), T)
    assert msg is not grpc.aio.EOF, "stream ended"
    return msg


def test_stream_executions_filters_by_account_and_resumes(tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path) as x:
            feed = x.gateway.service.feed
            await x.step()
            await x.fed()
            await x.fed("g2")
            live = x.stub.StreamExecutions(xpb.StreamExecutionsRequest(account="alice"))
            await wait_until(lambda: "alice" in feed.exec_outlets, T, "alice's stream")
            await x.stub.SubmitOrder(order("a1", xpb.SELL, 5, 50000))
            await x.stub.SubmitOrder(order("c1", xpb.BUY, 1, 40000, account="carol"))
            await x.stub.SubmitOrder(order("b1", xpb.BUY, 2, 50000, account="bob"))
            await x.stub.SubmitOrder(order("a2", xpb.BUY, 100, 10000, symbol="ACME"))
            await x.step("g1")
            await x.step("g2")
            got = [await next_msg(live) for _ in range(2)]
            reports = [r for b in got for r in b.reports]
            assert {r.group for r in reports} == {"g1", "g2"}
            for r in reports:
                assert "alice" in (r.account, r.maker_account, r.taker_account), r
            assert "FILL" in [r.kind for r in reports]
            assert all(r.account != "carol" for r in reports)
            assert got[0].position < got[1].position  # one batch per output event
            live.cancel()

            # Resume after the first batch: the rest comes from the store, then live.
            resumed = x.stub.StreamExecutions(xpb.StreamExecutionsRequest(
                account="alice", after_position=got[0].position))
            assert await next_msg(resumed) == got[1]
            await x.stub.CancelOrder(xpb.CancelOrderRequest(
                symbol="BTC-USD", account="alice", request_id="r1", client_order_id="a1"))
            await x.step("g1")
            tail = await next_msg(resumed)
            assert tail.position > got[1].position
            assert tail.reports[0].kind == "CANCELLED"
            resumed.cancel()

            # From the start of the log: every alice report, deposits included.
            everything = x.stub.StreamExecutions(xpb.StreamExecutionsRequest(
                account="alice", after_position=1))
            batches = [await next_msg(everything) for _ in range(5)]
            assert [b.position for b in batches] == sorted(b.position for b in batches)
            assert batches[0].reports[0].kind == "BALANCE"
            assert batches[-1] == tail
            everything.cancel()
            await wait_until(lambda: feed.outlets == 0, T, "streams closed")
    run(body)


def test_a_slow_execution_consumer_is_cut_off_and_can_resume(tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path, GatewayLimits(stream_queue=2)) as x:
            feed = x.gateway.service.feed
            await x.step()
            await x.fed()
            call = x.stub.StreamExecutions(xpb.StreamExecutionsRequest(account="alice"))
            await wait_until(lambda: "alice" in feed.exec_outlets, T, "alice's stream")
            for i in range(5):
                await x.stub.SubmitOrder(order(f"s{i}", xpb.SELL, 1, 50000 + i))
            # Five output events committed together reach the feed in one message: more
            # than the client's queue of two before its handler can run.
            await x.drivers["g1"].step(split=True)
            first = await next_msg(call)
            err = await refused(call.read())
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"resume with after_position={first.position}" in (err.details() or "")
            resumed = x.stub.StreamExecutions(xpb.StreamExecutionsRequest(
                account="alice", after_position=first.position))
            rest = [await next_msg(resumed) for _ in range(4)]
            cids = [b.reports[0].client_order_id for b in [first, *rest]]
            assert cids == [f"s{i}" for i in range(5)]
            resumed.cancel()
    run(body)


def test_a_resumed_execution_stream_goes_live_under_steady_load(tmp_path: Path) -> None:
    """A resumed StreamExecutions hands over from its catch-up to the live feed within a
    bounded number of messages while the exchange keeps trading, and delivers every
    output event once, in order. The consumer reads one message per output event the
    exchange commits, and its handler runs at most an HTTP/2 window ahead of it: before,
    the catch-up switched only once it had seen everything the feed had, which a backlog
    that never shrinks never allows, so it chased the feed for good (holding a store
    subscription of its own)."""
    per_step, history = 100, 30  # ~14 kB a message: the history is several windows

    async def body() -> None:
        async with exchange(tmp_path) as x:
            feed = x.gateway.service.feed
            sent = 0

            async def trade() -> None:
                # alice's IOC sells, none filled: two reports each, her balance untouched.
                nonlocal sent
                cids = [f"s{sent + i}" for i in range(per_step)]
                sent += per_step
                await x.client.append(wire.input_stream("g1"), [wire.command_event(
                    "g1", cm.NewOrder(0, "BTC-USD", "alice", cid, ESide.SELL, 1, 50000,
                                      OrderType.LIMIT, ETif.IOC, False, STP.NONE), cid)
                    for cid in cids])
                await x.step("g1")
                await x.fed()

            await x.step("g1")  # the exchange's setup: alice's deposit is her first report
            for _ in range(history):
                await trade()
            # No BDP probing: the window stays at its initial size, which the messages of
            # the history exceed many times over.
            async with grpc.aio.insecure_channel(
                    x.gateway.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
                call = xpb_grpc.OrderGatewayStub(channel).StreamExecutions(
                    xpb.StreamExecutionsRequest(account="alice", after_position=1))
                got = []
                for _ in range(4 * history):
                    if "alice" in feed.exec_outlets:
                        break
                    await trade()  # the feed has it before the consumer reads on
                    got.append(await next_msg(call))
                assert "alice" in feed.exec_outlets, (
                    f"still catching up after {len(got)} messages read")
                outputs = await x.client.read(wire.output_stream("g1"), limit=10_000)
                while not got or got[-1].position < outputs[-1].position:
                    got.append(await next_msg(call))
                assert [b.position for b in got] == [e.position for e in outputs]
                ids = [r.client_order_id for b in got for r in b.reports if r.kind == "ACCEPTED"]
                assert ids == [f"s{i}" for i in range(sent)]
                call.cancel()
            await wait_until(lambda: feed.outlets == 0, T, "the stream closed")
    run(body)


# ---------------------------------------------------------------------- StreamBook

def levels(msg: xpb.BookMessage) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    return [(lv.price, lv.qty) for lv in msg.bids], [(lv.price, lv.qty) for lv in msg.asks]


def test_stream_book_snapshot_then_updates(tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path) as x:
            await x.step()
            for cid, side, qty, price, acct in [("a1", xpb.SELL, 3, 50010, "alice"),
                                                ("a2", xpb.SELL, 4, 50020, "alice"),
                                                ("a3", xpb.SELL, 5, 50030, "alice"),
                                                ("b1", xpb.BUY, 2, 49990, "bob"),
                                                ("b2", xpb.BUY, 1, 49980, "carol"),
                                                ("b3", xpb.BUY, 6, 49990, "carol")]:
                await x.stub.SubmitOrder(order(cid, side, qty, price, account=acct))
            await x.stub.SubmitOrder(order("e1", xpb.BUY, 7, 2000, account="bob",
                                           symbol="ETH-USD"))
            await x.step()
            await x.fed()
            call = x.stub.StreamBook(xpb.StreamBookRequest(symbol="BTC-USD", depth=2))
            snap = await next_msg(call)
            assert snap.snapshot and snap.symbol == "BTC-USD"
            assert snap.input_position == x.drivers["g1"].last_input
            assert levels(snap) == ([(49990, 8), (49980, 1)], [(50010, 3), (50020, 4)])
            full = x.stub.StreamBook(xpb.StreamBookRequest(symbol="BTC-USD"))  # depth 20
            assert levels(await next_msg(full))[1] == [(50010, 3), (50020, 4), (50030, 5)]
            full.cancel()

            # A buy that takes the best ask and rests the rest at 50010. The stream shows
            # two levels a side: the bid at 49980 leaves that window (qty 0), the ask at
            # 50030 enters it (before, it was never sent: the client's book lost a level).
            book = {side: dict(lv) for side, lv in zip("ba", levels(snap), strict=True)}

            def apply(update: xpb.BookMessage) -> tuple[list[tuple[int, int]], ...]:
                for side, lv in zip("ba", levels(update), strict=True):
                    for price, qty in lv:
                        if qty:
                            book[side][price] = qty
                        else:
                            del book[side][price]  # only levels it shows are removed
                return (sorted(book["b"].items(), reverse=True), sorted(book["a"].items()))
            taker = await x.stub.SubmitOrder(order("b4", xpb.BUY, 5, 50010, account="bob"))
            await x.step()
            update = await next_msg(call)
            assert not update.snapshot and update.input_position == taker.input_position
            assert sorted(update.bids, key=lambda lv: lv.price) == [
                xpb.BookLevel(price=49980, qty=0), xpb.BookLevel(price=50010, qty=2)]
            assert sorted(update.asks, key=lambda lv: lv.price) == [
                xpb.BookLevel(price=50010, qty=0), xpb.BookLevel(price=50030, qty=5)]
            assert apply(update) == ([(50010, 2), (49990, 8)], [(50020, 4), (50030, 5)])
            # Other symbols' changes do not reach this stream, nor changes below its
            # window (carol's bid at 49980): the next update is the one at 49990.
            await x.stub.SubmitOrder(order("e2", xpb.BUY, 1, 2001, account="bob",
                                           symbol="ETH-USD"))
            await x.stub.CancelOrder(xpb.CancelOrderRequest(
                symbol="BTC-USD", account="carol", request_id="r1", client_order_id="b2"))
            await x.step()
            await x.stub.CancelOrder(xpb.CancelOrderRequest(
                symbol="BTC-USD", account="carol", request_id="r2", client_order_id="b3"))
            await x.step()
            update = await next_msg(call)
            assert levels(update) == ([(49990, 2)], [])
            apply(update)
            # The best ask goes: the third one comes into view.
            await x.stub.CancelOrder(xpb.CancelOrderRequest(
                symbol="BTC-USD", account="alice", request_id="r3", client_order_id="a2"))
            await x.step()
            assert apply(await next_msg(call)) == ([(50010, 2), (49990, 2)], [(50030, 5)])
            call.cancel()
    run(body)


def test_a_new_gateway_rebuilds_books_from_the_log_and_live_means_from_now(
        tmp_path: Path) -> None:
    async def body() -> None:
        async with exchange(tmp_path) as x:
            await x.step()
            await x.stub.SubmitOrder(order("a1", xpb.SELL, 3, 50010))
            await x.stub.SubmitOrder(order("b1", xpb.BUY, 2, 49990, account="bob"))
            await x.step()
            await x.fed()
            second = GatewayServer(x.config, x.store.address)
            await second.start()
            await second.wait_admitted()
            try:
                async with grpc.aio.insecure_channel(second.address) as channel:
                    stub = xpb_grpc.OrderGatewayStub(channel)
                    book = stub.StreamBook(xpb.StreamBookRequest(symbol="BTC-USD"))
                    snap = await next_msg(book)
                    assert levels(snap) == ([(49990, 2)], [(50010, 3)])
                    assert snap.input_position == x.drivers["g1"].last_input
                    book.cancel()
                    live = stub.StreamExecutions(xpb.StreamExecutionsRequest(account="alice"))
                    feed = second.service.feed
                    await wait_until(lambda: "alice" in feed.exec_outlets, T, "alice's stream")
                    sent = await stub.SubmitOrder(order("a2", xpb.SELL, 1, 50020))
                    await x.step()
                    first = await next_msg(live)  # not alice's deposit or a1 from the log
                    assert [r.client_order_id for r in first.reports] == ["a2"]
                    assert first.reports[0].input_position == sent.input_position
                    live.cancel()
            finally:
                await second.stop(grace_s=0.5)
    run(body)


# ---------------------------------------------------------------------- CLI and processes

def gateway_process(store: str, exchange: str) -> ServeProcess:
    """`xdc gateway` as a child process (ready line read, killed by PID)."""
    return ServeProcess(command=["gateway", "--store", store, "--listen", "127.0.0.1:0",
                                 "--exchange", exchange])


def write_exchange(tmp_path: Path) -> Path:
    path = tmp_path / "exchange.toml"
    path.write_text(EXCHANGE)
    return path


async def xdc(*args: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xdc.cli", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_cli_exchange_init_gateway_order_and_book(tmp_path: Path) -> None:
    exchange_file = write_exchange(tmp_path)

    async def body(store: ServeProcess, gateway: ServeProcess) -> None:
        gw = ("--gateway", gateway.address)
        async with StoreClient(store.address) as client:
            driver = EngineDriver(client, "g1")
            await driver.step()
            rc, out, err = await xdc("order", "submit", *gw, "--symbol", "BTC-USD",
                                     "--account", "alice", "--client-order-id", "s1",
                                     "--side", "sell", "--qty", "5", "--price", "50000")
            assert rc == 0, err
            sell = json.loads(out)
            assert sell["input_position"] > 0 and sell["duplicate"] is False
            rc, out, _ = await xdc("order", "submit", *gw, "--symbol", "BTC-USD", "--account",
                                   "alice", "--client-order-id", "s1", "--side", "sell",
                                   "--qty", "5", "--price", "50000")
            assert json.loads(out)["duplicate"] is True
            await driver.step()

            follow = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "xdc.cli", "book", "BTC-USD", "--follow", *gw,
                stdout=asyncio.subprocess.PIPE)
            try:
                assert follow.stdout is not None
                snap = json.loads(await asyncio.wait_for(follow.stdout.readline(), T))
                assert snap["snapshot"] is True
                assert snap["asks"] == [{"price": 50000, "qty": 5}] and snap["bids"] == []

                async with running_driver(driver):
                    rc, out, err = await xdc(
                        "order", "submit", *gw, "--symbol", "BTC-USD", "--account", "bob",
                        "--client-order-id", "b1", "--side", "buy", "--qty", "2", "--price",
                        "50000", "--wait")
                    assert rc == 0, err
                    buy = json.loads(out)
                    assert buy["timed_out"] is False
                    assert [r["kind"] for r in buy["reports"]][:2] == ["ACCEPTED", "FILL"]
                    assert buy["reports"][1]["maker_account"] == "alice"
                    assert buy["reports"][0]["side"] == "BUY"
                    update = json.loads(await asyncio.wait_for(follow.stdout.readline(), T))
                    assert update["snapshot"] is False
                    assert update["asks"] == [{"price": 50000, "qty": 3}]

                    rc, out, err = await xdc(
                        "order", "replace", *gw, "--symbol", "BTC-USD", "--account", "alice",
                        "--request-id", "r1", "--client-order-id", "s1", "--price", "50005",
                        "--qty", "3", "--wait")
                    assert rc == 0, err
                    assert json.loads(out)["reports"][0]["kind"] == "REPLACED"
                    rc, out, err = await xdc(
                        "order", "cancel", *gw, "--symbol", "BTC-USD", "--account", "alice",
                        "--request-id", "r2", "--client-order-id", "s1", "--wait")
                    assert rc == 0, err
                    cancelled = json.loads(out)["reports"][0]
                    assert (cancelled["kind"], cancelled["qty"]) == ("CANCELLED", 3)
            finally:
                follow.kill()  # by PID
                await follow.wait()

            rc, out, err = await xdc("book", "BTC-USD", *gw)
            assert rc == 0, err
            book = json.loads(out)
            assert (book["bids"], book["asks"]) == ([], [])
            assert book["input_position"] == driver.last_input

            rc, out, err = await xdc("order", "submit", *gw, "--symbol", "BTC-USD",
                                     "--account", "alice", "--client-order-id", "z",
                                     "--side", "sell", "--qty", "0", "--price", "1")
            assert rc == 1 and "INVALID_ARGUMENT: qty: 1.." in err
            rc, out, err = await xdc("book", "NOPE", *gw)
            assert rc == 1 and "NOT_FOUND" in err

    with ServeProcess(str(tmp_path / "store")) as store:
        init = ("exchange", "init", "--store", store.address, "--exchange", str(exchange_file))

        async def init_twice() -> None:
            rc, out, err = await xdc(*init)
            assert rc == 0, err
            lines = [json.loads(line) for line in out.splitlines()]
            assert [(r["group"], r["appended"], r["duplicates"]) for r in lines] == [
                ("g1", 5, 0), ("g2", 2, 0)]
            rc, out, err = await xdc(*init)
            assert rc == 0, err
            assert [json.loads(line)["duplicates"] for line in out.splitlines()] == [5, 2]
            rc, out, _ = await xdc("exchange", "example")
            assert rc == 0 and parse(tomllib.loads(out)).group_of["ACME"] == "equities"
        run(init_twice)

        gateway = gateway_process(store.address, str(exchange_file))
        with gateway:
            run(lambda: body(store, gateway))
            gateway.signal(signal.SIGTERM)
            assert gateway.proc is not None and gateway.proc.wait(20) == 0
            assert gateway.proc.stdout is not None
            assert b'"stopped"' in gateway.proc.stdout.read()


def test_gateway_cli_refuses_a_bad_exchange_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[group]]\nname = 'g 1'\n")

    async def body() -> None:
        rc, _, err = await xdc("gateway", "--store", "127.0.0.1:1", "--listen", "127.0.0.1:0",
                               "--exchange", str(bad))
        assert rc == 2 and "group[0].name" in err
        rc, _, err = await xdc("exchange", "init", "--store", "127.0.0.1:1", "--exchange",
                               str(tmp_path / "missing.toml"))
        assert rc == 2 and "missing.toml" in err
    run(body)


