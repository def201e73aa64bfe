"""Seeded order workloads as input events, and the exactly-once check of a group's
outputs: shared by the real-process engine tests (tests/support/exchange.py), the DR
drills (geo/drill.py) and anything else that drives an engine group through the store.

* ``command_events(group, commands, tag)``: input events for a list of commands, each
  with an id derived from ``tag`` and its index (a retry with the same id is idempotent),
  and a poison input (a NewOrder whose bytes are not a command) every ``poison_every``.
* ``order_stream(seed)``: an endless, seeded stream of commands (setup first) over a small
  universe: resting and marketable orders, cancels and replaces of recent orders by client
  order id, and a few requests the engine must reject. Self-contained: it never looks at
  an engine, so it can run for as long as a drill lasts.
* ``gateway_load(group, seed, tag)``: the same commands split by who sends them: the
  orders, cancels and replaces as ``OrderGateway`` requests (``GatewayOrder``, with the
  id of the input event the gateway will append), setup and poison inputs as raw events
  (only an admin appends those); ``exchange_toml(group)`` is the exchange file the
  gateway routes the workload's symbols by;
* ``check_exactly_once(client, group)``: the output stream holds, exactly once and in
  order, what a single failure-free instance computes from the input stream.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from engine import events as ev
from engine import wire
from engine.commands import AddSymbol, CancelOrder, Deposit, NewOrder, ReplaceOrder
from engine.constants import OrderType, Side, TimeInForce
from engine.consumer import Consumer
from store.client import StoreClient
from store.validation import ALL
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb

# symbol: (base, quote, tick, lot, band_bps, ref price)
SYMBOLS = {"DRA-USD": ("DRA", "USD", 5, 1, 3000, 1000),
           "DRB-USD": ("DRB", "USD", 1, 2, 2000, 200)}
ACCOUNTS = tuple(f"acct{i}" for i in range(8))
RECENT = 256  # client order ids remembered per stream for cancels and replaces
READ_PAGE = 50_000  # events per read request (the store caps one read at 100k)


def setup_commands() -> list[object]:
    cmds: list[object] = [AddSymbol(0, s, b, q, tick, lot, bps, ref)
                          for s, (b, q, tick, lot, bps, ref) in SYMBOLS.items()]
    for a in ACCOUNTS:
        cmds += [Deposit(0, a, "USD", 10**9), Deposit(0, a, "DRA", 10**6),
                 Deposit(0, a, "DRB", 10**6)]
    return cmds


def order_stream(seed: int) -> Iterator[object]:
    """Setup, then commands forever (every ``ts_ns`` is 0: input commands carry no time of
    their own). The same seed gives the same commands."""
    r = random.Random(seed)
    yield from setup_commands()
    recent: deque[tuple[str, str, str]] = deque(maxlen=RECENT)  # (symbol, account, cid)
    i = 0
    while True:
        i += 1
        sym = r.choice(list(SYMBOLS))
        _b, _q, tick, lot, _bps, ref = SYMBOLS[sym]
        acct = r.choice(ACCOUNTS)
        x = r.random()
        if x < 0.70 or not recent:
            cid = f"s{seed}o{i}"
            side = r.choice((Side.BUY, Side.SELL))
            qty = lot * r.randint(1, 5)
            if r.random() < 0.1:
                yield NewOrder(0, sym, acct, cid, side, qty, 0, OrderType.MARKET,
                               TimeInForce.IOC)
                continue
            price = ref + tick * r.randint(-6, 6)
            tif = TimeInForce.IOC if r.random() < 0.15 else TimeInForce.GTC
            if r.random() < 0.03:
                price += 1 if tick > 1 else 0  # off tick: rejected (tick 5)
            if r.random() < 0.02:
                acct = "nobody"  # unknown account: rejected
            recent.append((sym, acct, cid))
            yield NewOrder(0, sym, acct, cid, side, qty, price, OrderType.LIMIT, tif)
        elif x < 0.90:
            s, a, cid = recent[r.randrange(len(recent))]
            yield CancelOrder(0, s, a, 0, cid)
        else:
            s, a, cid = recent[r.randrange(len(recent))]
            t, lt, rf = SYMBOLS[s][2], SYMBOLS[s][3], SYMBOLS[s][5]
            yield ReplaceOrder(0, s, a, rf + t * r.randint(-6, 6), lt * r.randint(1, 5), 0, cid)


def command_events(group: str, commands: Iterable[object], tag: str,
                   poison_every: int = 0) -> Iterator[pb.ProposedEvent]:
    """Input events for ``commands``; the i-th has the idempotency key ``tag:i``. With
    ``poison_every``, a poison input follows every ``poison_every``-th command."""
    for i, cmd in enumerate(commands):
        yield _raw_event(group, cmd, tag, i)
        if poison_every and i % poison_every == poison_every - 1:
            yield _poison_event(tag, i)


def _raw_event(group: str, cmd: object, tag: str, i: int) -> pb.ProposedEvent:
    return wire.command_event(group, cmd._replace(ts_ns=0),  # type: ignore[attr-defined]
                              f"{tag}:{i}")


def _poison_event(tag: str, i: int) -> pb.ProposedEvent:
    return pb.ProposedEvent(id=wire.derived_id("poison", tag, i), type="NewOrder",
                            content_type=wire.COMMAND_CONTENT_TYPE, data=b"\x01poison")


@dataclass(frozen=True, slots=True)
class GatewayOrder:
    """One OrderGateway call: `method` ("SubmitOrder", "CancelOrder", "ReplaceOrder"),
    its request, and the id of the input event the gateway appends for it."""

    method: str
    request: xpb.SubmitOrderRequest | xpb.CancelOrderRequest | xpb.ReplaceOrderRequest
    event_id: bytes


_SIDES = {Side.BUY: xpb.BUY, Side.SELL: xpb.SELL}
_TIFS = {TimeInForce.GTC: xpb.GTC, TimeInForce.IOC: xpb.IOC, TimeInForce.FOK: xpb.FOK}
_TYPES = {OrderType.LIMIT: xpb.LIMIT, OrderType.MARKET: xpb.MARKET}


def gateway_order(group: str, cmd: object, request_id: str) -> GatewayOrder:
    """The gateway request that appends `cmd` (a NewOrder, CancelOrder or ReplaceOrder
    with default self-trade prevention); `request_id` names a cancel or a replace."""
    if isinstance(cmd, NewOrder):
        req: Any = xpb.SubmitOrderRequest(
            symbol=cmd.symbol, account=cmd.account, client_order_id=cmd.client_order_id,
            side=_SIDES[cmd.side], order_type=_TYPES[cmd.order_type],
            time_in_force=_TIFS[cmd.tif], price=cmd.price, qty=cmd.qty)
        method, key = "SubmitOrder", cmd.client_order_id
    elif isinstance(cmd, CancelOrder):
        req = xpb.CancelOrderRequest(symbol=cmd.symbol, account=cmd.account,
                                     request_id=request_id,
                                     client_order_id=cmd.client_order_id)
        method, key = "CancelOrder", request_id
    elif isinstance(cmd, ReplaceOrder):
        req = xpb.ReplaceOrderRequest(symbol=cmd.symbol, account=cmd.account,
                                      request_id=request_id,
                                      client_order_id=cmd.client_order_id,
                                      price=cmd.price, qty=cmd.qty)
        method, key = "ReplaceOrder", request_id
    else:
        raise TypeError(f"{type(cmd).__name__} is not sent through the gateway")
    return GatewayOrder(method, req, wire.input_id(group, cmd, key))


def gateway_load(group: str, seed: int, tag: str, poison_every: int = 0
                 ) -> Iterator[GatewayOrder | pb.ProposedEvent]:
    """``order_stream(seed)`` as gateway requests, with the setup commands and (every
    ``poison_every``-th command) a poison input as raw events (ids as command_events')."""
    for i, cmd in enumerate(order_stream(seed)):
        if isinstance(cmd, (NewOrder, CancelOrder, ReplaceOrder)):
            yield gateway_order(group, cmd, f"{tag}r{i}")
        else:
            yield _raw_event(group, cmd, tag, i)
        if poison_every and i % poison_every == poison_every - 1:
            yield _poison_event(tag, i)


def exchange_toml(group: str) -> str:
    """The exchange file of the workload's symbols in `group` (no deposits: the setup
    commands carry them)."""
    lines = ["[[group]]", f'name = "{group}"']
    for name, (base, quote, tick, lot, bps, ref) in SYMBOLS.items():
        lines += ["", "  [[group.symbol]]", f'  name = "{name}"', f'  base = "{base}"',
                  f'  quote = "{quote}"', f"  tick_size = {tick}", f"  lot_size = {lot}",
                  f"  band_bps = {bps}", f"  ref_price = {ref}"]
    return "\n".join(lines) + "\n"


async def read_stream(client: StoreClient, stream: str) -> list[pb.RecordedEvent]:
    """Every event of ``stream`` (none when it does not exist)."""
    out: list[pb.RecordedEvent] = []
    try:
        while True:  # pages of READ_PAGE: a read is bounded by the store's max_read_count
            page: list[pb.RecordedEvent] = []
            # $all pages by global position, a stream by its revision.
            start = (out[-1].position if stream == ALL else out[-1].revision) + 1 \
                if out else 0
            async for batch in client.read_batches(stream, start=start, limit=READ_PAGE,
                                                   timeout_s=60):
                page.extend(batch.events)
            out.extend(page)
            if len(page) < READ_PAGE:
                return out
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise


async def outputs_through(client: StoreClient, group: str) -> int:
    """The last input whose outputs are committed (0 when the group has no output)."""
    try:
        tail = await client.read(wire.output_stream(group), backwards=True, limit=16)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    # The last output batch: events of other types may follow it.
    return next((int(e.metadata["last_input"]) for e in tail if e.type == wire.OUTPUT_TYPE),
                0)


class ExactlyOnceViolation(AssertionError):
    """The committed outputs are not exactly the failure-free outputs of the inputs."""


async def check_exactly_once(client: StoreClient, group: str
                             ) -> tuple[list[pb.RecordedEvent], list[pb.RecordedEvent]]:
    """The output stream holds, exactly once and in order, the outputs a single instance
    computes from the input stream with no failure; every order has one outcome. Returns
    (inputs, outputs); raises ExactlyOnceViolation."""
    inputs = await read_stream(client, wire.input_stream(group))
    # Events of other types in the output stream hold no outputs (the engine skips them).
    outputs = [e for e in await read_stream(client, wire.output_stream(group))
               if e.type == wire.OUTPUT_TYPE]
    ref = Consumer(group)
    for e in inputs:
        ref.on_input(e.position, e.type, e.data, e.timestamp_ns)
    expected = [p.blob for p in ref.pending]
    committed = [b for o in outputs for b in wire.decode_output(o.data).blobs]
    if len(committed) != len(expected):
        raise ExactlyOnceViolation(f"{len(committed)} output blobs committed, "
                                   f"{len(expected)} expected")
    if committed != expected:
        first = next(i for i, (a, b) in enumerate(zip(committed, expected, strict=True))
                     if a != b)
        raise ExactlyOnceViolation(f"output blob {first} differs from the reference")
    by_input = dict(wire.blob_outputs(b) for b in committed)
    for e in inputs:
        if e.type == "NewOrder":
            outcomes = [r for r in by_input.get(e.position, [])
                        if r[0] in (ev.ACCEPTED, ev.REJECTED, ev.REJECTED_V2)]
            if len(outcomes) != 1:
                raise ExactlyOnceViolation(f"order at position {e.position} has "
                                           f"{len(outcomes)} outcomes")
    return inputs, outputs
