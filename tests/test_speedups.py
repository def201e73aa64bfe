"""store/_speedups.c against the Python definitions it replaces.

scan_append_stream may only ever recognise a message that the protobuf path accepts, and
must return what that path would (validation.prepare of each parsed append); it must also
actually take the messages that clients send, or it speeds nothing up. encode_run must
frame records byte for byte as the Python loop it replaced did."""

from __future__ import annotations

import random
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import _speedups, records
from store.client import new_event, new_id
from store.errors import StoreError
from store.limits import Limits
from store.log import PreparedAppend
from store.validation import prepare, prepare_scanned, scan_append_stream
from tests.support.store import run, running_store
from xdc.v1 import eventstore_pb2 as pb

LIMITS = Limits()


def _protobuf_path(data: bytes, limits: Limits) -> tuple[int, list] | None:
    """What the server makes of a message without the scan: (correlation id, each
    append prepared or its refusal's message), or None when it refuses the whole message."""
    try:
        msg = pb.AppendStreamRequest.FromString(data)
    except Exception:
        return None
    if len(msg.appends) > limits.max_appends_per_message:
        return None
    return msg.correlation_id, [_prepared(lambda a=a: prepare(a, limits)) for a in msg.appends]


def _prepared(make: Callable[[], PreparedAppend]) -> tuple | str:
    try:
        p = make()
    except StoreError as err:
        return err.message
    return (p.stream, p.stream_key, p.expected, p.expected_revision, p.ids, p.bodies,
            p.stream_fld, p.size)


def _same(data: bytes, limits: Limits = LIMITS) -> bool:
    """Asserts that the scan agrees with the protobuf path; True when it took the message."""
    scanned = scan_append_stream(data, limits)
    if scanned is None:
        return False
    slow = _protobuf_path(data, limits)
    assert slow is not None, f"scanned a message the protobuf path refuses: {data!r}"
    cid, appends, trace = scanned
    assert cid == slow[0]
    msg = pb.AppendStreamRequest.FromString(data)
    assert trace == dict(msg.trace_context)
    assert len(appends) == len(slow[1]) == len(msg.appends)
    for got, want, req in zip(appends, slow[1], msg.appends, strict=True):
        assert _prepared(lambda got=got: prepare_scanned(got, limits)) == want, data
        assert got[6] == {e.type for e in req.events}
    return True


def _message(appends: list[tuple[str, int, int, list[pb.ProposedEvent]]], cid: int = 7,
             trace: dict[str, str] | None = None) -> bytes:
    return pb.AppendStreamRequest(
        correlation_id=cid, trace_context=trace or {},
        appends=[pb.AppendRequest(stream=s, expected=k, expected_revision=r, events=evs)
                 for s, k, r, evs in appends]).SerializeToString()


def _event(type_: str = "T", data: bytes = b"x", content_type: str = "",
           event_id: bytes | None = None) -> pb.ProposedEvent:
    return pb.ProposedEvent(id=new_id() if event_id is None else event_id, type=type_,
                            content_type=content_type, data=data)


def test_messages_as_clients_send_them_are_scanned_as_protobuf_reads_them() -> None:
    """The store client's events (new_event, no metadata), the benchmark's, content types,
    empty data, several appends and streams, each expected kind: taken by the scan, and
    equal to the protobuf path. Without this the scan could answer None for everything."""
    cases = [
        [("s", pb.EXPECTED_ANY, 0, [new_event("Tick", b"x" * 200)])],
        [("orders-1", pb.EXPECTED_NO_STREAM, 0, [_event() for _ in range(500)]),
         ("fills", pb.EXPECTED_EXACT, 41, [_event("Fill", b"", "application/json")])],
        [("ü-stream", pb.EXPECTED_STREAM_EXISTS, 0, [_event("Tÿpe", b"\x00" * 3)]),
         ("s", pb.EXPECTED_EXACT, 1 << 62, [_event(t) for t in ("A", "B", "A", "C")])],
    ]
    for appends in cases:
        for cid in (0, 1, 1 << 63):
            assert _same(_message(appends, cid)), appends
    # the store's own limits, exactly at each one: still taken
    lim = Limits(max_event_bytes=300, max_type_bytes=4, max_append_events=3,
                 max_appends_per_message=2)
    big = _event("ABCD", b"d" * 200, "WXYZ")
    big.data = b"d" * (300 - len(big.SerializeToString()) + 200)
    assert len(big.SerializeToString()) == 300
    assert _same(_message([("a", 0, 0, [big, _event(), _event()]), ("b", 0, 0, [_event()])]),
                 lim)


def test_what_the_scan_leaves_to_the_protobuf_path() -> None:
    """Each form the scan does not take (the protobuf path accepts several of them, and
    refuses the others naming the field): None, never a guess."""
    ok = _event("T", b"data")
    body = ok.SerializeToString()
    lim = Limits(max_event_bytes=100, max_type_bytes=8, max_append_events=2,
                 max_appends_per_message=1)

    def raw_append(event_bytes: bytes, head: bytes = b"\x0a\x01s") -> bytes:
        inner = head + b"\x22" + bytes((len(event_bytes),)) + event_bytes
        return b"\x12" + bytes((len(inner),)) + inner

    refused = {
        "metadata": _message([("s", 0, 0, [new_event("T", b"x", metadata={"k": "v"})])]),
        "a trace context entry without its value": _message([("s", 0, 0, [ok])]) + (
            b"\x1a\x03\x0a\x01k"),
        "a trace context entry value first": _message([("s", 0, 0, [ok])]) + (
            b"\x1a\x06\x12\x01v\x0a\x01k"),
        "a trace context before the appends": _message([], trace={"k": "v"}) + _message(
            [("s", 0, 0, [ok])], 0),
        "no events": _message([("s", 0, 0, [])]),
        "empty stream": _message([("", 0, 0, [ok])]),
        "no type": _message([("s", 0, 0, [_event("")])]),
        "no id": _message([("s", 0, 0, [_event(event_id=b"")])]),
        "nil id": _message([("s", 0, 0, [_event(event_id=bytes(16))])]),
        "15-byte id": _message([("s", 0, 0, [_event(event_id=b"x" * 15)])]),
        "event over max_event_bytes": _message([("s", 0, 0, [_event(data=b"x" * 80)])]),
        "type over max_type_bytes": _message([("s", 0, 0, [_event("T" * 9)])]),
        "content type over max_type_bytes": _message([("s", 0, 0, [_event(
            content_type="c" * 9)])]),
        "events over max_append_events": _message([("s", 0, 0, [ok, ok, ok])]),
        "appends over max_appends_per_message": _message([("s", 0, 0, [ok])] * 2),
        "fields out of order": raw_append(body[18:] + body[:18]),
        "a field twice": raw_append(body + body[18:24]),
        "an unknown field": raw_append(body + b"\x38\x01"),
        "type not UTF-8": raw_append(body[:18] + b"\x12\x02\xc3\x28" + body[21:]),
        "a surrogate in the type": raw_append(body[:18] + b"\x12\x03\xed\xa0\x80" + body[21:]),
        "stream not UTF-8": raw_append(body, b"\x0a\x01\xff"),
        "a non-minimal length": raw_append(body[:18] + b"\x12\x81\x00" + body[20:]),
        "expected written as 0": raw_append(body, b"\x0a\x01s\x10\x00"),
        "truncated": _message([("s", 0, 0, [ok])])[:-1],
        "trailing garbage": _message([("s", 0, 0, [ok])]) + b"\x00",
        "correlation id written as 0": b"\x08\x00" + _message([("s", 0, 0, [ok])], 0),
    }
    for name, data in refused.items():
        assert scan_append_stream(data, lim) is None, name
    # bytes only (the scan runs without the GIL: a mutable buffer could change under it)
    with pytest.raises(TypeError):
        _speedups.scan_append_stream(bytearray(_message([("s", 0, 0, [ok])])), 9, 9, 9, 9)
    # limits past a C size (Limits has no upper bound) take what they take below it
    huge = Limits(**{name: 1 << 70 for name in (
        "max_event_bytes", "max_type_bytes", "max_append_events", "max_appends_per_message",
        "max_append_bytes", "max_pending_bytes", "max_batch_bytes", "max_group_events")})
    assert _same(_message([("s", 0, 0, [_event("T" * 300, b"x" * 2_000_000)])]), huge)
    # varints: the protobuf path's to judge past what a serializer writes
    assert scan_append_stream(b"\x08" + b"\xff" * 9 + b"\x01", lim) is not None  # 2**64 - 1
    assert scan_append_stream(b"\x08" + b"\xff" * 9 + b"\x02", lim) is None  # past 64 bits
    for kind in (4, (1 << 31) - 1):  # open enum: an unknown kind is prepare_scanned's refusal
        assert _same(_message([("s", kind, 0, [ok])]), lim)
    assert scan_append_stream(_message([("s", -1, 0, [ok])]), lim) is None  # 10-byte varint
    # The same bytes with one change each are taken: the cases above test what they say.
    assert _same(_message([("s", 0, 0, [ok])]), lim)
    assert _same(raw_append(body), lim)
    assert _same(_message([]), lim)  # no appends: an empty answer, as protobuf's
    # a trace context (a traced client's), empty keys and values, a key given twice
    assert _same(_message([("s", 0, 0, [ok])], trace={"traceparent": "00-x", "": ""}), lim)
    assert _same(_message([("s", 0, 0, [ok])]) + b"\x1a\x06\x0a\x01k\x12\x01v"
                 + b"\x1a\x06\x0a\x01k\x12\x01w", lim)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    texts = st.text(max_size=6)
    trace = draw(st.dictionaries(texts, texts, max_size=2))
    appends = []
    for _ in range(draw(st.integers(0, 3))):
        events = []
        for _ in range(draw(st.integers(0, 4))):
            ids = st.sampled_from([b"", bytes(16), b"\x01" * 15]) | st.binary(min_size=16,
                                                                              max_size=16)
            e = pb.ProposedEvent(
                id=draw(ids),
                type=draw(texts), content_type=draw(texts), data=draw(st.binary(max_size=40)))
            if draw(st.integers(0, 5)) == 0:
                e.metadata[draw(texts)] = draw(texts)
            events.append(e)
        appends.append((draw(texts), draw(st.integers(0, 5)),
                        draw(st.sampled_from([0, 1, 1 << 40])), events))
    data = _message(appends, draw(st.sampled_from([0, 1, 1 << 63])), trace)
    # and a byte changed, inserted or cut here and there
    for _ in range(draw(st.integers(0, 2))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 2))
        b = draw(st.integers(0, 255))
        data = (data[:i] + bytes((b,)) + data[i + 1:] if op == 0 else
                data[:i] + bytes((b,)) + data[i:] if op == 1 else data[:i] + data[i + 1:])
    return data


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages())
def test_the_scan_agrees_with_the_protobuf_path_on_any_bytes(data: bytes) -> None:
    """Generated messages, some damaged: whatever the scan takes, the protobuf path takes
    too, with equal prepared appends; a message the protobuf path takes and that is in
    canonical form without event metadata is taken by the scan."""
    lim = Limits(max_event_bytes=60, max_type_bytes=5, max_append_events=3,
                 max_appends_per_message=2)
    taken = _same(data, lim)
    slow = _protobuf_path(data, lim)
    if slow is not None and not taken and all(isinstance(p, tuple) for p in slow[1]):
        msg = pb.AppendStreamRequest.FromString(data)
        known = pb.AppendStreamRequest()
        known.CopyFrom(msg)
        known.DiscardUnknownFields()
        canonical = known.SerializeToString() == data
        assert not canonical or any(e.metadata for a in msg.appends for e in a.events), data


def _encode_run_reference(position: int, term: int, revision: int, timestamp_ns: int,
                          stream_fld: bytes, bodies: list[bytes]) -> list[bytes]:
    """The Python loop encode_run replaced."""
    header = struct.Struct("<BQBQBQBQ")
    out = []
    for i, body in enumerate(bodies):
        rest = header.pack((8 << 3) | 1, position + i, (9 << 3) | 1, term, (7 << 3) | 1,
                           revision + i, (10 << 3) | 1, timestamp_ns) + stream_fld + body
        out.append(b"\x0a" + records.varint(len(rest)) + rest)
    return out


def test_encode_run_equals_the_python_loop() -> None:
    rng = random.Random(23)
    for _ in range(300):
        fld = records.stream_field(bytes(rng.choice(b"abc") for _ in range(rng.choice(
            (1, 100, 200)))))
        bodies = [rng.randbytes(rng.choice((0, 1, 80, 150, 16_000, 17_000, 70_000)))
                  for _ in range(rng.randint(0, 5))]
        args = (rng.randint(1, 1 << 40), rng.randint(1, 1 << 63), rng.randint(1, 1 << 40),
                rng.randint(0, (1 << 64) - 1), fld, bodies)
        assert records.encode_run(*args) == _encode_run_reference(*args)
    assert _speedups.encode_run(1, 1, 1, 0, b"\x32\x01s", ()) == []
    with pytest.raises(TypeError):
        _speedups.encode_run(1, 1, 1, 0, b"\x32\x01s", ["not bytes"])
    with pytest.raises(OverflowError):
        _speedups.encode_run(-1, 1, 1, 0, b"\x32\x01s", [b""])
    top = (1 << 64) - 1  # the last position or revision a record can hold, not past it
    assert len(_speedups.encode_run(top, 1, top, 0, b"\x32\x01s", [b"a"])) == 1
    for position, revision in ((top, 1), (1, top)):
        with pytest.raises(OverflowError):
            _speedups.encode_run(position, 1, revision, 0, b"\x32\x01s", [b"a", b"b"])


def test_keyed_equals_the_python_pairs() -> None:
    """keyed: the (key, record) pairs, keys the log's 8-byte big-endian positions."""
    values = [b"a", b"", b"c" * 300]
    for first in (1, 255, 1 << 40, (1 << 64) - 3):
        items = _speedups.keyed(first, values)
        want = [struct.pack(">Q", first + i) for i in range(3)]
        assert items == list(zip(want, values, strict=True))
        assert all(p[1] is v for p, v in zip(items, values, strict=True))
    assert _speedups.keyed(7, []) == []
    with pytest.raises(OverflowError):
        _speedups.keyed((1 << 64) - 2, values)


def test_a_server_answers_scanned_and_parsed_messages_alike(tmp_path: Path) -> None:
    """One AppendStream call: a message the scan takes, one it leaves (metadata), one
    with a refused append beside an accepted one: answers, refusals and records as the
    protobuf path gives them."""
    async def body() -> None:
        async with running_store(tmp_path) as (_, c):
            plain = [new_event("T", b"a"), new_event("T", b"b")]
            tagged = [new_event("T", b"c", metadata={"k": "v"})]
            bad = pb.ProposedEvent(id=uuid.uuid4().bytes, type="")
            call = c.stub.AppendStream()  # the raw call: one answer per message
            msgs = [pb.AppendStreamRequest(correlation_id=1, appends=[
                        pb.AppendRequest(stream="s", events=plain)]),
                    pb.AppendStreamRequest(correlation_id=2, appends=[
                        pb.AppendRequest(stream="s", events=tagged)]),
                    pb.AppendStreamRequest(correlation_id=3, appends=[
                        pb.AppendRequest(stream="s", events=[new_event("T", b"d")]),
                        pb.AppendRequest(stream="s", events=[bad])])]
            assert scan_append_stream(msgs[0].SerializeToString(), LIMITS) is not None
            assert scan_append_stream(msgs[1].SerializeToString(), LIMITS) is None
            for m in msgs:
                await call.write(m)
            await call.done_writing()
            answers = [r async for r in call]
            assert [a.correlation_id for a in answers] == [1, 2, 3]
            assert [(r.ok.first_position, r.ok.last_position) for r in answers[0].results] == [
                (1, 2)]
            assert answers[1].results[0].ok.first_position == 3
            assert answers[2].results[0].ok.first_position == 4
            assert answers[2].results[1].error.message == "appends[1].events[0].type: required"
            got = await c.read("s")
            assert [e.data for e in got] == [b"a", b"b", b"c", b"d"]
            assert [e.id for e in got] == [e.id for e in (*plain, *tagged)] + [
                msgs[2].appends[0].events[0].id]
            assert dict(got[2].metadata) == {"k": "v"}
    run(body)
