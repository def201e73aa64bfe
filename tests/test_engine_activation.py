"""Output format activation at an exact input position (engine/wire.py ACTIVATE_TYPE):
the pure consumer driven by a log with an activation in it. Before the activation the
outputs, chain hashes and snapshots are the previous release's, byte for byte (pinned
here: computed by the code before output versions existed); after it, cancels and
rejects carry side and price, on every instance alike, across restores from snapshots;
an instance that does not support the version alarms and emits nothing past it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from engine import events as ev
from engine import wire
from engine.book import Engine
from engine.cli import StoreSilent, active_output_version
from engine.codec import (
    CodecError,
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
)
from engine.constants import STP, OrderType, Side, TimeInForce
from engine.consumer import Consumer
from engine.exchange_config import ExchangeConfig, init_events, parse
from engine.gateway import GatewayServer
from engine.runner import status_or_none
from engine.workload import check_exactly_once, outputs_through
from geo.etcd_server import free_ports
from store.client import StoreClient, new_event, new_id
from store.process import ServeProcess
from tests.support.cli import xdc_cli
from tests.support.exchange import Rec, lease_dir
from tests.support.store import run, wait_until
from tests.test_engine_failover import _has_role, _primary
from tests.test_gateway import EXCHANGE, T
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc

GROUP = "act"
SYM = "ACT"
ACCOUNTS = tuple(f"t{i}" for i in range(6))
N = 1500
SEED = 5
# What the release before output versions computes for commands(SEED, N) with no
# activation (1513 inputs at positions 1..1513): the chain after input 756 (the last
# before the activation of the tests below), after the last input, the state hash at the
# end and the sha256 of all its output blobs. Computed with that release's engine/.
OLD_CHAIN_BEFORE = "362b1e0003b8e387ae177601be7d30dc5cefd9c875c4757c02b640c9522e3bdf"
OLD_CHAIN_ALL = "d468d4cbb5df6276c88dfe568933a5162b0f09752db5c98a79f15dd3529b9ef4"
OLD_STATE = "db55830f4e1438918b28d17338ac2016ecda12cd9018f1da57f56133bd7b29f8"
OLD_BLOBS = "b12e8436d1769737b27e6e9128247e66e6e6b0dc81547dc41af094757e52a6d4"


def commands(seed: int, n: int) -> list[object]:
    """A symbol, funded accounts, then ``n`` seeded commands that make every kind of
    cancel (user, IOC remainder, self-trade on either side, fill-or-kill) and reject (new
    orders of every side, price and reason; cancels, replaces, reductions of orders
    that are gone). Fixed: the pinned hashes above are of its commands."""
    rng = random.Random(seed)
    cmds: list[object] = [AddSymbol(1, SYM, "B", "Q", 1, 1, 500, 1000)]
    for a in ACCOUNTS:
        cmds += [Deposit(1, a, "Q", 10**12), Deposit(1, a, "B", 10**9)]
    placed: list[tuple[str, str]] = []
    for i in range(n):
        ts = 1000 + i
        acct = rng.choice(ACCOUNTS)
        side = rng.choice((Side.BUY, Side.SELL))
        cid = f"c{i}"
        x = rng.random()
        if x < 0.40:
            px = 1000 + rng.randint(1, 20) * (1 if side == Side.SELL else -1)
            cmds.append(NewOrder(ts, SYM, acct, cid, side, rng.randint(1, 9), px,
                                 OrderType.LIMIT, TimeInForce.GTC, rng.random() < 0.1,
                                 rng.randrange(5)))
            placed.append((acct, cid))
        elif x < 0.50:
            px = 1000 + rng.randint(0, 15) * (1 if side == Side.BUY else -1)
            cmds.append(NewOrder(ts, SYM, acct, cid, side, rng.randint(1, 30), px,
                                 OrderType.LIMIT, TimeInForce.IOC, False, rng.randrange(5)))
        elif x < 0.56:
            px = 1000 + rng.randint(0, 15) * (1 if side == Side.BUY else -1)
            cmds.append(NewOrder(ts, SYM, acct, cid, side, rng.randint(1, 30), px,
                                 OrderType.LIMIT, TimeInForce.FOK, False, STP.NONE))
        elif x < 0.60:
            cmds.append(NewOrder(ts, SYM, acct, cid, side, rng.randint(1, 20), 0,
                                 OrderType.MARKET, TimeInForce.IOC, False, rng.randrange(5)))
        elif x < 0.76 and placed:
            a, c = rng.choice(placed)
            cmds.append(CancelOrder(ts, SYM, a, 0, c))
        elif x < 0.84 and placed:
            a, c = rng.choice(placed)
            cmds.append(ReplaceOrder(ts, SYM, a, 1000 + rng.randint(-20, 20),
                                     rng.randint(1, 9), 0, c))
        elif x < 0.88 and placed:
            a, c = rng.choice(placed)
            cmds.append(ReduceOrder(ts, SYM, a, 1, 0, c))
        else:  # refused: outside the band, no funds, no such side, no such symbol
            bad = rng.randrange(4)
            cmds.append(NewOrder(ts, SYM if bad != 3 else "NOPE", acct, cid,
                                 side if bad != 2 else 7, 10**10 if bad == 1 else 1,
                                 99_000 if bad == 0 else 1000))
    return cmds


def command_rec(position: int, cmd: object) -> Rec:
    return Rec(wire.input_stream(GROUP), type(cmd).__name__, position, 0,
               cmd.ts_ns,  # type: ignore[attr-defined]
               encode_command(cmd._replace(ts_ns=0)))  # type: ignore[attr-defined]


def control_rec(position: int, kind: str, data: bytes) -> Rec:
    return Rec(wire.input_stream(GROUP), kind, position, 0, 0, data)


def activation_rec(position: int, version: int = 2) -> Rec:
    return control_rec(position, wire.ACTIVATE_TYPE,
                       wire.activation_event(GROUP, version).data)


def log_of(cmds: list[object], controls: dict[int, Rec | None] | None = None) -> list[Rec]:
    """The input records of ``cmds``, with a control record at each position of
    ``controls`` (an activation of version 2 for None), the commands after it moved on."""
    controls = controls or {}
    out: list[Rec] = []
    it = iter(cmds)
    position = 0
    while True:
        position += 1
        if position in controls:
            out.append(controls[position] or activation_rec(position))
            continue
        cmd = next(it, None)
        if cmd is None:
            return out
        out.append(command_rec(position, cmd))


def fed(records: list[Rec], rng: random.Random | None = None,
        **kw: object) -> Consumer:
    """A consumer fed ``records``: one by one, or (``rng``) in runs of random lengths as
    the shell's batches come."""
    c = Consumer(GROUP, **kw)  # type: ignore[arg-type]
    if rng is None:
        for r in records:
            c.on_record(r)
        return c
    k = 0
    while k < len(records):
        n = rng.choice((1, 3, 40, 300))
        c.on_records(records[k:k + n])
        k += n
    return c


def outputs(c: Consumer) -> dict[int, list[tuple]]:
    return dict(wire.blob_outputs(p.blob) for p in c.pending)


def as_v1(raw: tuple) -> tuple:
    """A version-2 event as version 1 makes it (its tag, without side and price)."""
    if raw[0] == ev.CANCELLED_V2:
        return (ev.CANCELLED, *raw[1:-2])
    if raw[0] == ev.REJECTED_V2:
        return (ev.REJECTED, *raw[1:-2])
    return raw


CMDS = commands(SEED, N)
P = 1 + len(CMDS) // 2  # where the activation goes


def test_outputs_before_an_activation_are_the_old_releases_and_after_it_carry_side_and_price(
) -> None:
    plain = fed(log_of(CMDS))
    records = log_of(CMDS, {P: None})
    c = fed(records, random.Random(1))
    assert not c.alarm and c.engine.output_version == 2
    assert [(k.kind, k.position, k.body) for k in c.controls] == [
        (wire.ACTIVATE_TYPE, P, {"output_version": "2", "outcome": "activated"})]
    before = [p for p in c.pending if p.position < P]
    # Byte for byte the old release's outputs and chain, up to the activation.
    assert before == [p for p in plain.pending if p.position < P]
    assert before[-1].chain.hex() == OLD_CHAIN_BEFORE
    assert P not in outputs(c)  # the activation itself has no output
    mine, theirs = outputs(c), outputs(plain)
    after = {pos: raws for pos, raws in mine.items() if pos > P}
    # After it, the same outputs, but cancels and rejects of version 2 ...
    assert {pos: [as_v1(r) for r in raws] for pos, raws in after.items()} == {
        pos + 1: raws for pos, raws in theirs.items() if pos >= P}
    tags = [r[0] for raws in after.values() for r in raws]
    assert ev.CANCELLED not in tags and ev.REJECTED not in tags
    assert tags.count(ev.CANCELLED_V2) > 100 and tags.count(ev.REJECTED_V2) > 100
    # ... whose side and price are the order's: as accepted (or replaced) for a cancel,
    # the command's for a reject.
    by_position = {r.position: r for r in records}
    orders: dict[int, tuple[int, int]] = {}
    reasons: set[str] = set()
    for pos in sorted(mine):
        for raw in mine[pos]:
            rec = ev.to_record(raw)
            if isinstance(rec, ev.Accepted):
                orders[rec.order_id] = (rec.side, rec.price)
            elif isinstance(rec, ev.Replaced):
                orders[rec.order_id] = (orders[rec.order_id][0], rec.price)
            elif isinstance(rec, ev.CancelledV2):
                assert (rec.side, rec.price) == orders[rec.order_id], (pos, rec)
                reasons.add(rec.reason)
            elif isinstance(rec, ev.RejectedV2):
                cmd = wire.decode_input(by_position[pos].data, 0)
                side = getattr(cmd, "side", ev.NO_SIDE)
                want = (side if side in (Side.BUY, Side.SELL) else ev.NO_SIDE,
                        getattr(cmd, "price", 0))
                assert (rec.side, rec.price) == want, (pos, rec, cmd)
    assert reasons == {"USER", "EXPIRED", "STP", "FOK_UNFILLED"}


def test_a_log_without_activation_replays_to_the_old_releases_hashes() -> None:
    """Existing logs and snapshots: the same outputs, chain and state hash as the release
    before output versions, and a snapshot in its layout (version 1)."""
    c = fed(log_of(CMDS), random.Random(2))
    assert c.chain.hex() == OLD_CHAIN_ALL
    assert state_hash(c.engine).hex() == OLD_STATE
    assert hashlib.sha256(b"".join(p.blob for p in c.pending)).hexdigest() == OLD_BLOBS
    data = c.capture().data
    assert data[:6] == b"XDCE\x01\x00" and restore(data).output_version == 1
    assert snapshot_bytes(restore(data)) == data


def test_instances_agree_and_a_restore_after_the_activation_equals_a_full_replay() -> None:
    records = log_of(CMDS, {P: None})
    one, many = fed(records), fed(records, random.Random(3))
    assert (one.chain, list(one.pending), state_hash(one.engine)) == (
        many.chain, list(many.pending), state_hash(many.engine))
    # Snapshots: before the activation, the old layout, byte for byte; after, the output
    # version in it, and a restore there plus the rest equals the full replay.
    for at, layout in ((P - 1, b"XDCE\x01\x00"), (P, b"XDCE\x02\x00\x02\x00"),
                       (P + 300, b"XDCE\x02\x00\x02\x00")):
        head = fed(records[:at])
        cap = head.capture()
        assert cap.data.startswith(layout), (at, cap.data[:8])
        if at < P:
            assert cap.data == fed(log_of(CMDS)[:at]).capture().data
        assert cap.in_force == ((1, 0) if at < P else (2, P))
        restored = Consumer.from_snapshot(GROUP, cap.data, cap.position, cap.chain,
                                          cap.out_revision, cap.state_hash,
                                          in_force=cap.in_force)
        assert restored.engine.output_version == (1 if at < P else 2) and not restored.alarm
        assert restored.capture().in_force == cap.in_force
        # A snapshot that does not say (an older release's), or says what its engine
        # is not: version 1 needs no activation; of version 2 nothing is known.
        for said in (None, (2, P + 1) if at < P else (1, 0)):
            blind = Consumer.from_snapshot(GROUP, cap.data, cap.position, cap.chain,
                                           cap.out_revision, cap.state_hash, in_force=said)
            assert blind.capture().in_force == ((1, 0) if at < P else None)
        for r in records[at:]:
            restored.on_record(r)
        assert restored.chain == one.chain
        assert state_hash(restored.engine) == state_hash(one.engine)
        assert list(restored.pending) == [p for p in one.pending if p.position > at]


def test_a_trusted_catch_up_past_the_activation_switches_at_it() -> None:
    """Catching up for the state alone (``Consumer.trust``) up to an input after the
    activation still applies it (a control, not a command's outputs): the outputs it
    then checks are version 2 and equal a full replay's, whichever batches come."""
    records = log_of(CMDS, {P: None})
    full = fed(records)
    for at in (P - 1, P + 1, P + 300):
        trusted = [p for p in full.pending if p.position <= at][-1]
        for rng in (None, random.Random(at)):
            c = Consumer(GROUP)
            c.trust(trusted.position, trusted.chain)
            k = 0
            while k < len(records):
                n = 1 if rng is None else rng.choice((1, 3, 40, 300))
                c.on_records(records[k:k + n])
                k += n
            assert c.engine.output_version == 2 and not c.alarm
            assert (c.chain, state_hash(c.engine)) == (full.chain, state_hash(full.engine))
            assert list(c.pending) == [p for p in full.pending if p.position > trusted.position]
    capped = Consumer(GROUP, output_versions=(1,))
    capped.trust(trusted.position, trusted.chain)
    for r in records:
        capped.on_record(r)
    assert f"input {P} activates output version 2" in capped.alarm


def test_an_instance_that_does_not_support_the_version_alarms_and_emits_nothing_past_it(
) -> None:
    records = log_of(CMDS, {P: None})
    old = fed(records[:P - 1], output_versions=(1,))
    nxt = old.next_append()  # a primary: what it emits ends before the activation
    assert nxt is not None and not old.alarm
    old.rewind_emission()
    for r in records[P - 1:]:
        old.on_record(r)
    assert old.alarm == (f"input {P} activates output version 2; this instance supports "
                         f"output versions 1: it emits no output of any input after it")
    assert old.next_append() is None
    assert old.controls[-1].body["outcome"] == "not supported: alarm"
    # Its snapshots cannot say which version the log put in force.
    assert old.engine.output_version == 1 and old.capture().in_force is None
    # Restored from a snapshot taken after the activation, it alarms too.
    cap = fed(records[:P + 10]).capture()
    restored = Consumer.from_snapshot(GROUP, cap.data, cap.position, cap.chain,
                                      cap.out_revision, cap.state_hash, output_versions=(1,))
    assert "output version 2; this instance supports output versions 1" in restored.alarm
    assert restored.next_append() is None
    # A version no release here supports: every instance alarms, naming its versions.
    future = fed(log_of(CMDS[:50], {20: activation_rec(20, 3)}))
    assert "activates output version 3; this instance supports output versions 1, 2" \
        in future.alarm
    assert future.next_append() is None
    # A snapshot of an engine at a version this release does not emit is refused.
    forged = b"XDCE\x02\x00\x03\x00" + cap.data[8:]
    with pytest.raises(CodecError, match="output version 3"):
        restore(forged)
    with pytest.raises(CodecError, match="not canonical"):
        restore(b"XDCE\x02\x00\x01\x00" + cap.data[8:])


def test_an_activation_lands_once_and_versions_only_move_forward() -> None:
    first, again = wire.activation_event(GROUP, 2), wire.activation_event(GROUP, 2)
    assert first.id == again.id and first.SerializeToString() == again.SerializeToString()
    assert wire.activation_event(GROUP, 3).id != first.id
    assert wire.activation_event("other", 2).id != first.id
    # The same version again, an older one and unreadable bodies change nothing.
    noise = {P: None, P + 40: activation_rec(P + 40), P + 80: activation_rec(P + 80, 1),
             P + 120: control_rec(P + 120, wire.ACTIVATE_TYPE, b'{"output_version": "3"}'),
             P + 160: control_rec(P + 160, wire.ACTIVATE_TYPE, b"[" * 100_000)}
    noisy = fed(log_of(CMDS, noise), random.Random(4))
    once = fed(log_of(CMDS, {P: None}))
    assert not noisy.alarm and noisy.engine.output_version == 2
    assert [k.body["outcome"] for k in noisy.controls] == [
        "activated", "output version 2 in force: nothing changes",
        "output version 2 in force: nothing changes", "unreadable: nothing changes",
        "unreadable: nothing changes"]
    # Controls have no outputs: in input order, the outputs are the same.
    assert [raws for _, raws in sorted(outputs(noisy).items())] == [
        raws for _, raws in sorted(outputs(once).items())]
    for bad in (b"", b"2", b'{"output_version": true}', b'{"output_version": 0}',
                b'{"output_version": 65536}', b'{"version": 2}', b"\xff"):
        assert wire.parse_activation(bad) is None, bad
    assert wire.parse_activation(b'{"output_version": 2, "note": "x"}') == 2


# Bodies whose reading could depend on the process: integers around the least limit
# PYTHONINTMAXSTRDIGITS can set (640 digits) and the default one (4300).
_DIGIT_BODIES = [
    '{"output_version": 2, "x": %s}' % ("7" * n) for n in (600, 640, 641, 700, 1000, 4000)
] + ['{"output_version": 2, "x": -%s}' % ("7" * 640),
     '{"instance": "a", "address": "h:1", "x": [%s]}' % ("9" * 900)]

_READ_BODIES = """
import json, sys
from engine import wire
for body in json.loads(sys.stdin.read()):
    data = body.encode()
    print(json.dumps([sorted(wire.json_object(data)), wire.parse_activation(data),
                      wire.parse_instance(data)]))
"""


def test_json_bodies_read_alike_whatever_the_int_digit_limit() -> None:
    """An engine record's JSON body is read alike in every process: a body holding an
    integer of 641..4096 digits parsed where PYTHONINTMAXSTRDIGITS was left at 4300 and
    not where it was set lower (640 is allowed), so such an activation switched the
    output format of some instances and not others. Read in real processes with the
    limit at 640, 4300 and none."""
    root = Path(__file__).resolve().parent.parent
    answers = {}
    for limit in ("640", "4300", "0"):
        done = subprocess.run(
            [sys.executable, "-c", _READ_BODIES], input=json.dumps(_DIGIT_BODIES),
            capture_output=True, text=True, cwd=root, timeout=60,
            env={**os.environ, "PYTHONINTMAXSTRDIGITS": limit})
        assert done.returncode == 0, done.stderr
        answers[limit] = done.stdout.splitlines()
    assert answers["640"] == answers["4300"] == answers["0"], answers
    read = [json.loads(line) for line in answers["0"]]
    assert [r[1] for r in read[:2]] == [2, 2]  # up to 640 digits: read
    assert [r[1] for r in read[2:7]] == [None] * 5, read
    assert read[7] == [[], None, None]


def test_json_bodies_with_lone_surrogates_are_not_read() -> None:
    r"""A lone surrogate in a JSON body (the escape "\ud800", or its UTF-8 bytes) is no
    text: read as a name or an address it raised wherever it was used (parse_instance's
    length check, the instance's Status answer naming a switchover's target, an etcd
    key), at that input, on every instance and after each restart. Such bodies read as
    {} (not a record's body); a surrogate pair is a character like any other."""
    lone = [b'{"instance": "a", "address": "\\ud800:1"}',
            b'{"instance": "a", "address": "h:1", "x": ["\\udfff"]}',
            b'{"instance": "a", "address": "\xed\xa0\x80:1"}']
    for data in lone:
        assert wire.json_object(data) == {}, data
        assert wire.parse_instance(data) is None, data
    assert wire.parse_activation(b'{"output_version": 2, "\\ud800": 1}') is None
    assert wire.parse_instance(b'{"instance": "\\ud83d\\ude00", "address": "h:1"}') == (
        "\U0001F600", "h:1")
    marker = Consumer(GROUP)
    marker.on_input(1, wire.SWITCHOVER_TYPE, b'{"to": "\\udc00"}', 0)
    assert marker.controls[0].body == {} and marker.hold_after == 1
    assert marker.handover_to == ""


def test_reports_show_side_and_price_from_version_2_only() -> None:
    v1 = (ev.CANCELLED, SYM, 7, "t1", "c1", "USER", 3, 9)
    v2 = (ev.CANCELLED_V2, *v1[1:], Side.SELL, 1010)
    old = wire.report(GROUP, 5, 0, v1)
    new = wire.report(GROUP, 5, 0, v2)
    assert (old.kind, old.side, old.price, old.qty) == ("CANCELLED", xpb.SIDE_UNSPECIFIED, 0, 3)
    assert (new.kind, new.side, new.price, new.qty) == ("CANCELLED", xpb.SELL, 1010, 3)
    rej = (ev.REJECTED_V2, SYM, "t1", "c2", 0, "NEW", "INSUFFICIENT_BALANCE", "", 9,
           Side.BUY, 990)
    r = wire.report(GROUP, 6, 0, rej)
    assert (r.kind, r.side, r.price, r.reason) == ("REJECTED", xpb.BUY, 990,
                                                   "INSUFFICIENT_BALANCE")
    none = wire.report(GROUP, 6, 0, (*rej[:-2], ev.NO_SIDE, 0))
    assert (none.side, none.price) == (xpb.SIDE_UNSPECIFIED, 0)
    assert wire.accounts_of(v2) == wire.accounts_of(v1) == ("t1",)
    assert wire.accounts_of(rej) == ("t1",)


def _engine(version: int) -> Engine:
    """The symbol; t0 with a little quote asset, t1 and t2 with plenty of both."""
    e = Engine()
    for c in (AddSymbol(1, SYM, "B", "Q", 1, 1, 500, 1000), Deposit(1, "t0", "Q", 100),
              Deposit(1, "t1", "Q", 10**9), Deposit(1, "t1", "B", 10**9),
              Deposit(1, "t2", "Q", 10**9)):
        e.apply(c)
    if version != 1:
        e.set_output_version(version)
    return e


class _Evil:
    """A field whose hash raises: the reject must still be made."""

    def __hash__(self) -> int:
        raise ZeroDivisionError


@pytest.mark.parametrize(("cmd", "reason", "side_price"), [
    (NewOrder(10, "NOPE", "t0", "x", Side.BUY, 1, 990), "UNKNOWN_SYMBOL", (Side.BUY, 990)),
    (NewOrder(10, SYM, "t0", "x", True, 1, 1060), "PRICE_OUTSIDE_BAND", (Side.SELL, 1060)),
    (NewOrder(10, SYM, "t0", "x", 7, 1, 1000), "INVALID_SIDE", (ev.NO_SIDE, 1000)),
    (NewOrder(10, SYM, "t0", "x", _Evil(), 1, 1000), "INTERNAL_ERROR", (ev.NO_SIDE, 1000)),
    (NewOrder(10, SYM, "t0", "x", Side.BUY, 1, -5), "INVALID_PRICE", (Side.BUY, 0)),
    (NewOrder(10, SYM, "t0", "x", Side.BUY, 1, 100.0), "INVALID_PRICE", (Side.BUY, 0)),
    (NewOrder(10, SYM, "t0", "x", Side.SELL, 1, 0, OrderType.MARKET, TimeInForce.IOC,
              False, STP.NONE), "INSUFFICIENT_BALANCE", (Side.SELL, 0)),
    (CancelOrder(10, SYM, "t0", 99), "UNKNOWN_ORDER", (ev.NO_SIDE, 0)),
    (ReplaceOrder(10, SYM, "t0", 1005, 2, 99), "UNKNOWN_ORDER", (ev.NO_SIDE, 1005)),
    (ReduceOrder(10, SYM, "t0", 1, 99), "UNKNOWN_ORDER", (ev.NO_SIDE, 0)),
    ("garbage", "UNKNOWN_COMMAND", (ev.NO_SIDE, 0)),
])
def test_a_version_2_reject_carries_the_side_and_price_its_command_has(
        cmd: object, reason: str, side_price: tuple[int, int]) -> None:
    """Every field of the version-1 reject, then the command's side and price when it
    has valid ones: whatever the command, never an exception."""
    out = _engine(2).apply_raw(cmd)
    assert [r[0] for r in out] == [ev.REJECTED_V2] and out[0][6] == reason, out
    assert out[0][-2:] == side_price
    assert (ev.REJECTED, *out[0][1:-2]) == _engine(1).apply_raw(cmd)[0]
    assert decode_event(encode_event(out[0])) == out[0]


def test_a_halt_under_version_2_keeps_the_commands_time() -> None:
    """A command that raises after changing its book halts it: the Halted event takes
    the reject's time (under version 2 the reject's last fields are side and price)."""
    e = _engine(2)
    e.apply(NewOrder(5, SYM, "t1", "m", Side.SELL, 5, 1000))

    class Exploding(dict):  # crediting the maker raises mid-match
        def __setitem__(self, key: str, value: int) -> None:
            raise ArithmeticError("boom")

    e.accounts["t1"].avail = Exploding(e.accounts["t1"].avail)  # type: ignore[assignment]
    out = e.apply(NewOrder(10, SYM, "t2", "x", Side.BUY, 5, 1000))
    assert out == [ev.RejectedV2(SYM, "t2", "x", 0, "NEW", "INTERNAL_ERROR", "ArithmeticError",
                                 10, Side.BUY, 1000),
                   ev.Halted(SYM, "ArithmeticError", 10)]
    assert e.books[SYM].halted


# ---------------------------------------------------------------------- real processes
#
# A real store process, `xdc engine run` processes and `xdc engine activate`; the
# exchange of tests/test_gateway.py, group g1 (BTC-USD: alice sells, bob and carol buy).

G1 = "g1"


def _g1_orders(seed: int, n: int) -> list[pb.ProposedEvent]:
    """``n`` seeded input events of g1: alice's resting sells, carol's resting buys below
    them, bob's IOC buys that trade with the sells (their remainders expire), carol's
    buys outside the price band (rejected), and cancels of resting orders (some filled or
    cancelled already: rejected)."""
    rng = random.Random(seed)
    out: list[pb.ProposedEvent] = []
    resting: list[tuple[str, str]] = []
    for i in range(n):
        x = rng.random()
        key = f"o{seed}-{i}"
        cmd: object
        if x < 0.35:
            cmd = NewOrder(0, "BTC-USD", "alice", key, Side.SELL, 1, 50_000 + rng.randint(0, 10))
            resting.append(("alice", key))
        elif x < 0.6:
            cmd = NewOrder(0, "BTC-USD", "carol", key, Side.BUY, rng.randint(1, 3),
                           49_990 + rng.randint(0, 9))
            resting.append(("carol", key))
        elif x < 0.65:
            cmd = NewOrder(0, "BTC-USD", "carol", key, Side.BUY, 1, 80_000)
        elif x < 0.8 or not resting:
            cmd = NewOrder(0, "BTC-USD", "bob", key, Side.BUY, rng.randint(1, 3), 50_005,
                           OrderType.LIMIT, TimeInForce.IOC, False, STP.NONE)
        else:
            account, cid = rng.choice(resting)
            cmd = CancelOrder(0, "BTC-USD", account, 0, cid)
        out.append(wire.command_event(G1, cmd, key))
    return out


def _g1_engine(store: str, instance: str, lease: str, seed: int,
               *extra: str) -> ServeProcess:
    return ServeProcess(command=[
        "engine", "run", "--store", store, "--group", G1, "--instance", instance,
        "--lease", lease, "--snapshot-every", "200", *extra],
        env={"PYTHONHASHSEED": str(seed)}).start()


def _g1_started_with_primary(store: str, config: ExchangeConfig, lease: str,
                             engines: dict[str, ServeProcess]) -> None:
    """Group g1 initialised in the store, and an instance "new" of it running as primary."""
    async def init() -> None:
        async with StoreClient(store) as client:
            await client.append(wire.input_stream(G1), init_events(config.groups[0]))
    run(init)
    engines["new"] = _g1_engine(store, "new", lease, 1)
    run(lambda: _primary(engines))


async def _flow(client: StoreClient, events: list[pb.ProposedEvent], until: asyncio.Event,
                more: int, width: int = 16) -> int:
    """Appends ``events`` in order, ``width`` in flight, until ``until`` is set and ``more``
    have been appended since; returns the last position. Orders keep flowing whatever
    the rest of the test takes (a command line's start on a busy machine)."""
    last, since = 0, -1
    for i in range(0, len(events), width):
        if until.is_set():
            since = i if since < 0 else since
            if i - since >= more:
                return last
        rs = await asyncio.gather(*[client.append(wire.input_stream(G1), [e])
                                    for e in events[i:i + width]])
        last = max(last, *(r.last_position for r in rs))
    raise AssertionError(f"all {len(events)} orders appended before the test was done")


async def _input_position(client: StoreClient) -> int:
    return (await client.stream_info(wire.input_stream(G1))).last_position


async def _cancel_report(stub: xpb_grpc.OrderGatewayStub, cid: str) -> xpb.ExecutionReport:
    """Rests a buy of bob's (1 at 40,000) through the gateway, cancels it, and returns
    the cancel's report as the gateway answers it."""
    placed = await stub.SubmitOrder(xpb.SubmitOrderRequest(
        symbol="BTC-USD", account="bob", client_order_id=cid, side=xpb.BUY, qty=1,
        price=40_000, wait=True))
    assert [r.kind for r in placed.reports][:1] == ["ACCEPTED"], placed
    gone = await stub.CancelOrder(xpb.CancelOrderRequest(
        symbol="BTC-USD", account="bob", request_id=f"{cid}-cancel", client_order_id=cid,
        wait=True))
    assert gone.reports and gone.reports[0].kind == "CANCELLED", gone
    return gone.reports[0]


async def _streamed_cancels(stub: xpb_grpc.OrderGatewayStub,
                            cids: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(side, price) of the cancel reports of bob's orders ``cids`` on StreamExecutions
    resumed from the start of the log."""
    found: dict[str, tuple[int, int]] = {}
    stream = stub.StreamExecutions(xpb.StreamExecutionsRequest(account="bob",
                                                               after_position=1))
    try:
        async with asyncio.timeout(T):
            async for batch in stream:
                for r in batch.reports:
                    if r.kind == "CANCELLED" and r.client_order_id in cids:
                        found[r.client_order_id] = (r.side, r.price)
                if len(found) == len(cids):
                    return found
    finally:
        stream.cancel()
    raise AssertionError(f"the stream ended with {found}")


def _activate(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return xdc_cli("engine", "activate", G1, "--store", store, *args)


def test_activation_under_load_then_sigkill_of_the_primary_takes_over_exactly_once(
        tmp_path: Path) -> None:
    """A primary and a warm instance of this release, orders flowing: `xdc engine
    activate` lands the activation in the middle of them, both instances switch there,
    and SIGKILL of the primary after it leaves the warm one to take over with no alarm,
    gap or duplicate. A cancel answered through the gateway has no side or price before
    the activation, and the order's after it; the killed instance restarts from a
    snapshot taken after the activation and agrees with the survivor."""
    config = parse(tomllib.loads(EXCHANGE))
    lease = lease_dir(tmp_path)
    load = _g1_orders(7, 8000)
    store = ServeProcess(str(tmp_path / "store")).start()
    engines: dict[str, ServeProcess] = {}
    try:
        engines["a"] = _g1_engine(store.address, "a", lease, 1)
        engines["b"] = _g1_engine(store.address, "b", lease, 2)

        async def body() -> None:
            client = StoreClient(store.address)
            gateway = GatewayServer(config, store.address, "127.0.0.1:0")
            try:
                await client.append(wire.input_stream(G1), init_events(config.groups[0]))
                victim = await _primary(engines)
                survivor = "b" if victim == "a" else "a"
                await wait_until(lambda: _has_role(engines[survivor].address, "warm"), T)
                await gateway.start()
                await gateway.wait_admitted(timeout_s=T)
                async with grpc.aio.insecure_channel(gateway.address) as channel:
                    stub = xpb_grpc.OrderGatewayStub(channel)
                    before = await _cancel_report(stub, "pre")
                    assert (before.side, before.price) == (xpb.SIDE_UNSPECIFIED, 0), before

                    start = await _input_position(client)
                    activated = asyncio.Event()
                    loader = asyncio.create_task(_flow(client, load, activated, 400))
                    await wait_until(lambda: _above(client, start + 250), T, "orders flowing")
                    cli = await asyncio.to_thread(_activate, store.address,
                                                  "--output-version", "2")
                    activated.set()
                    assert cli.returncode == 0, cli.stderr
                    answer = json.loads(cli.stdout)
                    at = answer["position"]
                    assert answer["applied"] == {"a": 2, "b": 2}, answer
                    assert at > start + 250, answer
                    # Kill the primary after the activation, with orders and outputs in
                    # flight.
                    await wait_until(lambda: _above(client, at + 150), T, "orders after it")
                    assert not loader.done()
                    engines[victim].signal(signal.SIGKILL)
                    engines[victim].proc.wait()  # type: ignore[union-attr]
                    last = await loader
                    assert await _primary({survivor: engines[survivor]}, 30) == survivor
                    after = await _cancel_report(stub, "post")
                    assert (after.side, after.price) == (xpb.BUY, 40_000), after
                    # Read back from the store (a resumed stream), the same reports.
                    assert await _streamed_cancels(stub, ("pre", "post")) == {
                        "pre": (xpb.SIDE_UNSPECIFIED, 0), "post": (xpb.BUY, 40_000)}

                await wait_until(lambda: _outputs_through(client, last), 30, "outputs")
                inputs, _ = await check_exactly_once(client, G1)
                assert at in {e.position for e in inputs if e.type == wire.ACTIVATE_TYPE}
                s = await status_or_none(engines[survivor].address)
                assert s is not None and not s.alarm and s.output_version == 2
                assert list(s.supported_output_versions) == [1, 2]
                tags = await _tags_around(client, at)
                assert {ev.CANCELLED, ev.REJECTED} & tags[False] == {ev.CANCELLED, ev.REJECTED}
                assert not {ev.CANCELLED_V2, ev.REJECTED_V2} & tags[False]
                assert {ev.CANCELLED_V2, ev.REJECTED_V2} <= tags[True]
                assert not {ev.CANCELLED, ev.REJECTED} & tags[True]

                # The killed instance restarts from a snapshot after the activation.
                engines[victim] = _g1_engine(store.address, victim, lease, 3)

                async def agreed() -> bool:
                    x = await status_or_none(engines[victim].address)
                    y = await status_or_none(engines[survivor].address)
                    return (x is not None and y is not None and x.role == "warm"
                            and x.input_position == y.input_position
                            and x.chain_hash == y.chain_hash and x.state_hash == y.state_hash)
                await wait_until(agreed, 30, "the restarted instance agrees")
                restarted = await status_or_none(engines[victim].address)
                assert restarted is not None and not restarted.alarm
                assert restarted.snapshot_position > at and restarted.output_version == 2
                # Each snapshot says what was in force at its input, so the version in
                # force is read from the log after the newest one.
                said = {int(e.metadata["input_position"]): (e.metadata["output_version"],
                                                            e.metadata["output_version_at"])
                        for e in await client.read(wire.snapshot_stream(G1), limit=10_000)}
                assert any(p < at for p in said) and any(p > at for p in said), said
                assert all(v == (("1", "0") if p < at else ("2", str(at)))
                           for p, v in said.items()), said
                assert await active_output_version(client, G1) == (2, at)
            finally:
                await gateway.stop(grace_s=0.5)
                await client.close()
        run(body, timeout_s=150)
        verify = xdc_cli("engine", "verify", G1, "--store", store.address)
        result = json.loads(verify.stdout)
        assert verify.returncode == 0 and result["ok"], result
        assert result["snapshots_checked"] >= 1 and result["snapshot_mismatches"] == []
    finally:
        for p in engines.values():
            p.kill()
        store.kill()


async def _above(client: StoreClient, position: int) -> bool:
    return await _input_position(client) > position


async def _outputs_through(client: StoreClient, position: int) -> bool:
    return await outputs_through(client, G1) >= position


async def _tags_around(client: StoreClient, at: int) -> dict[bool, set[int]]:
    """Event tags of the committed outputs of the inputs before (False) and after (True)
    input ``at``."""
    tags: dict[bool, set[int]] = {False: set(), True: set()}
    for e in await client.read(wire.output_stream(G1), limit=100_000):
        for position, raws in wire.batch_outputs(wire.decode_output(e.data)):
            assert position != at, "the activation has no output"
            tags[position > at].update(r[0] for r in raws)
    return tags


def test_engine_activate_refuses_while_an_instance_does_not_support_the_version(
        tmp_path: Path) -> None:
    """`xdc engine activate` asks every instance the group advertised: one capped at
    output version 1 (`--max-output-version 1`, as an instance of an older release) makes
    it refuse (exit 2) naming it, and nothing is appended; a version no instance supports
    names them all. Once that instance is gone, the activation lands, once however often
    it is asked, and versions only move forward. Started again, the capped instance alarms
    at the activation and never takes over. `xdc engine status` shows each instance's
    versions and the group's."""
    config = parse(tomllib.loads(EXCHANGE))
    lease = lease_dir(tmp_path)
    store = ServeProcess(str(tmp_path / "store")).start()
    engines: dict[str, ServeProcess] = {}
    try:
        too_new = xdc_cli("engine", "run", "--store", store.address, "--group", G1,
                          "--instance", "x", "--lease", lease, "--max-output-version", "3")
        assert too_new.returncode == 2, too_new.stderr
        assert "--max-output-version 3: this release emits output versions 1, 2, at most 2" \
            in too_new.stderr

        _g1_started_with_primary(store.address, config, lease, engines)
        engines["old"] = _g1_engine(store.address, "old", lease, 2,
                                    "--max-output-version", "1")

        async def old_warm() -> None:
            await wait_until(lambda: _has_role(engines["old"].address, "warm"), T)
        run(old_warm)
        revision = run(_input_tail(store.address))[1]

        status = xdc_cli("engine", "status", "--group", G1, "--store", store.address)
        assert status.returncode == 0, status.stderr
        lines = {s["instance"]: s for s in map(json.loads, status.stdout.splitlines())}
        assert {k: (s["output_version"], s["supported_output_versions"],
                    s["group_output_version"]) for k, s in lines.items()} == {
            "new": (1, [1, 2], 1), "old": (1, [1], 1)}

        refused = _activate(store.address, "--output-version", "2")
        assert refused.returncode == 2, (refused.stdout, refused.stderr)
        assert "do not support output version 2: old at " in refused.stderr, refused.stderr
        assert "output versions 1)" in refused.stderr and "new at" not in refused.stderr
        assert "nothing appended" in refused.stderr and refused.stdout == ""
        none = _activate(store.address, "--output-version", "3")
        assert none.returncode == 2 and "new at" in none.stderr and "old at" in none.stderr
        bad = _activate(store.address, "--output-version", "0")
        assert bad.returncode == 2 and "an integer 1..65535" in bad.stderr, bad.stderr
        assert run(_input_tail(store.address))[1] == revision  # nothing appended

        engines.pop("old").stop()
        done = _activate(store.address, "--output-version", "2")
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["applied"] == {"new": 2} and answer["not_answering"] == ["old"]
        position = answer["position"]
        assert run(_input_tail(store.address)) == (position, revision + 1)
        again = _activate(store.address, "--output-version", "2")
        assert again.returncode == 0 and json.loads(again.stdout) == {
            "group": G1, "output_version": 2, "position": position, "already_active": True}
        back = _activate(store.address, "--output-version", "1")
        assert back.returncode == 2 and "versions only move forward" in back.stderr

        async def appended_again() -> None:
            async with StoreClient(store.address) as client:
                r = await client.append(wire.input_stream(G1), [wire.activation_event(G1, 2)])
                assert r.last_position == position  # the same event, not a second one
        run(appended_again)
        assert run(_input_tail(store.address)) == (position, revision + 1)

        # Started again (a newer snapshot or not), the capped instance alarms there.
        engines["old"] = _g1_engine(store.address, "old", lease, 2,
                                    "--max-output-version", "1")

        async def old_alarmed() -> None:
            async def alarmed() -> bool:
                s = await status_or_none(engines["old"].address)
                return s is not None and bool(s.alarm)
            await wait_until(alarmed, T, "the capped instance alarms")
            s = await status_or_none(engines["old"].address)
            assert s is not None and s.role == "diverged", s
            assert f"input {position} activates output version 2; this instance " \
                   f"supports output versions 1" in s.alarm, s.alarm
            assert s.campaign_blocked == "diverged (see alarm)"
        run(old_alarmed)
        status = xdc_cli("engine", "status", "--group", G1, "--store", store.address)
        lines = {s["instance"]: s for s in map(json.loads, status.stdout.splitlines())}
        assert status.returncode == 1  # an instance alarmed
        assert (lines["new"]["output_version"], lines["new"]["group_output_version"]) == (2, 2)
    finally:
        for p in engines.values():
            p.kill()
        store.kill()


def _input_tail(store: str) -> Callable[[], Awaitable[tuple[int, int]]]:
    """(last position, last revision) of g1's input stream."""
    async def tail() -> tuple[int, int]:
        async with StoreClient(store) as client:
            info = await client.stream_info(wire.input_stream(G1))
            return info.last_position, info.last_revision
    return tail


def test_engine_activate_asks_every_instance_however_many_advertisements_came_before(
        tmp_path: Path) -> None:
    """`xdc engine activate` (and `engine status --group`) read the group's whole
    instances stream: after an instance restarted 300 times on a new port each time (one
    advertisement per start), they read its first 256 events only, so an instance capped
    at output version 1 that started after those was not asked: the activation landed
    (exit 0), and that instance alarmed at it."""
    config = parse(tomllib.loads(EXCHANGE))
    lease = lease_dir(tmp_path)
    store = ServeProcess(str(tmp_path / "store")).start()
    engines: dict[str, ServeProcess] = {}
    stream = wire.instances_stream(G1)

    def advertised(name: str) -> Callable[[], Awaitable[bool]]:
        async def found() -> bool:
            async with StoreClient(store.address) as client:
                tail = await client.read(stream, backwards=True, limit=1)
            return bool(tail) and (wire.parse_instance(tail[0].data) or ("",))[0] == name
        return found

    try:
        _g1_started_with_primary(store.address, config, lease, engines)
        run(lambda: wait_until(advertised("new"), T, "new advertised"))

        async def crash_loop() -> None:  # 300 starts of "w", each on another port
            events = [wire.instance_event(G1, "w", f"127.0.0.1:{20_000 + i}", "1.1.0")
                      for i in range(299)]
            events.append(wire.instance_event(G1, "w", f"127.0.0.1:{free_ports(1)[0]}",
                                              "1.1.0"))
            async with StoreClient(store.address) as client:
                for i in range(0, len(events), 100):
                    await client.append(stream, events[i:i + 100])
        run(crash_loop)
        engines["old"] = _g1_engine(store.address, "old", lease, 2,
                                    "--max-output-version", "1")
        run(lambda: wait_until(advertised("old"), T, "old advertised"))
        revision = run(_input_tail(store.address))[1]

        refused = _activate(store.address, "--output-version", "2")
        assert refused.returncode == 2, (refused.stdout, refused.stderr)
        assert "do not support output version 2: old at " in refused.stderr, refused.stderr
        assert run(_input_tail(store.address))[1] == revision  # nothing appended
        status = xdc_cli("engine", "status", "--group", G1, "--store", store.address)
        lines = [json.loads(line) for line in status.stdout.splitlines()]
        assert {s.get("instance") for s in lines} >= {"new", "old"}, status.stdout
        assert len(lines) == 3, lines  # new, old and the last address of w (no answer)
    finally:
        for p in engines.values():
            p.kill()
        store.kill()


@pytest.mark.parametrize("args", [
    ("activate", "x!y", "--output-version", "2", "--store", "127.0.0.1:1"),
    ("status", "--group", "x!y", "--store", "127.0.0.1:1"),
    ("switchover", "x!y", "--to", "b", "--store", "127.0.0.1:1"),
    ("snapshot", "x!y", "--store", "127.0.0.1:1"),
    ("verify", "x!y", "--store", "127.0.0.1:1"),
])
def test_an_engine_command_refuses_a_bad_group_name_with_exit_2(args: tuple[str, ...]
                                                                 ) -> None:
    """A group name the wire does not allow is refused before anything is asked (exit 2,
    the rule named), not a ValueError traceback."""
    cli = xdc_cli("engine", *args)
    assert cli.returncode == 2, (cli.returncode, cli.stderr)
    assert "engine group 'x!y': 1..32 of A-Z a-z 0-9 _ -" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr


def test_engine_status_asks_the_instances_at_once() -> None:
    """`xdc engine status` asks its instances concurrently: it asks every instance a group
    advertised (up to 256), and one after the other, each gone one that does not answer
    cost its connection attempt's timeout. Eight silent listeners cost about one."""
    silent = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()  # connections complete in the backlog; nothing ever answers
            silent.append(s)
        addresses = ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in silent)
        began = time.monotonic()
        cli = xdc_cli("engine", "status", "--engine", addresses)
        took = time.monotonic() - began
    finally:
        for s in silent:
            s.close()
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert cli.returncode == 1 and len(lines) == 8, (cli.stdout, cli.stderr)
    assert [line["error"].split(":")[:2] for line in lines] == [
        a.split(":") for a in addresses.split(",")]  # in the order asked
    assert took < 6, took


@pytest.mark.parametrize("md", [
    {}, {"output_version": "2"}, {"output_version": "x", "output_version_at": "5"},
    {"output_version": "65536", "output_version_at": "5"},  # over MAX_OUTPUT_VERSION
    {"output_version": "2", "output_version_at": "11"},  # after the snapshot's input
    {"output_version": "2", "output_version_at": "0"},  # 2 needs an activation
    {"output_version": "1", "output_version_at": "5"},  # 1 needs none
])
def test_a_snapshot_says_nothing_of_its_version_unless_it_can_be_so(md: dict[str, str]
                                                                      ) -> None:
    assert wire.snapshot_in_force({"input_position": "10", **md}) is None
    assert wire.snapshot_in_force({"input_position": "10", "output_version": "2",
                                   "output_version_at": "10"}) == (2, 10)
    assert wire.snapshot_in_force({"input_position": "10", **wire.snapshot_in_force_metadata(
        (1, 0))}) == (1, 0)


def test_the_version_in_force_is_read_after_the_newest_snapshot_that_says_it(
        tmp_path: Path) -> None:
    """`xdc engine status --group` and `xdc engine activate` read the activations of the
    log after the newest snapshot, from what it says was in force at its input: not
    the whole log (~1.5 s per 330k records here, on every status). A snapshot that says
    nothing (an older release's) means the whole log, as before."""
    store = ServeProcess(str(tmp_path / "store")).start()
    try:
        async def scenario() -> None:
            async with StoreClient(store.address) as client:
                after: list[int] = []
                subscribe = client.subscribe

                def spied(**kw: object) -> object:
                    after.append(int(kw.get("after_position", 0)))  # type: ignore[arg-type]
                    return subscribe(**kw)
                client.subscribe = spied  # type: ignore[method-assign]

                inputs, snaps = wire.input_stream(G1), wire.snapshot_stream(G1)

                def snapshot(position: int, md: dict[str, str]) -> pb.ProposedEvent:
                    return pb.ProposedEvent(id=new_id(), type=wire.SNAPSHOT_TYPE, data=b"s",
                                            metadata={"input_position": str(position),
                                                      "chunk": "0/1", **md})
                orders = [new_event("Noise") for _ in range(20)]
                early = (await client.append(inputs, orders[:10])).last_position
                await client.append(snaps, [snapshot(early, wire.snapshot_in_force_metadata(
                    (1, 0)))])
                at = (await client.append(inputs, [wire.activation_event(G1, 2)])
                      ).first_position
                mid = (await client.append(inputs, orders[10:])).last_position
                # The activation after the newest snapshot is found.
                assert await active_output_version(client, G1) == (2, at)
                assert after == [early]
                # An older release's snapshot: the whole log.
                await client.append(snaps, [snapshot(mid, {})])
                assert await active_output_version(client, G1) == (2, at)
                assert after == [early, 0]
                # One that says what was in force: only the log after its input.
                await client.append(snaps, [snapshot(mid, wire.snapshot_in_force_metadata(
                    (2, at)))])
                assert await active_output_version(client, G1) == (2, at)
                assert after == [early, 0, mid]
        run(scenario)
    finally:
        store.stop()


def test_reading_the_groups_activations_fails_when_the_store_goes_silent(
        tmp_path: Path) -> None:
    """The output version in force is read from the whole log (engine activate, engine
    status --group): when the store stopped answering during that read, the client's
    subscription waited for it for good and the command hung. Nothing from the store for
    `idle_s` now fails the read, naming how far it got; a store that answers again is
    read to the end."""
    store = ServeProcess(str(tmp_path / "store")).start()
    try:
        async def scenario() -> None:
            async with StoreClient(store.address) as client:
                await client.append(wire.input_stream(G1),
                                    [wire.activation_event(G1, 2)])
                assert (await active_output_version(client, G1, idle_s=5))[0] == 2
                os.kill(store.pid, signal.SIGSTOP)
                try:
                    began = time.monotonic()
                    with pytest.raises(StoreSilent, match=r"sent nothing for 0\.5 s"):
                        async with asyncio.timeout(20):  # the old code: a hang, failed here
                            await active_output_version(client, G1, idle_s=0.5)
                    assert time.monotonic() - began < 10
                finally:
                    os.kill(store.pid, signal.SIGCONT)
                assert (await active_output_version(client, G1, idle_s=5))[0] == 2
        run(scenario)
    finally:
        store.stop()
