"""Turns client requests into validated, prepared appends, or refuses them with a
message that names the field and the limit. Nothing here touches the disk."""

from __future__ import annotations

import re
import sys

from google.protobuf.unknown_fields import UnknownFieldSet

from store import _speedups
from store.errors import StoreError, invalid
from store.limits import Limits
from store.log import EXACT, PreparedAppend
from store.records import stream_field
from xdc.v1 import eventstore_pb2 as pb

ALL = "$all"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc: C0, DEL, C1
_NIL = bytes(16)
_EXPECTED_KINDS = frozenset(pb.ExpectedKind.values())

STREAM_RULE = (
    "a stream name is 1..{max} bytes of UTF-8 without control characters and does not "
    "start with '$' (reserved)"
)


def check_stream_name(stream: str, limits: Limits, field: str = "stream",
                      allow_all: bool = False) -> bytes:
    """Returns the stream's key bytes, or raises INVALID_ARGUMENT naming the rule."""
    rule = STREAM_RULE.format(max=limits.max_stream_name_bytes)
    if not stream:
        raise invalid(field, f"empty; {rule}")
    if stream == ALL and allow_all:
        return stream.encode()
    key = stream.encode()
    if len(key) > limits.max_stream_name_bytes:
        raise invalid(field, f"{len(key)} bytes exceeds max_stream_name_bytes "
                             f"({limits.max_stream_name_bytes}); {rule}")
    if stream[0] == "$":
        raise invalid(field, f"{stream!r} starts with '$'; {rule}")
    if _CONTROL.search(stream):
        raise invalid(field, f"contains a control character; {rule}")
    return key


# Stream names recently validated -> (key, encoded stream field): producers append to
# the same streams over and over. Bounded: cleared when full.
_STREAM_CACHE: dict[tuple[str, int], tuple[bytes, bytes]] = {}
_STREAM_CACHE_MAX = 65_536


def _stream(stream: str, limits: Limits) -> tuple[bytes, bytes]:
    cached = _STREAM_CACHE.get((stream, limits.max_stream_name_bytes))
    if cached is not None:
        return cached
    key = check_stream_name(stream, limits)
    if len(_STREAM_CACHE) >= _STREAM_CACHE_MAX:
        _STREAM_CACHE.clear()
    value = _STREAM_CACHE[(stream, limits.max_stream_name_bytes)] = (key, stream_field(key))
    return value


def _varint_bytes(n: int) -> int:
    return 1 if n < 0x80 else 2 if n < 0x4000 else 3 if n < 0x200000 else (n.bit_length() + 6) // 7


def _field_bytes(n: int) -> int:
    """Bytes of a length-delimited field holding ``n`` bytes: none when empty (proto3
    leaves it out), else its one-byte tag, its length and the value."""
    return n and 1 + _varint_bytes(n) + n


_ID_FIELD_BYTES = _field_bytes(16)  # the event id: checked to be 16 bytes first


def prepare(req: pb.AppendRequest, limits: Limits) -> PreparedAppend:
    """The append validated and serialized, or INVALID_ARGUMENT naming the field from
    the append down (`events[2].type: ...`): the caller of a message of appends puts the
    append's place in front (store/service.py)."""
    # Each field read once: a read looks the field up by name and makes a new object.
    stream, kind, expected_revision = req.stream, req.expected, req.expected_revision
    events = req.events
    n = len(events)
    stream_key, stream_fld = _check_append(stream, kind, expected_revision, n, limits)
    ids: list[bytes] = []
    bodies: list[bytes] = []
    total = 0
    max_event = limits.max_event_bytes
    max_type = limits.max_type_bytes
    # Over a slice: protobuf's repeated containers have no __iter__, so a for loop over
    # one indexes it until IndexError, and raising that error (its message formatted)
    # cost 7% of this function.
    for i, ev in enumerate(events[:]):
        event_id = ev.id
        if len(event_id) != 16 or event_id == _NIL:
            raise invalid(f"events[{i}].id",
                          f"must be a 16-byte binary UUID other than nil, got {len(event_id)} "
                          f"bytes{' (nil)' if event_id == _NIL else ''}")
        event_type = ev.type
        if not event_type:
            raise invalid(f"events[{i}].type", "required")
        if len(event_type) * 4 > max_type and len(event_type.encode()) > max_type:
            raise invalid(f"events[{i}].type", f"{len(event_type.encode())} bytes exceeds "
                                               f"max_type_bytes ({max_type})")
        content_type = ev.content_type
        if len(content_type) * 4 > max_type and len(content_type.encode()) > max_type:
            raise invalid(f"events[{i}].content_type",
                          f"{len(content_type.encode())} bytes exceeds max_type_bytes ({max_type})")
        # Without a map field the bytes are the same either way, in half the time.
        body = ev.SerializeToString()
        # The map is read only when the bytes hold more than the id, the type, the
        # content type and the data: reading an empty map field makes protobuf create and
        # free an arena, and its allocator calls malloc_trim(0) every 10,000 such frees,
        # handing every free page of the process back to the kernel (measured: a page
        # fault per 5 events afterwards, a quarter of a leader's time in the kernel).
        if len(body) != (_ID_FIELD_BYTES
                         + _field_bytes(len(event_type) if event_type.isascii()
                                        else len(event_type.encode()))
                         + _field_bytes(len(content_type) if content_type.isascii()
                                        else len(content_type.encode()))
                         + _field_bytes(len(ev.data))):
            unknown = UnknownFieldSet(ev)
            if len(unknown):
                # A record is the store's header and stream field, then these bytes, and
                # fields 6.. are RecordedEvent's stream, revision, position, term and
                # time: kept, they would override the store's for every reader.
                numbers = sorted({f.field_number for f in unknown})
                raise invalid(f"events[{i}]", f"unknown field number(s) "
                                              f"{', '.join(map(str, numbers))}: a "
                                              f"ProposedEvent has fields 1..5 (id, type, "
                                              f"content_type, data, metadata)")
            metadata = ev.metadata
            if metadata:
                _check_metadata(metadata, limits, f"events[{i}].metadata")
                body = ev.SerializeToString(deterministic=True)  # map entries in key order
        if len(body) > max_event:
            raise invalid(f"events[{i}]", f"{len(body)} bytes exceeds max_event_bytes "
                                          f"({max_event})")
        total += len(body)
        ids.append(event_id)
        bodies.append(body)
    _check_events(ids, total, limits)
    return PreparedAppend(stream, stream_key, kind, expected_revision, ids, bodies,
                          stream_fld, total)


# An append as store/_speedups.c's scan_append_stream returns it: stream, expected kind,
# expected revision, event ids, serialized events, their summed size, the event types.
ScannedAppend = tuple[str, int, int, list[bytes], list[bytes], int, set[str]]


def prepare_scanned(append: ScannedAppend, limits: Limits) -> PreparedAppend:
    """`prepare` for an append whose events the scan checked already (each event's id,
    type, content type, size and form): the checks of the append as a whole."""
    stream, kind, expected_revision, ids, bodies, total, _ = append
    stream_key, stream_fld = _check_append(stream, kind, expected_revision, len(ids), limits)
    _check_events(ids, total, limits)
    return PreparedAppend(stream, stream_key, kind, expected_revision, ids, bodies,
                          stream_fld, total)


def scan_append_stream(data: bytes, limits: Limits,
                       ) -> tuple[int, list[ScannedAppend], dict[str, str]] | None:
    """An AppendStream message's correlation id, appends and trace context, read straight
    from its bytes in C, or None: the message is not in the form a protobuf serializer
    writes (fields in number order, minimal varints, no unknown field), an event has
    metadata (stored with its entries in key order: re-serialized), or an event fails a
    check of `prepare` (a message of several appends with one bad event, say). The caller
    then parses it with protobuf, which accepts every form and names what is wrong: one
    set of messages and rules."""
    # Limits have no upper bound; the scan's are C sizes (a larger one changes nothing).
    return _speedups.scan_append_stream(
        data, min(limits.max_event_bytes, sys.maxsize), min(limits.max_type_bytes, sys.maxsize),
        min(limits.max_append_events, sys.maxsize),
        min(limits.max_appends_per_message, sys.maxsize))


def _check_append(stream: str, kind: int, expected_revision: int, n: int,
                  limits: Limits) -> tuple[bytes, bytes]:
    """The append's own fields and event count; its stream's key and encoded field."""
    stream_key, stream_fld = _stream(stream, limits)
    if kind not in _EXPECTED_KINDS:
        raise invalid("expected", f"unknown ExpectedKind {kind}")
    if kind != EXACT and expected_revision:
        raise invalid("expected_revision", "set only with EXPECTED_EXACT")
    if n == 0:
        raise invalid("events", f"empty; an append carries 1..{limits.max_append_events} "
                                "events")
    if n > limits.max_append_events:
        raise invalid("events", f"{n} events exceeds max_append_events "
                                f"({limits.max_append_events})")
    return stream_key, stream_fld


def _check_events(ids: list[bytes], total: int, limits: Limits) -> None:
    """The events together: their size and their ids' uniqueness."""
    if total > limits.max_append_bytes:
        raise invalid("events", f"{total} bytes in all exceeds max_append_bytes "
                                f"({limits.max_append_bytes})")
    n = len(ids)
    if n > 1 and len(set(ids)) != n:
        seen: dict[bytes, int] = {}
        for i, event_id in enumerate(ids):
            if event_id in seen:
                raise invalid(f"events[{i}].id", f"duplicates events[{seen[event_id]}].id "
                                                 "in the same append")
            seen[event_id] = i


def _check_metadata(metadata: object, limits: Limits, field: str) -> None:
    entries = len(metadata)  # type: ignore[arg-type]
    if entries > limits.max_metadata_entries:
        raise invalid(field, f"{entries} entries exceeds max_metadata_entries "
                             f"({limits.max_metadata_entries})")
    for key in metadata:  # type: ignore[attr-defined]
        if not key:
            raise invalid(field, "empty key")
        if len(key.encode()) > limits.max_metadata_key_bytes:
            raise invalid(f"{field}[{key[:32]!r}...]", f"key exceeds max_metadata_key_bytes "
                                                       f"({limits.max_metadata_key_bytes})")


def check_read(req: pb.ReadRequest, limits: Limits) -> bytes:
    key = check_stream_name(req.stream, limits, "stream", allow_all=True)
    if req.direction not in (pb.FORWARDS, pb.BACKWARDS):
        raise invalid("direction", f"unknown Direction {req.direction}")
    if req.limit == 0 or req.limit > limits.max_read_count:
        raise invalid("limit", f"{req.limit} is outside 1..max_read_count "
                               f"({limits.max_read_count})")
    return key


def check_subscribe(req: pb.SubscribeRequest, limits: Limits) -> tuple[bytes, frozenset[str]]:
    """The subscription's filter: (stream prefix bytes, event types), or INVALID_ARGUMENT
    naming the field and the limit."""
    prefix = req.stream_prefix.encode()
    if len(prefix) > limits.max_stream_name_bytes:
        raise invalid("stream_prefix", f"{len(prefix)} bytes exceeds max_stream_name_bytes "
                                       f"({limits.max_stream_name_bytes})")
    types = req.event_types
    if len(types) > limits.max_subscribe_types:
        raise invalid("event_types", f"{len(types)} types exceeds max_subscribe_types "
                                     f"({limits.max_subscribe_types})")
    for i, t in enumerate(types):
        if not t:
            raise invalid(f"event_types[{i}]", "empty; an event type is 1.."
                                               f"{limits.max_type_bytes} bytes")
        size = len(t.encode())
        if size > limits.max_type_bytes:
            raise invalid(f"event_types[{i}]", f"{size} bytes exceeds max_type_bytes "
                                               f"({limits.max_type_bytes})")
    return prefix, frozenset(types)


def refuse(err: StoreError) -> pb.AppendResult:
    return pb.AppendResult(error=pb.AppendError(
        code=err.code.value[0], message=err.message,
        actual_last_revision=err.actual_last_revision, leader=err.leader,
        retry_after_ms=err.retry_after_ms))
