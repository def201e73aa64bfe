"""Input commands of the matching core.

Every command carries ``ts_ns``: the engine's only notion of time, taken from the input
(the store's leader timestamp or the gateway's), never from a clock. Fields are not
validated on construction: a command is data decoded from the log, and a malformed one
must become a deterministic ``Rejected`` event inside the engine rather than an
exception in the decoder.

Units: prices are integers in quote units per base unit, quantities integers in base
units, and ``price * qty`` is the quote amount that changes hands. Prices must be a
multiple of the symbol's tick size, quantities of its lot size.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.constants import STP, OrderType, TimeInForce


@dataclass(slots=True, frozen=True)
class NewOrder:
    """Submit an order. ``price`` is ignored-and-must-be-0 for market orders.

    ``client_order_id`` may be empty; when set it must be unique among the account's open
    orders and can be used to cancel, replace or reduce.
    """

    ts_ns: int
    symbol: str
    account: str
    client_order_id: str
    side: int
    qty: int
    price: int = 0
    order_type: int = OrderType.LIMIT
    tif: int = TimeInForce.GTC
    post_only: bool = False
    stp: int = STP.CANCEL_NEWEST


@dataclass(slots=True, frozen=True)
class CancelOrder:
    """Cancel by ``order_id`` (engine-assigned, unique per symbol) or, when it is 0, by the
    account's ``client_order_id``. Only the owning account may cancel."""

    ts_ns: int
    symbol: str
    account: str
    order_id: int = 0
    client_order_id: str = ""


@dataclass(slots=True, frozen=True)
class ReplaceOrder:
    """Change price and open quantity of a resting order. The order keeps its ids but
    loses time priority, and may trade at once if the new price crosses."""

    ts_ns: int
    symbol: str
    account: str
    price: int
    qty: int
    order_id: int = 0
    client_order_id: str = ""


@dataclass(slots=True, frozen=True)
class ReduceOrder:
    """Lower a resting order's open quantity to ``qty`` (0 < qty < open), keeping its
    time priority."""

    ts_ns: int
    symbol: str
    account: str
    qty: int
    order_id: int = 0
    client_order_id: str = ""


@dataclass(slots=True, frozen=True)
class AddSymbol:
    """Create a book. ``ref_price`` is the band's reference until the first trade."""

    ts_ns: int
    symbol: str
    base: str
    quote: str
    tick_size: int
    lot_size: int
    band_bps: int
    ref_price: int
    max_orders: int = 1_000_000
    max_qty: int = (1 << 40) - 1


@dataclass(slots=True, frozen=True)
class UpdateSymbol:
    """Change a book's mutable configuration. Tick and lot sizes are fixed at creation
    because resting orders were validated against them. ``ref_price`` replaces the
    reference only while the book has not traded yet."""

    ts_ns: int
    symbol: str
    band_bps: int
    ref_price: int
    max_orders: int
    max_qty: int


@dataclass(slots=True, frozen=True)
class Deposit:
    ts_ns: int
    account: str
    asset: str
    amount: int


@dataclass(slots=True, frozen=True)
class Withdraw:
    """Withdraw from the available (not held) balance."""

    ts_ns: int
    account: str
    asset: str
    amount: int


Command = (
    NewOrder
    | CancelOrder
    | ReplaceOrder
    | ReduceOrder
    | AddSymbol
    | UpdateSymbol
    | Deposit
    | Withdraw
)
