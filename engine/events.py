"""Output events of the matching core, in two interchangeable forms.

* Raw form: ``(TAG, field1, field2, ...)`` tuples. The engine's hot path emits these
  (building a frozen dataclass costs ~1 us per event in CPython, a tuple ~40 ns) and the
  canonical encoder reads them directly.
* Record form: the ``@dataclass(slots=True, frozen=True)`` classes below, whose fields are
  the raw tuple's fields in the same order. ``to_record``/``to_raw`` convert.

Field order and tags are part of the canonical encoding: append new event types with
new tags, never reorder fields.

Output format versions (``engine.constants.OUTPUT_VERSIONS``): an engine emits version 1
until an activation input switches it (``Engine.output_version``). Version 2 reports a
cancel and a reject with the order's side and price: ``CancelledV2``/``RejectedV2``, new
tags whose fields are their version-1 event's, in the same order, then ``side, price``.
So version-1 outputs keep their bytes, every event still decodes without knowing the
version it was made under, and code that reads a version-1 field by index reads it in
both.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import ClassVar

ACCEPTED = 1
REJECTED = 2
FILL = 3
CANCELLED = 4
REPLACED = 5
REDUCED = 6
BOOK = 7
SYMBOL_CONFIG = 8
BALANCE = 9
HALTED = 10
CANCELLED_V2 = 11
REJECTED_V2 = 12
# The side of a RejectedV2 whose command has no valid side (a cancel, a reduction, a
# garbled order).
NO_SIDE = -1


@dataclass(slots=True, frozen=True)
class Accepted:
    """An order entered the book's processing. ``price`` is the effective limit price:
    for a market order its protection price (see ``engine.book``)."""

    TAG: ClassVar[int] = ACCEPTED
    symbol: str
    order_id: int
    account: str
    client_order_id: str
    side: int
    order_type: int
    tif: int
    price: int
    qty: int
    ts_ns: int


@dataclass(slots=True, frozen=True)
class Rejected:
    """A command was refused and changed nothing (``detail`` is the exception type name
    for ``INTERNAL_ERROR``, else empty). Unusable input fields are reported as ""/0."""

    TAG: ClassVar[int] = REJECTED
    symbol: str
    account: str
    client_order_id: str
    order_id: int
    command: str
    reason: str
    detail: str
    ts_ns: int


@dataclass(slots=True, frozen=True)
class Fill:
    """A trade at the maker's price."""

    TAG: ClassVar[int] = FILL
    symbol: str
    price: int
    qty: int
    taker_side: int
    maker_order_id: int
    taker_order_id: int
    maker_account: str
    taker_account: str
    ts_ns: int


@dataclass(slots=True, frozen=True)
class Cancelled:
    """An accepted order's open quantity ``qty`` left the book without trading."""

    TAG: ClassVar[int] = CANCELLED
    symbol: str
    order_id: int
    account: str
    client_order_id: str
    reason: str
    qty: int
    ts_ns: int


@dataclass(slots=True, frozen=True)
class CancelledV2(Cancelled):
    """``Cancelled`` from output version 2 on, with the order's side and price (its
    effective limit price, as ``Accepted`` reported it): the resting order's for a cancel
    of any reason, the taker's for the remainder of an incoming order."""

    TAG: ClassVar[int] = CANCELLED_V2
    side: int
    price: int


@dataclass(slots=True, frozen=True)
class RejectedV2(Rejected):
    """``Rejected`` from output version 2 on, with the command's side and price: a new
    order's, a replacement's price; ``NO_SIDE``/0 for what the command does not have
    (or has invalid)."""

    TAG: ClassVar[int] = REJECTED_V2
    side: int
    price: int


@dataclass(slots=True, frozen=True)
class Replaced:
    """New price and open quantity; fills and book updates for the new price follow."""

    TAG: ClassVar[int] = REPLACED
    symbol: str
    order_id: int
    account: str
    client_order_id: str
    price: int
    qty: int
    ts_ns: int


@dataclass(slots=True, frozen=True)
class Reduced:
    """Open quantity lowered to ``qty`` (by the user, or by STP decrement)."""

    TAG: ClassVar[int] = REDUCED
    symbol: str
    order_id: int
    account: str
    client_order_id: str
    qty: int
    reason: str
    ts_ns: int


@dataclass(slots=True, frozen=True)
class BookUpdate:
    """L2: the aggregate open quantity at (side, price) is now ``qty`` (0 = level gone).
    Emitted when a command leaves a level it changed; the last update of a level within
    one command's events is its final state."""

    TAG: ClassVar[int] = BOOK
    symbol: str
    side: int
    price: int
    qty: int


@dataclass(slots=True, frozen=True)
class SymbolConfig:
    """A book was created or reconfigured; ``ref_price`` is the current band reference."""

    TAG: ClassVar[int] = SYMBOL_CONFIG
    symbol: str
    base: str
    quote: str
    tick_size: int
    lot_size: int
    band_bps: int
    ref_price: int
    max_orders: int
    max_qty: int
    ts_ns: int


@dataclass(slots=True, frozen=True)
class BalanceChanged:
    TAG: ClassVar[int] = BALANCE
    account: str
    asset: str
    delta: int
    available: int
    held: int
    reason: str
    ts_ns: int


@dataclass(slots=True, frozen=True)
class Halted:
    """The engine raised after it had started to change this symbol's state: the symbol
    stops (every later command on it is rejected) rather than trade on a state that may
    be half-updated. Every replica halts at the same input."""

    TAG: ClassVar[int] = HALTED
    symbol: str
    reason: str
    ts_ns: int


Event = (
    Accepted
    | Rejected
    | Fill
    | Cancelled
    | Replaced
    | Reduced
    | BookUpdate
    | SymbolConfig
    | BalanceChanged
    | Halted
    | CancelledV2
    | RejectedV2
)

EVENT_CLASSES: dict[int, type] = {
    cls.TAG: cls
    for cls in (
        Accepted,
        Rejected,
        Fill,
        Cancelled,
        Replaced,
        Reduced,
        BookUpdate,
        SymbolConfig,
        BalanceChanged,
        Halted,
        CancelledV2,
        RejectedV2,
    )
}

# Per tag: field kinds, "s" for str and "i" for int, in field order (used by the codec).
FIELD_KINDS: dict[int, str] = {
    tag: "".join("s" if f.type in ("str", str) else "i" for f in fields(cls))
    for tag, cls in EVENT_CLASSES.items()
}


def to_record(raw: tuple) -> Event:
    return EVENT_CLASSES[raw[0]](*raw[1:])


def to_raw(event: Event) -> tuple:
    return (event.TAG, *astuple(event))
