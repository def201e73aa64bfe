"""Enumerations, reject/cancel reason codes and hard limits of the matching core.

Enumerations are plain ``int`` constants on namespace classes rather than ``IntEnum``:
the hot path compares and stores them millions of times a second, and the canonical
encoding writes them as integers. Reason codes are short ``str`` constants so that an
output event is readable without a lookup table and stays stable across versions.
"""

from __future__ import annotations

from typing import Final


class Side:
    BUY: Final = 0
    SELL: Final = 1
    NAMES: Final = ("BUY", "SELL")


class OrderType:
    LIMIT: Final = 0
    MARKET: Final = 1
    NAMES: Final = ("LIMIT", "MARKET")


class TimeInForce:
    GTC: Final = 0  # rests until cancelled
    IOC: Final = 1  # fill what crosses now, expire the rest
    FOK: Final = 2  # fill everything now or nothing
    NAMES: Final = ("GTC", "IOC", "FOK")


class STP:
    """Self-trade prevention: what happens when a taker meets a resting order of its own
    account. The *taker's* mode decides (as on most venues)."""

    NONE: Final = 0  # self trades are allowed and printed as fills
    CANCEL_NEWEST: Final = 1  # cancel the taker's remaining quantity, maker stays
    CANCEL_OLDEST: Final = 2  # cancel the resting maker, the taker continues
    CANCEL_BOTH: Final = 3  # cancel both
    DECREMENT_AND_CANCEL: Final = 4  # reduce both by the overlap, cancel whichever hits 0
    NAMES: Final = ("NONE", "CANCEL_NEWEST", "CANCEL_OLDEST", "CANCEL_BOTH", "DECREMENT_AND_CANCEL")


class Reject:
    """Reason codes of ``Rejected`` events. A rejected command changes no state."""

    UNKNOWN_COMMAND: Final = "UNKNOWN_COMMAND"
    INTERNAL_ERROR: Final = "INTERNAL_ERROR"
    INVALID_TIMESTAMP: Final = "INVALID_TIMESTAMP"
    UNKNOWN_SYMBOL: Final = "UNKNOWN_SYMBOL"
    SYMBOL_HALTED: Final = "SYMBOL_HALTED"
    SYMBOL_EXISTS: Final = "SYMBOL_EXISTS"
    INVALID_SYMBOL: Final = "INVALID_SYMBOL"
    INVALID_CONFIG: Final = "INVALID_CONFIG"
    TOO_MANY_SYMBOLS: Final = "TOO_MANY_SYMBOLS"
    INVALID_ACCOUNT: Final = "INVALID_ACCOUNT"
    UNKNOWN_ACCOUNT: Final = "UNKNOWN_ACCOUNT"
    TOO_MANY_ACCOUNTS: Final = "TOO_MANY_ACCOUNTS"
    INVALID_ASSET: Final = "INVALID_ASSET"
    INVALID_AMOUNT: Final = "INVALID_AMOUNT"
    SUPPLY_LIMIT: Final = "SUPPLY_LIMIT"
    INVALID_CLIENT_ORDER_ID: Final = "INVALID_CLIENT_ORDER_ID"
    DUPLICATE_CLIENT_ORDER_ID: Final = "DUPLICATE_CLIENT_ORDER_ID"
    INVALID_SIDE: Final = "INVALID_SIDE"
    INVALID_ORDER_TYPE: Final = "INVALID_ORDER_TYPE"
    INVALID_TIF: Final = "INVALID_TIF"
    INVALID_STP: Final = "INVALID_STP"
    INVALID_POST_ONLY: Final = "INVALID_POST_ONLY"
    INVALID_QTY: Final = "INVALID_QTY"
    INVALID_LOT: Final = "INVALID_LOT"
    INVALID_PRICE: Final = "INVALID_PRICE"
    INVALID_TICK: Final = "INVALID_TICK"
    PRICE_OUTSIDE_BAND: Final = "PRICE_OUTSIDE_BAND"
    BOOK_FULL: Final = "BOOK_FULL"
    TOO_MANY_OPEN_ORDERS: Final = "TOO_MANY_OPEN_ORDERS"
    POST_ONLY_WOULD_CROSS: Final = "POST_ONLY_WOULD_CROSS"
    INSUFFICIENT_BALANCE: Final = "INSUFFICIENT_BALANCE"
    UNKNOWN_ORDER: Final = "UNKNOWN_ORDER"
    INVALID_ORDER_REF: Final = "INVALID_ORDER_REF"


class CancelReason:
    """Reason codes of ``Cancelled`` events (an accepted order leaving the book unfilled)."""

    USER: Final = "USER"  # cancel command
    EXPIRED: Final = "EXPIRED"  # IOC or market remainder
    FOK_UNFILLED: Final = "FOK_UNFILLED"  # fill-or-kill could not fill completely
    STP: Final = "STP"  # self-trade prevention
    MATCH_LIMIT: Final = "MATCH_LIMIT"  # remainder after MAX_MATCHES_PER_ORDER makers


class ReduceReason:
    USER: Final = "USER"
    STP: Final = "STP"  # decrement-and-cancel


class BalanceReason:
    DEPOSIT: Final = "DEPOSIT"
    WITHDRAW: Final = "WITHDRAW"


class Cmd:
    """Command kind names, carried by ``Rejected`` so a reject says what it rejects."""

    NEW: Final = "NEW"
    CANCEL: Final = "CANCEL"
    REPLACE: Final = "REPLACE"
    REDUCE: Final = "REDUCE"
    ADD_SYMBOL: Final = "ADD_SYMBOL"
    UPDATE_SYMBOL: Final = "UPDATE_SYMBOL"
    DEPOSIT: Final = "DEPOSIT"
    WITHDRAW: Final = "WITHDRAW"
    UNKNOWN: Final = "UNKNOWN"


# Hard limits. Every integer the engine stores fits a signed 64-bit field of the
# canonical encoding: prices and quantities below 2**40, and the total supply of any
# asset (sum of all balances and holds) at most MAX_SUPPLY, so no balance can exceed it.
MAX_PRICE: Final = (1 << 40) - 1
MAX_QTY: Final = (1 << 40) - 1
MAX_SUPPLY: Final = (1 << 62) - 1
MAX_TS_NS: Final = (1 << 63) - 1
MAX_ID_LEN: Final = 64  # account ids, client order ids
MAX_SYMBOL_LEN: Final = 32
# Resting orders one incoming order may trade against or remove (fills and self-trade
# cancels); the rest of it is cancelled (MATCH_LIMIT), never rested. All of one input's
# outputs travel in one output event (engine/consumer.py: at most MAX_BATCH_BYTES, 512
# KiB): without a bound, an order sweeping ~9,000 one-lot orders held every later output
# back, and one sweeping 65,536 failed an assertion on every instance, again at each
# restart (a poison order). 1,024 makers, each at a price level of its own, with the
# longest symbol, account ids and client order ids, encode to ~281 KB (tests/test_book.py).
MAX_MATCHES_PER_ORDER: Final = 1_024
MAX_ASSET_LEN: Final = 16
MAX_BAND_BPS: Final = 1_000_000  # 100x the reference price
MAX_ORDER_ID: Final = (1 << 62) - 1
# Output format versions this release can emit (engine/events.py says what each adds).
# An engine emits version 1 until an activation in its input stream (engine/wire.py
# ACTIVATE_TYPE) switches it at that exact input; versions only move forward.
OUTPUT_VERSIONS: Final = (1, 2)
MAX_OUTPUT_VERSION: Final = 65_535  # a snapshot holds the version in 16 bits
