"""The pure, deterministic matching core: many symbols' order books plus account risk.

``Engine.process(command, out)`` appends the command's output events (raw tuples, see
``engine.events``) to ``out``; ``Engine.apply(command)`` returns them as records. The
engine is the state of ``(state, command) -> (state, events)``: it is mutated in place
(copying a book per command would cost more than matching it) and its every output is
a function of the sequence of commands alone. There is no I/O, clock, randomness,
float or set here; dicts are only looked up, never iterated on a path that produces
output, except in insertion order where that order is itself a function of the input.

Output format versions (``engine.events``): ``Engine.output_version`` (1 at first, part
of the canonical state) says which events a cancel and a reject make; only an activation
input changes it (``set_output_version``, called by the consumer between batches).

API: ``Engine(limits)``; ``process(cmd, out)`` / ``process_batch(cmds, out)`` append raw
event tuples; ``apply(cmd)`` returns records; ``step(state, cmd) -> (state, events)``;
``check_invariants(engine)`` for tests; ``gc_paused()`` for the shell's hot loop.
Snapshots, hashes and encodings live in ``engine.codec``.

Rules (the reference model in tests/test_book_model.py encodes the same rules):

* Price-time priority; a trade prints at the resting (maker) order's price.
* Order ids are assigned per symbol from 1, at acceptance (rejects consume none).
* Price band: the reference price is the price of the symbol's last trade, or the
  configured ``ref_price`` before its first trade. With ``band = ref * band_bps // 10000``
  a limit price ``p`` is accepted iff ``ref - band <= p <= min(ref + band, MAX_PRICE)``.
  The reference moves at the end of each command that traded.
* Market orders are "market with protection": a market buy is an IOC/FOK limit order at
  the band's upper edge rounded down to the tick, a market sell at the lower edge rounded
  up to the tick (at least one tick). So a market order never trades outside the band,
  and its risk check is exact: a market buy must be able to pay ``protection * qty``.
* Risk: a buy reserves ``price * qty`` of the quote asset, a sell ``qty`` of the base
  asset, at acceptance; the reservation ("held") of a resting order is exactly
  ``price * open qty`` (buy) or ``open qty`` (sell). A taker buy that trades below its
  limit gets the difference back at once. Cancels, reductions and expiries release.
  There are no fees.
* A resting order limit (``max_orders`` per book) and open-order limit per account are
  checked for GTC limit orders (that may rest) before matching, conservatively.
* Self-trade prevention follows the taker's mode, see ``engine.constants.STP``.
  Fill-or-kill: the order is filled only if the resting quantity it can reach within its
  limit, walking in priority order and skipping own orders that STP would cancel
  (CANCEL_OLDEST) or counting them (NONE), reaches its quantity before any own order
  that would stop it (CANCEL_NEWEST, CANCEL_BOTH, DECREMENT_AND_CANCEL). Otherwise it is
  accepted and cancelled with ``FOK_UNFILLED``, changing nothing else.
* Post-only orders (limit GTC only) that would cross on arrival are rejected.
* A command that raises inside the engine becomes ``Rejected(INTERNAL_ERROR, detail=<type
  name>)``; its partial events are discarded. If it raised after it had started to change
  a book, that book is halted (``Halted`` event; later commands on it are rejected) so no
  replica ever trades on a half-applied state. ``MemoryError`` is re-raised: it is not a
  function of the input, so turning it into an output would let replicas diverge.
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from heapq import heapify, heappop, heappush

from engine import events as ev
from engine.commands import (
    AddSymbol,
    CancelOrder,
    Deposit,
    NewOrder,
    ReduceOrder,
    ReplaceOrder,
    UpdateSymbol,
    Withdraw,
)
from engine.constants import (
    MAX_ASSET_LEN,
    MAX_BAND_BPS,
    MAX_ID_LEN,
    MAX_MATCHES_PER_ORDER,
    MAX_PRICE,
    MAX_QTY,
    MAX_SUPPLY,
    MAX_SYMBOL_LEN,
    MAX_TS_NS,
    OUTPUT_VERSIONS,
    STP,
    BalanceReason,
    CancelReason,
    Cmd,
    OrderType,
    ReduceReason,
    Reject,
    TimeInForce,
)

BUY = 0
SELL = 1
LIMIT = OrderType.LIMIT
MARKET = OrderType.MARKET
GTC = TimeInForce.GTC
IOC = TimeInForce.IOC
FOK = TimeInForce.FOK
STP_NONE = STP.NONE
STP_CN = STP.CANCEL_NEWEST
STP_CO = STP.CANCEL_OLDEST
STP_CB = STP.CANCEL_BOTH
STP_DC = STP.DECREMENT_AND_CANCEL

_ACCEPTED = ev.ACCEPTED
_REJECTED = ev.REJECTED
_REJECTED_V2 = ev.REJECTED_V2
_CANCELLED_V2 = ev.CANCELLED_V2
# Where a Rejected (and a RejectedV2) holds its time.
_REJECT_TS = 8
_FILL = ev.FILL
_CANCELLED = ev.CANCELLED
_REPLACED = ev.REPLACED
_REDUCED = ev.REDUCED
_BOOK = ev.BOOK

# A level's deque keeps cancelled orders (qty 0) until matching reaches them; it is
# rebuilt when dead entries outnumber live ones by this much, so memory stays bounded.
_COMPACT_SLACK = 16
# Band edges remembered per reference price (a trade moves the reference, usually among
# a few recent prices); the cache is dropped whole when it reaches this size.
_EDGES_CACHE_MAX = 4096
# Emptied levels kept per book for reuse (see ``Book.spare``).
_SPARE_LEVELS = 64


@dataclass(slots=True, frozen=True)
class EngineLimits:
    """Engine-wide limits. Part of the canonical state: outputs depend on them."""

    max_symbols: int = 10_000
    max_accounts: int = 10_000_000
    max_open_orders_per_account: int = 100_000


# A resting order is a list, not an object: building one is a single BUILD_LIST
# (~30 ns) where a slotted instance costs 0.15-0.4 us in CPython 3.11, and every
# resting order is built on the hot path. Layout (index names below):
#     [qty, oid, acct, cid, side, price, post_only, stp]
# ``qty`` is the open quantity; 0 marks a dead deque entry (cancelled in place).
QTY = 0
OID = 1
ACCT = 2
CID = 3
SIDE = 4
PRICE = 5
POST_ONLY = 6
STP_MODE = 7
Order = list  # type alias for readability of signatures


def new_order(oid: int, acct: Account, cid: str, side: int, price: int, qty: int,
              post_only: bool, stp: int) -> Order:
    return [qty, oid, acct, cid, side, price, post_only, stp]


class Level:
    """One price level: FIFO of orders, aggregate open qty, live order count."""

    __slots__ = ("dq", "n", "qty")
    dq: deque[Order]
    qty: int
    n: int


def new_level() -> Level:
    # Bare instance + slot stores: a class call through __init__ costs twice as much.
    lvl = Level()
    lvl.dq = deque()
    lvl.qty = 0
    lvl.n = 0
    return lvl


def _take_level(book: Book) -> Level:
    """An empty level for a new price: a spare one if the book has any."""
    spare = book.spare
    return spare.pop() if spare else new_level()


def _drop_level(book: Book, levels: dict[int, Level], price: int, lvl: Level) -> None:
    """Remove a level that has no live order left, keeping it as a spare."""
    del levels[price]
    spare = book.spare
    if len(spare) < _SPARE_LEVELS:
        lvl.dq.clear()  # cancelled orders (qty 0) may remain in it
        lvl.qty = 0  # already 0 with no live order: set so a spare is always pristine
        spare.append(lvl)


class Account:
    """Balances per asset: ``avail`` may be spent, ``held`` reserves resting orders.
    Absent keys mean 0 (``defaultdict`` so that a credit is one ``+=``; a read that may
    miss uses ``.get``). ``cids`` indexes the account's open orders (all symbols) by
    client order id."""

    __slots__ = ("avail", "cids", "held", "id", "n_open")

    def __init__(self, account_id: str) -> None:
        self.id = account_id
        self.avail: defaultdict[str, int] = defaultdict(int)
        self.held: defaultdict[str, int] = defaultdict(int)
        self.n_open = 0
        self.cids: dict[str, Order] = {}


class Book:
    """One symbol. Bids and asks are ``price -> Level`` dicts plus a heap of keys
    (``-price`` for bids) whose stale entries are skipped and periodically rebuilt."""

    __slots__ = (
        "ask_heap",
        "asks",
        "band_bps",
        "base",
        "bid_heap",
        "bids",
        "cfg_ref",
        "edges",
        "halted",
        "hi",
        "lo",
        "lot",
        "max_orders",
        "max_qty",
        "mkt_buy",
        "mkt_sell",
        "next_oid",
        "orders",
        "quote",
        "ref",
        "spare",
        "symbol",
        "tick",
        "traded",
    )

    def __init__(
        self,
        symbol: str,
        base: str,
        quote: str,
        tick: int,
        lot: int,
        band_bps: int,
        ref_price: int,
        max_orders: int,
        max_qty: int,
    ) -> None:
        self.symbol = symbol
        self.base = base
        self.quote = quote
        self.tick = tick
        self.lot = lot
        self.band_bps = band_bps
        self.cfg_ref = ref_price
        self.max_orders = max_orders
        self.max_qty = max_qty
        self.traded = False
        self.halted = False
        self.next_oid = 1
        self.bids: dict[int, Level] = {}
        self.asks: dict[int, Level] = {}
        self.bid_heap: list[int] = []
        self.ask_heap: list[int] = []
        self.orders: dict[int, Order] = {}
        # Emptied levels, reused for the next new price: levels near the touch empty and
        # refill all the time (a quarter of the commands of bench.match open a level), and
        # reusing one is cheaper than building a Level and its deque. Not state: nothing
        # observable depends on which object a level is.
        self.spare: list[Level] = []
        self.edges: dict[int, tuple[int, int, int, int]] = {}
        self.set_ref(ref_price)

    def set_band(self, band_bps: int) -> None:
        self.band_bps = band_bps
        self.edges = {}  # computed with the old band

    def set_ref(self, ref: int) -> None:
        """Move the band's reference price: the band ``lo..hi`` and the market protection
        prices follow (every trading command may move it: cached per reference)."""
        self.ref = ref
        edges = self.edges.get(ref)
        if edges is None:
            tick = self.tick
            lo, hi = band_edges(ref, self.band_bps)
            edges = (lo, hi, hi - hi % tick, max(tick, lo + (-lo) % tick))
            if len(self.edges) >= _EDGES_CACHE_MAX:
                self.edges.clear()
            self.edges[ref] = edges
        self.lo, self.hi, self.mkt_buy, self.mkt_sell = edges

    def best_bid(self) -> int | None:
        return _best(self.bids, self.bid_heap, -1)

    def best_ask(self) -> int | None:
        return _best(self.asks, self.ask_heap, 1)

    def depth(self, side: int) -> list[tuple[int, int]]:
        """L2 levels ``(price, qty)`` of one side, best first (not on the hot path)."""
        levels = self.bids if side == BUY else self.asks
        prices = sorted(levels, reverse=side == BUY)
        return [(p, levels[p].qty) for p in prices]

    def level_orders(self, side: int, price: int) -> list[Order]:
        """Live orders at one level in priority order (not on the hot path)."""
        lvl = (self.bids if side == BUY else self.asks).get(price)
        return [] if lvl is None else [o for o in lvl.dq if o[QTY]]


def _best(levels: dict[int, Level], heap: list[int], sgn: int) -> int | None:
    while heap:
        p = heap[0] * sgn
        if p in levels:
            return p
        heappop(heap)
    return None


def _valid_id(s: object, max_len: int) -> bool:
    # Identifiers end up in the canonical encoding: printable ASCII without spaces, so
    # every replica encodes them to the same bytes and no surrogate can make encoding raise.
    return (type(s) is str and 0 < len(s) <= max_len and s.isascii() and s.isprintable()
            and " " not in s)


def _clean_str(s: object, max_len: int = MAX_ID_LEN) -> str:
    return s if _valid_id(s, max_len) else ""  # type: ignore[return-value]


def _clean_int(x: object) -> int:
    return x if type(x) is int and 0 <= x <= MAX_TS_NS else 0  # type: ignore[return-value]


# Valid (side, order_type, tif, stp, post_only) combinations of a new order, each
# mapping to itself: market orders are IOC or FOK, post-only orders limit GTC.
_NEW_FLAGS: dict[tuple, tuple[int, int, int, int, bool]] = {
    (side, otype, tif, stp, po): (side, otype, tif, stp, po)
    for side in (BUY, SELL)
    for otype in (LIMIT, MARKET)
    for tif in (GTC, IOC, FOK)
    for stp in range(5)
    for po in (False, True)
    if not (otype == MARKET and tif == GTC) and not (po and (otype != LIMIT or tif != GTC))
}


def _flags_reject(c: NewOrder) -> str:
    """The reason a new order's enum fields are not a valid combination."""
    # Equality-based like the table lookup (so True counts as 1 in both).
    if c.side not in (BUY, SELL):
        return Reject.INVALID_SIDE
    if c.order_type not in (LIMIT, MARKET):
        return Reject.INVALID_ORDER_TYPE
    if c.tif not in (GTC, IOC, FOK) or (c.order_type == MARKET and c.tif == GTC):
        return Reject.INVALID_TIF
    if c.stp not in (0, 1, 2, 3, 4):
        return Reject.INVALID_STP
    return Reject.INVALID_POST_ONLY


def _is_int(x: object, lo: int, hi: int) -> bool:
    # bool is an int subclass; `type(x) is int` keeps True out of prices and quantities.
    return type(x) is int and lo <= x <= hi  # type: ignore[operator]


def band_edges(ref: int, band_bps: int) -> tuple[int, int]:
    """The price band ``lo..hi`` around reference price ``ref`` (limit prices outside it
    are rejected PRICE_OUTSIDE_BAND)."""
    band = ref * band_bps // 10000
    return ref - band, min(ref + band, MAX_PRICE)


def band_after(symbol: str, band: tuple[int, int] | None,
               raw: tuple) -> tuple[int, int] | None:
    """The price band ``(band_bps, reference price)`` of ``symbol`` after the output event
    ``raw`` (a raw tuple), given the one before it (None: not known): the band rule above
    as the engine's outputs show it, for whoever follows them (the gateway) instead of
    the book. A ``SymbolConfig`` of the symbol states both (its ``ref_price`` is the
    reference in force: the last trade's price once the book has traded); a ``Fill``
    moves the reference to its price (the reference moves at the end of a command that
    traded, to the price it last traded at: its last fill's); any other event changes
    neither. Checking a command's price uses the band after every output before it."""
    tag = raw[0]
    if tag == ev.SYMBOL_CONFIG and raw[1] == symbol:
        return raw[6], raw[7]
    if tag == _FILL and band is not None and raw[1] == symbol:
        return band[0], raw[2]
    return band


class Engine:
    """All books and accounts of one engine instance. See the module docstring."""

    __slots__ = ("_max_open", "accounts", "books", "limits", "output_version", "supply")

    def __init__(self, limits: EngineLimits | None = None) -> None:
        self.limits = limits or EngineLimits()
        self._max_open = self.limits.max_open_orders_per_account
        self.books: dict[str, Book] = {}
        self.accounts: dict[str, Account] = {}
        self.supply: dict[str, int] = {}  # asset -> sum of avail + held over accounts
        self.output_version = 1  # engine.events: which events cancels and rejects make

    def set_output_version(self, version: int) -> None:
        """Emit output format ``version`` from the next command on (an activation)."""
        assert version in OUTPUT_VERSIONS, version
        self.output_version = version

    # ---------------------------------------------------------------- entry points

    def process(self, cmd: object, out: list[tuple]) -> None:
        """Apply one command, appending its raw output events to ``out``. Never raises
        for any input (except ``MemoryError``/``RecursionError``)."""
        self.process_batch((cmd,), out)

    def process_batch(self, cmds: Iterable[object], out: list[tuple],
                      starts: list[int] | None = None) -> None:
        """``process`` each command in order (the consumer's hot loop). With ``starts``,
        the index in ``out`` where each command's events begin is appended to it (one
        append per command: the consumer splits a batch's events by input with it).

        New orders, the bulk of all input, are handled inline rather than by a method
        call per command, with what they read from the engine hoisted out of the loop;
        cancels, the next most common, skip the handler table. (``out.append`` stays a
        method call: CPython 3.11 specialises it to an inline list append, cheaper than
        calling a bound ``append`` kept in a local.)

        The output version is read once per call: it changes only between calls (an
        activation is an input of its own, never inside a batch of commands)."""
        books = self.books
        v1 = self.output_version == 1
        accounts = self.accounts
        max_open = self._max_open
        reject = self._reject_any
        handlers = _HANDLERS
        for cmd in cmds:
            n0 = len(out)
            if starts is not None:
                starts.append(n0)
            try:
                if type(cmd) is not NewOrder:
                    if type(cmd) is CancelOrder:  # the next most common
                        self._cancel(cmd, out)
                        continue
                    handler = handlers.get(type(cmd))
                    if handler is None:
                        reject(cmd, out, Cmd.UNKNOWN, Reject.UNKNOWN_COMMAND, "")
                    else:
                        handler(self, cmd, out)
                    continue
                # ---- a new order. Validation only reads: no state changes before the
                # Accepted event is emitted. One unpack of the command tuple instead of a
                # field lookup per use.
                ts, symbol, account, cid, side, qty, price, otype, tif, post_only, stp = cmd
                if type(ts) is not int or ts < 0 or ts > MAX_TS_NS:
                    reject(cmd, out, Cmd.NEW, Reject.INVALID_TIMESTAMP, "")
                    continue
                # Keys are plain str; whatever else is looked up misses (or, if unhashable,
                # raises before any change). Events carry the stored key, never the input.
                # Dict lookups here subscript (cheaper than .get in CPython 3.11) and, on
                # KeyError, ask .get: None for a miss, or it raises again what the key's
                # own __hash__/__eq__ raised, exactly as a plain .get would have.
                try:
                    book = books[symbol]
                except KeyError:
                    book = books.get(symbol)
                if book is None:
                    reject(cmd, out, Cmd.NEW, Reject.UNKNOWN_SYMBOL, "")
                    continue
                if book.halted:
                    reject(cmd, out, Cmd.NEW, Reject.SYMBOL_HALTED, "")
                    continue
                try:
                    acct = accounts[account]
                except KeyError:
                    acct = accounts.get(account)
                if acct is None:
                    reject(cmd, out, Cmd.NEW, Reject.UNKNOWN_ACCOUNT, "")
                    continue
                if cid != "":
                    if not _valid_id(cid, MAX_ID_LEN):
                        reject(cmd, out, Cmd.NEW, Reject.INVALID_CLIENT_ORDER_ID, "")
                        continue
                    if cid in acct.cids:
                        reject(cmd, out, Cmd.NEW, Reject.DUPLICATE_CLIENT_ORDER_ID, "")
                        continue
                # All five enum fields in one lookup of the table of valid combinations,
                # which also normalises them to plain ints/bools; a miss finds the reason.
                # (Subscript as above: through .get, a tuple key costs ~3x more.)
                try:
                    flags = _NEW_FLAGS[side, otype, tif, stp, post_only]
                except KeyError:
                    flags = _NEW_FLAGS.get((side, otype, tif, stp, post_only))
                if flags is None:
                    reject(cmd, out, Cmd.NEW, _flags_reject(cmd), "")  # type: ignore[arg-type]
                    continue
                side, otype, tif, stp, post_only = flags
                if type(qty) is not int or qty <= 0 or qty > book.max_qty:
                    reject(cmd, out, Cmd.NEW, Reject.INVALID_QTY, "")
                    continue
                if qty % book.lot:
                    reject(cmd, out, Cmd.NEW, Reject.INVALID_LOT, "")
                    continue
                crosses = True
                if otype == LIMIT:
                    if type(price) is not int or price <= 0 or price > MAX_PRICE:
                        reject(cmd, out, Cmd.NEW, Reject.INVALID_PRICE, "")
                        continue
                    if price % book.tick:
                        reject(cmd, out, Cmd.NEW, Reject.INVALID_TICK, "")
                        continue
                    if price < book.lo or price > book.hi:
                        reject(cmd, out, Cmd.NEW, Reject.PRICE_OUTSIDE_BAND, "")
                        continue
                    if tif == GTC:
                        if len(book.orders) >= book.max_orders:
                            reject(cmd, out, Cmd.NEW, Reject.BOOK_FULL, "")
                            continue
                        if acct.n_open >= max_open:
                            reject(cmd, out, Cmd.NEW, Reject.TOO_MANY_OPEN_ORDERS, "")
                            continue
                        # Best opposite price (dropping stale heap keys changes no state);
                        # the side's own levels are picked here for the fast path below.
                        crosses = False
                        if side == BUY:
                            own = book.bids
                            heap = book.ask_heap
                            levels = book.asks
                            while heap:
                                if heap[0] in levels:
                                    if heap[0] <= price:
                                        crosses = True
                                    break
                                heappop(heap)
                        else:
                            own = book.asks
                            heap = book.bid_heap
                            levels = book.bids
                            while heap:
                                if -heap[0] in levels:
                                    if -heap[0] >= price:
                                        crosses = True
                                    break
                                heappop(heap)
                        if post_only and crosses:
                            reject(cmd, out, Cmd.NEW, Reject.POST_ONLY_WOULD_CROSS, "")
                            continue
                else:
                    if type(price) is not int or price != 0:
                        reject(cmd, out, Cmd.NEW, Reject.INVALID_PRICE, "")
                        continue
                    price = book.mkt_buy if side == BUY else book.mkt_sell
                # A buy reserves price * qty of the quote asset, a sell qty of the base.
                if side == BUY:
                    asset, need = book.quote, price * qty
                else:
                    asset, need = book.base, qty
                avail = acct.avail
                have = avail.get(asset, 0)
                if have < need:
                    reject(cmd, out, Cmd.NEW, Reject.INSUFFICIENT_BALANCE, "")
                    continue

                # Validated: from here on only integer arithmetic on checked values.
                oid = book.next_oid
                out.append((_ACCEPTED, book.symbol, oid, acct.id, cid, side, otype, tif, price,
                            qty, ts))
                book.next_oid = oid + 1
                if crosses:
                    if tif == FOK and not _fok_fillable(book, acct, side, price, qty, stp):
                        out.append((_CANCELLED, book.symbol, oid, acct.id, cid,
                                    CancelReason.FOK_UNFILLED, qty, ts) if v1 else
                                   (_CANCELLED_V2, book.symbol, oid, acct.id, cid,
                                    CancelReason.FOK_UNFILLED, qty, ts, side, price))
                    else:
                        self._execute(book, acct, oid, cid, side, price, qty, tif == GTC,
                                      post_only, stp, ts, out)
                    continue
                # Fast path (most orders): a GTC limit that cannot trade goes straight to
                # its level. Same effects as _execute with no fills.
                avail[asset] = have - need
                acct.held[asset] += need
                lvl = own.get(price)
                if lvl is None:
                    spare = book.spare  # see Book.spare
                    lvl = own[price] = spare.pop() if spare else new_level()
                    heap = book.bid_heap if side == BUY else book.ask_heap
                    heappush(heap, -price if side == BUY else price)
                o = [qty, oid, acct, cid, side, price, post_only, stp]  # see Order layout
                lvl.dq.append(o)
                lvl.n += 1
                lvl.qty += qty
                book.orders[oid] = o
                acct.n_open += 1
                if cid:
                    acct.cids[cid] = o
                out.append((_BOOK, book.symbol, side, price, lvl.qty))
            except (MemoryError, RecursionError):
                raise
            except Exception as exc:
                self._failed(cmd, out, n0, exc)

    def _failed(self, cmd: object, out: list[tuple], n0: int, exc: Exception) -> None:
        """Turn an exception raised by a command into its deterministic outputs."""
        rolled_back = len(out) > n0
        del out[n0:]
        # The type name, not the message: messages may embed addresses or dict orders.
        detail = _clean_str(type(exc).__name__) or "Exception"
        self._reject_any(cmd, out, _KINDS.get(type(cmd), Cmd.UNKNOWN), Reject.INTERNAL_ERROR,
                         detail)
        # Book handlers change nothing before their first output event (enforced by the
        # order of statements in each handler and tested), so a command that raised after
        # emitting may have half-updated its book: halt that book.
        if type(cmd) in _BOOK_COMMANDS and rolled_back:
            book = self.books.get(cmd.symbol)  # type: ignore[attr-defined]
            if book is not None:
                book.halted = True
                out.append((ev.HALTED, book.symbol, detail, out[-1][_REJECT_TS]))

    def apply_raw(self, cmd: object) -> list[tuple]:
        out: list[tuple] = []
        self.process(cmd, out)
        return out

    def apply(self, cmd: object) -> list[ev.Event]:
        """Apply one command and return its events as frozen dataclass records."""
        return [ev.to_record(t) for t in self.apply_raw(cmd)]

    # ---------------------------------------------------------------- rejects

    def _reject_any(self, cmd: object, out: list[tuple], kind: str, reason: str,
                    detail: str) -> None:
        def field(name: str) -> object:
            try:
                return getattr(cmd, name, None)
            except Exception:
                return None

        rejected = (
            _REJECTED,
            _clean_str(field("symbol"), MAX_SYMBOL_LEN),
            _clean_str(field("account")),
            _clean_str(field("client_order_id")),
            _clean_int(field("order_id")),
            kind,
            reason,
            detail,
            _clean_int(field("ts_ns")),
        )
        out.append(rejected if self.output_version == 1 else _reject_v2(rejected, cmd))

    # ---------------------------------------------------------------- orders
    # (New orders are validated in ``process_batch``.)

    def _execute(self, book: Book, acct: Account, oid: int, cid: str, side: int, price: int,
                 qty: int, may_rest: bool, post_only: bool, stp: int, ts: int,
                 out: list[tuple]) -> None:
        """Match a validated taker, settle its balances, then rest or expire the rest.

        The taker's own reservation is never booked before matching: its balances move
        once at the end (fills at or below its limit can only cost less than the risk
        check assumed), which keeps the per-fill work to the maker side. A level's
        aggregate is updated once when the walk leaves it, not per fill."""
        sym = book.symbol
        aid = acct.id
        base = book.base
        quote = book.quote
        if side == BUY:
            levels = book.asks
            heap = book.ask_heap
            sgn = 1
        else:
            levels = book.bids
            heap = book.bid_heap
            sgn = -1
        oside = 1 - side
        lim_key = price * sgn
        orders = book.orders
        q = qty
        value = 0  # quote amount of all fills
        dec = 0  # taker quantity removed by STP decrement, without a trade
        last_px = 0
        kill = False  # taker's remainder cancelled by STP
        touched = 0  # makers filled or removed (MAX_MATCHES_PER_ORDER)
        capped = False
        while q:
            while heap:
                key = heap[0]
                p = key * sgn
                lvl = levels.get(p)
                if lvl is not None:
                    break
                heappop(heap)
            else:
                break
            if key > lim_key:
                break
            dq = lvl.dq
            q0 = q  # q0 - q is what traded at this level (STP decrements move q0 too)
            stp_hit = False
            while True:
                m = dq[0]  # lvl.n > 0, so a live order is in the deque
                mq = m[QTY]
                if not mq:
                    dq.popleft()
                    continue
                if touched == MAX_MATCHES_PER_ORDER:
                    capped = True
                    break
                touched += 1
                macct = m[ACCT]
                if macct is acct and stp:
                    if stp == STP_CN:
                        kill = True
                        break
                    stp_hit = True
                    if stp == STP_DC and mq > q:
                        # The maker absorbs the taker's whole remainder.
                        m[QTY] = mq - q
                        lvl.qty -= q
                        _release(macct, m[SIDE], p, q, base, quote)
                        out.append((_REDUCED, sym, m[OID], aid, m[CID], mq - q, ReduceReason.STP,
                                    ts))
                        kill = True
                        break
                    # The maker leaves the book whole (CO, CB, or DC with mq <= q).
                    dq.popleft()
                    m[QTY] = 0
                    lvl.qty -= mq
                    lvl.n -= 1
                    del orders[m[OID]]
                    macct.n_open -= 1
                    if m[CID]:
                        del macct.cids[m[CID]]
                    _release(macct, m[SIDE], p, mq, base, quote)
                    out.append((_CANCELLED, sym, m[OID], aid, m[CID], CancelReason.STP, mq, ts)
                               if self.output_version == 1 else
                               (_CANCELLED_V2, sym, m[OID], aid, m[CID], CancelReason.STP, mq,
                                ts, oside, p))
                    if stp == STP_CB:
                        kill = True
                        break
                    if stp == STP_DC:
                        if q == mq:
                            kill = True  # taker decremented to nothing: cancelled below
                            break
                        q -= mq
                        q0 -= mq
                        dec += mq
                        out.append((_REDUCED, sym, oid, aid, cid, q, ReduceReason.STP, ts))
                    if not lvl.n:
                        break
                    continue
                if q >= mq:
                    # Maker filled completely. Its Order object is dropped from every
                    # index here, so its qty field need not be zeroed.
                    t = mq
                    q -= mq
                    dq.popleft()
                    lvl.n -= 1
                    del orders[m[OID]]
                    macct.n_open -= 1
                    if m[CID]:
                        del macct.cids[m[CID]]
                else:
                    t = q
                    m[QTY] = mq - q
                    q = 0
                v = p * t
                value += v
                out.append((_FILL, sym, p, t, side, m[OID], oid, macct.id, aid, ts))
                if side == BUY:
                    macct.held[base] -= t
                    macct.avail[quote] += v
                else:
                    macct.held[quote] -= v
                    macct.avail[base] += t
                if not q or not lvl.n:
                    break
            if q != q0:
                lvl.qty -= q0 - q
                last_px = p
                out.append((_BOOK, sym, oside, p, lvl.qty))
            elif stp_hit:
                out.append((_BOOK, sym, oside, p, lvl.qty))
            if not lvl.n:
                # _drop_level inline (a level empties in most marketable orders); its key
                # is the heap's top.
                del levels[p]
                heappop(heap)
                spare = book.spare
                if len(spare) < _SPARE_LEVELS:
                    dq.clear()
                    lvl.qty = 0
                    spare.append(lvl)
            if kill or capped:
                break
        filled = qty - q - dec
        # No over-fill. (q <= qty, filled <= qty and value >= 0 hold by construction: q
        # only decreases, and dec, prices and quantities are positive.)
        assert q >= 0 and filled >= 0
        rest = q if (may_rest and not kill and not capped) else 0
        # Settle the taker in one step: pay for fills, reserve what rests (nothing, for
        # IOC and market orders: skip the no-op; a 0 balance is the same as none).
        if side == BUY:
            hold = price * rest
            a = acct.avail
            a[quote] -= value + hold
            a[base] += filled
            if hold:
                acct.held[quote] += hold
        else:
            a = acct.avail
            a[base] -= filled + rest
            a[quote] += value
            if rest:
                acct.held[base] += rest
        if value:
            book.traded = True
            if last_px != book.ref:
                book.set_ref(last_px)
        if rest:
            own = book.bids if side == BUY else book.asks
            lvl = own.get(price)
            if lvl is None:
                lvl = own[price] = _take_level(book)
                heap = book.bid_heap if side == BUY else book.ask_heap
                heappush(heap, -price if side == BUY else price)
            o = [rest, oid, acct, cid, side, price, post_only, stp]  # see Order layout
            lvl.dq.append(o)
            lvl.n += 1
            lvl.qty += rest
            orders[oid] = o
            acct.n_open += 1
            if cid:
                acct.cids[cid] = o
            out.append((_BOOK, sym, side, price, lvl.qty))
        elif q:
            reason = (CancelReason.STP if kill else CancelReason.MATCH_LIMIT if capped
                      else CancelReason.EXPIRED)
            out.append((_CANCELLED, sym, oid, aid, cid, reason, q, ts)
                       if self.output_version == 1 else
                       (_CANCELLED_V2, sym, oid, aid, cid, reason, q, ts, side, price))

    def _find(self, c: CancelOrder | ReplaceOrder | ReduceOrder, kind: str,
              out: list[tuple]) -> tuple[Book, Account, Order] | None:
        """Common checks of commands on an existing order; rejects and returns None."""
        ts = c.ts_ns
        if type(ts) is not int or not 0 <= ts <= MAX_TS_NS:
            self._reject_any(c, out, kind, Reject.INVALID_TIMESTAMP, "")
            return None
        book = self.books.get(c.symbol)
        if book is None:
            self._reject_any(c, out, kind, Reject.UNKNOWN_SYMBOL, "")
            return None
        if book.halted:
            self._reject_any(c, out, kind, Reject.SYMBOL_HALTED, "")
            return None
        acct = self.accounts.get(c.account)
        if acct is None:
            self._reject_any(c, out, kind, Reject.UNKNOWN_ACCOUNT, "")
            return None
        sym = book.symbol
        aid = acct.id
        oid = c.order_id
        cid = c.client_order_id
        if type(oid) is not int or type(cid) is not str or (oid == 0 and cid == ""):
            self._reject_any(c, out, kind, Reject.INVALID_ORDER_REF, "")
            return None
        o = book.orders.get(oid) if oid else acct.cids.get(cid)
        # An order of another account is reported exactly like a missing one.
        if o is None or o[ACCT] is not acct or book.orders.get(o[OID]) is not o:
            # Common in real flow (cancel racing a fill): build the reject directly from
            # the fields validated above rather than through the generic sanitiser.
            rejected = (_REJECTED, sym, aid, cid if cid == "" or _valid_id(cid, MAX_ID_LEN)
                        else "", oid if 0 <= oid <= MAX_TS_NS else 0, kind,
                        Reject.UNKNOWN_ORDER, "", ts)
            out.append(rejected if self.output_version == 1 else _reject_v2(rejected, c))
            return None
        return book, acct, o

    def _cancel(self, c: CancelOrder, out: list[tuple]) -> None:
        # ``_find`` specialised for the second most common command (the same checks in
        # the same order): one unpack of the command instead of a field lookup per use,
        # and a call less.
        ts, symbol, account, oid, cid = c
        kind = Cmd.CANCEL
        if type(ts) is not int or not 0 <= ts <= MAX_TS_NS:
            return self._reject_any(c, out, kind, Reject.INVALID_TIMESTAMP, "")
        book = self.books.get(symbol)
        if book is None:
            return self._reject_any(c, out, kind, Reject.UNKNOWN_SYMBOL, "")
        if book.halted:
            return self._reject_any(c, out, kind, Reject.SYMBOL_HALTED, "")
        acct = self.accounts.get(account)
        if acct is None:
            return self._reject_any(c, out, kind, Reject.UNKNOWN_ACCOUNT, "")
        if type(oid) is not int or type(cid) is not str or (oid == 0 and cid == ""):
            return self._reject_any(c, out, kind, Reject.INVALID_ORDER_REF, "")
        orders = book.orders
        o = orders.get(oid) if oid else acct.cids.get(cid)
        if o is None or o[ACCT] is not acct or orders.get(o[OID]) is not o:
            rejected = (_REJECTED, book.symbol, acct.id, cid if cid == "" or _valid_id(
                cid, MAX_ID_LEN) else "", oid if 0 <= oid <= MAX_TS_NS else 0, kind,
                Reject.UNKNOWN_ORDER, "", ts)
            out.append(rejected if self.output_version == 1 else _reject_v2(rejected, c))
            return None
        if self.output_version == 1:
            out.append((_CANCELLED, book.symbol, o[OID], acct.id, o[CID], CancelReason.USER,
                        o[QTY], ts))
        else:
            out.append((_CANCELLED_V2, book.symbol, o[OID], acct.id, o[CID], CancelReason.USER,
                        o[QTY], ts, o[SIDE], o[PRICE]))
        _unlink(book, o, out)
        return None

    def _replace(self, c: ReplaceOrder, out: list[tuple]) -> None:
        found = self._find(c, Cmd.REPLACE, out)
        if found is None:
            return
        book, acct, o = found
        price = c.price
        qty = c.qty
        if not _is_int(qty, 1, book.max_qty):
            return self._reject_any(c, out, Cmd.REPLACE, Reject.INVALID_QTY, "")
        if qty % book.lot:
            return self._reject_any(c, out, Cmd.REPLACE, Reject.INVALID_LOT, "")
        if not _is_int(price, 1, MAX_PRICE):
            return self._reject_any(c, out, Cmd.REPLACE, Reject.INVALID_PRICE, "")
        if price % book.tick:
            return self._reject_any(c, out, Cmd.REPLACE, Reject.INVALID_TICK, "")
        if price < book.lo or price > book.hi:
            return self._reject_any(c, out, Cmd.REPLACE, Reject.PRICE_OUTSIDE_BAND, "")
        side = o[SIDE]
        if o[POST_ONLY]:
            if side == BUY:
                best = _best(book.asks, book.ask_heap, 1)
                crosses = best is not None and best <= price
            else:
                best = _best(book.bids, book.bid_heap, -1)
                crosses = best is not None and best >= price
            if crosses:
                return self._reject_any(c, out, Cmd.REPLACE, Reject.POST_ONLY_WOULD_CROSS, "")
        if side == BUY:
            extra = price * qty - o[PRICE] * o[QTY]
            if extra > acct.avail.get(book.quote, 0):
                return self._reject_any(c, out, Cmd.REPLACE, Reject.INSUFFICIENT_BALANCE, "")
        elif qty - o[QTY] > acct.avail.get(book.base, 0):
            return self._reject_any(c, out, Cmd.REPLACE, Reject.INSUFFICIENT_BALANCE, "")
        ts = c.ts_ns
        out.append((_REPLACED, book.symbol, o[OID], acct.id, o[CID], price, qty, ts))
        _unlink(book, o, out)
        self._execute(book, acct, o[OID], o[CID], side, price, qty, True, o[POST_ONLY],
                      o[STP_MODE], ts, out)

    def _reduce(self, c: ReduceOrder, out: list[tuple]) -> None:
        found = self._find(c, Cmd.REDUCE, out)
        if found is None:
            return
        book, acct, o = found
        qty = c.qty
        if not _is_int(qty, 1, o[QTY] - 1):
            return self._reject_any(c, out, Cmd.REDUCE, Reject.INVALID_QTY, "")
        if qty % book.lot:
            return self._reject_any(c, out, Cmd.REDUCE, Reject.INVALID_LOT, "")
        out.append((_REDUCED, book.symbol, o[OID], acct.id, o[CID], qty, ReduceReason.USER,
                    c.ts_ns))
        d = o[QTY] - qty
        lvl = (book.bids if o[SIDE] == BUY else book.asks)[o[PRICE]]
        o[QTY] = qty
        lvl.qty -= d
        _release(acct, o[SIDE], o[PRICE], d, book.base, book.quote)
        out.append((_BOOK, book.symbol, o[SIDE], o[PRICE], lvl.qty))

    # ---------------------------------------------------------------- admin

    def _add_symbol(self, c: AddSymbol, out: list[tuple]) -> None:
        kind = Cmd.ADD_SYMBOL
        if not _is_int(c.ts_ns, 0, MAX_TS_NS):
            return self._reject_any(c, out, kind, Reject.INVALID_TIMESTAMP, "")
        if not _valid_id(c.symbol, MAX_SYMBOL_LEN):
            return self._reject_any(c, out, kind, Reject.INVALID_SYMBOL, "")
        if c.symbol in self.books:
            return self._reject_any(c, out, kind, Reject.SYMBOL_EXISTS, "")
        if len(self.books) >= self.limits.max_symbols:
            return self._reject_any(c, out, kind, Reject.TOO_MANY_SYMBOLS, "")
        ok = (
            _valid_id(c.base, MAX_ASSET_LEN)
            and _valid_id(c.quote, MAX_ASSET_LEN)
            and c.base != c.quote
            and _is_int(c.tick_size, 1, MAX_PRICE)
            and _is_int(c.lot_size, 1, MAX_QTY)
            and _config_ok(c.tick_size, c.lot_size, c.band_bps, c.ref_price, c.max_orders,
                           c.max_qty)
        )
        if not ok:
            return self._reject_any(c, out, kind, Reject.INVALID_CONFIG, "")
        book = Book(c.symbol, c.base, c.quote, c.tick_size, c.lot_size, c.band_bps,
                    c.ref_price, c.max_orders, c.max_qty)
        self.books[c.symbol] = book
        out.append(_config_event(book, c.ts_ns))

    def _update_symbol(self, c: UpdateSymbol, out: list[tuple]) -> None:
        kind = Cmd.UPDATE_SYMBOL
        if not _is_int(c.ts_ns, 0, MAX_TS_NS):
            return self._reject_any(c, out, kind, Reject.INVALID_TIMESTAMP, "")
        book = self.books.get(c.symbol) if type(c.symbol) is str else None
        if book is None:
            return self._reject_any(c, out, kind, Reject.UNKNOWN_SYMBOL, "")
        if not _config_ok(book.tick, book.lot, c.band_bps, c.ref_price, c.max_orders,
                          c.max_qty):
            return self._reject_any(c, out, kind, Reject.INVALID_CONFIG, "")
        book.set_band(c.band_bps)
        book.cfg_ref = c.ref_price
        book.max_orders = c.max_orders
        book.max_qty = c.max_qty
        book.set_ref(book.ref if book.traded else c.ref_price)
        out.append(_config_event(book, c.ts_ns))

    def _deposit(self, c: Deposit, out: list[tuple]) -> None:
        kind = Cmd.DEPOSIT
        if not _is_int(c.ts_ns, 0, MAX_TS_NS):
            return self._reject_any(c, out, kind, Reject.INVALID_TIMESTAMP, "")
        if not _valid_id(c.account, MAX_ID_LEN):
            return self._reject_any(c, out, kind, Reject.INVALID_ACCOUNT, "")
        if not _valid_id(c.asset, MAX_ASSET_LEN):
            return self._reject_any(c, out, kind, Reject.INVALID_ASSET, "")
        amount = c.amount
        if not _is_int(amount, 1, MAX_SUPPLY):
            return self._reject_any(c, out, kind, Reject.INVALID_AMOUNT, "")
        if self.supply.get(c.asset, 0) + amount > MAX_SUPPLY:
            return self._reject_any(c, out, kind, Reject.SUPPLY_LIMIT, "")
        acct = self.accounts.get(c.account)
        if acct is None:
            if len(self.accounts) >= self.limits.max_accounts:
                return self._reject_any(c, out, kind, Reject.TOO_MANY_ACCOUNTS, "")
            acct = self.accounts[c.account] = Account(c.account)
        self.supply[c.asset] = self.supply.get(c.asset, 0) + amount
        acct.avail[c.asset] += amount
        avail = acct.avail[c.asset]
        out.append((ev.BALANCE, c.account, c.asset, amount, avail, acct.held.get(c.asset, 0),
                    BalanceReason.DEPOSIT, c.ts_ns))

    def _withdraw(self, c: Withdraw, out: list[tuple]) -> None:
        kind = Cmd.WITHDRAW
        if not _is_int(c.ts_ns, 0, MAX_TS_NS):
            return self._reject_any(c, out, kind, Reject.INVALID_TIMESTAMP, "")
        acct = self.accounts.get(c.account) if type(c.account) is str else None
        if acct is None:
            return self._reject_any(c, out, kind, Reject.UNKNOWN_ACCOUNT, "")
        if not _valid_id(c.asset, MAX_ASSET_LEN):
            return self._reject_any(c, out, kind, Reject.INVALID_ASSET, "")
        amount = c.amount
        if not _is_int(amount, 1, MAX_SUPPLY):
            return self._reject_any(c, out, kind, Reject.INVALID_AMOUNT, "")
        if acct.avail.get(c.asset, 0) < amount:
            return self._reject_any(c, out, kind, Reject.INSUFFICIENT_BALANCE, "")
        self.supply[c.asset] -= amount
        avail = acct.avail[c.asset] = acct.avail[c.asset] - amount
        out.append((ev.BALANCE, c.account, c.asset, -amount, avail, acct.held.get(c.asset, 0),
                    BalanceReason.WITHDRAW, c.ts_ns))


# A command's side as a version-2 reject reports it: equality-based, as the validation of
# a new order (``_NEW_FLAGS``) reads it.
_SIDE_OF = {BUY: BUY, SELL: SELL}


def _reject_v2(rejected: tuple, cmd: object) -> tuple:
    """The RejectedV2 of a Rejected tuple: its fields, then ``cmd``'s side and price when
    it has valid ones (NO_SIDE and 0 otherwise). Never raises, whatever ``cmd`` is."""
    try:
        side = _SIDE_OF.get(getattr(cmd, "side", None), ev.NO_SIDE)
    except Exception:  # an unhashable or misbehaving field: the reject must still be made
        side = ev.NO_SIDE
    try:
        price = getattr(cmd, "price", None)
    except Exception:
        price = None
    if type(price) is not int or not 0 <= price <= MAX_PRICE:
        price = 0
    return (_REJECTED_V2, *rejected[1:], side, price)


def _config_ok(tick: int, lot: int, band_bps: object, ref_price: object, max_orders: object,
               max_qty: object) -> bool:
    return (
        _is_int(band_bps, 1, MAX_BAND_BPS)
        and _is_int(ref_price, tick, MAX_PRICE)
        and ref_price % tick == 0  # type: ignore[operator]
        and _is_int(max_orders, 1, 100_000_000)
        and _is_int(max_qty, lot, MAX_QTY)
    )


def _config_event(book: Book, ts: int) -> tuple:
    return (ev.SYMBOL_CONFIG, book.symbol, book.base, book.quote, book.tick, book.lot,
            book.band_bps, book.ref, book.max_orders, book.max_qty, ts)


def _release(acct: Account, side: int, price: int, qty: int, base: str, quote: str) -> None:
    """Return the reservation of ``qty`` of a resting order to the available balance."""
    if side == BUY:
        v = price * qty
        acct.held[quote] -= v
        acct.avail[quote] += v
    else:
        acct.held[base] -= qty
        acct.avail[base] += qty


def _unlink(book: Book, o: Order, out: list[tuple]) -> None:
    """Take a resting order out of its book, release its reservation, emit the level."""
    qty, oid, acct, cid, side, price = o[:POST_ONLY]  # the Order layout's first fields
    levels = book.bids if side == BUY else book.asks
    lvl = levels[price]
    # _release, inline (every cancel and replace comes here).
    if side == BUY:
        v = price * qty
        acct.held[book.quote] -= v
        acct.avail[book.quote] += v
    else:
        acct.held[book.base] -= qty
        acct.avail[book.base] += qty
    o[QTY] = 0
    lvl.qty -= qty
    lvl.n -= 1
    del book.orders[oid]
    acct.n_open -= 1
    if cid:
        del acct.cids[cid]
    dq = lvl.dq
    if not lvl.n:
        _drop_level(book, levels, price, lvl)
        # Its heap key stays, stale (skipped and popped when it reaches the top). This is
        # the only place stale keys are made (matching pops the key of a level it
        # empties), so the heap is compacted here when they outnumber live levels.
        heap = book.bid_heap if side == BUY else book.ask_heap
        if len(heap) > 2 * len(levels) + _COMPACT_SLACK:
            _rebuild_heap(heap, levels, side)
    elif dq[0] is o:
        dq.popleft()
    elif len(dq) > 2 * lvl.n + _COMPACT_SLACK:
        lvl.dq = deque(x for x in dq if x[QTY])
    out.append((_BOOK, book.symbol, side, price, lvl.qty))


def _rebuild_heap(heap: list[int], levels: dict[int, Level], side: int) -> None:
    heap[:] = [-p for p in levels] if side == BUY else list(levels)
    heapify(heap)


def _fok_fillable(book: Book, acct: Account, side: int, price: int, qty: int,
                  stp: int) -> bool:
    levels = book.asks if side == BUY else book.bids
    prices = sorted(p for p in levels if (p <= price if side == BUY else p >= price))
    if side == SELL:
        prices.reverse()
    need = qty
    makers = 0  # the taker could not trade past MAX_MATCHES_PER_ORDER of them
    for p in prices:
        for m in levels[p].dq:
            if not m[QTY]:
                continue
            makers += 1
            if makers > MAX_MATCHES_PER_ORDER:
                return False
            if m[ACCT] is acct and stp != STP_NONE:
                if stp == STP_CO:
                    continue
                return False
            need -= m[QTY]
            if need <= 0:
                return True
    return False


_HANDLERS = {
    CancelOrder: Engine._cancel,
    ReplaceOrder: Engine._replace,
    ReduceOrder: Engine._reduce,
    AddSymbol: Engine._add_symbol,
    UpdateSymbol: Engine._update_symbol,
    Deposit: Engine._deposit,
    Withdraw: Engine._withdraw,
}

_BOOK_COMMANDS = (NewOrder, CancelOrder, ReplaceOrder, ReduceOrder)

_KINDS = {
    NewOrder: Cmd.NEW,
    CancelOrder: Cmd.CANCEL,
    ReplaceOrder: Cmd.REPLACE,
    ReduceOrder: Cmd.REDUCE,
    AddSymbol: Cmd.ADD_SYMBOL,
    UpdateSymbol: Cmd.UPDATE_SYMBOL,
    Deposit: Cmd.DEPOSIT,
    Withdraw: Cmd.WITHDRAW,
}


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the engine's hot loop without CPython's cyclic GC (how the shell should run it).

    The engine makes no reference cycles in steady state (an order's link back to its
    account is dropped with the order), so everything it frees goes by reference
    counting; the cyclic collector only re-scans the live book over and over, which costs
    ~40% of matching throughput with default thresholds. Collect at quiet points (e.g.
    after a snapshot) if exceptions from poison input may have left cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# When GcFreezer thaws what it froze for one full collection (``thaw_due``): not before
# THAW_MIN_S after the last, nor before THAW_COST_FACTOR times that one's pause (a full
# collection walks the whole book: measured 185 ms with 3M tracked objects, ~1M resting
# orders; so at most 0.1% of the time goes to them); then only once there are signs of
# cyclic garbage made since (the young collections found some, or a trace export failed:
# the shell makes cycles, so some may have been frozen alive), or THAW_MAX_S has passed
# (garbage made of objects that lived long and gave no sign, e.g. a channel replaced).
THAW_MIN_S = 60.0
THAW_COST_FACTOR = 1_000
THAW_MAX_S = 3_600.0


def thaw_due(elapsed_s: float, last_pause_s: float, garbage_signs: int) -> bool:
    """Whether a full collection of the frozen objects is due, ``elapsed_s`` after the
    last one (or the start), which took ``last_pause_s``, with ``garbage_signs`` signs of
    cyclic garbage made since."""
    if elapsed_s < max(THAW_MIN_S, THAW_COST_FACTOR * last_pause_s):
        return False
    return garbage_signs > 0 or elapsed_s >= THAW_MAX_S


def young_collected() -> int:
    """Objects the collections of generations 0 and 1 have found unreachable so far: a
    sign that the process makes cyclic garbage (GcFreezer's default)."""
    stats = gc.get_stats()
    return int(stats[0]["collected"] + stats[1]["collected"])


class GcFreezer:
    """Keeps the live book out of CPython's full collections (the shell's other half of
    ``gc_paused``).

    A full collection walks every tracked object, and every resting order is one (a
    list): measured on this machine, 19 ms with 100k resting orders, 112 ms with 500k,
    200 ms with 1M, a stall of matching each time the old generation has grown by a
    quarter. Every ``every`` inputs this collects the young generations (cycles made and
    dropped since) and freezes what survives (``gc.freeze``: out of every later
    collection, still freed by reference counting): a full collection then walks only
    what was made since the last freeze.

    The price: an object frozen alive that later becomes part of a garbage cycle is not
    collected while frozen, and such garbage gives no sign to the young collections. The
    engine makes none (see ``gc_paused``), but the shell's libraries do: a failed trace
    export leaves its frames and its request in a cycle (xdc.telemetry._BatchReleased).
    So when ``thaw_due`` (``signs``: a count that grows with each sign of cyclic garbage;
    the runner adds failed trace exports to the young collections' finds), everything
    frozen is unfrozen for one full collection and frozen again: garbage that gave a sign
    lives at most THAW_MIN_S (or the cost rule's interval), any other THAW_MAX_S, at one
    pause per interval. ``thaws``, ``thaw_collected`` and ``thaw_s`` say how many there
    were, and what the last one found and took."""

    def __init__(self, every: int, clock: Callable[[], float] = time.monotonic,
                 signs: Callable[[], int] = young_collected) -> None:
        assert every > 0
        self.every = every
        self.freezes = 0
        self.thaws = 0
        self.thaw_collected = 0
        self.thaw_s = 0.0
        self._since = 0
        self._clock = clock
        self._signs = signs
        self._thawed_at = clock()
        self._signs_at_thaw = signs()

    def advance(self, inputs: int) -> bool:
        """``inputs`` more were processed; freezes once ``every`` have been since the last
        time, after a full collection of what was frozen when one is due. Returns
        whether that collection ran."""
        self._since += inputs
        if self._since < self.every:
            return False
        self._since = 0
        gc.collect(1)
        now = self._clock()
        thawed = thaw_due(now - self._thawed_at, self.thaw_s,
                          self._signs() - self._signs_at_thaw)
        if thawed:
            gc.unfreeze()
            self.thaw_collected = gc.collect()
            done = self._clock()
            self.thaw_s, self.thaws = done - now, self.thaws + 1
            self._thawed_at, self._signs_at_thaw = done, self._signs()
        gc.freeze()
        self.freezes += 1
        return thawed


def step(state: Engine, cmd: object) -> tuple[Engine, list[ev.Event]]:
    """Functional façade: ``(state, command) -> (state, events)``. The state object is
    updated in place and returned."""
    return state, state.apply(cmd)


def check_invariants(eng: Engine) -> None:
    """Assert every structural and accounting invariant (tests; too slow per command)."""
    held: dict[tuple[str, str], int] = {}
    n_open: dict[str, int] = {}
    cids: dict[tuple[str, str], Order] = {}
    for sym in sorted(eng.books):
        book = eng.books[sym]
        assert book.symbol == sym
        for side, levels, heap, sgn in ((BUY, book.bids, book.bid_heap, -1),
                                        (SELL, book.asks, book.ask_heap, 1)):
            keys = {k * sgn for k in heap}
            for p in sorted(levels):
                lvl = levels[p]
                assert p in keys, "level missing from heap"
                live = [o for o in lvl.dq if o[QTY]]
                assert live and len(live) == lvl.n, "level count"
                assert sum(o[QTY] for o in live) == lvl.qty, "level aggregate"
                for o in live:
                    assert o[SIDE] == side and o[PRICE] == p
                    assert book.orders.get(o[OID]) is o
                    assert p % book.tick == 0 and o[QTY] % book.lot == 0
                    asset = book.quote if side == BUY else book.base
                    amount = p * o[QTY] if side == BUY else o[QTY]
                    key = (o[ACCT].id, asset)
                    held[key] = held.get(key, 0) + amount
                    n_open[o[ACCT].id] = n_open.get(o[ACCT].id, 0) + 1
                    if o[CID]:
                        assert (o[ACCT].id, o[CID]) not in cids
                        cids[(o[ACCT].id, o[CID])] = o
        assert sum(lvl.n for lvl in book.bids.values()) + sum(
            lvl.n for lvl in book.asks.values()) == len(book.orders)
        in_use = {id(lvl) for lvl in (*book.bids.values(), *book.asks.values())}
        for lvl in book.spare:
            assert not lvl.dq and not lvl.n and not lvl.qty, "spare level not empty"
            assert id(lvl) not in in_use, "spare level still in the book"
        assert len({id(lvl) for lvl in book.spare}) == len(book.spare), "spare twice"
        bb, ba = book.best_bid(), book.best_ask()
        assert bb is None or ba is None or bb < ba, f"{sym} crossed: {bb} >= {ba}"
        assert all(o[OID] < book.next_oid for o in book.orders.values())
    supply: dict[str, int] = {}
    for aid in sorted(eng.accounts):
        acct = eng.accounts[aid]
        assert acct.id == aid
        assert acct.n_open == n_open.get(aid, 0), "account open count"
        assert {(aid, c): o for c, o in acct.cids.items()} == {
            k: o for k, o in cids.items() if k[0] == aid}, "cid index"
        for asset in sorted(set(acct.avail) | set(acct.held)):
            a = acct.avail.get(asset, 0)
            h = acct.held.get(asset, 0)
            assert a >= 0 and h >= 0, f"negative balance {aid} {asset}"
            assert h == held.get((aid, asset), 0), f"hold mismatch {aid} {asset}"
            supply[asset] = supply.get(asset, 0) + a + h
    for asset in sorted(set(supply) | set(eng.supply)):
        assert supply.get(asset, 0) == eng.supply.get(asset, 0), f"supply {asset}"
