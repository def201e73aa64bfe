"""Canonical byte encodings: engine snapshots, output events, input commands.

Canonical means: the same logical value always encodes to the same bytes, in any
process and under any ``PYTHONHASHSEED``. Everything is written in an explicit order
(sorted keys, book priority order), integers as little-endian signed 64-bit, strings as
a one-byte length and ASCII (the engine only admits printable ASCII identifiers of at
most 64 characters; reason codes and details are shorter too). No pickle.

Snapshot layout (version 1)::

    b"XDCE" u16 version
    q max_symbols, q max_accounts, q max_open_orders_per_account
    u32 n_accounts, then per account in id order:
        str id, u16 n, n x (str asset, q avail, q held)  # assets in order, zeros omitted
    u32 n_books, then per book in symbol order:
        str symbol, str base, str quote,
        q tick, lot, band_bps, cfg_ref, ref, traded, halted, max_orders, max_qty, next_oid
        u32 n_orders, then bids best to worst, then asks best to worst, FIFO per level:
            q oid, q price, q qty, B side, B post_only, B stp, I account index, str cid

Version 2 is version 1 with the engine's output format version (``Engine.output_version``)
after the layout version: ``b"XDCE" u16 2, u16 output_version`` (2 and up), then the
same fields. A version-1 engine (one no activation has switched) is written as version 1,
so its snapshot bytes and state hash are those of releases before output versions;
both layouts are read.

Derived state (heaps, per-account open counts and client-order-id indexes, asset supply,
band edges) is rebuilt on restore, so a restored engine is indistinguishable in its
outputs from the one that was snapshotted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable
from typing import Any, get_type_hints

from engine import commands as cm
from engine._speedups import encode_chained as _encode_chained
from engine._speedups import encode_orders, record_frame
from engine._speedups import take_inputs as _take_inputs
from engine._speedups import take_raw_inputs as _take_raw_inputs
from engine.book import (
    BUY,
    Account,
    Book,
    Engine,
    EngineLimits,
    new_level,
)
from engine.constants import OUTPUT_VERSIONS
from engine.events import (
    ACCEPTED,
    BOOK,
    CANCELLED,
    CANCELLED_V2,
    EVENT_CLASSES,
    FIELD_KINDS,
    FILL,
    REJECTED,
    REJECTED_V2,
)

MAGIC = b"XDCE"
VERSION = 1  # the layout of a snapshot of an engine at output version 1
VERSION_WITH_OUTPUT = 2  # of one at any later output version
GENESIS = bytes(32)  # chain hash before the first output

_H = struct.Struct("<H")
_I = struct.Struct("<I")
_Q2 = struct.Struct("<qq")
_Q3 = struct.Struct("<qqq")
_Q10 = struct.Struct("<10q")
_ORDER = struct.Struct("<qqqBBBI")


class CodecError(ValueError):
    """Bytes that are not a valid encoding."""


_STR_CACHE: dict[str, bytes] = {}
_STR_CACHE_MAX = 65_536  # symbols, accounts and reason codes repeat; ids mostly do not


def _str(s: str) -> bytes:
    cached = _STR_CACHE.get(s)
    if cached is not None:
        return cached
    b = s.encode("ascii")
    if len(b) > 255:
        raise CodecError("string longer than 255 bytes")
    out = bytes((len(b),)) + b
    if len(_STR_CACHE) >= _STR_CACHE_MAX:
        _STR_CACHE.clear()
    _STR_CACHE[s] = out
    return out


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, st: struct.Struct) -> tuple:
        try:
            v = st.unpack_from(self.buf, self.pos)
        except struct.error as exc:
            raise CodecError("truncated") from exc
        self.pos += st.size
        return v

    def str(self) -> str:
        pos = self.pos
        if pos >= len(self.buf):
            raise CodecError("truncated")
        n = self.buf[pos]
        end = pos + 1 + n
        if end > len(self.buf):
            raise CodecError("truncated")
        self.pos = end
        return bytes(self.buf[pos + 1:end]).decode("ascii")


# ---------------------------------------------------------------------- snapshots


# An account's asset count: 16 bits, or this mark then 32 bits. Nothing bounds the
# assets an account may hold (each deposit may name a new one), and a state that the
# snapshot cannot hold would stop every instance at its next capture; the mark leaves
# every count below it, every snapshot ever written, as it was.
_MANY_ASSETS = 0xFFFF


def _asset_count(n: int) -> bytes:
    return _H.pack(n) if n < _MANY_ASSETS else _H.pack(_MANY_ASSETS) + _I.pack(n)


def snapshot_bytes(eng: Engine) -> bytes:
    """Canonical encoding of the whole engine state."""
    parts: list[bytes] = [MAGIC, _H.pack(VERSION)]
    if eng.output_version != 1:
        parts = [MAGIC, _H.pack(VERSION_WITH_OUTPUT), _H.pack(eng.output_version)]
    lim = eng.limits
    parts.append(_Q3.pack(lim.max_symbols, lim.max_accounts, lim.max_open_orders_per_account))
    aids = sorted(eng.accounts)
    parts.append(_I.pack(len(aids)))
    for aid in aids:
        acct = eng.accounts[aid]
        assets = sorted(
            a for a in set(acct.avail) | set(acct.held)
            if acct.avail.get(a, 0) or acct.held.get(a, 0)
        )
        parts.append(_str(aid))
        parts.append(_asset_count(len(assets)))
        for a in assets:
            parts.append(_str(a))
            parts.append(_Q2.pack(acct.avail.get(a, 0), acct.held.get(a, 0)))
    syms = sorted(eng.books)
    parts.append(_I.pack(len(syms)))
    by_account = {eng.accounts[aid]: i for i, aid in enumerate(aids)}  # its index
    for sym in syms:
        b = eng.books[sym]
        parts += (_str(b.symbol), _str(b.base), _str(b.quote))
        parts.append(_Q10.pack(b.tick, b.lot, b.band_bps, b.cfg_ref, b.ref, int(b.traded),
                               int(b.halted), b.max_orders, b.max_qty, b.next_oid))
        parts.append(_I.pack(len(b.orders)))
        n = 0
        try:
            for levels, rev in ((b.bids, True), (b.asks, False)):
                # The hot loop of a capture, in C (the engine stands still meanwhile).
                data, count = encode_orders([levels[p].dq for p in sorted(levels, reverse=rev)],
                                            by_account)
                parts.append(data)
                n += count
        except UnicodeError:
            raise
        except ValueError as exc:  # an id over 255 bytes
            raise CodecError(str(exc)) from None
        assert n == len(b.orders), "order index out of step with levels"
    return b"".join(parts)


def restore(data: bytes) -> Engine:
    """Rebuild an engine from ``snapshot_bytes`` output. Bytes it cannot rebuild an
    engine from raise CodecError, whatever they trip over (an index past the accounts,
    a tick of 0): a bad snapshot costs its reader a replay, never its start."""
    try:
        return _restore(data)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"not a snapshot this engine restores: {type(exc).__name__}: "
                         f"{exc}") from None


def _restore(data: bytes) -> Engine:
    r = _Reader(data)
    if bytes(r.buf[:4]) != MAGIC:
        raise CodecError("not an engine snapshot")
    r.pos = 4
    (version,) = r.take(_H)
    output_version = 1
    if version == VERSION_WITH_OUTPUT:
        (output_version,) = r.take(_H)
        if output_version == 1:
            raise CodecError("output version 1 in a version-2 snapshot (not canonical)")
    elif version != VERSION:
        raise CodecError(f"unsupported snapshot version {version}")
    if output_version not in OUTPUT_VERSIONS:
        raise CodecError(f"snapshot of an engine at output version {output_version}; this "
                         f"engine emits output versions {_versions(OUTPUT_VERSIONS)}")
    eng = Engine(EngineLimits(*r.take(_Q3)))
    eng.set_output_version(output_version)
    (n_accounts,) = r.take(_I)
    accts: list[Account] = []
    supply = eng.supply
    for _ in range(n_accounts):
        acct = Account(r.str())
        (n,) = r.take(_H)
        if n == _MANY_ASSETS:
            (n,) = r.take(_I)
            if n < _MANY_ASSETS:
                raise CodecError(f"an asset count of {n} written long (not canonical)")
        for _ in range(n):
            asset = r.str()
            avail, held = r.take(_Q2)
            acct.avail[asset] = avail
            if held:
                acct.held[asset] = held
            supply[asset] = supply.get(asset, 0) + avail + held
        eng.accounts[acct.id] = acct
        accts.append(acct)
    (n_books,) = r.take(_I)
    unpack_order = _ORDER.unpack_from
    size = _ORDER.size
    for _ in range(n_books):
        sym, base, quote = r.str(), r.str(), r.str()
        (tick, lot, band_bps, cfg_ref, ref, traded, halted, max_orders, max_qty,
         next_oid) = r.take(_Q10)
        b = Book(sym, base, quote, tick, lot, band_bps, cfg_ref, max_orders, max_qty)
        b.set_ref(ref)
        b.traded = bool(traded)
        b.halted = bool(halted)
        b.next_oid = next_oid
        (n_orders,) = r.take(_I)
        buf = r.buf
        orders = b.orders
        lvl = None
        last: tuple[int, int] | None = None
        for _ in range(n_orders):
            try:
                oid, price, qty, side, post_only, stp, ai = unpack_order(buf, r.pos)
            except struct.error as exc:
                raise CodecError("truncated") from exc
            r.pos += size
            cid = r.str()
            acct = accts[ai]
            if (side, price) != last:
                levels = b.bids if side == BUY else b.asks
                lvl = levels[price] = new_level()
                last = (side, price)
            o = [qty, oid, acct, cid, side, price, post_only == 1, stp]  # Order layout
            lvl.dq.append(o)  # type: ignore[union-attr]
            lvl.n += 1  # type: ignore[union-attr]
            lvl.qty += qty  # type: ignore[union-attr]
            orders[oid] = o
            acct.n_open += 1
            if cid:
                acct.cids[cid] = o
        # Keys were written best first: descending bids negate to an ascending list,
        # ascending asks are one already; a sorted list is a valid heap.
        b.bid_heap = [-p for p in b.bids]
        b.ask_heap = list(b.asks)
        eng.books[sym] = b
    if r.pos != len(r.buf):
        raise CodecError("trailing bytes")
    return eng


def _versions(versions: tuple[int, ...]) -> str:
    return ", ".join(map(str, versions))


def state_hash(eng: Engine) -> bytes:
    return hashlib.sha256(snapshot_bytes(eng)).digest()


# ---------------------------------------------------------------------- events
#
# Encoders are generated once per event tag as straight-line code (the consumer encodes
# every output of every input: a generic per-field loop costs several times more). Each
# returns the event *framed* for an output blob, ``u16 length + event``; the canonical
# event bytes are the frame without its first two bytes.

_EVENT_INTS = {tag: struct.Struct("<B" + "q" * kinds.count("i")) for tag, kinds in
               FIELD_KINDS.items()}
_EVENT_STR_POS = {tag: tuple(i + 1 for i, k in enumerate(kinds) if k == "s")
                  for tag, kinds in FIELD_KINDS.items()}
_EVENT_INT_POS = {tag: tuple(i + 1 for i, k in enumerate(kinds) if k == "i")
                  for tag, kinds in FIELD_KINDS.items()}


def _compile_event_encoder(tag: int) -> Any:
    ints, strs = _EVENT_INT_POS[tag], _EVENT_STR_POS[tag]
    head = struct.Struct("<HB" + "q" * len(ints))
    svars = [f"s{i}" for i in strs]
    length = " + ".join([str(head.size - 2)] + [f"len({v})" for v in svars])
    src = "def encode(r):\n"
    for i, v in zip(strs, svars, strict=True):
        src += f"    {v} = _cached(r[{i}]) or _str(r[{i}])\n"
    src += f"    return b''.join((_head({length}, {tag}, {', '.join(f'r[{i}]' for i in ints)})"
    src += "".join(f", {v}" for v in svars) + "))\n"
    env = {"_cached": _STR_CACHE.get, "_str": _str, "_head": head.pack}
    exec(src, env)  # the source is built above from the event field table alone
    return env["encode"]


_FRAMED = {tag: _compile_event_encoder(tag) for tag in FIELD_KINDS}

# The tags most outputs have, most frequent first (the workload of bench.match: ~40%
# book updates, ~30% accepts, ~20% fills): ``encode_framed`` tests for them in this order.
# The version-2 rejects and cancels come last: before them, an output of version 1 is
# tested exactly as it was before output versions.
_COMMON_TAGS = (BOOK, ACCEPTED, FILL, REJECTED, CANCELLED, REJECTED_V2, CANCELLED_V2)


# Event fields whose strings are mostly new (client order ids): looked up with .get; the
# others (symbols, accounts, reasons) are almost always in _STR_CACHE and subscripted
# (cheaper than a call; a miss raises KeyError once per string).
_UNCACHED_FIELDS = ("client_order_id",)


def _event_lines(indent: str, env: dict[str, Any]) -> list[str]:
    """The body of each common tag's encoder, for a loop over events ``r`` that appends
    each event's parts to ``parts`` (other tags go through ``_FRAMED``). ``parts.append``
    as a method call: CPython 3.11 specialises it to an inline list append."""
    env["_cache"] = _STR_CACHE
    lines = [f"{indent}tag = r[0]"]
    for k, tag in enumerate(_COMMON_TAGS):
        ints, strs = _EVENT_INT_POS[tag], _EVENT_STR_POS[tag]
        head = struct.Struct("<HB" + "q" * len(ints))
        env[f"_head{tag}"] = head.pack
        svars = [f"s{i}" for i in strs]
        length = " + ".join([str(head.size - 2)] + [f"len({v})" for v in svars])
        names = [f.name for f in dataclasses.fields(EVENT_CLASSES[tag])]
        lines.append(f"{indent}{'if' if k == 0 else 'elif'} tag == {tag}:")
        for i, v in zip(strs, svars, strict=True):
            if names[i - 1] in _UNCACHED_FIELDS:
                lines.append(f"{indent}    {v} = _cached(r[{i}]) or _str(r[{i}])")
            else:
                lines += [f"{indent}    try:", f"{indent}        {v} = _cache[r[{i}]]",
                          f"{indent}    except KeyError:", f"{indent}        {v} = _str(r[{i}])"]
        args = ", ".join(f"r[{i}]" for i in ints)
        lines.append(f"{indent}    parts.append(_head{tag}({length}, {tag}, {args}))")
        lines.extend(f"{indent}    parts.append({v})" for v in svars)
    lines += [f"{indent}else:",
              f"{indent}    parts.append(_framed[tag](r))"]
    return lines


def _compile_framed_encoder() -> Any:
    """``encode_framed`` as straight-line code: the body of each common tag's encoder
    inlined in one loop over the events, writing the parts of every event into one list
    joined once, instead of a call and a join per event (6-7% less encoding time on the
    bench.match workload, about 1% of the consumer's time per input).
    Same bytes as ``_FRAMED[tag](r)`` per event (tests/test_consumer.py compares them);
    other tags go through ``_FRAMED``."""
    env: dict[str, Any] = {"_cached": _STR_CACHE.get, "_str": _str, "_framed": _FRAMED}
    lines = ["def encode_framed(raws, head=b''):",
             "    parts = [head]",
             "    for r in raws:  # a loop, not a comprehension: no extra frame per call",
             *_event_lines("        ", env),
             "    return b''.join(parts)"]
    exec("\n".join(lines) + "\n", env)  # built from the event field table alone
    return env["encode_framed"]


# encode_framed(raws, head=b"") -> bytes: ``head``, then ``u16 length + canonical bytes``
# of each raw event (the generated function itself: a wrapper would cost a call per input).
encode_framed: Callable[..., bytes] = _compile_framed_encoder()


# Per tag (an index), its field kinds as bytes (b"s": str, b"i": int), for the C loop.
_KINDS_BY_TAG = tuple(FIELD_KINDS[t].encode() if t in FIELD_KINDS else None
                      for t in range(max(FIELD_KINDS) + 1))


def encode_chained(raws: list[tuple], starts: list[int], positions: list[int], first: int,
                   chain: bytes, emit: Callable[[Any], object], cls: type) -> bytes:
    """For each input i from ``first`` on whose events ``raws[starts[i]:starts[i + 1]]``
    are not none: ``blob = wire.IN_HEAD(positions[i], number of events) +
    encode_framed(its events)`` and ``chain = sha256(chain + blob)``, then
    ``emit(cls((positions[i], blob, chain)))`` (``cls``: a tuple subclass); returns the
    last chain. ``starts`` has one more entry than ``positions``: the end of the last
    input's events.

    The consumer's hot path, one call per batch of inputs: the loop is C
    (engine/_speedups.c), ~4x the generated Python loop it replaced; events it does not
    take as they are go through ``_FRAMED``, so its bytes and refusals are those of
    ``encode_framed`` (tests/test_consumer.py)."""
    return _encode_chained(raws, starts, positions, first, chain, emit, cls, _KINDS_BY_TAG,
                           _FRAMED)


def encode_event(raw: tuple) -> bytes:
    """Canonical bytes of one raw event: tag, its int fields (q each) in field order,
    then its str fields (length byte + ASCII) in field order."""
    return _FRAMED[raw[0]](raw)[2:]


def decode_event(data: bytes) -> tuple:
    if not data or data[0] not in _EVENT_INTS:
        raise CodecError("unknown event tag")
    tag = data[0]
    st = _EVENT_INTS[tag]
    r = _Reader(data)
    ints = r.take(st)
    strs = [r.str() for _ in _EVENT_STR_POS[tag]]
    if r.pos != len(data):
        raise CodecError("trailing bytes")
    out: list[object] = [tag] + [None] * len(FIELD_KINDS[tag])
    for pos, v in zip(_EVENT_INT_POS[tag], ints[1:], strict=True):
        out[pos] = v
    for pos, v in zip(_EVENT_STR_POS[tag], strs, strict=True):
        out[pos] = v
    return tuple(out)


def chain_hash(chain: bytes, encoded_event: bytes) -> bytes:
    """Running hash of outputs: ``sha256(chain + encoded_event)``; start from GENESIS."""
    return hashlib.sha256(chain + encoded_event).digest()


def chain_events(chain: bytes, raws: list[tuple]) -> bytes:
    for raw in raws:
        chain = hashlib.sha256(chain + encode_event(raw)).digest()
    return chain


# ---------------------------------------------------------------------- commands

COMMAND_CLASSES: tuple[type, ...] = (
    cm.NewOrder,
    cm.CancelOrder,
    cm.ReplaceOrder,
    cm.ReduceOrder,
    cm.AddSymbol,
    cm.UpdateSymbol,
    cm.Deposit,
    cm.Withdraw,
)
_CMD_TAG = {cls: i + 1 for i, cls in enumerate(COMMAND_CLASSES)}


def _field_types(cls: type) -> tuple[tuple[str, str], ...]:
    hints = get_type_hints(cls)
    return tuple((name, hints[name].__name__) for name in cls._fields)  # type: ignore[attr-defined]


# (name, type name: "int", "str" or "bool") per field, in field order.
_CMD_FIELDS = {cls: _field_types(cls) for cls in COMMAND_CLASSES}
_TS = struct.Struct("<q")


def encode_command(cmd: object) -> bytes:
    """Canonical bytes of an input command (the gateway's payload). Raises ``CodecError``
    for values the wire format cannot hold (the gateway validates before appending)."""
    cls = type(cmd)
    tag = _CMD_TAG.get(cls)
    if tag is None:
        raise CodecError(f"not a command: {cls.__name__}")
    parts = [bytes((tag,))]
    for name, typ in _CMD_FIELDS[cls]:
        v = getattr(cmd, name)
        if typ == "str":
            if type(v) is not str or not v.isascii():
                raise CodecError(f"{name}: ASCII string required")
            parts.append(_str(v))
        elif typ == "bool":
            if type(v) is not bool:
                raise CodecError(f"{name}: bool required")
            parts.append(bytes((int(v),)))
        else:
            if type(v) is not int or not -(1 << 63) <= v < (1 << 63):
                raise CodecError(f"{name}: 64-bit int required")
            parts.append(_TS.pack(v))
    return b"".join(parts)


def _compile_decoder(cls: type) -> Any:
    """``decode(data, ts_ns=None)`` for one command class, generated once as straight-line
    code: each run of fixed-size fields is read with one struct, each string by its length
    byte, and the command is built with ``tuple.__new__`` (the consumer decodes every
    input; interpreting a field plan per input cost as much as matching it). ``ts_ns``,
    when given, replaces the encoded time (the first field of every command). Accepts
    and refuses the same bytes as a field-by-field reference decoder
    (tests/test_consumer.py compares them)."""
    fields = _CMD_FIELDS[cls]
    assert fields[0] == ("ts_ns", "int"), cls
    env: dict[str, Any] = {"CodecError": CodecError, "_make": tuple.__new__, "_cls": cls,
                           "_ts": _TS.unpack_from}
    body = ["n = len(data)", "if n < 9:", "    raise CodecError('truncated')",
            "if ts_ns is None:", "    (ts_ns,) = _ts(data, 1)", "pos = 9"]
    names = ["ts_ns"]
    run: list[tuple[str, str]] = []  # (variable, struct code) of the current fixed run

    def flush() -> None:
        if not run:
            return
        st = struct.Struct("<" + "".join(code for _, code in run))
        unpack = f"_run{len(env)}"
        env[unpack] = st.unpack_from
        body.extend([f"if pos + {st.size} > n:", "    raise CodecError('truncated')",
                     f"{', '.join(v for v, _ in run)}, = {unpack}(data, pos)",
                     f"pos += {st.size}"])
        for v, code in run:
            if code == "B":
                body.extend([f"if {v} > 1:", "    raise CodecError('bad bool')",
                             f"{v} = {v} == 1"])
        run.clear()

    for i, (_, typ) in enumerate(fields[1:], 1):
        v = f"f{i}"
        names.append(v)
        if typ == "str":
            flush()
            body.extend(["if pos >= n:", "    raise CodecError('truncated')",
                         "end = pos + 1 + data[pos]", "if end > n:",
                         "    raise CodecError('truncated')",
                         f"{v} = data[pos + 1:end].decode('ascii')", "pos = end"])
        else:
            run.append((v, "B" if typ == "bool" else "q"))
    flush()
    body.extend(["if pos != n:", "    raise CodecError('trailing bytes')",
                 f"return _make(_cls, ({', '.join(names)},))"])
    src = ("def decode(data, ts_ns=None):\n    try:\n"
           + "".join(f"        {line}\n" for line in body)
           + "    except UnicodeDecodeError as exc:\n"
           + "        raise CodecError('non-ASCII string') from exc\n")
    exec(src, env)  # the source is built above from the command field table alone
    return env["decode"]


# Decoded strings of the fields that repeat (symbols, accounts): one dict lookup instead
# of a decode, and the engine's lookups by them find their hash cached in the str.
_INTERN_FIELDS = ("symbol", "account")
_INTERNED: dict[bytes, str] = {}
_INTERNED_MAX = 16_384


def _intern(b: bytes) -> str:
    s = b.decode("ascii")  # UnicodeDecodeError: the caller's checked path names it
    if len(_INTERNED) >= _INTERNED_MAX:
        _INTERNED.clear()
    _INTERNED[b] = s
    return s


# (symbol, account) of the commands that start with both (orders, cancels, replaces,
# reductions), by their bytes with both length bytes: one lookup for the two.
_INTERNED_PAIRS: dict[bytes, tuple[str, str]] = {}


def _intern_pair(b: bytes) -> tuple[str, str]:
    n = b[0]
    pair = (b[1:1 + n].decode("ascii"), b[2 + n:].decode("ascii"))
    if len(_INTERNED_PAIRS) >= _INTERNED_MAX:
        _INTERNED_PAIRS.clear()
    _INTERNED_PAIRS[b] = pair
    return pair


def _compile_fast_decoder(cls: type, checked: Any) -> Any:
    """``decode(data, ts_ns=None)`` for one command class: ``checked`` (above) for any
    malformed bytes, and for well-formed ones the same command read with fewer steps:
    the string lengths are followed first (an index past the end raises IndexError) and
    the whole is checked by its length once, then the fixed runs are unpacked and the
    strings decoded. Anything irregular (wrong length, a bool byte over 1, a non-ASCII
    string, data too short) goes to ``checked``, which refuses it with its own reason,
    so both accept and refuse exactly the same bytes with the same result."""
    fields = _CMD_FIELDS[cls]
    assert fields[0] == ("ts_ns", "int"), cls
    env: dict[str, Any] = {"_make": tuple.__new__, "_cls": cls, "_ts": _TS.unpack_from,
                           "_checked": checked, "_interned": _INTERNED, "_intern": _intern,
                           "_pairs": _INTERNED_PAIRS, "_intern_pair": _intern_pair}
    ends: list[str] = []  # each string's end, in field order
    unpacks: list[str] = []  # each fixed run, once the length is known right
    checks: list[str] = []
    strings: list[str] = []
    names = ["ts_ns"]
    run: list[tuple[str, str]] = []  # (variable, struct code) of the current fixed run
    cur = "9"  # where the next field starts (an expression)

    def flush() -> None:
        nonlocal cur
        if not run:
            return
        st = struct.Struct("<" + "".join(code for _, code in run))
        unpack = f"_run{len(env)}"
        env[unpack] = st.unpack_from
        unpacks.append(f"{', '.join(v for v, _ in run)}, = {unpack}(data, {cur})")
        for v, code in run:
            if code == "B":
                checks.extend([f"if {v} > 1:", "    return _checked(data, ts_ns)"])
                names[names.index(v)] = f"{v} == 1"
        cur = f"{cur} + {st.size}"
        run.clear()

    for i, (name, typ) in enumerate(fields[1:], 1):
        v = f"f{i}"
        names.append(v)
        if typ == "str":
            flush()
            ends.append(f"e{i} = {cur} + 1 + data[{cur}]")
            piece = f"data[{cur} + 1:e{i}]"
            if i == 2 and fields[1] == ("symbol", "str") and name == "account":
                del strings[-4:]  # the symbol's lookup: both in one
                strings.extend(["try:", "    f1, f2 = _pairs[data[9:e2]]", "except KeyError:",
                                "    f1, f2 = _intern_pair(data[9:e2])"])
            elif name in _INTERN_FIELDS:
                strings.extend(["try:", f"    {v} = _interned[{piece}]", "except KeyError:",
                                f"    {v} = _intern({piece})"])
            else:
                strings.append(f"{v} = {piece}.decode('ascii')")
            cur = f"e{i}"
        else:
            run.append((v, "B" if typ == "bool" else "q"))
    flush()
    body = [*ends, f"if {cur} != len(data):", "    return _checked(data, ts_ns)",
            *unpacks, *checks, *strings,
            "if ts_ns is None:", "    (ts_ns,) = _ts(data, 1)",
            f"return _make(_cls, ({', '.join(names)},))"]
    src = ("def decode(data, ts_ns=None):\n    try:\n"
           + "".join(f"        {line}\n" for line in body)
           + "    except (IndexError, UnicodeDecodeError):\n"
           + "        return _checked(data, ts_ns)\n")
    exec(src, env)  # the source is built above from the command field table alone
    return env["decode"]


def _unknown_tag(data: bytes, ts_ns: int | None = None) -> object:
    raise CodecError("unknown command tag")


# decode(data, ts_ns=None) by a command's first byte (its tag), for every byte value: the
# consumer calls ``COMMAND_DECODERS[data[0]](data, ts_ns)`` itself (one call per input, not
# two; ``data[0]`` of empty data raises IndexError, which it takes as undecodable too).
COMMAND_DECODERS: tuple[Callable[..., object], ...] = (_unknown_tag,) + tuple(
    _compile_fast_decoder(cls, _compile_decoder(cls)) for cls in COMMAND_CLASSES) + (
    _unknown_tag,) * (
    255 - len(COMMAND_CLASSES))


def decode_or_none(data: bytes, ts_ns: int | None) -> object:
    """The command in ``data`` (its time ``ts_ns``), or None for what is not a command:
    the engine turns None into a deterministic reject."""
    try:
        return COMMAND_DECODERS[data[0]](data, ts_ns)
    except (CodecError, ValueError, IndexError):  # data[0] of empty data: IndexError
        return None


def _input_plan(cls: type) -> tuple[type, bytes, bool]:
    """(cls, field kinds after ts_ns, symbol and account interned as a pair) for the C
    decoder: the plan that _compile_fast_decoder follows for well-formed bytes."""
    fields = _CMD_FIELDS[cls][1:]
    kinds = bytes(ord("q" if typ == "int" else "b" if typ == "bool"
                      else "n" if name in _INTERN_FIELDS else "s") for name, typ in fields)
    pair = len(fields) >= 2 and fields[0] == ("symbol", "str") and fields[1][0] == "account"
    return cls, kinds, pair


_INPUT_PLANS = (None, *(_input_plan(cls) for cls in COMMAND_CLASSES))


def take_inputs(records: list[Any], i: int, input_stream: str, last: int,
                control_types: tuple[str, ...]) -> tuple[list[int], list[object], int]:
    """(positions, commands, index): from ``records[i]`` on, the records of
    ``input_stream`` after position ``last`` that are not of a type in ``control_types``,
    decoded as ``decode_or_none`` with the record's time (None: not a command), up to
    the first record of another stream or of a control type (its index) or the end;
    records at or before ``last`` are skipped. The consumer's input loop, in C
    (engine/_speedups.c): it decodes the well-formed bytes of each command as
    _compile_fast_decoder does and calls ``decode_or_none`` for any other."""
    return _take_inputs(records, i, input_stream, last, control_types, _INPUT_PLANS,
                        decode_or_none, _INTERNED, _intern, _INTERNED_PAIRS, _intern_pair)


def take_raw_inputs(buf: bytes, off: int, input_stream: bytes, last: int,
                    control_types: tuple[bytes, ...], output_stream: bytes, output_type: bytes,
                    ) -> tuple[list[int], list[object], list[tuple[int, int, bytes]], int]:
    """``take_inputs`` for the records of a serialized RecordBatch ``buf`` from byte
    ``off``, read where they lie (engine/_speedups.c): (positions, commands, outputs, the
    offset of the first record not taken, or of the end). Committed outputs (records of
    ``output_stream`` and ``output_type``) do not stop it: each is (the last input position
    before it, its revision, its data) in outputs; other streams' records are passed over.
    A control, or a record it does not take as protobuf would parse it, stops it;
    ``record_frame(buf, off)`` gives that record's bytes. Streams and types are bytes."""
    return _take_raw_inputs(buf, off, input_stream, last, control_types, output_stream,
                            output_type, _INPUT_PLANS, decode_or_none, _INTERNED, _intern,
                            _INTERNED_PAIRS, _intern_pair)


def decode_command(data: bytes, ts_ns: int | None = None) -> object:
    """The command encoded in ``data``; with ``ts_ns``, that time instead of the encoded
    one. Raises ``CodecError`` for bytes that are not a command."""
    if not data:
        raise CodecError("unknown command tag")
    return COMMAND_DECODERS[data[0]](data, ts_ns)


__all__ = [
    "GENESIS",
    "CodecError",
    "chain_events",
    "chain_hash",
    "decode_command",
    "decode_event",
    "decode_or_none",
    "encode_command",
    "encode_event",
    "record_frame",
    "restore",
    "snapshot_bytes",
    "state_hash",
    "take_raw_inputs",
]


def _check_event_classes() -> None:
    # Import-time guard: every event class has a field-kind entry.
    assert set(EVENT_CLASSES) == set(FIELD_KINDS)


_check_event_classes()
