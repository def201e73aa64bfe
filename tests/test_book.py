"""Unit tests of the matching core: order types, STP, replace/reduce, checks, risk,
poison input, codecs."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections import defaultdict

import pytest

from engine import events as ev
from engine.book import (
    THAW_COST_FACTOR,
    THAW_MAX_S,
    THAW_MIN_S,
    Engine,
    EngineLimits,
    GcFreezer,
    check_invariants,
    step,
    thaw_due,
)
from engine.codec import (
    GENESIS,
    CodecError,
    chain_events,
    chain_hash,
    decode_command,
    decode_event,
    encode_command,
    encode_event,
    restore,
    snapshot_bytes,
    state_hash,
)
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
    MAX_ID_LEN,
    MAX_MATCHES_PER_ORDER,
    MAX_PRICE,
    MAX_SUPPLY,
    MAX_SYMBOL_LEN,
    STP,
    CancelReason,
    OrderType,
    Reject,
    Side,
    TimeInForce,
)
from engine.events import (
    Accepted,
    BalanceChanged,
    BookUpdate,
    Cancelled,
    Fill,
    Halted,
    Reduced,
    Rejected,
    Replaced,
    SymbolConfig,
)

BUY, SELL = Side.BUY, Side.SELL
SYM = "BTC-USD"
LOT_SYM = "ETH-USD"  # tick 5, lot 10
USD = 10**9


def make(limits: EngineLimits | None = None, band_bps: int = 1000) -> Engine:
    e = Engine(limits)
    for c in (
        AddSymbol(1, SYM, "BTC", "USD", 1, 1, band_bps, 100),
        AddSymbol(1, LOT_SYM, "ETH", "USD", 5, 10, 1000, 100),
        Deposit(1, "a", "USD", USD), Deposit(1, "a", "BTC", 1000), Deposit(1, "a", "ETH", 1000),
        Deposit(1, "b", "USD", USD), Deposit(1, "b", "BTC", 1000), Deposit(1, "b", "ETH", 1000),
        Deposit(1, "c", "USD", USD), Deposit(1, "c", "BTC", 1000),
    ):
        out = e.apply(c)
        assert not any(isinstance(x, Rejected) for x in out), out
    return e


def run(e: Engine, cmd: object) -> list[ev.Event]:
    out = e.apply(cmd)
    check_invariants(e)
    return out


def limit(acct: str, side: int, qty: int, price: int, cid: str = "", **kw: object) -> NewOrder:
    return NewOrder(10, kw.pop("symbol", SYM), acct, cid, side, qty, price, **kw)  # type: ignore[arg-type]


def market(acct: str, side: int, qty: int, tif: int = TimeInForce.IOC, **kw: object) -> NewOrder:
    return NewOrder(10, SYM, acct, "", side, qty, 0, OrderType.MARKET, tif, **kw)  # type: ignore[arg-type]


def of(events: list[ev.Event], cls: type) -> list:
    return [x for x in events if isinstance(x, cls)]


def reasons(events: list[ev.Event]) -> list[str]:
    return [x.reason for x in of(events, Rejected)]


def bal(e: Engine, acct: str, asset: str) -> tuple[int, int]:
    a = e.accounts[acct]
    return a.avail.get(asset, 0), a.held.get(asset, 0)


# ---------------------------------------------------------------- order types


def test_limit_rests_with_accept_and_book_update() -> None:
    e = make()
    out = run(e, limit("a", BUY, 5, 99, "x1"))
    assert out == [
        Accepted(SYM, 1, "a", "x1", BUY, OrderType.LIMIT, TimeInForce.GTC, 99, 5, 10),
        BookUpdate(SYM, BUY, 99, 5),
    ]
    assert bal(e, "a", "USD") == (USD - 495, 495)
    assert e.books[SYM].depth(BUY) == [(99, 5)]


def test_price_time_priority_partial_fills_at_maker_price() -> None:
    e = make()
    run(e, limit("a", SELL, 3, 101))  # oid 1
    run(e, limit("b", SELL, 4, 100))  # oid 2: better price
    run(e, limit("a", SELL, 5, 100))  # oid 3: same price, later
    out = run(e, limit("c", BUY, 10, 101))  # oid 4
    fills = of(out, Fill)
    assert [(f.maker_order_id, f.price, f.qty) for f in fills] == [(2, 100, 4), (3, 100, 5),
                                                                    (1, 101, 1)]
    assert of(out, BookUpdate) == [BookUpdate(SYM, SELL, 100, 0), BookUpdate(SYM, SELL, 101, 2)]
    assert all(f.taker_order_id == 4 and f.taker_account == "c" for f in fills)
    # Taker paid 4*100 + 5*100 + 1*101 and got 10 BTC; nothing rests.
    assert bal(e, "c", "USD") == (USD - 1001, 0)
    assert bal(e, "c", "BTC") == (1010, 0)
    assert bal(e, "b", "USD") == (USD + 400, 0)
    assert bal(e, "a", "BTC") == (1000 - 8, 2)
    assert e.books[SYM].ref == 101  # band reference follows the last trade


def test_taker_remainder_rests_and_holds_at_its_limit() -> None:
    e = make()
    run(e, limit("a", SELL, 2, 98))
    out = run(e, limit("b", BUY, 5, 100))
    assert of(out, Fill)[0].qty == 2
    assert out[-1] == BookUpdate(SYM, BUY, 100, 3)
    assert bal(e, "b", "USD") == (USD - 2 * 98 - 3 * 100, 300)


def test_market_order_uses_band_protection_and_expires_remainder() -> None:
    e = make()  # ref 100, band 10%: protection 110 for buys, 90 for sells
    run(e, limit("a", SELL, 2, 105))
    run(e, limit("a", SELL, 2, 111 - 1))
    run(e, limit("b", SELL, 5, 110))
    out = run(e, market("c", BUY, 20))
    assert out[0] == Accepted(SYM, 4, "c", "", BUY, OrderType.MARKET, TimeInForce.IOC, 110, 20,
                              10)
    assert sum(f.qty for f in of(out, Fill)) == 9
    assert out[-1] == Cancelled(SYM, 4, "c", "", CancelReason.EXPIRED, 11, 10)
    assert bal(e, "c", "USD") == (USD - 2 * 105 - 7 * 110, 0)


def test_market_buy_risk_is_checked_at_protection_price() -> None:
    e = make()
    run(e, Deposit(1, "poor", "USD", 109))
    run(e, limit("a", SELL, 1, 100))
    assert reasons(run(e, market("poor", BUY, 1))) == [Reject.INSUFFICIENT_BALANCE]
    run(e, Deposit(1, "poor", "USD", 1))
    out = run(e, market("poor", BUY, 1))
    assert of(out, Fill)[0].price == 100
    assert bal(e, "poor", "USD") == (10, 0) and bal(e, "poor", "BTC") == (1, 0)


def test_market_sell_into_empty_book_expires() -> None:
    e = make()
    out = run(e, market("a", SELL, 3))
    assert [type(x) for x in out] == [Accepted, Cancelled]
    assert out[0].price == 90 and out[1].reason == CancelReason.EXPIRED
    assert bal(e, "a", "BTC") == (1000, 0)


def test_market_gtc_and_market_with_price_rejected() -> None:
    e = make()
    assert reasons(run(e, market("a", BUY, 1, TimeInForce.GTC))) == [Reject.INVALID_TIF]
    bad = NewOrder(1, SYM, "a", "", BUY, 1, 100, OrderType.MARKET, TimeInForce.IOC)
    assert reasons(run(e, bad)) == [Reject.INVALID_PRICE]


def test_ioc_fills_what_crosses_and_expires_rest() -> None:
    e = make()
    run(e, limit("a", BUY, 3, 100))
    out = run(e, limit("b", SELL, 5, 99, tif=TimeInForce.IOC))
    assert of(out, Fill)[0].qty == 3
    assert out[-1] == Cancelled(SYM, 2, "b", "", CancelReason.EXPIRED, 2, 10)
    assert e.books[SYM].depth(SELL) == []
    assert bal(e, "b", "BTC") == (997, 0)


def test_fok_all_or_nothing() -> None:
    e = make()
    run(e, limit("a", SELL, 3, 100))
    run(e, limit("a", SELL, 3, 102))
    before = state_hash(e)
    out = run(e, limit("b", BUY, 7, 102, tif=TimeInForce.FOK))
    assert [type(x) for x in out] == [Accepted, Cancelled]
    assert out[1].reason == CancelReason.FOK_UNFILLED
    # Only the order-id counter moved.
    e2 = restore(snapshot_bytes(e))
    e2.books[SYM].next_oid -= 1
    assert state_hash(e2) == before
    out = run(e, limit("b", BUY, 4, 101, tif=TimeInForce.FOK))
    assert of(out, Cancelled)[0].reason == CancelReason.FOK_UNFILLED  # 101 reaches only 3
    out = run(e, limit("b", BUY, 6, 102, tif=TimeInForce.FOK))
    assert sum(f.qty for f in of(out, Fill)) == 6 and not of(out, Cancelled)


def test_post_only() -> None:
    e = make()
    run(e, limit("a", SELL, 3, 101))
    assert reasons(run(e, limit("b", BUY, 1, 101, post_only=True))) == [
        Reject.POST_ONLY_WOULD_CROSS]
    out = run(e, limit("b", BUY, 1, 100, post_only=True))
    assert out[-1] == BookUpdate(SYM, BUY, 100, 1)
    assert reasons(run(e, limit("b", BUY, 1, 99, post_only=True, tif=TimeInForce.IOC))) == [
        Reject.INVALID_POST_ONLY]
    # A resting post-only order may not be replaced into a cross either.
    assert reasons(run(e, ReplaceOrder(11, SYM, "b", 101, 1, order_id=2))) == [
        Reject.POST_ONLY_WOULD_CROSS]


# ---------------------------------------------------------------- self-trade prevention


def _stp_book(mode: int, maker_qty: int = 5, taker_qty: int = 5) -> tuple[Engine, list]:
    e = make()
    run(e, limit("b", SELL, 2, 100))  # oid 1, other account, first in line
    run(e, limit("a", SELL, maker_qty, 100))  # oid 2, own order
    run(e, limit("b", SELL, 4, 100))  # oid 3
    out = run(e, limit("a", BUY, taker_qty, 100, stp=mode))  # oid 4
    return e, out


def test_stp_none_allows_self_trade() -> None:
    _, out = _stp_book(STP.NONE)
    assert [(f.maker_order_id, f.qty) for f in of(out, Fill)] == [(1, 2), (2, 3)]


def test_stp_cancel_newest() -> None:
    e, out = _stp_book(STP.CANCEL_NEWEST)
    assert [(f.maker_order_id, f.qty) for f in of(out, Fill)] == [(1, 2)]
    assert out[-1] == Cancelled(SYM, 4, "a", "", CancelReason.STP, 3, 10)
    assert e.books[SYM].depth(SELL) == [(100, 9)]  # own maker 5 + other 4 stay


def test_stp_cancel_oldest() -> None:
    e, out = _stp_book(STP.CANCEL_OLDEST)
    assert of(out, Cancelled) == [Cancelled(SYM, 2, "a", "", CancelReason.STP, 5, 10)]
    assert [(f.maker_order_id, f.qty) for f in of(out, Fill)] == [(1, 2), (3, 3)]
    assert e.books[SYM].depth(SELL) == [(100, 1)]
    assert bal(e, "a", "BTC") == (1005, 0)  # maker's hold released, 5 bought


def test_stp_cancel_both() -> None:
    e, out = _stp_book(STP.CANCEL_BOTH)
    assert of(out, Cancelled) == [Cancelled(SYM, 2, "a", "", CancelReason.STP, 5, 10),
                                  Cancelled(SYM, 4, "a", "", CancelReason.STP, 3, 10)]
    assert e.books[SYM].depth(SELL) == [(100, 4)]


def test_stp_decrement_maker_larger() -> None:
    e, out = _stp_book(STP.DECREMENT_AND_CANCEL, maker_qty=6, taker_qty=5)
    # 2 trade with b, the remaining 3 decrement the own maker 6 -> 3; taker cancelled.
    assert of(out, Reduced) == [Reduced(SYM, 2, "a", "", 3, "STP", 10)]
    assert of(out, Cancelled) == [Cancelled(SYM, 4, "a", "", CancelReason.STP, 3, 10)]
    assert e.books[SYM].level_orders(SELL, 100)[0][0] == 3
    assert bal(e, "a", "BTC") == (1000 - 6 + 3 + 2, 3)


def test_stp_decrement_equal_and_taker_larger() -> None:
    e, out = _stp_book(STP.DECREMENT_AND_CANCEL, maker_qty=3, taker_qty=5)
    assert of(out, Cancelled) == [Cancelled(SYM, 2, "a", "", CancelReason.STP, 3, 10),
                                  Cancelled(SYM, 4, "a", "", CancelReason.STP, 3, 10)]
    e, out = _stp_book(STP.DECREMENT_AND_CANCEL, maker_qty=2, taker_qty=8)
    assert of(out, Reduced) == [Reduced(SYM, 4, "a", "", 4, "STP", 10)]
    assert [(f.maker_order_id, f.qty) for f in of(out, Fill)] == [(1, 2), (3, 4)]
    assert not of(out, Cancelled)[1:]
    assert bal(e, "a", "USD") == (USD - 600, 0)


def test_fok_respects_stp() -> None:
    e = make()
    run(e, limit("a", SELL, 5, 100))
    run(e, limit("b", SELL, 5, 101))
    # Own order first: CANCEL_OLDEST skips it (and the 5 at 101 suffice), NEWEST kills.
    out = run(e, limit("a", BUY, 5, 101, tif=TimeInForce.FOK, stp=STP.CANCEL_NEWEST))
    assert of(out, Cancelled)[0].reason == CancelReason.FOK_UNFILLED
    out = run(e, limit("a", BUY, 5, 101, tif=TimeInForce.FOK, stp=STP.CANCEL_OLDEST))
    assert of(out, Cancelled)[0].reason == CancelReason.STP  # the own resting order
    assert sum(f.qty for f in of(out, Fill)) == 5


# ---------------------------------------------------------------- cancel, replace, reduce


def test_cancel_by_id_and_client_id_releases_hold() -> None:
    e = make()
    run(e, limit("a", BUY, 5, 99, "k1"))
    run(e, limit("a", SELL, 5, 105, "k2"))
    out = run(e, CancelOrder(11, SYM, "a", order_id=1))
    assert out == [Cancelled(SYM, 1, "a", "k1", CancelReason.USER, 5, 11),
                   BookUpdate(SYM, BUY, 99, 0)]
    out = run(e, CancelOrder(11, SYM, "a", client_order_id="k2"))
    assert out[0].order_id == 2
    assert bal(e, "a", "USD") == (USD, 0) and bal(e, "a", "BTC") == (1000, 0)
    assert reasons(run(e, CancelOrder(11, SYM, "a", order_id=1))) == [Reject.UNKNOWN_ORDER]
    # The client order id is free again.
    assert of(run(e, limit("a", BUY, 1, 99, "k1")), Accepted)


def test_cannot_touch_another_accounts_order() -> None:
    e = make()
    run(e, limit("a", BUY, 5, 99, "k1"))
    for cmd in (CancelOrder(11, SYM, "b", order_id=1),
                CancelOrder(11, SYM, "b", client_order_id="k1"),
                ReplaceOrder(11, SYM, "b", 98, 5, order_id=1),
                ReduceOrder(11, SYM, "b", 1, order_id=1)):
        assert reasons(run(e, cmd)) == [Reject.UNKNOWN_ORDER]
    assert reasons(run(e, CancelOrder(11, SYM, "a"))) == [Reject.INVALID_ORDER_REF]
    assert reasons(run(e, CancelOrder(11, LOT_SYM, "a", order_id=1))) == [Reject.UNKNOWN_ORDER]


def test_replace_loses_priority_reduce_keeps_it() -> None:
    e = make()
    run(e, limit("a", BUY, 5, 100))  # 1
    run(e, limit("b", BUY, 5, 100))  # 2
    run(e, limit("c", BUY, 5, 100))  # 3
    out = run(e, ReduceOrder(11, SYM, "a", 2, order_id=1))
    assert out == [Reduced(SYM, 1, "a", "", 2, "USER", 11), BookUpdate(SYM, BUY, 100, 12)]
    assert [o[1] for o in e.books[SYM].level_orders(BUY, 100)] == [1, 2, 3]
    out = run(e, ReplaceOrder(11, SYM, "b", 100, 5, order_id=2))
    assert out == [Replaced(SYM, 2, "b", "", 100, 5, 11), BookUpdate(SYM, BUY, 100, 7),
                   BookUpdate(SYM, BUY, 100, 12)]
    assert [o[1] for o in e.books[SYM].level_orders(BUY, 100)] == [1, 3, 2]
    assert bal(e, "a", "USD") == (USD - 200, 200)
    assert reasons(run(e, ReduceOrder(11, SYM, "a", 2, order_id=1))) == [Reject.INVALID_QTY]
    assert reasons(run(e, ReduceOrder(11, SYM, "a", 0, order_id=1))) == [Reject.INVALID_QTY]


def test_replace_to_crossing_price_trades_and_rests_rest() -> None:
    e = make()
    run(e, limit("a", SELL, 3, 102))  # 1
    run(e, limit("b", BUY, 5, 99, "bb"))  # 2
    out = run(e, ReplaceOrder(11, SYM, "b", 102, 8, client_order_id="bb"))
    assert [type(x) for x in out] == [Replaced, BookUpdate, Fill, BookUpdate, BookUpdate]
    assert out[-1] == BookUpdate(SYM, BUY, 102, 5)
    assert bal(e, "b", "USD") == (USD - 3 * 102 - 5 * 102, 5 * 102)
    o = e.accounts["b"].cids["bb"]
    assert (o[1], o[0], o[5]) == (2, 5, 102)


def test_replace_risk_and_checks() -> None:
    e = make()
    run(e, Deposit(1, "p", "USD", 1000))
    run(e, limit("p", BUY, 10, 100))
    assert reasons(run(e, ReplaceOrder(11, SYM, "p", 101, 10, order_id=1))) == [
        Reject.INSUFFICIENT_BALANCE]
    assert of(run(e, ReplaceOrder(11, SYM, "p", 99, 10, order_id=1)), Replaced)
    assert bal(e, "p", "USD") == (10, 990)
    assert reasons(run(e, ReplaceOrder(11, SYM, "p", 200, 1, order_id=1))) == [
        Reject.PRICE_OUTSIDE_BAND]
    assert reasons(run(e, ReplaceOrder(11, SYM, "p", 99, 0, order_id=1))) == [Reject.INVALID_QTY]


# ---------------------------------------------------------------- checks and limits


def test_tick_lot_band_and_qty_rejects() -> None:
    e = make()
    assert reasons(run(e, limit("a", BUY, 10, 102, symbol=LOT_SYM))) == [Reject.INVALID_TICK]
    assert reasons(run(e, limit("a", BUY, 15, 100, symbol=LOT_SYM))) == [Reject.INVALID_LOT]
    assert of(run(e, limit("a", BUY, 20, 105, symbol=LOT_SYM)), Accepted)
    # band: ref 100, 10% -> [90, 110]
    assert reasons(run(e, limit("a", BUY, 1, 89))) == [Reject.PRICE_OUTSIDE_BAND]
    assert reasons(run(e, limit("a", SELL, 1, 111))) == [Reject.PRICE_OUTSIDE_BAND]
    assert of(run(e, limit("a", BUY, 1, 90)), Accepted)
    assert of(run(e, limit("a", SELL, 1, 110)), Accepted)
    assert reasons(run(e, limit("a", BUY, 0, 100))) == [Reject.INVALID_QTY]
    assert reasons(run(e, limit("a", BUY, -1, 100))) == [Reject.INVALID_QTY]
    assert reasons(run(e, limit("a", BUY, 1, 0))) == [Reject.INVALID_PRICE]
    assert reasons(run(e, limit("a", BUY, 1, MAX_PRICE + 1))) == [Reject.INVALID_PRICE]
    assert reasons(run(e, limit("a", BUY, 1, 100, symbol="NOPE"))) == [Reject.UNKNOWN_SYMBOL]
    assert reasons(run(e, limit("zz", BUY, 1, 100))) == [Reject.UNKNOWN_ACCOUNT]


def test_band_follows_last_trade_and_update_symbol() -> None:
    e = make()
    run(e, UpdateSymbol(2, SYM, 1000, 200, 1000, 10**6))  # before any trade: ref moves
    assert e.books[SYM].ref == 200
    assert reasons(run(e, limit("a", BUY, 1, 100))) == [Reject.PRICE_OUTSIDE_BAND]
    run(e, limit("a", SELL, 1, 210))
    run(e, limit("b", BUY, 1, 210))
    assert e.books[SYM].ref == 210
    out = run(e, UpdateSymbol(3, SYM, 500, 100, 1000, 10**6))  # after trading: ref kept
    assert out == [SymbolConfig(SYM, "BTC", "USD", 1, 1, 500, 210, 1000, 10**6, 3)]
    assert (e.books[SYM].lo, e.books[SYM].hi) == (200, 220)
    assert reasons(run(e, UpdateSymbol(3, SYM, 0, 100, 1000, 10**6))) == [Reject.INVALID_CONFIG]


def test_add_symbol_validation() -> None:
    e = Engine(EngineLimits(max_symbols=1))
    assert reasons(run(e, AddSymbol(1, "X", "A", "A", 1, 1, 100, 10))) == [Reject.INVALID_CONFIG]
    assert reasons(run(e, AddSymbol(1, "X", "A", "B", 3, 1, 100, 10))) == [Reject.INVALID_CONFIG]
    assert reasons(run(e, AddSymbol(1, "bad sym\n", "A", "B", 1, 1, 100, 10))) == [
        Reject.INVALID_SYMBOL]
    assert of(run(e, AddSymbol(1, "X", "A", "B", 1, 1, 100, 10)), SymbolConfig)
    assert reasons(run(e, AddSymbol(1, "X", "A", "B", 1, 1, 100, 10))) == [Reject.SYMBOL_EXISTS]
    assert reasons(run(e, AddSymbol(1, "Y", "A", "B", 1, 1, 100, 10))) == [
        Reject.TOO_MANY_SYMBOLS]


def test_risk_rejects_and_balances() -> None:
    e = make()
    run(e, Deposit(1, "p", "USD", 500))
    run(e, Deposit(1, "p", "BTC", 3))
    assert reasons(run(e, limit("p", BUY, 6, 100))) == [Reject.INSUFFICIENT_BALANCE]
    assert of(run(e, limit("p", BUY, 5, 100)), Accepted)
    assert reasons(run(e, limit("p", BUY, 1, 90))) == [Reject.INSUFFICIENT_BALANCE]
    assert reasons(run(e, limit("p", SELL, 4, 105))) == [Reject.INSUFFICIENT_BALANCE]
    assert of(run(e, limit("p", SELL, 3, 105)), Accepted)
    assert reasons(run(e, Withdraw(1, "p", "USD", 1))) == [Reject.INSUFFICIENT_BALANCE]
    run(e, limit("a", SELL, 5, 100))
    assert bal(e, "p", "USD") == (0, 0) and bal(e, "p", "BTC") == (5, 3)
    run(e, limit("b", BUY, 3, 105))
    assert bal(e, "p", "USD") == (315, 0) and bal(e, "p", "BTC") == (5, 0)
    out = run(e, Withdraw(2, "p", "USD", 315))
    assert out == [BalanceChanged("p", "USD", -315, 0, 0, "WITHDRAW", 2)]


def test_deposit_validation_and_supply_limit() -> None:
    e = Engine(EngineLimits(max_accounts=1))
    assert reasons(run(e, Deposit(1, "a", "USD", 0))) == [Reject.INVALID_AMOUNT]
    assert reasons(run(e, Deposit(1, "a b", "USD", 1))) == [Reject.INVALID_ACCOUNT]
    assert reasons(run(e, Deposit(1, "a", "U" * 17, 1))) == [Reject.INVALID_ASSET]
    assert of(run(e, Deposit(1, "a", "USD", MAX_SUPPLY)), BalanceChanged)
    assert reasons(run(e, Deposit(1, "a", "USD", 1))) == [Reject.SUPPLY_LIMIT]
    assert reasons(run(e, Deposit(1, "b", "EUR", 1))) == [Reject.TOO_MANY_ACCOUNTS]
    assert reasons(run(e, Withdraw(1, "b", "USD", 1))) == [Reject.UNKNOWN_ACCOUNT]


def test_open_order_limits_and_duplicate_client_ids() -> None:
    e = make(EngineLimits(max_open_orders_per_account=2))
    run(e, AddSymbol(1, "S", "BTC", "USD", 1, 1, 1000, 100, max_orders=3))
    assert of(run(e, limit("a", BUY, 1, 99, "d", symbol="S")), Accepted)
    assert reasons(run(e, limit("a", BUY, 1, 99, "d"))) == [Reject.DUPLICATE_CLIENT_ORDER_ID]
    assert of(run(e, limit("a", BUY, 1, 99)), Accepted)
    assert reasons(run(e, limit("a", BUY, 1, 99))) == [Reject.TOO_MANY_OPEN_ORDERS]
    # IOC orders never rest, so the limit does not apply to them.
    assert of(run(e, limit("a", BUY, 1, 99, tif=TimeInForce.IOC)), Accepted)
    run(e, limit("b", BUY, 1, 99, symbol="S"))
    run(e, limit("b", BUY, 1, 98, symbol="S"))
    assert reasons(run(e, limit("c", BUY, 1, 98, symbol="S"))) == [Reject.BOOK_FULL]
    assert reasons(run(e, limit("a", BUY, 1, 99, "x" * 65))) == [
        Reject.INVALID_CLIENT_ORDER_ID]


# ---------------------------------------------------------------- poison input


class _Raises:
    """Looks like a NewOrder, but reading ``qty`` raises."""

    ts_ns = 5
    symbol = SYM
    account = "a"
    client_order_id = ""
    side = BUY
    order_type = OrderType.LIMIT
    tif = TimeInForce.GTC
    stp = STP.NONE
    post_only = False
    price = 100


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ts_ns": -1}, Reject.INVALID_TIMESTAMP),
        ({"ts_ns": 1.5}, Reject.INVALID_TIMESTAMP),
        ({"symbol": 5}, Reject.UNKNOWN_SYMBOL),
        ({"symbol": ["x"]}, Reject.INTERNAL_ERROR),  # unhashable: raises before any change
        ({"account": None}, Reject.UNKNOWN_ACCOUNT),
        ({"client_order_id": 7}, Reject.INVALID_CLIENT_ORDER_ID),
        ({"client_order_id": "\ud800"}, Reject.INVALID_CLIENT_ORDER_ID),
        ({"side": 2}, Reject.INVALID_SIDE),
        ({"side": "BUY"}, Reject.INVALID_SIDE),
        ({"order_type": 9}, Reject.INVALID_ORDER_TYPE),
        ({"tif": -1}, Reject.INVALID_TIF),
        ({"stp": 5}, Reject.INVALID_STP),
        ({"post_only": "yes"}, Reject.INVALID_POST_ONLY),
        ({"qty": 1.0}, Reject.INVALID_QTY),
        ({"qty": True}, Reject.INVALID_QTY),
        ({"qty": "5"}, Reject.INVALID_QTY),
        ({"price": 100.0}, Reject.INVALID_PRICE),
        ({"price": None}, Reject.INVALID_PRICE),
        ({"side": [0]}, Reject.INTERNAL_ERROR),  # unhashable: raises inside, still a reject
    ],
)
def test_malformed_new_orders_are_rejected(changes: dict, reason: str) -> None:
    e = make()
    before = state_hash(e)
    cmd = limit("a", BUY, 1, 100)._replace(**changes)
    out = run(e, cmd)
    assert len(out) == 1 and out[0].reason == reason
    assert state_hash(e) == before
    for x in out:
        decode_event(encode_event(ev.to_raw(x)))  # every reject is encodable


def test_poison_commands_never_stop_processing() -> None:
    e = make()
    assert reasons(run(e, "garbage")) == [Reject.UNKNOWN_COMMAND]
    assert reasons(run(e, None)) == [Reject.UNKNOWN_COMMAND]

    class Evil(str):  # a client order id whose comparison raises
        def __ne__(self, other: object) -> bool:
            raise ZeroDivisionError

    evil = limit("a", BUY, 1, 100)._replace(client_order_id=Evil("x"))
    out = run(e, evil)
    assert [(x.reason, x.detail) for x in out] == [(Reject.INTERNAL_ERROR, "ZeroDivisionError")]
    assert not e.books[SYM].halted  # it raised before changing anything
    assert of(run(e, limit("a", BUY, 1, 100)), Accepted)


def test_exception_after_state_change_halts_only_that_book() -> None:
    e = make()
    run(e, limit("a", SELL, 5, 100))

    class Exploding(defaultdict):
        def __setitem__(self, key: str, value: int) -> None:
            raise ArithmeticError("boom")

    bad = Exploding(int, e.accounts["a"].avail)
    e.accounts["a"].avail = bad  # crediting the maker will raise mid-match
    out = e.apply(limit("b", BUY, 5, 100))
    assert out == [Rejected(SYM, "b", "", 0, "NEW", Reject.INTERNAL_ERROR, "ArithmeticError", 10),
                   Halted(SYM, "ArithmeticError", 10)]
    assert e.books[SYM].halted
    assert reasons(e.apply(limit("b", BUY, 5, 100))) == [Reject.SYMBOL_HALTED]
    assert reasons(e.apply(CancelOrder(1, SYM, "a", order_id=1))) == [Reject.SYMBOL_HALTED]
    e.accounts["a"].avail = defaultdict(int, bad)
    assert of(e.apply(limit("b", BUY, 10, 100, symbol=LOT_SYM)), Accepted)  # others go on
    restored = restore(snapshot_bytes(e))
    assert restored.books[SYM].halted


def test_memory_error_is_not_turned_into_output() -> None:
    e = make()

    class Oom(str):
        def __ne__(self, other: object) -> bool:
            raise MemoryError

    o = limit("a", BUY, 1, 100)._replace(client_order_id=Oom("x"))
    with pytest.raises(MemoryError):
        e.apply(o)


# ---------------------------------------------------------------- records, codecs, hashes


def test_step_and_records() -> None:
    e = make()
    e2, out = step(e, limit("a", BUY, 1, 100))
    assert e2 is e
    assert all(dataclasses.is_dataclass(x) for x in out)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out[0].qty = 3  # type: ignore[misc]
    for x in out:
        assert ev.to_record(ev.to_raw(x)) == x


def test_event_codec_round_trip_all_types() -> None:
    samples = [
        Accepted(SYM, 1, "a", "c", 0, 1, 2, 100, 5, 7),
        Rejected("", "", "", 0, "NEW", "X", "Y", 0),
        Fill(SYM, 100, 5, 1, 2, 3, "a", "b", 9),
        Cancelled(SYM, 1, "a", "", "USER", 5, 9),
        Replaced(SYM, 1, "a", "", 100, 5, 9),
        Reduced(SYM, 1, "a", "", 5, "STP", 9),
        BookUpdate(SYM, 1, 100, 0),
        SymbolConfig(SYM, "BTC", "USD", 1, 1, 100, 100, 5, 6, 9),
        BalanceChanged("a", "USD", -5, MAX_SUPPLY, 0, "WITHDRAW", 9),
        Halted(SYM, "KeyError", 9),
        ev.CancelledV2(SYM, 1, "a", "", "USER", 5, 9, SELL, 100),
        ev.RejectedV2("", "", "", 0, "CANCEL", "X", "Y", 0, ev.NO_SIDE, 0),
    ]
    assert {type(x).TAG for x in samples} == set(ev.EVENT_CLASSES)
    seen = set()
    for x in samples:
        b = encode_event(ev.to_raw(x))
        assert ev.to_record(decode_event(b)) == x
        seen.add(b)
    assert len(seen) == len(samples)
    with pytest.raises(CodecError):
        decode_event(b"\x63")
    with pytest.raises(CodecError):
        decode_event(encode_event(ev.to_raw(samples[0])) + b"x")


def test_command_codec_round_trip() -> None:
    cmds = [
        limit("a", BUY, 5, 100, "cid", post_only=True),
        market("a", SELL, 5),
        CancelOrder(1, SYM, "a", 3, ""),
        ReplaceOrder(1, SYM, "a", 100, 5, 0, "x"),
        ReduceOrder(1, SYM, "a", 1, 2),
        AddSymbol(1, SYM, "BTC", "USD", 1, 1, 100, 100),
        UpdateSymbol(1, SYM, 100, 100, 5, 5),
        Deposit(1, "a", "USD", 5),
        Withdraw(1, "a", "USD", 5),
    ]
    for c in cmds:
        assert decode_command(encode_command(c)) == c
    with pytest.raises(CodecError):
        encode_command(cmds[0]._replace(qty=1 << 64))
    with pytest.raises(CodecError):
        decode_command(b"\x01\x00")


def test_chain_hash() -> None:
    e = make()
    raws = e.apply_raw(limit("a", BUY, 1, 100))
    chain = GENESIS
    for r in raws:
        chain = chain_hash(chain, encode_event(r))
    assert chain == chain_events(GENESIS, raws) != GENESIS
    assert chain_events(GENESIS, raws[::-1]) != chain


def test_snapshot_is_canonical_regardless_of_history() -> None:
    # The same logical state reached through different histories (account creation
    # order, a dead deque entry, a stale heap key) encodes to the same bytes.
    sym = AddSymbol(1, SYM, "BTC", "USD", 1, 1, 1000, 100)
    e1, e2 = Engine(), Engine()
    for c in (sym, Deposit(1, "a", "USD", 500), Deposit(1, "b", "USD", 500),
              limit("a", BUY, 1, 98), limit("b", BUY, 1, 98),
              CancelOrder(1, SYM, "b", order_id=2)):
        run(e1, c)
    for c in (sym, Deposit(1, "b", "USD", 500), Deposit(1, "a", "USD", 500),
              limit("a", BUY, 1, 98), limit("b", BUY, 1, 97),
              CancelOrder(1, SYM, "b", order_id=2)):
        run(e2, c)
    assert len(e1.books[SYM].bids[98].dq) == 2 and len(e2.books[SYM].bid_heap) == 2
    assert snapshot_bytes(e1) == snapshot_bytes(e2)
    assert state_hash(e1) == state_hash(e2)
    r = restore(snapshot_bytes(e1))
    assert snapshot_bytes(r) == snapshot_bytes(e1)
    # and it behaves the same afterwards
    nxt = limit("b", SELL, 1, 98)
    assert r.apply_raw(nxt) == e1.apply_raw(nxt) == e2.apply_raw(nxt)
    with pytest.raises(CodecError):
        restore(b"nope")
    with pytest.raises(CodecError):
        restore(snapshot_bytes(e1)[:-3])


def test_level_compaction_and_heap_rebuild_keep_priority() -> None:
    # Many cancels behind the head of one level, and many short-lived levels, exercise
    # the dead-entry compaction and the stale-heap rebuild; priority must survive both.
    e = make()
    for _ in range(40):
        run(e, limit("a", BUY, 1, 100))  # oids 1..40
    for oid in range(35, 1, -1):
        run(e, CancelOrder(11, SYM, "a", order_id=oid))
    book = e.books[SYM]
    assert [o[1] for o in book.level_orders(BUY, 100)] == [1, 36, 37, 38, 39, 40]
    assert len(book.bids[100].dq) <= 2 * 6 + 16 + 1
    for i in range(60):
        run(e, limit("b", BUY, 1, 91 + i % 8))
        run(e, CancelOrder(11, SYM, "b", order_id=41 + i))
    assert len(book.bid_heap) <= 2 * len(book.bids) + 16 + 1
    out = run(e, limit("c", SELL, 6, 100))
    assert [f.maker_order_id for f in of(out, Fill)] == [1, 36, 37, 38, 39, 40]
    assert restore(snapshot_bytes(e)).apply_raw(limit("c", SELL, 1, 91)) == e.apply_raw(
        limit("c", SELL, 1, 91))


def test_heap_stays_bounded_when_levels_empty_every_way() -> None:
    # Stale heap keys are made only by cancels that empty a level (matching pops the key
    # of a level it empties), and the heap is compacted there: it stays bounded whatever
    # mix of cancels, re-created prices and sweeps empties the levels. A live best bid
    # keeps the stale keys below it from being popped at the top.
    e = make(band_bps=5000)
    book = e.books[SYM]
    run(e, limit("c", BUY, 5, 99))
    oid = 1
    longest = 0
    for i in range(600):
        run(e, limit("a", BUY, 1, 60 + (i * 7) % 39))  # many prices, recurring
        oid += 1
        if i % 4:
            run(e, CancelOrder(11, SYM, "a", order_id=oid))
        if i % 150 == 149:
            run(e, market("b", SELL, 30))  # sweeps levels from the top: pops their keys
            run(e, limit("c", BUY, 5, 99))
            oid += 2
        longest = max(longest, len(book.bid_heap))
        assert len(book.bid_heap) <= 2 * len(book.bids) + 16 + 1
    assert longest > len(book.bids) + 16  # stale keys did pile up between compactions
    assert book.best_bid() == max(book.bids)


def test_process_equals_process_batch() -> None:
    cmds = [limit("a", BUY, 1 + i % 3, 95 + i % 5) if i % 4 else market("b", SELL, 2)
            for i in range(200)]
    cmds += [CancelOrder(11, SYM, "a", order_id=oid) for oid in range(1, 120, 3)]
    cmds += ["garbage", None, limit("a", 7, 1, 100), limit("nobody", BUY, 1, 100)]
    one, batch = make(), make()
    out1: list[tuple] = []
    each: list[list[tuple]] = []  # each command's own events
    for c in cmds:
        n = len(out1)
        one.process(c, out1)
        each.append(out1[n:])
    out2: list[tuple] = []
    starts: list[int] = []
    for i in range(0, len(cmds), 7):
        batch.process_batch(cmds[i:i + 7], out2, starts)
    assert out1 == out2 and snapshot_bytes(one) == snapshot_bytes(batch)
    # ``starts``: where each command's events begin, one entry per command
    assert len(starts) == len(cmds)
    assert [out2[s:e] for s, e in zip(starts, [*starts[1:], len(out2)], strict=True)] == each


def test_gc_freezer_takes_long_lived_objects_out_of_full_collections() -> None:
    """Resting orders (tracked lists) that survive ``every`` inputs are frozen: a full
    collection no longer walks them, and they are still freed by reference counting."""
    freezer = GcFreezer(every=1_000)
    before = gc.get_freeze_count()
    resting = [[i, "acct"] for i in range(20_000)]
    try:
        freezer.advance(999)
        assert gc.get_freeze_count() == before and freezer.freezes == 0
        freezer.advance(1)
        assert freezer.freezes == 1 and gc.get_freeze_count() >= before + len(resting)
        walked = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert not any(id(o) in walked for o in resting)
        frozen = gc.get_freeze_count()
        del resting[:10_000]  # cancelled or filled: freed at once, frozen or not
        assert gc.get_freeze_count() <= frozen - 10_000
        freezer.advance(999)
        assert freezer.freezes == 1  # counted from the last freeze
    finally:
        gc.unfreeze()


def test_snapshot_bytes_are_the_format_stored_snapshots_have() -> None:
    """The snapshot encoding of a fixed state (two symbols, resting orders with and
    without client order ids, post-only, every STP mode) is the bytes of the stored
    format, pinned by their hash: stored snapshots' state hashes are checked against a
    new release's replay (`engine verify`, restore), so a faster encoder must write the
    very same bytes. The hash is of the encoder before its per-order loop was rewritten
    (in C: ~40 instead of ~110-130 ms per 100k resting orders here). The restore reads
    them back to the same bytes."""
    import hashlib
    import random

    from bench.match import setup_commands, workload
    from engine.book import CID, POST_ONLY
    e = Engine()
    out: list[tuple] = []
    for c in setup_commands() + workload(3_000, seed=7):
        e.process(c, out)
    rng = random.Random(11)
    e.process(AddSymbol(1, "ZED-EUR", "ZED", "EUR", 5, 2, 2_000, 10_000), out)
    for a in ("alice", "bob", "carol-x"):
        e.process(Deposit(1, a, "EUR", 10**12), out)
        e.process(Deposit(1, a, "ZED", 10**9), out)
    for i in range(400):
        e.process(NewOrder(2, "ZED-EUR", rng.choice(("alice", "bob", "carol-x")),
                           f"cid-{i}" if rng.random() < 0.7 else "",
                           BUY if rng.random() < 0.5 else SELL, 2 * rng.randint(1, 9),
                           10_000 + 5 * rng.randint(-150, 150),
                           post_only=rng.random() < 0.2, stp=rng.randint(0, 4)), out)
    data = snapshot_bytes(e)
    assert hashlib.sha256(data).hexdigest() == (
        "752dd517d214e6d0b332b497546811feb0b6c364e388ca1ca97baa21b6ef8b03")
    assert snapshot_bytes(restore(data)) == data
    book = e.books["ZED-EUR"]
    assert any(o[CID] for o in book.orders.values())
    assert any(o[POST_ONLY] for o in book.orders.values())
    with pytest.raises(CodecError, match="longer than 255"):
        next(iter(book.orders.values()))[CID] = "x" * 256
        snapshot_bytes(e)


def _orders_py(queues: list, by_account: dict) -> tuple[bytes, int]:
    """The Python loop engine._speedups.encode_orders replaced (engine/codec.py)."""
    import struct

    from engine.book import ACCT, CID, OID, POST_ONLY, PRICE, QTY, SIDE, STP_MODE
    pack = struct.Struct("<qqqBBBI").pack
    parts: list[bytes] = []
    n = 0
    for queue in queues:
        for o in queue:
            if o[QTY]:
                cid = o[CID].encode("ascii")
                if len(cid) > 255:
                    raise ValueError("string longer than 255 bytes")
                parts += (pack(o[OID], o[PRICE], o[QTY], o[SIDE], o[POST_ONLY], o[STP_MODE],
                               by_account[o[ACCT]]), bytes((len(cid),)), cid)
                n += 1
    return b"".join(parts), n


def test_the_c_order_encoder_writes_what_the_python_loop_wrote() -> None:
    """engine._speedups.encode_orders (the snapshot's per-order loop, 2x faster than the
    Python one) against that loop on seeded queues: orders filled but still queued (qty
    0), ids of 0, 1, 64 and 255 characters, fields at their extremes, post-only as a
    bool; and its refusals: an id over 255 bytes or not ASCII, an unknown account, a
    field out of its range, something that is not an order."""
    import random
    import string
    from collections import deque

    from engine._speedups import encode_orders

    from engine.book import Account
    rng = random.Random(5)
    accounts = [Account(f"a{i}") for i in range(5)]
    by_account = {a: i for i, a in enumerate(accounts)}
    big = 2**63 - 1
    for _ in range(300):
        queues = [deque([rng.choice([0, 1, rng.randint(1, big)]), rng.randint(1, big),
                         rng.choice(accounts),
                         "".join(rng.choices(string.printable[:94], k=rng.choice(
                             [0, 1, 64, 255]))),
                         rng.randint(0, 1), rng.randint(-big - 1, big), rng.random() < 0.5,
                         rng.randint(0, 4)] for _ in range(rng.randint(0, 6)))
                  for _ in range(rng.randint(0, 6))]
        assert encode_orders(queues, by_account) == _orders_py(queues, by_account)
    order = [1, 1, accounts[0], "x" * 256, 0, 5, False, 1]
    with pytest.raises(ValueError, match="longer than 255"):
        encode_orders([[order]], by_account)
    order[3] = "caf\u00e9"
    with pytest.raises(UnicodeEncodeError):
        encode_orders([[order]], by_account)
    order[3] = ""
    order[2] = Account("stranger")
    with pytest.raises(KeyError):
        encode_orders([[order]], by_account)
    order[2] = accounts[0]
    for i, bad in ((4, 256), (6, -1), (1, 2**63), (5, -(2**63) - 1)):
        wrong = list(order)
        wrong[i] = bad
        with pytest.raises(OverflowError):
            encode_orders([[wrong]], by_account)
    with pytest.raises(TypeError):
        encode_orders([[tuple(order)]], by_account)
    assert encode_orders([], by_account) == (b"", 0)

    # Python code run by a truth test that empties the order (helper-75: read out of
    # bounds, a crash, when the C read the list's items after it): the fields read are
    # the ones it held.
    class Emptying(int):
        def __bool__(self) -> bool:
            held.clear()
            return True

    held = [Emptying(3), 7, accounts[1], "id", 1, 100, False, 2]
    expected = _orders_py([[[3, 7, accounts[1], "id", 1, 100, False, 2]]], by_account)
    assert encode_orders([[held]], by_account) == expected and held == []


class _Cyclic:
    """An object in a reference cycle with itself: freed only by the cyclic collector."""

    def __init__(self) -> None:
        self.me = self


def test_gc_freezer_thaw_collects_garbage_that_was_frozen_alive() -> None:
    """An object frozen alive that becomes cyclic garbage survives every collection while
    frozen (the leak), and gives no sign to the young collections; once a thaw is due
    (THAW_MIN_S passed, and a sign of garbage: here the young collections found some;
    in the runner a failed trace export counts too), the freezer unfreezes everything
    for one full collection, which frees it, and freezes again. Before, it was never
    freed. A sign of another kind (``signs``) makes it due just the same."""
    now = [0.0]
    freezer = GcFreezer(every=10, clock=lambda: now[0])
    try:
        held = _Cyclic()
        dead = weakref.ref(held)
        freezer.advance(10)
        assert freezer.freezes == 1 and freezer.thaws == 0
        del held
        gc.collect()  # a full collection leaves the permanent generation alone
        assert dead() is not None
        _Cyclic()  # dropped at once: young garbage, found by the next freeze's collection
        now[0] = THAW_MIN_S - 1
        freezer.advance(10)
        assert freezer.freezes == 2 and freezer.thaws == 0 and dead() is not None
        now[0] = THAW_MIN_S
        freezer.advance(10)
        assert freezer.freezes == 3 and freezer.thaws == 1
        assert dead() is None and freezer.thaw_collected >= 1
        assert gc.get_freeze_count() > 0  # frozen again after the collection

        failures = [0]  # e.g. failed trace exports
        signed = GcFreezer(every=10, clock=lambda: now[0], signs=lambda: failures[0])
        held = _Cyclic()
        dead = weakref.ref(held)
        signed.advance(10)
        del held
        now[0] += THAW_MIN_S
        signed.advance(10)  # no sign yet: not due, whatever the young collections found
        assert signed.thaws == 0 and dead() is not None
        failures[0] += 1
        signed.advance(10)
        assert signed.thaws == 1 and dead() is None
    finally:
        gc.unfreeze()


def test_thaw_due_rule() -> None:
    """Never sooner than THAW_MIN_S, nor than THAW_COST_FACTOR times the last pause;
    then once the young collections found cyclic garbage, or at THAW_MAX_S anyway."""
    assert not thaw_due(THAW_MIN_S - 0.1, 0.0, 5)
    assert thaw_due(THAW_MIN_S, 0.0, 1)
    assert not thaw_due(THAW_MIN_S, 0.0, 0)
    assert not thaw_due(THAW_MAX_S - 1, 0.0, 0)
    assert thaw_due(THAW_MAX_S, 0.0, 0)
    pause = 0.2  # e.g. ~1M resting orders
    assert THAW_COST_FACTOR * pause > THAW_MIN_S
    assert not thaw_due(THAW_COST_FACTOR * pause - 1, pause, 10)
    assert thaw_due(THAW_COST_FACTOR * pause, pause, 10)
    assert not thaw_due(THAW_MAX_S, THAW_MAX_S / THAW_COST_FACTOR * 2, 0)


# ---------------------------------------------------------------- one order's reach


def sweep_book(makers: int) -> tuple[Engine, str]:
    """A book with the longest symbol and ``makers`` one-lot asks of an account with the
    longest id, each with the longest client order id at a price level of its own (the
    most output bytes per maker); account TAKER can buy them all."""
    sym = "S" * MAX_SYMBOL_LEN
    e = Engine()
    for c in (AddSymbol(1, sym, "B", "Q", 1, 1, 10_000, 100_000),
              Deposit(1, MAKER, "B", 10**6), Deposit(1, TAKER, "Q", 10**15)):
        assert not of(e.apply(c), Rejected)
    for i in range(makers):
        cid = f"{i:0{MAX_ID_LEN}d}"
        assert not of(e.apply(limit(MAKER, SELL, 1, 100_001 + i, cid, symbol=sym)), Rejected)
    return e, sym


MAKER, TAKER = "m" * MAX_ID_LEN, "t" * MAX_ID_LEN


def test_an_order_trades_with_at_most_max_matches_makers_and_never_rests_past_them() -> None:
    """A buy that could sweep more makers than MAX_MATCHES_PER_ORDER fills against that
    many and is cancelled for the rest (MATCH_LIMIT), even GTC: resting it would cross
    the book. Its outputs, the most there can be per maker, fit one output event with
    room to spare (an input's outputs travel whole in one: engine/consumer.py). Before,
    such an order held every later output back, and one sweeping 65,536 makers failed an
    assertion on every instance at each restart."""
    from engine import wire
    from engine.consumer import MAX_BATCH_BYTES

    extra = 10
    e, sym = sweep_book(MAX_MATCHES_PER_ORDER + extra)
    raws: list[tuple] = []
    e.process(limit(TAKER, BUY, MAX_MATCHES_PER_ORDER + 1_000, 200_000, symbol=sym), raws)
    out = [ev.to_record(r) for r in raws]
    check_invariants(e)
    assert len(of(out, Fill)) == MAX_MATCHES_PER_ORDER
    (cancelled,) = of(out, Cancelled)
    assert cancelled.reason == CancelReason.MATCH_LIMIT and cancelled.qty == 1_000
    book = e.books[sym]
    assert not book.bids and len(book.asks) == extra  # nothing rested, nothing crossed
    blob = wire.outputs_blob(1, raws)
    assert len(blob) < 0.6 * MAX_BATCH_BYTES, len(blob)
    # Exactly the limit is no limit: all of it fills.
    e, sym = sweep_book(MAX_MATCHES_PER_ORDER)
    out = run(e, limit(TAKER, BUY, MAX_MATCHES_PER_ORDER, 200_000, symbol=sym))
    assert len(of(out, Fill)) == MAX_MATCHES_PER_ORDER and not of(out, Cancelled)


def test_a_fill_or_kill_order_beyond_max_matches_makers_is_not_filled_at_all() -> None:
    e, sym = sweep_book(MAX_MATCHES_PER_ORDER + 1)
    fok = limit(TAKER, BUY, MAX_MATCHES_PER_ORDER + 1, 200_000, symbol=sym,
                tif=TimeInForce.FOK)
    out = run(e, fok)
    assert not of(out, Fill)
    (cancelled,) = of(out, Cancelled)
    assert cancelled.reason == CancelReason.FOK_UNFILLED
    assert len(e.books[sym].asks) == MAX_MATCHES_PER_ORDER + 1  # untouched
    out = run(e, fok._replace(qty=MAX_MATCHES_PER_ORDER))  # within reach: all of it
    assert len(of(out, Fill)) == MAX_MATCHES_PER_ORDER


def test_snapshot_of_an_account_holding_65536_assets_round_trips() -> None:
    """The snapshot wrote an account's number of assets in 16 bits, but nothing bounds
    how many distinct assets an account may hold: 65,536 valid deposits of distinct
    assets made a reachable state that snapshot_bytes could not encode (struct.error):
    every instance stopped at its next capture, and again after each restart (helper-87's
    review). Counts from 65,535 on are written long; those below, as before."""
    e = Engine()
    out: list[tuple] = []
    e.process_batch([Deposit(1, "a", f"A{i}", 1) for i in range(65_536)], out)
    assert all(t[0] == ev.BALANCE for t in out)  # every deposit accepted
    check_invariants(e)
    snap = snapshot_bytes(e)
    restored = restore(snap)
    assert state_hash(restored) == state_hash(e) and snapshot_bytes(restored) == snap
    # A small count written long is not the canonical form: refused.
    small = Engine()
    small.process_batch([Deposit(1, "a", "A", 1)], out)
    data = snapshot_bytes(small)
    short = b"\x01\x00" + bytes([1]) + b"A"  # count 1, then the asset "A"
    assert data.count(short) == 1
    long = b"\xff\xff\x01\x00\x00\x00" + bytes([1]) + b"A"
    with pytest.raises(CodecError, match="not canonical"):
        restore(data.replace(short, long))
