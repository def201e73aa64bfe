"""How the exchange lives in the event store: stream names, event ids, the input command
events the gateway appends and the output batches the engines append (DESIGN §5).

Per engine group ``G`` (a set of symbols and the accounts that trade them; one risk
domain) there are three streams::

    exchange.G.input      commands (type = command class name, data = canonical bytes)
                          and engine controls (type xdc.Switchover /
                          xdc.SnapshotRequest / xdc.Activate)
    exchange.G.output     output batches (type = OUTPUT_TYPE), appended by the primary
                          with the exact expected revision of the stream
    exchange.G.snapshots  engine snapshots, chunked (type = SNAPSHOT_TYPE)
    exchange.G.instances  where each engine instance answers EngineControl (type
                          INSTANCE_TYPE, JSON), appended when it starts: how gateways
                          find instances they were not told about (a new release)

Input events carry ``ts_ns = 0``: the engine's time for a command is the store's leader
timestamp of its record, which is part of the replicated log, so a retried submit has
the same bytes (and the same id) as the first attempt.

An output event carries the outputs of one or more consecutive inputs::

    b"XO" u8 version, q first_input, q last_input, 32s chain (after last_input),
    u32 n_inputs, then per input with outputs: q position, u16 n, n x (u16 len, event)

``event`` is ``engine.codec.encode_event``. The output named (group, input position,
output index) is therefore stored exactly once: the event's id is derived from
(group, first input), and the expected revision fences out every writer but one, so two
instances emitting around a failover cannot both land the same outputs. The chain hash
runs per input over ``q position + u16 n + events``: replicas that agree on it agree on
every output up to that input.

Output format activation: an ``xdc.Activate`` input (JSON ``{"output_version": N}``, id
derived from (group, N): appended twice, it lands once) switches the engine state's
output version (``engine.events``) at its exact position: the outputs of every input
after it are of version N, those before it stay as they were, on every instance alike. A
new release ships the new format dormant and emits exactly what the old one did until
then, so it can be rolled out by switchover like any release whose outputs do not
change. Versions only move forward: an activation of the version in force, or an older
one, changes nothing (so does one whose body is unreadable); an instance that does not
support N raises its alarm there and emits nothing after it. An instance of a release
that predates activations does not even receive the record (engines subscribe to
CONSUMED_TYPES, a list of its own release): it would go on with version 1 and diverge,
so every instance of such a release must be gone before an activation (`xdc engine
activate` refuses while any instance it can ask does not support N).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from engine import commands as cm
from engine import events as ev
from engine.codec import (
    CodecError,
    decode_command,
    decode_event,
    encode_command,
    encode_framed,
)
from engine.constants import MAX_OUTPUT_VERSION, Side
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb

GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
COMMAND_CONTENT_TYPE = "application/x-xdc-command"
OUTPUT_TYPE = "xdc.Outputs"
SNAPSHOT_TYPE = "xdc.Snapshot"
SWITCHOVER_TYPE = "xdc.Switchover"
INSTANCE_TYPE = "xdc.EngineInstance"
MAX_ADDRESS_BYTES = 256
SNAPSHOT_REQUEST_TYPE = "xdc.SnapshotRequest"
ACTIVATE_TYPE = "xdc.Activate"
CONTROL_TYPES = (SWITCHOVER_TYPE, SNAPSHOT_REQUEST_TYPE, ACTIVATE_TYPE)
COMMAND_TYPES = tuple(cls.__name__ for cls in (
    cm.NewOrder, cm.CancelOrder, cm.ReplaceOrder, cm.ReduceOrder, cm.AddSymbol,
    cm.UpdateSymbol, cm.Deposit, cm.Withdraw))
# What an engine subscribes to: its inputs and the committed outputs, in log order.
CONSUMED_TYPES = (*COMMAND_TYPES, *CONTROL_TYPES, OUTPUT_TYPE)
# What the order gateway appends (engine/gateway.py); the other commands (symbols,
# deposits) and the controls are the operators'.
GATEWAY_TYPES = tuple(cls.__name__ for cls in (cm.NewOrder, cm.CancelOrder, cm.ReplaceOrder))

_OUT_HEAD = struct.Struct("<2sBqq32sI")
_IN_HEAD = struct.Struct("<qH")
_U16 = struct.Struct("<H")
_Q = struct.Struct("<q")
OUT_MAGIC = b"XO"
OUT_VERSION = 1


def check_group(group: str) -> str:
    if not GROUP_RE.match(group):
        raise ValueError(f"engine group {group!r}: 1..32 of A-Z a-z 0-9 _ -")
    return group


def input_stream(group: str) -> str:
    return f"exchange.{group}.input"


def output_stream(group: str) -> str:
    return f"exchange.{group}.output"


def snapshot_stream(group: str) -> str:
    return f"exchange.{group}.snapshots"


def instances_stream(group: str) -> str:
    return f"exchange.{group}.instances"


def group_prefix(group: str) -> str:
    return f"exchange.{group}."


def exchange_principals(tokens: dict[str, str], certs: dict[str, str] | None = None,
                        trader_accounts: tuple[str, ...] = ("alice",)) -> list[dict[str, object]]:
    """The principals of an exchange's auth file (store/auth.py render), by role: `admin`
    (everything: switchovers, engine controls, symbols and deposits), `gateway` (appends
    orders, reads the exchange), `engine` (appends outputs and snapshots, reads the
    exchange), `trader` (its accounts at the gateway, its own `orders.*` streams) and
    `peer` (the store members' replication, without TLS).
    `tokens`: role -> token (roles without one are left out); `certs`: role -> the client
    certificate identity that authenticates as it too."""
    exchange = "exchange.*"
    roles: dict[str, dict[str, object]] = {
        "admin": {"accounts": ["*"], "grants": [
            {"operations": ["admin", "append", "read", "subscribe"], "streams": ["*"]}]},
        "gateway": {"grants": [
            {"operations": ["append"], "streams": [input_stream("*")],
             "types": list(GATEWAY_TYPES)},
            {"operations": ["read", "subscribe"], "streams": [exchange]}]},
        "engine": {"grants": [
            {"operations": ["append"], "streams": [output_stream("*"), snapshot_stream("*"),
                                                   instances_stream("*")]},
            {"operations": ["read", "subscribe"], "streams": [exchange]}]},
        "trader": {"accounts": list(trader_accounts), "grants": [
            {"operations": ["append", "read", "subscribe"], "streams": ["orders.*"]}]},
        # The store members themselves, in a cluster without TLS (with TLS, their
        # certificates): replication between them (geo/config.py peer_token_file).
        "peer": {"grants": [{"operations": ["replicate"]}]},
    }
    certs = certs or {}
    return [{"name": role, "token": tokens[role], "cert": certs.get(role, ""), **spec}
            for role, spec in roles.items() if role in tokens]


def derived_id(*parts: str | int) -> bytes:
    """A UUID (version 8, RFC 9562 "custom") derived from ``parts``: the same parts give
    the same id in any process, which is what makes retries and re-emission idempotent."""
    h = hashlib.sha256(b"xdc.exchange\0" + "\0".join(str(p) for p in parts).encode())
    raw = bytearray(h.digest()[:16])
    raw[6] = 0x80 | (raw[6] & 0x0F)
    raw[8] = 0x80 | (raw[8] & 0x3F)
    return bytes(raw)


# ---------------------------------------------------------------------- inputs

# Kinds of input whose keys share one namespace: a cancel and a replace are both named by
# the account's request ids, so one request id names one of them (a replace sent under a
# cancel's request id has the cancel's event id, and the store refuses it as other content
# under that id: ALREADY_EXISTS), as FIX gives each request its own ClOrdID.
_KEY_SPACES = {"CancelOrder": "request", "ReplaceOrder": "request"}


def input_id(group: str, cmd: object, key: str) -> bytes:
    """The id of ``cmd``'s input event. ``key`` is the request's idempotency key within
    (group, account, key space): the client order id of a submit, the request id of a
    cancel or replace (one space for both), the key of an admin command of its kind."""
    kind = type(cmd).__name__
    return derived_id("in", group, _KEY_SPACES.get(kind, kind), getattr(cmd, "account", ""),
                      key)


def command_event(group: str, cmd: object, key: str,
                  metadata: dict[str, str] | None = None) -> pb.ProposedEvent:
    """The input event of ``cmd`` (its ``ts_ns`` must be 0), with ``input_id``'s id."""
    assert getattr(cmd, "ts_ns", 0) == 0, "input commands carry no time of their own"
    event = pb.ProposedEvent(
        id=input_id(group, cmd, key), type=type(cmd).__name__,
        content_type=COMMAND_CONTENT_TYPE, data=encode_command(cmd))
    if metadata:  # assigning even an empty map costs about a microsecond per order
        event.metadata.update(metadata)
    return event


def instance_event(group: str, instance: str, address: str, version: str) -> pb.ProposedEvent:
    """An engine instance's EngineControl address (its id derives from all four: an
    instance restarted at the same address and version appends nothing new)."""
    body = {"instance": instance, "address": address, "version": version}
    return pb.ProposedEvent(id=derived_id("instance", group, instance, address, version),
                            type=INSTANCE_TYPE, content_type="application/json",
                            data=json.dumps(body, sort_keys=True).encode())


# Bytes and brackets a JSON body of the group's records may hold; past either it is not
# parsed. What the engine and its CLI write is far below both.
MAX_JSON_BYTES = 4096
MAX_JSON_BRACKETS = 64
# Characters an integer in such a body may have (its sign too): the least limit
# PYTHONINTMAXSTRDIGITS can set (sys.int_info.str_digits_check_threshold), so that it
# parses in every process or in none.
MAX_JSON_INT_CHARS = 640


def _json_int(text: str) -> int:
    if len(text) > MAX_JSON_INT_CHARS:
        raise ValueError(f"an integer of {len(text)} characters in a JSON body")
    return int(text)


def json_object(data: bytes) -> dict[str, object]:
    """The JSON object an engine record's data holds (a control's body, an instance's
    address); {} for any other bytes. The same answer in every process for any bytes:
    json raises RecursionError past a nesting depth that depends on the caller's stack,
    so a deeply nested body would crash every instance that reads it, at the same input,
    again after each restart (a poison input); bodies with more than MAX_JSON_BRACKETS
    brackets (anywhere, strings too: what the engine writes has one) are not parsed. Nor
    are bodies over MAX_JSON_BYTES, nor those with an integer over MAX_JSON_INT_CHARS:
    past 640 digits an integer parses or not depending on the process's environment
    (PYTHONINTMAXSTRDIGITS may be set as low as 640; 4300 by default). Nor those with a
    lone surrogate (an escape such as "\\ud800", or its bytes): it is no text, and raised
    wherever it was used as text (encoded, put in a protobuf string), at that input."""
    if len(data) > MAX_JSON_BYTES or data.count(b"{") + data.count(b"[") > MAX_JSON_BRACKETS:
        return {}
    try:
        body = json.loads(data, parse_int=_json_int)
        json.dumps(body, ensure_ascii=False).encode()  # UnicodeEncodeError: a surrogate
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def parse_instance(data: bytes) -> tuple[str, str] | None:
    """(instance, address) of an instance event's data; None if it is not one."""
    body = json_object(data)
    instance, address = body.get("instance"), body.get("address")
    if (not isinstance(instance, str) or not isinstance(address, str) or not instance
            or not 0 < len(address.encode()) <= MAX_ADDRESS_BYTES or ":" not in address):
        return None
    return instance, address


def control_event(group: str, kind: str, body: dict[str, str], key: str) -> pb.ProposedEvent:
    assert kind in CONTROL_TYPES
    return pb.ProposedEvent(id=derived_id("ctl", group, kind, key), type=kind,
                            content_type="application/json",
                            data=json.dumps(body, sort_keys=True).encode())


def activation_event(group: str, output_version: int) -> pb.ProposedEvent:
    """The activation of output format ``output_version`` in ``group``: its id derives from
    both, so however often it is appended, the version is activated once, at one place."""
    assert 1 <= output_version <= MAX_OUTPUT_VERSION, output_version
    return pb.ProposedEvent(id=derived_id("ctl", group, ACTIVATE_TYPE, output_version),
                            type=ACTIVATE_TYPE, content_type="application/json",
                            data=json.dumps({"output_version": output_version}).encode())


def parse_activation(data: bytes) -> int | None:
    """The output version an activation's data names; None if it names none (not a JSON
    object whose ``output_version`` is an integer in 1..MAX_OUTPUT_VERSION)."""
    version = json_object(data).get("output_version")
    if type(version) is not int or not 1 <= version <= MAX_OUTPUT_VERSION:
        return None
    return version


def snapshot_in_force_metadata(in_force: tuple[int, int] | None) -> dict[str, str]:
    """A snapshot's metadata on its output version: the version in force and the position
    of the activation that put it there (0 for version 1), so that the version in force
    after the group's last input is read from the log after the newest snapshot, not from
    the whole log (engine.cli.active_output_version). Nothing when unknown."""
    if in_force is None:
        return {}
    return {"output_version": str(in_force[0]), "output_version_at": str(in_force[1])}


def snapshot_in_force(md: Mapping[str, str]) -> tuple[int, int] | None:
    """What ``snapshot_in_force_metadata`` wrote in a snapshot's metadata ``md``; None
    when it wrote nothing or something it cannot have written (a version outside
    1..MAX_OUTPUT_VERSION, an activation after the snapshot's input, version 1 put in
    force by an activation)."""
    try:
        version, at = int(md["output_version"]), int(md["output_version_at"])
        position = int(md["input_position"])
    except (KeyError, ValueError):
        return None
    if not (1 <= version <= MAX_OUTPUT_VERSION and 0 <= at <= position
            and (at == 0) == (version == 1)):
        return None
    return version, at


def decode_input(data: bytes, ts_ns: int) -> object:
    """The command of an input event, with the record's leader timestamp as its time.
    Raises CodecError for bytes that are not a command."""
    if len(data) < 9:
        raise CodecError("short command")
    return decode_command(data, ts_ns)


# ---------------------------------------------------------------------- outputs

def outputs_blob(position: int, raws: list[tuple]) -> bytes:
    """One input's outputs (raw events) as stored in an output batch and hashed into the
    chain (the consumer's hot path)."""
    assert len(raws) < 65_536
    return encode_framed(raws, _IN_HEAD.pack(position, len(raws)))


def input_blob(position: int, encoded: list[bytes]) -> bytes:
    """``outputs_blob`` from events encoded already (or any bytes: tests forge blobs)."""
    assert len(encoded) < 65_536
    parts = [_IN_HEAD.pack(position, len(encoded))]
    for e in encoded:
        parts.append(_U16.pack(len(e)))
        parts.append(e)
    return b"".join(parts)


def chain_next(chain: bytes, blob: bytes) -> bytes:
    return hashlib.sha256(chain + blob).digest()


@dataclass(frozen=True, slots=True)
class OutputBatch:
    first_input: int
    last_input: int
    chain: bytes  # after last_input
    blobs: tuple[bytes, ...]  # input_blob per input that had outputs, in order

    def encode(self) -> bytes:
        return _OUT_HEAD.pack(OUT_MAGIC, OUT_VERSION, self.first_input, self.last_input,
                              self.chain, len(self.blobs)) + b"".join(self.blobs)

    def event(self, group: str, writer: str = "", traceparent: str = "") -> pb.ProposedEvent:
        """``writer`` (the emitting instance) is for operators: two instances emitting the
        same batch then conflict (ALREADY_EXISTS) instead of deduplicating, which the
        expected revision makes impossible anyway. ``traceparent`` (W3C, 55 characters)
        is the context the outputs were made in, when traced: in the metadata, outside
        the data the chain hash covers, and set aside by the store's idempotency."""
        metadata = {"first_input": str(self.first_input), "writer": writer,
                    "last_input": str(self.last_input), "chain": self.chain.hex()}
        if traceparent:
            metadata["traceparent"] = traceparent
        return pb.ProposedEvent(
            id=derived_id("out", group, self.first_input), type=OUTPUT_TYPE,
            content_type="application/x-xdc-outputs", data=self.encode(), metadata=metadata)


OUT_HEAD_SIZE = _OUT_HEAD.size
IN_HEAD = _IN_HEAD  # an input blob's head: q position, u16 number of events


def output_header(data: bytes) -> tuple[int, int, bytes, int]:
    """(first_input, last_input, chain, number of input blobs) of an output batch."""
    if len(data) < _OUT_HEAD.size:
        raise CodecError("short output batch")
    magic, version, first, last, chain, n = _OUT_HEAD.unpack_from(data)
    if magic != OUT_MAGIC or version != OUT_VERSION:
        raise CodecError("not an output batch")
    return first, last, chain, n


def decode_output(data: bytes) -> OutputBatch:
    first, last, chain, n = output_header(data)
    pos = _OUT_HEAD.size
    blobs = []
    try:
        for _ in range(n):
            start = pos
            _, k = _IN_HEAD.unpack_from(data, pos)
            pos += _IN_HEAD.size
            for _ in range(k):
                (length,) = _U16.unpack_from(data, pos)
                pos += 2 + length
            blobs.append(data[start:pos])
    except struct.error as exc:
        raise CodecError("truncated output batch") from exc
    if pos != len(data):
        raise CodecError("trailing bytes in output batch")
    return OutputBatch(first, last, chain, tuple(blobs))


def blob_position(blob: bytes) -> int:
    return _Q.unpack_from(blob)[0]


def blob_outputs(blob: bytes, unknown: collections.Counter[int] | None = None
                 ) -> tuple[int, list[tuple]]:
    """(input position, raw events) of one input blob. With ``unknown``, an event of a
    kind this code does not know (an engine at a newer output version) is counted there
    by tag and stands as ``(tag, "")`` (``known``: False), so that the events after it
    keep their output index; without, it raises CodecError."""
    position, k = _IN_HEAD.unpack_from(blob)
    pos = _IN_HEAD.size
    raws = []
    for _ in range(k):
        (length,) = _U16.unpack_from(blob, pos)
        data = blob[pos + 2:pos + 2 + length]
        if unknown is not None and data and data[0] not in _KIND:
            unknown[data[0]] += 1
            raws.append((data[0], ""))
        else:
            raws.append(decode_event(data))
        pos += 2 + length
    return position, raws


def batch_outputs(batch: OutputBatch, unknown: collections.Counter[int] | None = None
                  ) -> list[tuple[int, list[tuple]]]:
    return [blob_outputs(b, unknown) for b in batch.blobs]


def known(raw: tuple) -> bool:
    """Whether ``raw`` is an event this code knows (see ``blob_outputs``)."""
    return raw[0] in _KIND


# ---------------------------------------------------------------------- reports

_KIND = {ev.ACCEPTED: "ACCEPTED", ev.REJECTED: "REJECTED", ev.FILL: "FILL",
         ev.CANCELLED: "CANCELLED", ev.REPLACED: "REPLACED", ev.REDUCED: "REDUCED",
         ev.HALTED: "HALTED", ev.BALANCE: "BALANCE", ev.BOOK: "BOOK",
         ev.SYMBOL_CONFIG: "SYMBOL_CONFIG",
         # Output version 2: the same kinds, with side and price.
         ev.CANCELLED_V2: "CANCELLED", ev.REJECTED_V2: "REJECTED"}
_SIDE_PB = {Side.BUY: xpb.BUY, Side.SELL: xpb.SELL}


def report(group: str, position: int, index: int, raw: tuple) -> xpb.ExecutionReport:
    """The client's view of one raw output event (of any output version: a version-2
    cancel or reject fills side and price, a version-1 one leaves them unset)."""
    rec = ev.to_record(raw)
    r = xpb.ExecutionReport(kind=_KIND[raw[0]], group=group, input_position=position,
                            output_index=index)
    for name in ("symbol", "order_id", "account", "client_order_id", "price", "qty",
                 "reason", "detail", "maker_order_id", "taker_order_id", "maker_account",
                 "taker_account", "ts_ns"):
        v = getattr(rec, name, None)
        if v is not None:
            setattr(r, name, v)
    side = getattr(rec, "side", getattr(rec, "taker_side", None))
    if side is not None and raw[0] != ev.BOOK:
        r.side = _SIDE_PB.get(side, xpb.SIDE_UNSPECIFIED)
    if raw[0] == ev.BALANCE:
        r.account, r.symbol, r.qty = rec.account, rec.asset, rec.delta  # type: ignore[union-attr]
    return r


def accounts_of(raw: tuple) -> tuple[str, ...]:
    """Accounts an output concerns (who sees it on StreamExecutions)."""
    tag = raw[0]
    if tag == ev.FILL:
        return (raw[7], raw[8]) if raw[7] != raw[8] else (raw[7],)
    if tag in (ev.ACCEPTED, ev.CANCELLED, ev.REPLACED, ev.REDUCED, ev.CANCELLED_V2):
        return (raw[3],)
    if tag in (ev.REJECTED, ev.REJECTED_V2):
        return (raw[2],)
    if tag == ev.BALANCE:
        return (raw[1],)
    return ()

