"""The exchange file (TOML): engine groups, their symbols, and opening balances.

The gateway routes by it (symbol -> group) and `xdc exchange init` turns it into input
commands (AddSymbol, Deposit) appended to each group's input stream: the engines learn
their configuration from the log only, never from this file, so replicas and replays
agree. Shape::

    [[group]]
    name = "g1"

      [[group.symbol]]
      name = "BTC-USD"
      base = "BTC"
      quote = "USD"
      tick_size = 1
      lot_size = 1
      band_bps = 5000      # orders priced more than 50% away from the reference refused
      ref_price = 50000

      [[group.deposit]]    # opening balances, appended once by `xdc exchange init`
      account = "alice"
      asset = "USD"
      amount = 1000000000
"""

from __future__ import annotations

import pathlib
import tomllib
from dataclasses import dataclass, field

from engine import commands as cm
from engine import wire
from engine.constants import MAX_ID_LEN, MAX_SYMBOL_LEN
from xdc.v1 import eventstore_pb2 as pb


class ExchangeConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    name: str
    base: str
    quote: str
    tick_size: int
    lot_size: int
    band_bps: int
    ref_price: int
    max_orders: int = 1_000_000


@dataclass(frozen=True, slots=True)
class DepositSpec:
    account: str
    asset: str
    amount: int


@dataclass(frozen=True, slots=True)
class GroupSpec:
    name: str
    symbols: tuple[SymbolSpec, ...]
    deposits: tuple[DepositSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class ExchangeConfig:
    groups: tuple[GroupSpec, ...]
    group_of: dict[str, str] = field(default_factory=dict)  # symbol -> group

    def group(self, name: str) -> GroupSpec:
        for g in self.groups:
            if g.name == name:
                return g
        raise ExchangeConfigError(f"unknown engine group {name!r}")


def _int(table: dict, key: str, where: str, lo: int = 0, default: int | None = None) -> int:
    v = table.get(key, default)
    if type(v) is not int or v < lo:
        raise ExchangeConfigError(f"{where}.{key}: an integer >= {lo} is required, got {v!r}")
    return v


def _str(table: dict, key: str, where: str, max_len: int) -> str:
    v = table.get(key)
    if not isinstance(v, str) or not 1 <= len(v) <= max_len or not v.isascii() \
            or not v.isprintable():
        raise ExchangeConfigError(f"{where}.{key}: 1..{max_len} printable ASCII characters "
                                  f"required, got {v!r}")
    return v


def parse(data: dict) -> ExchangeConfig:
    groups = []
    group_of: dict[str, str] = {}
    raw_groups = data.get("group")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise ExchangeConfigError("at least one [[group]] is required")
    for i, g in enumerate(raw_groups):
        where = f"group[{i}]"
        name = g.get("name")
        try:
            wire.check_group(name if isinstance(name, str) else "")
        except ValueError as exc:
            raise ExchangeConfigError(f"{where}.name: {exc}") from None
        if any(x.name == name for x in groups):
            raise ExchangeConfigError(f"{where}.name: duplicate group {name!r}")
        symbols = []
        for j, s in enumerate(g.get("symbol", [])):
            sw = f"{where}.symbol[{j}]"
            spec = SymbolSpec(
                name=_str(s, "name", sw, MAX_SYMBOL_LEN), base=_str(s, "base", sw, 16),
                quote=_str(s, "quote", sw, 16), tick_size=_int(s, "tick_size", sw, 1),
                lot_size=_int(s, "lot_size", sw, 1), band_bps=_int(s, "band_bps", sw, 0),
                ref_price=_int(s, "ref_price", sw, 1),
                max_orders=_int(s, "max_orders", sw, 1, 1_000_000))
            if spec.name in group_of:
                raise ExchangeConfigError(f"{sw}.name: symbol {spec.name!r} is already in "
                                          f"group {group_of[spec.name]!r}")
            group_of[spec.name] = name
            symbols.append(spec)
        if not symbols:
            raise ExchangeConfigError(f"{where}: at least one [[group.symbol]] is required")
        deposits = tuple(
            DepositSpec(_str(d, "account", f"{where}.deposit[{k}]", MAX_ID_LEN),
                        _str(d, "asset", f"{where}.deposit[{k}]", 16),
                        _int(d, "amount", f"{where}.deposit[{k}]", 1))
            for k, d in enumerate(g.get("deposit", [])))
        groups.append(GroupSpec(name, tuple(symbols), deposits))
    return ExchangeConfig(tuple(groups), group_of)


def load(path: str | pathlib.Path) -> ExchangeConfig:
    try:
        data = tomllib.loads(pathlib.Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ExchangeConfigError(f"{path}: {exc}") from None
    return parse(data)


def init_events(group: GroupSpec) -> list[pb.ProposedEvent]:
    """The input events that configure ``group``: one AddSymbol per symbol, one Deposit
    per opening balance. Their ids derive from the config, so running init twice
    appends nothing new."""
    out = []
    for s in group.symbols:
        cmd = cm.AddSymbol(0, s.name, s.base, s.quote, s.tick_size, s.lot_size, s.band_bps,
                           s.ref_price, s.max_orders)
        out.append(wire.command_event(group.name, cmd, f"init:{s.name}"))
    for k, d in enumerate(group.deposits):
        cmd = cm.Deposit(0, d.account, d.asset, d.amount)
        out.append(wire.command_event(group.name, cmd, f"init:{k}:{d.asset}:{d.amount}"))
    return out


DEMO_CONFIG = """\
# The demo exchange: two engine groups, and opening balances for the accounts alice
# and bob (the trader principal of `xdc cluster up` trades for alice).
[[group]]
name = "crypto"

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
  asset = "USD"
  amount = 1000000000

  [[group.deposit]]
  account = "alice"
  asset = "BTC"
  amount = 100

  [[group.deposit]]
  account = "alice"
  asset = "ETH"
  amount = 1000

  [[group.deposit]]
  account = "bob"
  asset = "USD"
  amount = 1000000000

  [[group.deposit]]
  account = "bob"
  asset = "BTC"
  amount = 100

  [[group.deposit]]
  account = "bob"
  asset = "ETH"
  amount = 1000

[[group]]
name = "equities"

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
  amount = 1000000000

  [[group.deposit]]
  account = "alice"
  asset = "ACME"
  amount = 100000

  [[group.deposit]]
  account = "bob"
  asset = "USD"
  amount = 1000000000

  [[group.deposit]]
  account = "bob"
  asset = "ACME"
  amount = 100000
"""
