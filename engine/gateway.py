"""The order gateway (DESIGN §5): the `OrderGateway` gRPC service of exchange.proto.

A request is validated, routed by the exchange file (symbol -> engine group) and
appended as ONE input command event to ``exchange.<group>.input``; the gateway never
touches a book. The event id derives from (group, kind, account, client order id or
request id) (``wire.command_event``), so the store's idempotency makes a retry land
once: the same fields give the original input position with ``duplicate=true``, other
fields under the same id are ALREADY_EXISTS. A cancel and a replace share the account's
request ids (``wire.input_id``): one whose request_id names an input of the other kind is
ALREADY_EXISTS too.

What comes back is read from the engines' output streams through one store subscription
(``OutputFeed``): one filtered subscription over the configured groups' output streams
(stream names checked exactly, since the store filters by prefix) rather than one per
group, so every output event is dispatched in global log order. That order is what lets a
``StreamExecutions`` client resume after the position of the last batch it saw without a
gap, whichever groups its account trades in. The feed serves:

* ``wait=true``: the outputs of the request's input position. Waiters are registered in
  the same event loop step that checks the group's progress, and outputs of recent inputs
  are kept in a bounded cache, so outputs that arrive before the append's answer are not
  missed; outputs that have left the cache are looked up in the output stream (binary
  search by revision).
* ``StreamExecutions``: reports of one account, one message per output event.
* ``StreamBook``: L2 books per symbol, built from every ``BookUpdate`` in the output
  streams from the start of the log. Future work: start from an engine snapshot instead
  of replaying all outputs, which a long-lived exchange will need.

Outputs of every output format version (engine/events.py) are rendered alike
(``wire.report``): from version 2 on, cancel and reject reports carry side and price.

Traced, an order's trace ends with its answer: the engine's output events carry the
``traceparent`` of the span their outputs were made in, and each message to a client (a
waiting request's answer, a live ``StreamExecutions`` message) is a CONSUMER span
``deliver <output stream>`` from the feed's receipt of the output event to the message
handed to gRPC (``deliver_span``): one per message, never per report. With tracing off
the feed keeps nothing for them and streams are offered the plain message.

Every queue has a limit: waiting requests (``max_waiters``), the recent-outputs cache
(``recent_inputs``) and each streaming client's queue (``stream_queue``); a client that
reads slower than the exchange trades is cut off with RESOURCE_EXHAUSTED rather than
buffered without bound.

Public API: ``GatewayLimits``, ``OrderGatewayService(config, client, limits)``,
``GatewayServer(config, store_targets, listen, limits)`` with ``start``/``stop``/
``address``, and ``serve_gateway(store_targets, listen, exchange_path)`` behind
``xdc gateway``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import math
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind

from engine import commands as cm
from engine import events as ev
from engine import wire
from engine.book import band_after, band_edges
from engine.codec import CodecError
from engine.constants import (
    MAX_ID_LEN,
    MAX_ORDER_ID,
    MAX_PRICE,
    MAX_QTY,
    STP,
    OrderType,
    Reject,
    Side,
    TimeInForce,
)
from engine.exchange_config import ExchangeConfig, ExchangeConfigError, load
from engine.matching_health import EngineDirectory, MatchingWatch
from geo.tier_supervisor import gateway_supervisor
from geo.tiers import TierSpec
from store import auth
from store.client import AppendError, CaughtUp, Checkpoint, StoreClient
from store.errors import show
from store.server import listen_on, new_server, run_until_signalled
from store.service import BadRequest
from xdc import telemetry
from xdc.tls import Tls
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc

log = logging.getLogger("xdc.gateway")

SERVICE = "xdc.v1.OrderGateway"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# A resumed StreamExecutions catches up from the store in at most this many rounds, each
# to the feed's position when it began (each round replays what was committed during the
# one before, less and less for a consumer faster than the exchange); the last is buffered
# by the live feed meanwhile (StreamExecutions).
CATCH_UP_ROUNDS = 3
# Output events per read when the gateway looks for the price band in force at an input
# read back from the store (OutputFeed.band_before), newest first, and the most reads it
# makes for one band: past them the reject is shown without its band (a symbol idle for
# that long costs a client's request no more than this).
BAND_READ_EVENTS = 8
BAND_MAX_READS = 64
# A request with a deadline is answered this long before it: an order that landed is
# reported (its position, timed_out) rather than lost in the caller's DEADLINE_EXCEEDED.
WAIT_DEADLINE_MARGIN_S = 0.05
# Output events per group whose receipt a waiting request's `deliver` span may still start
# from, when traced (OutputFeed.delivered): a waiter looks for its output among the last
# ones received, newest first.
MAX_TRACED_OUTPUTS = 1_024

# Proto enums -> engine constants. UNSPECIFIED takes the documented default.
SIDES = {xpb.BUY: Side.BUY, xpb.SELL: Side.SELL}
SIDE_PB = {Side.BUY: xpb.BUY, Side.SELL: xpb.SELL}
ORDER_TYPES = {xpb.ORDER_TYPE_UNSPECIFIED: OrderType.LIMIT, xpb.LIMIT: OrderType.LIMIT,
               xpb.MARKET: OrderType.MARKET}
TIFS = {xpb.TIF_UNSPECIFIED: TimeInForce.GTC, xpb.GTC: TimeInForce.GTC,
        xpb.IOC: TimeInForce.IOC, xpb.FOK: TimeInForce.FOK}
STPS = {xpb.STP_UNSPECIFIED: STP.CANCEL_NEWEST, xpb.STP_NONE: STP.NONE,
        xpb.STP_CANCEL_NEWEST: STP.CANCEL_NEWEST, xpb.STP_CANCEL_OLDEST: STP.CANCEL_OLDEST,
        xpb.STP_CANCEL_BOTH: STP.CANCEL_BOTH,
        xpb.STP_DECREMENT_AND_CANCEL: STP.DECREMENT_AND_CANCEL}


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    default_wait_ms: int = 5_000  # wait_timeout_ms 0
    max_wait_ms: int = 60_000  # larger wait_timeout_ms is INVALID_ARGUMENT
    max_waiters: int = 10_000  # requests waiting for outputs at once
    recent_inputs: int = 20_000  # inputs whose outputs are cached for late waiters
    stream_queue: int = 1_024  # messages queued per streaming client before it is cut off
    max_streams: int = 1_000  # StreamExecutions + StreamBook clients at once
    default_book_depth: int = 20
    max_book_depth: int = 1_000
    # Live streams (StreamBook, StreamExecutions from now) wait this long for the output
    # feed to read the log up to its end after a start; then UNAVAILABLE.
    catch_up_wait_s: float = 10.0

    def __post_init__(self) -> None:
        """Refuses limits that cannot work, naming the field and the rule: a ValueError,
        not an assert (gone under ``python -O``), since operators and embedders set
        them."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float":  # seconds (annotations are strings here)
                # NaN fails every comparison, so `> 0` alone would let it through; an
                # endless wait is no limit.
                if not (type(value) in (int, float) and 0 < value < math.inf):
                    raise ValueError(f"GatewayLimits.{f.name} ({value!r}) must be a finite "
                                     f"number of seconds > 0")
            elif type(value) is not int or value <= 0:  # bool is no count
                raise ValueError(f"GatewayLimits.{f.name} ({value!r}) must be an integer "
                                 f"> 0")
        for high, low in (("max_wait_ms", "default_wait_ms"),
                          ("max_book_depth", "default_book_depth")):
            if getattr(self, high) < getattr(self, low):
                raise ValueError(f"GatewayLimits.{high} ({getattr(self, high)}) must be >= "
                                 f"{low} ({getattr(self, low)})")


def _before_deadline(context: grpc.aio.ServicerContext, seconds: float) -> float:
    """`seconds`, cut to end WAIT_DEADLINE_MARGIN_S before the caller's deadline (if
    it set one): the answer must reach it before, not at it."""
    remaining = context.time_remaining()
    return seconds if remaining is None else min(seconds, remaining - WAIT_DEADLINE_MARGIN_S)


class Refused(Exception):
    """A request the gateway answers with a gRPC status, before or instead of appending."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------- validation

def check_id(name: str, value: str, required: bool = True) -> str:
    """Identifiers end up in the canonical command encoding: the engine accepts printable
    ASCII without spaces, so the gateway refuses anything else before it is appended."""
    if not value and not required:
        return ""
    if not (0 < len(value) <= MAX_ID_LEN and value.isascii() and value.isprintable()
            and " " not in value):
        need = "required, " if required else ""
        raise Refused(INVALID, f"{name}: {need}1..{MAX_ID_LEN} printable ASCII characters "
                               f"without spaces, got {show(value)}")
    return value


def check_int(name: str, value: int, lo: int, hi: int, why: str = "") -> int:
    if not lo <= value <= hi:
        raise Refused(INVALID, f"{name}: {lo}..{hi}{why}, got {value}")
    return value


def check_enum(name: str, value: int, table: dict[int, int], enum: object) -> int:
    if value not in table:
        names = [enum.Name(k) for k in table if k]  # type: ignore[attr-defined]
        raise Refused(INVALID, f"{name}: one of {', '.join(names)}, got {value}")
    return table[value]


def check_order_ref(order_id: int, client_order_id: str) -> tuple[int, str]:
    check_int("order_id", order_id, 0, MAX_ORDER_ID)
    cid = check_id("client_order_id", client_order_id, required=False)
    if not order_id and not cid:
        raise Refused(INVALID, "order_id or client_order_id: one is required to name the order")
    return order_id, cid


# ---------------------------------------------------------------------- the output feed

class Received(NamedTuple):
    """An output event as the feed received it, kept when traced: what the `deliver`
    spans of its outputs start from and point at."""

    first_input: int
    last_input: int
    position: int  # the output event's, in the log
    # Its `traceparent`: the engine's span its outputs were made in (engine/runner.py).
    producer: SpanContext | None
    at_ns: int  # when the feed received it


@dataclass(slots=True)
class GroupProgress:
    name: str
    stream: str
    last_input: int = 0  # the outputs of every input up to here have been dispatched
    evicted_upto: int = 0  # outputs of inputs up to here may have left the recent cache
    # Waiting requests by input position; the heap holds the positions, oldest first.
    waiters: dict[int, list[asyncio.Future[list[tuple] | None]]] = field(default_factory=dict)
    heap: list[int] = field(default_factory=list)
    # The last output events received, oldest first, when traced.
    received: collections.deque[Received] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_TRACED_OUTPUTS))


def deliver_span(stream: str, received: Received | None, delivery: str, reports: int,
                 context: Context | None = None, not_before_ns: int = 0) -> None:
    """The CONSUMER span `deliver <output stream>` of one message to a client (a waiting
    request's answer, one StreamExecutions message), made when it is handed to gRPC:
    from the feed's receipt of the output event (or `not_before_ns`, when later: the
    start of a request answered from outputs received before it) to then. Linked to the
    output's producer context (the engine's CONSUMER span, or its "emit" span); its
    parent is `context` (None: the current span, the waiting request's). The sampler
    decides, as for any span; call it only when tracing."""
    attrs: dict[str, Any] = {
        telemetry.MESSAGING_SYSTEM: telemetry.SYSTEM,
        telemetry.MESSAGING_OPERATION_TYPE: "process",
        telemetry.MESSAGING_OPERATION_NAME: "deliver",
        telemetry.MESSAGING_DESTINATION: stream,
        "xdc.gateway.delivery": delivery, "xdc.execution.reports": reports}
    links: list[Link] = []
    start = None
    if received is not None:
        attrs["xdc.output.position"] = received.position
        start = max(received.at_ns, not_before_ns)
        if received.producer is not None:
            links.append(Link(received.producer))
    telemetry.open_span(f"deliver {stream}", context=context, kind=SpanKind.CONSUMER,
                        attributes=attrs, links=links, start_time=start).end()


@dataclass(slots=True)
class L2Book:
    """Aggregate open quantity per price, per side, as the engine's BookUpdates say."""

    bids: dict[int, int] = field(default_factory=dict)
    asks: dict[int, int] = field(default_factory=dict)

    def apply(self, side: int, price: int, qty: int) -> None:
        levels = self.bids if side == Side.BUY else self.asks
        if qty:
            levels[price] = qty
        else:
            levels.pop(price, None)

    def top(self, side: int, depth: int) -> list[tuple[int, int]]:
        levels = self.bids if side == Side.BUY else self.asks
        best = heapq.nlargest if side == Side.BUY else heapq.nsmallest
        return [(p, levels[p]) for p in best(depth, levels)]

    def window(self, depth: int) -> tuple[dict[int, int], dict[int, int]]:
        """(bids, asks) of the top ``depth`` levels per side: what a stream of that
        depth shows."""
        return dict(self.top(Side.BUY, depth)), dict(self.top(Side.SELL, depth))


def _window_change(old: dict[int, int], new: dict[int, int]) -> list[xpb.BookLevel]:
    """The levels to send so that a client showing ``old`` shows ``new``: those that
    changed or came into the window, and those that left it with qty 0."""
    out = [xpb.BookLevel(price=p, qty=q) for p, q in new.items() if old.get(p) != q]
    out += [xpb.BookLevel(price=p, qty=0) for p in old if p not in new]
    return out


class Outlet:
    """One streaming client's queue. The feed never waits for a client: past `capacity`
    queued messages the client is marked overflowed and cut off by its handler."""

    def __init__(self, capacity: int) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue(capacity)
        self.overflowed = False
        self.depth = 0  # a book stream's levels per side
        # An execution stream's position when it was attached to the feed: the feed
        # offers it only later batches (a feed replaying the log after a start would
        # fill its queue with batches it has sent already).
        self.after = 0

    def offer(self, item: object) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True


def common_prefix(names: list[str]) -> str:
    """The longest string every name starts with (character-wise, not path-wise)."""
    if not names:
        return ""
    lo, hi = min(names), max(names)
    n = 0
    while n < min(len(lo), len(hi)) and lo[n] == hi[n]:
        n += 1
    return lo[:n]


def _levels(pairs: Iterable[tuple[int, int]]) -> list[xpb.BookLevel]:
    return [xpb.BookLevel(price=p, qty=q) for p, q in pairs]


def band_detail(band_bps: int, ref: int) -> str:
    """The price band of a reference price as the engine computes it (engine/book.py
    Book.set_ref), in words."""
    lo, hi = band_edges(ref, band_bps)
    return f"price band {lo}..{hi} (reference price {ref}, {band_bps} bps)"


Band = tuple[int, int]  # (band_bps, reference price): engine.book.band_after


_REJECTS = (ev.REJECTED, ev.REJECTED_V2)


def _band_reject(raw: tuple) -> bool:
    """A PRICE_OUTSIDE_BAND reject (of any output version: version 2 appends side and
    price to the same fields) whose detail the engine left empty (the gateway writes
    the band there)."""
    return (raw[0] in _REJECTS and raw[6] == Reject.PRICE_OUTSIDE_BAND
            and not raw[7])


def _with_band(raw: tuple, band: Band) -> tuple:
    return (*raw[:7], band_detail(*band), *raw[8:])


def order_report(group: str, position: int, index: int, raw: tuple) -> xpb.ExecutionReport:
    """wire.report, and a BOOK report's side: the side of the book its level is on."""
    r = wire.report(group, position, index, raw)
    if raw[0] == ev.BOOK:
        r.side = SIDE_PB.get(raw[2], xpb.SIDE_UNSPECIFIED)
    return r


def _read_back(batch: wire.OutputBatch) -> list[tuple[int, list[tuple]]]:
    """The outputs of a batch read back from the store: events of unknown kinds left out
    as on the live path (wire.blob_outputs), not counted again (the feed counted them
    when they went by)."""
    return wire.batch_outputs(batch, collections.Counter())


class OutputFeed:
    """Follows the configured groups' output streams with one store subscription and
    dispatches each output event to waiters, execution streams and L2 books."""

    def __init__(self, config: ExchangeConfig, client: StoreClient,
                 limits: GatewayLimits) -> None:
        self.client = client
        self.limits = limits
        self.groups = {g.name: GroupProgress(g.name, wire.output_stream(g.name))
                       for g in config.groups}
        self.by_stream = {g.stream: g for g in self.groups.values()}
        # The store filters by prefix: the longest prefix shared by the streams, and the
        # exact name checked on every event (a longer stream name also matches it).
        self.prefix = common_prefix(list(self.by_stream))
        self.position = 0  # every output event up to this global position is dispatched
        # Output events of kinds this gateway does not know that it dispatched, by tag
        # (wire.blob_outputs): left out of its reports (and of those it reads back from
        # the store), logged once per kind.
        self.unknown_outputs: collections.Counter[int] = collections.Counter()
        self.caught_up = asyncio.Event()
        self.recent: collections.OrderedDict[tuple[str, int], list[tuple]] = (
            collections.OrderedDict())
        self.group_of = dict(config.group_of)  # symbol -> group
        self.books: dict[str, L2Book] = {s: L2Book() for s in config.group_of}
        self.exec_outlets: dict[str, set[Outlet]] = {}
        self.book_outlets: dict[str, set[Outlet]] = {}
        # (symbol, depth) -> the window its book streams show, as of the last update.
        self.book_windows: dict[tuple[str, int], tuple[dict[int, int], dict[int, int]]] = {}
        self.outlets = 0
        # symbol -> (band_bps, reference price) as the outputs move them (_follow_bands);
        # the input position of the last output that moved it; the input positions of
        # its SymbolConfigs with their band_bps (as many as the symbol was configured):
        # what a report read back from the store needs to show the same band
        # (band_before).
        self.bands: dict[str, Band] = {}
        self.band_moved: dict[str, int] = {}
        self.band_bps_from: dict[str, list[tuple[int, int]]] = {}
        self.stopped = False
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for g in self.groups.values():
            for futs in g.waiters.values():
                for f in futs:
                    if not f.done():
                        f.set_result(None)
            g.waiters.clear()

    async def _follow(self) -> None:
        while True:
            try:
                async for item in self.client.subscribe(
                        after_position=self.position, stream_prefix=self.prefix,
                        event_types=[wire.OUTPUT_TYPE], batches=True):
                    if isinstance(item, pb.RecordBatch):
                        for e in item.events:
                            self.on_output_event(e)
                    else:
                        assert isinstance(item, CaughtUp | Checkpoint)
                        self.position = max(self.position, item.position)
                        if isinstance(item, CaughtUp) and not self.caught_up.is_set():
                            log.info("output feed caught up at position %d", item.position)
                            self.caught_up.set()
                log.warning("output subscription ended; resubscribing")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The client resumes by itself across UNAVAILABLE; anything else is logged
                # and the subscription re-opened from the last dispatched position.
                log.warning("output subscription failed (%s); resubscribing after %d",
                            exc, self.position)
            await asyncio.sleep(0.5)  # backoff between resubscriptions, not a sync point

    # ---- dispatch (synchronous: nothing else runs between the steps below)

    def on_output_event(self, e: pb.RecordedEvent) -> None:
        group = self.by_stream.get(e.stream)
        self.position = max(self.position, e.position)
        if group is None:
            return  # a longer stream name that shares the prefix, or another exchange's
        at_ns = time.time_ns() if telemetry.tracing() else 0
        try:
            batch = wire.decode_output(e.data)
            unknown: collections.Counter[int] = collections.Counter()
            outs = wire.batch_outputs(batch, unknown)
        except (CodecError, struct.error, KeyError, ValueError) as exc:
            log.error("output event at position %d of %s is undecodable (%s); skipped",
                      e.position, e.stream, exc)
            return
        if unknown:  # counted once the event is taken: an undecodable one counts nothing
            new = sorted(set(unknown) - set(self.unknown_outputs))
            self.unknown_outputs.update(unknown)
            if new:
                log.error("output events of kinds %s unknown to this gateway (first at "
                          "position %d of %s) are left out of its reports: an engine emits "
                          "a newer output version than it knows; upgrade the gateways "
                          "first (README)", new, e.position, e.stream)
        received = None
        if at_ns:  # traced: one record per output event, for its `deliver` spans
            received = Received(batch.first_input, batch.last_input, e.position,
                                telemetry.span_context(e.metadata.get(telemetry.TRACEPARENT)),
                                at_ns)
            group.received.append(received)
        for position, raws in outs:
            self._follow_bands(position, raws)
            self._remember(group, position, raws)
        group.last_input = max(group.last_input, batch.last_input)
        self._update_books(group, outs)
        self._send_executions(group, e.position, outs, received)
        if group.heap and group.heap[0] <= group.last_input:  # anyone waiting for these
            self._wake_waiters(group, batch.first_input, dict(outs))

    def _follow_bands(self, position: int, raws: list[tuple]) -> None:
        """Follows each symbol's price band as the engine moves it (``band_after``, the
        engine's rule) and writes the band into PRICE_OUTSIDE_BAND rejects, whose detail
        the engine leaves empty: the band before an input is the one its check used.
        Only the gateway's copy of the outputs changes (the stored ones, and their chain
        hash, stay as the engine made them); reports read back from the store get the
        same band from ``fill_in_bands``."""
        bands = self.bands
        for i, raw in enumerate(raws):
            symbol = raw[1]
            if _band_reject(raw):
                band = bands.get(symbol)
                if band is not None:
                    raws[i] = _with_band(raw, band)
                continue
            before = bands.get(symbol)
            after = band_after(symbol, before, raw)
            if after != before:
                assert after is not None
                bands[symbol] = after
                self.band_moved[symbol] = position
                if before is None or after[0] != before[0]:
                    self.band_bps_from.setdefault(symbol, []).append((position, after[0]))

    async def fill_in_bands(self, group: GroupProgress, revision: int,
                            outs: list[tuple[int, list[tuple]]], bands: dict[str, Band],
                            start: int = 0, account: str | None = None) -> None:
        """Writes the band into the PRICE_OUTSIDE_BAND rejects of ``outs[start:]`` (of
        ``account`` only, if given), outputs of the event at ``revision`` of the group's
        output stream read back from the store: the band ``_follow_bands`` wrote on the
        live path, the one in force before each input. ``bands`` holds the bands a reader
        going forward through the log knows (the ones found before): it follows them
        through ``outs``; a symbol it lacks is looked up (``band_before``)."""
        for k in range(start, len(outs)):
            position, raws = outs[k]
            for i, raw in enumerate(raws):
                symbol = raw[1]
                if _band_reject(raw):
                    if account is not None and raw[2] != account:
                        continue
                    if symbol not in bands:
                        band = await self.band_before(group, symbol, position, revision,
                                                      outs[:k])
                        if band is None:
                            continue
                        bands[symbol] = band
                    raws[i] = _with_band(raw, bands[symbol])
                elif symbol in bands:
                    bands[symbol] = band_after(symbol, bands[symbol], raw)  # type: ignore[assignment]

    async def band_before(self, group: GroupProgress, symbol: str, position: int,
                          revision: int, earlier: list[tuple[int, list[tuple]]]
                          ) -> Band | None:
        """The band of ``symbol`` in force before input ``position`` of ``group``, whose
        outputs are in the output event at ``revision`` after those of ``earlier``: the
        one the feed follows when no output since that input moved it, else found by
        reading the output stream back from there to the last output that set it (the
        band_bps then from the SymbolConfigs the feed saw). None when the store does not
        answer, has none, or not within BAND_MAX_READS reads."""
        seen_all = position - 1 <= group.last_input  # the feed has every output before
        moved = self.band_moved.get(symbol)
        if seen_all and moved is not None and moved < position:
            return self.bands.get(symbol)
        bps = None
        if seen_all:
            for at, value in self.band_bps_from.get(symbol, ()):
                if at >= position:
                    break
                bps = value
        # What band_after makes of each output, newest first, from a band of the known
        # band_bps and no reference yet (0): the first output it changes set the band
        # (a SymbolConfig states both; a Fill the reference).
        unset = None if bps is None else (bps, 0)

        def setter(outs: Iterable[tuple[int, list[tuple]]]) -> Band | None:
            for p, raws in reversed(list(outs)):
                if p >= position:
                    continue
                for raw in reversed(raws):
                    after = band_after(symbol, unset, raw)
                    if after != unset:
                        return after
            return None

        found = setter(earlier)
        reads = 0
        try:
            while found is None and revision > 1 and reads < BAND_MAX_READS:
                reads += 1
                events = await self.client.read(group.stream, start=revision - 1,
                                                backwards=True, limit=BAND_READ_EVENTS)
                if not events:
                    break
                for e in events:
                    revision = e.revision
                    if e.type == wire.OUTPUT_TYPE:
                        found = setter(_read_back(wire.decode_output(e.data)))
                        if found is not None:
                            break
        except (grpc.RpcError, CodecError, struct.error, KeyError, ValueError) as exc:
            log.warning("price band of %s before input %d not found in the store: %s",
                        symbol, position, exc)
        return found

    def _remember(self, group: GroupProgress, position: int, raws: list[tuple]) -> None:
        self.recent[(group.name, position)] = raws
        while len(self.recent) > self.limits.recent_inputs:
            (name, p), _ = self.recent.popitem(last=False)
            g = self.groups[name]
            g.evicted_upto = max(g.evicted_upto, p)

    def _wake_waiters(self, group: GroupProgress, first_input: int,
                      outs: dict[int, list[tuple]]) -> None:
        heap = group.heap
        while heap and heap[0] <= group.last_input:
            position = heapq.heappop(heap)
            futs = group.waiters.pop(position, None)
            if not futs:
                continue
            raws = outs.get(position)
            if raws is None:
                raws = self.recent.get((group.name, position))
            if raws is None and position >= first_input:
                raws = []  # inside this batch's range without outputs of its own
            # None left: outputs from an earlier batch no longer cached; the waiter reads
            # them from the store.
            for f in futs:
                if not f.done():
                    f.set_result(raws)

    def _send_executions(self, group: GroupProgress, position: int,
                         outs: list[tuple[int, list[tuple]]],
                         received: Received | None = None) -> None:
        if not self.exec_outlets:
            return
        by_account = self.account_reports(group.name, outs, self.exec_outlets)
        for account, reports in by_account.items():
            msg = xpb.ExecutionBatch(reports=reports, position=position)
            # Traced, and the output names its producer: the stream's handler makes the
            # message's `deliver` span when it hands the message to gRPC.
            item: object = (msg if received is None or received.producer is None
                            else (msg, received, group.stream))
            for outlet in self.exec_outlets[account]:
                if position > outlet.after:
                    outlet.offer(item)

    @staticmethod
    def account_reports(group: str, outs: list[tuple[int, list[tuple]]],
                        accounts: dict[str, object] | set[str]
                        ) -> dict[str, list[xpb.ExecutionReport]]:
        by_account: dict[str, list[xpb.ExecutionReport]] = {}
        for input_position, raws in outs:
            for index, raw in enumerate(raws):
                wanted = [a for a in wire.accounts_of(raw) if a in accounts]
                if not wanted:
                    continue
                report = wire.report(group, input_position, index, raw)  # no BOOK here
                for a in wanted:
                    by_account.setdefault(a, []).append(report)
        return by_account

    def _update_books(self, group: GroupProgress,
                      outs: list[tuple[int, list[tuple]]]) -> None:
        changed: set[str] = set()
        for _, raws in outs:
            for raw in raws:
                if raw[0] != ev.BOOK:
                    continue
                _, symbol, side, price, qty = raw
                book = self.books.get(symbol)
                if book is None:  # a symbol added to the group outside the exchange file
                    book = self.books[symbol] = L2Book()
                book.apply(side, price, qty)
                if symbol in self.book_outlets:
                    changed.add(symbol)
        # A stream shows the top `depth` levels per side: it is sent what changed in that
        # window, levels that entered it (a level above went) included; changes below it
        # are not its business. One computation per (symbol, depth), not per stream.
        for symbol in changed:
            by_depth: dict[int, list[Outlet]] = {}
            for outlet in self.book_outlets[symbol]:
                by_depth.setdefault(outlet.depth, []).append(outlet)
            for depth, outlets in by_depth.items():
                new = self.books[symbol].window(depth)
                old = self.book_windows.get((symbol, depth), ({}, {}))
                self.book_windows[(symbol, depth)] = new
                bids, asks = _window_change(old[0], new[0]), _window_change(old[1], new[1])
                if not (bids or asks):
                    continue
                msg = xpb.BookMessage(symbol=symbol, input_position=group.last_input,
                                      bids=bids, asks=asks)
                for outlet in outlets:
                    outlet.offer(msg)

    # ---- waiting for one input's outputs

    def delivered(self, group_name: str, position: int, reports: int,
                  since_ns: int = 0) -> None:
        """The `deliver` span of a waiting request's answer (call it when tracing, in the
        request's context): the current span's child (the request's SERVER span), linked
        to the producer of the output event that held input `position`'s outputs, from
        the feed's receipt of that event, or from `since_ns` (the request's start) when
        that came later (a retry answered from outputs received for the first attempt).
        Without a current span, the producer's child."""
        group = self.groups[group_name]
        found = None
        for r in reversed(group.received):  # newest first: the waiter's is one of the last
            if r.first_input <= position:
                if position <= r.last_input:
                    found = r
                break
        context = None
        if (telemetry.current_span_context() is None and found is not None
                and found.producer is not None):
            context, _ = telemetry.parent_and_links([found.producer])
        deliver_span(group.stream, found, "wait", reports, context, since_ns)

    async def outputs_of(self, group_name: str, position: int,
                         timeout_s: float) -> list[tuple] | None:
        """The raw outputs of input ``position`` of the group, or None if they did not
        arrive within ``timeout_s``."""
        group = self.groups[group_name]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        raws: list[tuple] | None
        if position <= group.last_input:
            raws = self.recent.get((group_name, position))
            if raws is not None:
                return raws
            if position > group.evicted_upto:
                return []  # processed, and nothing was emitted for it
        else:
            # Registered in the same loop step as the progress check above: the batch that
            # covers `position` cannot be dispatched in between.
            fut: asyncio.Future[list[tuple] | None] = loop.create_future()
            if position not in group.waiters:
                heapq.heappush(group.heap, position)
            group.waiters.setdefault(position, []).append(fut)
            try:
                done, _ = await asyncio.wait({fut}, timeout=timeout_s)
            finally:
                self._forget(group, position, fut)
            if not done or self.stopped:
                return None
            raws = fut.result()
            if raws is not None:
                return raws
        return await self._outputs_from_store(group, position,
                                              max(0.001, deadline - loop.time()))

    def _forget(self, group: GroupProgress, position: int,
                fut: asyncio.Future[list[tuple] | None]) -> None:
        futs = group.waiters.get(position)
        if futs is not None:
            if fut in futs:
                futs.remove(fut)
            if not futs:
                del group.waiters[position]
        # Timed-out waiters leave heap entries behind while the engine is stalled: rebuild
        # when they dominate, so the heap stays bounded by the live waiters.
        if len(group.heap) > 2 * len(group.waiters) + 64:
            group.heap = list(group.waiters)
            heapq.heapify(group.heap)

    async def _outputs_from_store(self, group: GroupProgress, position: int,
                                  timeout_s: float) -> list[tuple] | None:
        """Binary search of the output stream by revision: output batches are in input
        order, so the one whose range holds ``position`` is found in log2(batches) reads."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                info = await self.client.stream_info(group.stream)
                lo, hi = 1, info.last_revision
                while lo <= hi:
                    mid = (lo + hi) // 2
                    found = await self.client.read(group.stream, start=mid, limit=1)
                    batch = wire.decode_output(found[0].data)
                    if position < batch.first_input:
                        hi = mid - 1
                    elif position > batch.last_input:
                        lo = mid + 1
                    else:
                        break
                else:
                    return None
            outs = _read_back(batch)
        except (TimeoutError, grpc.RpcError, CodecError, IndexError, struct.error,
                ValueError) as exc:  # a stored event undecodable: as not found
            log.warning("outputs of input %d of %s not found in the store: %s", position,
                        group.name, exc)
            return None
        k = next((k for k, (p, _) in enumerate(outs) if p == position), None)
        if k is None:
            return []
        try:  # a band reject shows its band, as on the live path
            async with asyncio.timeout(max(0.001, deadline - loop.time())):
                await self.fill_in_bands(group, mid, outs[:k + 1], {}, k)
        except TimeoutError:
            log.warning("price band of input %d of %s not found in time", position,
                        group.name)
        return outs[k][1]

    # ---- streaming clients

    def open_outlet(self) -> Outlet:
        if self.outlets >= self.limits.max_streams:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many streaming clients (limit {self.limits.max_streams}); "
                          f"retry later")
        self.outlets += 1
        return Outlet(self.limits.stream_queue)

    def close_outlet(self, outlet: Outlet, table: dict[str, set[Outlet]], key: str) -> None:
        self.outlets -= 1
        members = table.get(key)
        if members is not None:
            members.discard(outlet)
            if not members:
                del table[key]

    def book_snapshot(self, symbol: str, depth: int) -> xpb.BookMessage:
        """The top ``depth`` levels per side now; the window that streams of this depth
        are updated from (the same for every one: they all had every update since)."""
        book = self.books.setdefault(symbol, L2Book())
        group = self.groups[self.group_of[symbol]]
        bids, asks = self.book_windows[(symbol, depth)] = book.window(depth)
        return xpb.BookMessage(symbol=symbol, snapshot=True, input_position=group.last_input,
                               bids=_levels(bids.items()), asks=_levels(asks.items()))


# ---------------------------------------------------------------------- the service

@dataclass(frozen=True, slots=True)
class Routed:
    """A validated request: the command to append to ``group``'s input stream."""

    group: str
    cmd: object
    key: str  # the idempotency key within (group, kind, account): a client order id
    # reused for a symbol of another engine group is another order (the groups share no
    # state); retries repeat the symbol, so they are never doubled
    what: str  # how a refusal names the key
    wait_s: float | None  # None: answer once appended



class OrderGatewayService(xpb_grpc.OrderGatewayServicer):
    """The servicer. ``start()`` opens the output feed (call it inside the event loop the
    gRPC server runs in), ``stop()`` closes it."""

    def __init__(self, config: ExchangeConfig, client: StoreClient,
                 limits: GatewayLimits | None = None) -> None:
        self.config = config
        self.client = client
        self.limits = limits or GatewayLimits()
        self.feed = OutputFeed(config, client, self.limits)
        self._waiting = 0

    def start(self) -> None:
        self.feed.start()

    @property
    def waiting(self) -> int:
        """Requests waiting for their outputs now (at most ``limits.max_waiters``)."""
        return self._waiting

    async def stop(self) -> None:
        await self.feed.stop()

    # ---- helpers

    def _group(self, symbol: str) -> str:
        if not symbol:
            raise Refused(INVALID, "symbol: required")
        group = self.config.group_of.get(symbol)
        if group is None:
            known = sorted(self.config.group_of)
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"symbol {show(symbol)} is not traded on this gateway "
                          f"(symbols: {shown})")
        return group

    def _wait_s(self, wait: bool, timeout_ms: int) -> float | None:
        check_int("wait_timeout_ms", timeout_ms, 0, self.limits.max_wait_ms,
                  f" (0: the default of {self.limits.default_wait_ms})")
        if not wait:
            return None
        return (timeout_ms or self.limits.default_wait_ms) / 1000

    async def _submit(self, req: Routed,
                      context: grpc.aio.ServicerContext) -> xpb.OrderResponse:
        group, wait_s = req.group, req.wait_s
        began_ns = time.time_ns()
        reserved = False
        if wait_s is not None:
            # Reserved before the append, so a full table refuses with nothing appended.
            if self._waiting >= self.limits.max_waiters:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"wait: too many requests waiting for outputs (limit "
                              f"{self.limits.max_waiters}); retry later or without wait")
            self._waiting += 1
            reserved = True
        try:
            timeout_s = max(0.001, _before_deadline(context, self.client.timeout_s))
            # The order's trace travels in its event: the engine's CONSUMER span links
            # to it (the store sets it aside when it compares a retried event).
            event = wire.command_event(group, req.cmd, req.key, metadata=telemetry.inject({}))
            try:
                r = await self.client.append(wire.input_stream(group), event,
                                             timeout_s=timeout_s)
            except AppendError as err:
                if err.code == grpc.StatusCode.ALREADY_EXISTS:
                    raise Refused(err.code, f"{req.what} was already used for a different request; "
                                            f"a retry must repeat the original fields exactly, "
                                            f"a new request needs a new id "
                                            f"(store: {err.message})") from None
                if err.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise Refused(err.code, f"not appended in time, outcome unknown: a retry "
                                            f"with the same {req.what} never makes a "
                                            f"second one") from None
                raise Refused(err.code, err.message) from None
            resp = xpb.OrderResponse(input_position=r.first_position, duplicate=r.duplicate)
            if wait_s is None:
                return resp
            # Answer timed_out (with the position) before the caller's deadline: past it,
            # the caller would not learn that the order landed.
            wait_s = max(0.0, _before_deadline(context, wait_s))
            raws = await self.feed.outputs_of(group, r.first_position, wait_s)
            if raws is None:
                resp.timed_out = True
            else:
                resp.reports.extend(order_report(group, r.first_position, i, raw)
                                    for i, raw in enumerate(raws) if wire.known(raw))
                if telemetry.tracing():  # the order's trace ends with its answer
                    self.feed.delivered(group, r.first_position, len(resp.reports),
                                        began_ns)
            return resp
        finally:
            if reserved:
                self._waiting -= 1

    # ---- RPCs

    async def SubmitOrder(self, request: xpb.SubmitOrderRequest,
                          context: grpc.aio.ServicerContext) -> xpb.OrderResponse:
        return await self._answer(context, self._new_order, request)

    async def CancelOrder(self, request: xpb.CancelOrderRequest,
                          context: grpc.aio.ServicerContext) -> xpb.OrderResponse:
        return await self._answer(context, self._cancel, request)

    async def ReplaceOrder(self, request: xpb.ReplaceOrderRequest,
                           context: grpc.aio.ServicerContext) -> xpb.OrderResponse:
        return await self._answer(context, self._replace, request)

    async def _answer(self, context: grpc.aio.ServicerContext,
                      parse: Callable[[Any], Routed], request: Any) -> xpb.OrderResponse:
        try:
            return await self._submit(parse(request), context)
        except Refused as r:
            await context.abort(r.code, r.message)
            raise AssertionError("unreachable") from None

    def _new_order(self, r: xpb.SubmitOrderRequest) -> Routed:
        account = check_id("account", r.account)
        cid = check_id("client_order_id", r.client_order_id)
        if r.side not in SIDES:
            raise Refused(INVALID, f"side: required, BUY or SELL, got {r.side}")
        order_type = check_enum("order_type", r.order_type, ORDER_TYPES, xpb.OrderType)
        tif = check_enum("time_in_force", r.time_in_force, TIFS, xpb.TimeInForce)
        stp = check_enum("stp", r.stp, STPS, xpb.SelfTradePrevention)
        check_int("qty", r.qty, 1, MAX_QTY)
        if order_type == OrderType.MARKET:
            check_int("price", r.price, 0, 0, " (market orders carry no price)")
            # The combinations the engine rejects for the order's own fields (book.py,
            # _NEW_FLAGS): refused here, so that its client_order_id is not used up.
            if tif == TimeInForce.GTC:
                raise Refused(INVALID, "time_in_force: a market order is IOC or FOK "
                                       "(unset is GTC)")
        else:
            check_int("price", r.price, 1, MAX_PRICE, " (limit orders)")
        if r.post_only and not (order_type == OrderType.LIMIT and tif == TimeInForce.GTC):
            raise Refused(INVALID, "post_only: only for a GTC limit order")
        wait_s = self._wait_s(r.wait, r.wait_timeout_ms)
        cmd = cm.NewOrder(0, r.symbol, account, cid, SIDES[r.side], r.qty, r.price,
                          order_type, tif, r.post_only, stp)
        return Routed(self._group(r.symbol), cmd, cid,
                      f"client_order_id {cid!r} of account {account!r}", wait_s)

    def _order_ref(self, r: xpb.CancelOrderRequest | xpb.ReplaceOrderRequest
                   ) -> tuple[str, str, int, str]:
        account = check_id("account", r.account)
        rid = check_id("request_id", r.request_id)
        return (account, rid, *check_order_ref(r.order_id, r.client_order_id))

    def _cancel(self, r: xpb.CancelOrderRequest) -> Routed:
        account, rid, order_id, cid = self._order_ref(r)
        wait_s = self._wait_s(r.wait, r.wait_timeout_ms)
        cmd = cm.CancelOrder(0, r.symbol, account, order_id, cid)
        return Routed(self._group(r.symbol), cmd, rid,
                      f"request_id {rid!r} of account {account!r}", wait_s)

    def _replace(self, r: xpb.ReplaceOrderRequest) -> Routed:
        account, rid, order_id, cid = self._order_ref(r)
        check_int("price", r.price, 1, MAX_PRICE)
        check_int("qty", r.qty, 1, MAX_QTY)
        wait_s = self._wait_s(r.wait, r.wait_timeout_ms)
        cmd = cm.ReplaceOrder(0, r.symbol, account, r.price, r.qty, order_id, cid)
        return Routed(self._group(r.symbol), cmd, rid,
                      f"request_id {rid!r} of account {account!r}", wait_s)

    async def StreamExecutions(self, request: xpb.StreamExecutionsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[xpb.ExecutionBatch]:
        feed = self.feed
        try:
            account = check_id("account", request.account)
        except Refused as r:
            await context.abort(r.code, r.message)
        outlet: Outlet | None = None
        position = request.after_position

        def attach() -> None:
            assert outlet is not None
            outlet.after = position
            feed.exec_outlets.setdefault(account, set()).add(outlet)

        def attached() -> bool:
            return outlet in feed.exec_outlets.get(account, ())

        try:
            # The stream's slot is taken first: a catch-up from the store (a subscription
            # of its own) counts against max_streams too.
            outlet = feed.open_outlet()
            if position == 0:
                # "From now": not the history the feed replays after the gateway started.
                await self._caught_up()
                attach()
            elif position == feed.position:
                attach()
            else:
                if position > feed.position:
                    # Past the feed: a gateway that started (its feed replays the log), or
                    # one behind the gateway the client resumes from. The check waits for
                    # the store while the feed dispatches, to this stream's loss if it
                    # were attached after it: the catch-up below reads from the store
                    # what the feed dispatches meanwhile, and attaches once level.
                    await self._check_reachable(position)
                # Catch-up from the store in rounds, each to a fixed target: the feed's
                # position when the round began. Chasing the feed's moving position never
                # ends while the consumer reads no faster than the exchange trades (its
                # backlog never shrinks); a fixed target is reached. A round that ends
                # level with the feed switches to it in the same loop step (no gap). The
                # last round is attached first: the feed queues what it dispatches past
                # the target while the catch-up sends the rest, and the live part skips
                # what the catch-up already sent.
                subscription = self.client.subscribe(
                    after_position=position, stream_prefix=feed.prefix,
                    event_types=[wire.OUTPUT_TYPE], batches=True)
                rounds, target = 1, feed.position
                bands: dict[str, Band] = {}  # as of the catch-up's position
                handed_over = False
                try:
                    async for item in subscription:
                        if isinstance(item, pb.RecordBatch):
                            for e in item.events:
                                msg = await self._catch_up_batch(e, account, bands)
                                position = e.position
                                if msg is not None:
                                    yield msg
                        else:
                            position = max(position, item.position)  # type: ignore[union-attr]
                        if outlet.overflowed:
                            break  # attached and too slow: refused below, with position
                        if position < target:
                            continue
                        if position >= feed.position:
                            attach()
                        if attached() and position >= target:
                            handed_over = True
                            break
                        rounds += 1
                        if rounds == CATCH_UP_ROUNDS:
                            attach()
                        target = feed.position
                except grpc.aio.AioRpcError as exc:
                    # The store's own status (a limit, a permission), not UNKNOWN.
                    raise Refused(exc.code(), f"catch-up from the store failed: "
                                              f"{exc.details()}; resume with "
                                              f"after_position={position}") from None
                finally:
                    await subscription.aclose()
                if not (handed_over or outlet.overflowed):
                    raise Refused(grpc.StatusCode.UNAVAILABLE,
                                  "the store ended the catch-up subscription; resume with "
                                  f"after_position={position}")
            while True:
                if outlet.overflowed:
                    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"execution stream consumer too slow: more than "
                                  f"{self.limits.stream_queue} batches queued; resume with "
                                  f"after_position={position}")
                item = await outlet.queue.get()
                received: Received | None = None
                if type(item) is tuple:  # (message, Received, output stream): traced
                    item, received, stream = item
                assert isinstance(item, xpb.ExecutionBatch)
                if item.position <= position:
                    continue
                position = item.position
                if received is not None:  # handed to gRPC now: its span, the producer's
                    # child (made before the yield: after it, code runs only when gRPC
                    # asks for the next message, never for a stream's last one)
                    parent, _ = telemetry.parent_and_links([received.producer])
                    deliver_span(stream, received, "stream", len(item.reports), parent)
                yield item
        except Refused as r:
            await context.abort(r.code, r.message)
        finally:
            if outlet is not None:
                feed.close_outlet(outlet, feed.exec_outlets, account)

    async def _check_reachable(self, position: int) -> None:
        """An ``after_position`` past the feed's: refused if the log does not reach it
        (a position of another cluster, or of a store since restored), where the stream
        would stay silent for good."""
        if position <= self.feed.position:
            return
        try:
            commit = (await self.client.node_info()).commit_position
        except grpc.aio.AioRpcError as exc:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"the store did not say where its log ends ({exc.details()}); "
                          f"retry shortly") from None
        if position > commit:
            raise Refused(grpc.StatusCode.OUT_OF_RANGE,
                          f"after_position: {position} is past the end of the log "
                          f"({commit})")

    async def _caught_up(self) -> None:
        if self.feed.caught_up.is_set():
            return
        try:
            async with asyncio.timeout(self.limits.catch_up_wait_s):
                await self.feed.caught_up.wait()
        except TimeoutError:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"the gateway is still reading the output log (at position "
                          f"{self.feed.position}); retry shortly") from None

    async def _catch_up_batch(self, e: pb.RecordedEvent, account: str,
                              bands: dict[str, Band]) -> xpb.ExecutionBatch | None:
        group = self.feed.by_stream.get(e.stream)
        if group is None:
            return None
        try:
            outs = _read_back(wire.decode_output(e.data))
        except (CodecError, struct.error, KeyError, ValueError):
            return None  # the feed logged it when it went by
        # Band rejects show their band, as on the live path (the bands of every group in
        # one dict: a symbol is traded in one group).
        await self.feed.fill_in_bands(group, e.revision, outs, bands, account=account)
        reports = OutputFeed.account_reports(group.name, outs, {account}).get(account)
        if not reports:
            return None
        return xpb.ExecutionBatch(reports=reports, position=e.position)

    async def StreamBook(self, request: xpb.StreamBookRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[xpb.BookMessage]:
        feed = self.feed
        outlet: Outlet | None = None
        symbol = request.symbol
        try:
            self._group(symbol)
            depth = request.depth or self.limits.default_book_depth
            check_int("depth", depth, 1, self.limits.max_book_depth, " levels per side")
            outlet = feed.open_outlet()  # the slot first: waiting for the feed counts too
            outlet.depth = depth
            await self._caught_up()
            # Attach and snapshot in one loop step: every later update follows the snapshot.
            feed.book_outlets.setdefault(symbol, set()).add(outlet)
            snapshot = feed.book_snapshot(symbol, depth)
            yield snapshot
            while True:
                if outlet.overflowed:
                    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"book stream consumer too slow: more than "
                                  f"{self.limits.stream_queue} updates queued; subscribe "
                                  f"again for a fresh snapshot")
                msg = await outlet.queue.get()
                yield msg  # type: ignore[misc]
        except Refused as r:
            await context.abort(r.code, r.message)
        finally:
            if outlet is not None:
                feed.close_outlet(outlet, feed.book_outlets, symbol)


# ---------------------------------------------------------------------- the server

def _account_rule(principal: auth.Principal, request: Any) -> None:
    # Bytes that did not parse and an empty account are the handler's to refuse
    # (INVALID_ARGUMENT).
    if not isinstance(request, BadRequest) and request.account:
        principal.require_account(request.account)


# Who may do what here (store/auth.py): orders and executions only for the principal's own
# accounts; books are public to any authenticated principal.
AUTH_RULES: auth.Rules = {
    f"/{SERVICE}/SubmitOrder": _account_rule,
    f"/{SERVICE}/CancelOrder": _account_rule,
    f"/{SERVICE}/ReplaceOrder": _account_rule,
    f"/{SERVICE}/StreamExecutions": _account_rule,
    f"/{SERVICE}/StreamBook": auth.authenticated,
}


class GatewayServer:
    """The gateway service behind a gRPC server with health checking and reflection.
    With `auth`, its callers authenticate and trade only for their own accounts; `token`
    is the gateway's own principal at the store."""

    def __init__(self, config: ExchangeConfig, store_targets: str | Sequence[str],
                 listen: str = "127.0.0.1:0", limits: GatewayLimits | None = None,
                 client: StoreClient | None = None, tls: Tls | None = None,
                 tiers_spec: TierSpec | None = None,
                 auth_config: auth.AuthConfig | None = None, token: str = "",
                 engines: Sequence[str] = (), discover_engines: bool = False) -> None:
        self.config = config
        self.listen = listen
        # Its certificate to the store and on its own port (xdc/tls.py).
        self.tls = tls
        # Its reads and its output feed serve order entry: they recover with that tier.
        self.client = client or StoreClient(store_targets, tier="order-entry", tls=tls,
                                            token=token)
        self._own_client = client is None
        self.service = OrderGatewayService(config, self.client, limits)
        self.health = health.aio.HealthServicer()
        # Sheds by the store's state, as the store itself does: while it has no quorum
        # or is failing over, orders are refused with the tier, the reason and a retry
        # hint, and after it they are admitted again in tier order. With `engines` (their
        # EngineControl addresses) or `discover_engines` (the addresses the instances of
        # its groups advertise), orders also wait for an engine primary that is current
        # in the store's term (engine/matching_health.py).
        directory = (EngineDirectory(self.client, [g.name for g in config.groups])
                     if discover_engines else None)
        self.tiers = gateway_supervisor(
            store_targets, tiers_spec, tls=tls, token=token,
            wrap=(lambda r: MatchingWatch(r, engines, tls, token, directory=directory))
            if engines or directory else None)
        # Its callers' principals (store/auth.py), checked before the tiers shed a call.
        self.guard = (auth.Guard(auth_config, {**AUTH_RULES, **self.tiers.auth_rules})
                      if auth_config is not None else None)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        guard = [self.guard] if self.guard is not None else []
        server = new_server(interceptors=[*telemetry.server_interceptors(), *guard,
                                          *self.tiers.interceptors])
        xpb_grpc.add_OrderGatewayServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.tiers.add_services(server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = listen_on(server, self.listen, self.tls)
        self.service.start()
        await server.start()
        self.server = server
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.tiers.start(self.health)

    async def wait_admitted(self, tier: str | None = None, timeout_s: float = 10.0) -> None:
        """Returns once the gateway admits `tier` (default: every tier). After a start
        the tiers are admitted in order, as the store's."""
        states = self.tiers.machine.states
        if tier is not None:
            index = self.tiers.spec.resolve(tier)
            assert index is not None, f"no tier {tier!r}"
            states = (states[index],)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not all(self.tiers.machine.states[t.index].admitted for t in states):
            if loop.time() > deadline:
                raise TimeoutError(f"not admitted within {timeout_s}s: " + "; ".join(
                    self.tiers.machine.states[t.index].detail for t in states))
            await asyncio.sleep(0.02)

    @property
    def address(self) -> str:
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.tiers.stop()
        if self.server is not None:
            await self.server.stop(grace_s)
        await self.service.stop()
        if self._own_client:
            await self.client.close()


def serve_gateway(store_targets: str | Sequence[str], listen: str, exchange_path: str,
                  limits: GatewayLimits | None = None, tls: Tls | None = None,
                  auth_config: auth.AuthConfig | None = None, token: str = "",
                  engines: Sequence[str] = (), discover_engines: bool = False) -> int:
    """Runs the gateway until SIGTERM/SIGINT; prints one JSON ready line. Exit code 2 for
    a bad exchange file, 1 when the address cannot be bound."""
    try:
        config = load(exchange_path)
    except ExchangeConfigError as exc:
        print(f"xdc gateway: {exc}", file=sys.stderr)
        return 2
    if isinstance(store_targets, str):
        store_targets = [t for t in store_targets.split(",") if t]

    async def main() -> None:
        server = GatewayServer(config, store_targets, listen, limits, tls=tls,
                               auth_config=auth_config, token=token, engines=engines,
                               discover_engines=discover_engines)

        async def start() -> str:
            await server.start()
            return server.address

        await run_until_signalled(start, server.stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"xdc gateway: {exc}", file=sys.stderr)
        return 1
    return 0
