"""The Python client of the event store, asyncio (`StoreClient`) and blocking (`Client`).

Appends travel on one long-lived `AppendStream` call: concurrent `append()` calls are
coalesced into one message (like a Kafka producer's linger and batch size), many
messages are in flight at once, and answers come back in order. Event ids make every
retry safe: a re-sent append whose events are already in the log is answered with the
original positions, so a lost connection, a full queue or a leader change is retried
transparently until the caller's timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from store.auth import bearer
from store.errors import MD_LEADER, MD_NOT_RUN, MD_RETRY_AFTER_MS, MD_SHED_REASON, MD_TIER
from store.limits import Limits
from store.records import batch_span
from xdc import telemetry
from xdc.tls import Tls, aio_channel
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc

ANY = pb.EXPECTED_ANY
NO_STREAM = pb.EXPECTED_NO_STREAM
STREAM_EXISTS = pb.EXPECTED_STREAM_EXISTS
EXACT = pb.EXPECTED_EXACT

_CODES = {c.value[0]: c for c in grpc.StatusCode}


# Event ids are UUIDv7 laid out as: 48-bit Unix millisecond, version, 42 bits drawn once
# per process (its "producer prefix"), 32-bit counter. A process's ids of one millisecond
# share their first 12 bytes and increase, which lets the store index a run of them with
# one entry (store/log.py, `id_runs`), and ids of two processes never interleave within a
# millisecond. Still a UUIDv7 (RFC 9562: the Unix millisecond first, version, variant,
# the rest the generator's choice); its monotonic methods (§6.2) put a counter right
# after the millisecond and reset it each millisecond, this one keeps a per-process
# random prefix in between and never resets. Unique in a process: the counter repeats
# only after 2**32 ids, never within one millisecond; across processes: the 42-bit
# prefixes would have to be equal. A forked child draws its own prefix and counter (it
# would otherwise repeat its parent's ids).
_V7 = 0x7 << 76 | 0b10 << 62  # version 7, variant 0b10
_V7_RANDOM = ~(0xF << 76 | 0b11 << 62) & ((1 << 80) - 1)  # the 74 bits left to random
_COUNTER_BITS = 32
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
_id_prefix = 0
_id_counter: Iterator[int] = iter(())


def _new_producer() -> None:
    global _id_prefix, _id_counter
    drawn = int.from_bytes(os.urandom(16), "big")
    _id_prefix = _V7 | (drawn & _V7_RANDOM & ~_COUNTER_MASK)
    # next() of an itertools.count is atomic under the GIL: threads need no lock. Started
    # in the lower half, so the first 2**31 ids increase without a wrap.
    _id_counter = itertools.count(drawn & _COUNTER_MASK >> 1)


_new_producer()
os.register_at_fork(after_in_child=_new_producer)


def new_id() -> bytes:
    """A time-ordered UUID (version 7): a producer's ids increase, and the store indexes
    those of one millisecond with one entry."""
    ms = time.time_ns() // 1_000_000
    bits = (ms << 80) | _id_prefix | (next(_id_counter) & _COUNTER_MASK)
    return bits.to_bytes(16, "big")


def new_event(event_type: str, data: bytes = b"", *, metadata: dict[str, str] | None = None,
              content_type: str = "", event_id: bytes | None = None) -> pb.ProposedEvent:
    event = pb.ProposedEvent(id=event_id or new_id(), type=event_type, data=data)
    # Set only when given: even an empty map costs a microsecond to assign.
    if metadata:
        event.metadata.update(metadata)
    if content_type:
        event.content_type = content_type
    return event


_IN_DOUBT = ("append not confirmed before the timeout; its outcome is unknown: retry with "
             "the same event ids")
_APPENDED_NOTHING = ("this call appended nothing (an earlier append of the same event ids "
                     "may have been: retry with them)")

# How gRPC fails a call it never sent anywhere (wait_for_ready off, retries off): no
# address of the target could be connected to (refused; closed or reset before the HTTP/2
# handshake ended, as a TLS port does to plaintext; a failed TLS handshake), or its name
# does not resolve. A call that had a connection fails with what ended that instead.
_NEVER_CONNECTED = ("failed to connect to all addresses", "errors resolving ",
                    "DNS resolution failed")


def never_sent(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed before any of it left this process (see _NEVER_CONNECTED)."""
    return (exc.code() == grpc.StatusCode.UNAVAILABLE
            and (exc.details() or "").startswith(_NEVER_CONNECTED))


class AppendError(Exception):
    """An append the store refused. `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str, actual_last_revision: int = 0,
                 leader: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.actual_last_revision = actual_last_revision
        self.leader = leader


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """The subscription has delivered everything committed when it caught up."""

    position: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A filtered subscription has looked at every event up to `position`."""

    position: int


@dataclass(frozen=True, slots=True)
class RawBatch:
    """A batch of events as the server sent it (``subscribe(raw=True)``): the serialized
    message ``data``, whose RecordBatch fields start at byte ``start`` (parse them with
    ``pb.RecordBatch.FromString(data[start:])``, or read them where they lie: the engine's
    consumer does, engine.consumer.Consumer.on_raw_batch), and its first and last
    events' positions."""

    data: bytes
    start: int
    first_position: int
    last_position: int

    def parsed(self) -> pb.RecordBatch:
        return pb.RecordBatch.FromString(self.data[self.start:])


SubscriptionItem = pb.RecordedEvent | pb.RecordBatch | RawBatch | CaughtUp | Checkpoint


@dataclass(slots=True)
class _Pending:
    """One append of a caller, until answered. Its request is built only when its
    message is: appends of one stream may then be merged (StoreClient._coalesce)."""

    stream: str
    proposed: list[pb.ProposedEvent]
    expected: int
    expected_revision: int
    future: asyncio.Future[pb.AppendResponse]
    deadline: float
    # The caller's span context when tracing: the message span's parent or link.
    caller: Any = None
    events: int = 1  # len(proposed)
    size: int = 0  # their serialized bytes, as the store counts them against its limits
    # Sent as an append of its own from now on: a merged append that held it was refused
    # for what one of its appends holds (each then gets its own answer).
    solo: bool = False
    # Where the message being sent holds it (StoreClient._coalesce): the index of its
    # append, and the events of other callers' appends merged before and after it.
    slot: int = 0
    before: int = 0
    after: int = 0
    # An attempt of it ended in a way that may have written it (a stream broken or stuck
    # with it in flight): at its deadline its outcome is unknown.
    maybe_written: bool = False
    # The target and transport error of the latest attempt that never left this process
    # (never_sent), and when the first such attempt failed: an append whose attempts all
    # ended so is known not to be written.
    unreached: str = ""
    unreached_at: float = 0.0
    # The refusal of the latest attempt that a node refused before running any of it
    # (xdc-not-run, or shed by a tier): like an attempt never sent, it wrote nothing.
    not_run: AppendError | None = None


# A refusal to retry after: (code, message, actual last revision, leader hint, backoff s).
_Refusal = tuple[grpc.StatusCode, str, int, str, float]

# An accepted append's result, read once for all the appends merged into it: (its answer,
# first position, last revision, duplicate).
_Outcome = tuple[pb.AppendResponse, int, int, bool]
_AppendResponse = pb.AppendResponse
_SubscribeResponse = pb.SubscribeResponse
# Subscribe with its answers left as bytes (subscribe(raw=True)).
_SUBSCRIBE = "/xdc.v1.EventStore/Subscribe"
_SUBSCRIBE_REQUEST = pb.SubscribeRequest.SerializeToString
_ProposedEvent = pb.ProposedEvent


def _outcomes(results: Sequence[pb.AppendResult]) -> list[_Outcome | None]:
    """The results of one message, each read once (None: refused). Reading a repeated
    field's element, or a field of it, makes a new wrapper each time: read per caller's
    append instead (a merged append answers many), settling took 1.9x as long (1.44 vs
    0.77 us an append: 128 single-event appends to 16 streams a message)."""
    out: list[_Outcome | None] = []
    for result in results:
        if result.WhichOneof("result") == "ok":
            ok = result.ok
            out.append((ok, ok.first_position, ok.last_revision, ok.duplicate))
        else:
            out.append(None)
    return out

log = logging.getLogger("xdc.client")

# How long a node that failed a stream (down, unreachable) is passed over by rotation
# and its name in other nodes' leader hints ignored: about one failover's span.
UNREACHABLE_S = 1.0

# The least time between two sweeps for appends past their deadline (StoreClient._expire):
# the latest an append fails after its timeout when many expire one after another (behind
# a paused node), which each cost a pass over every append unanswered.
EXPIRY_SWEEP_S = 0.02

# Answers of one message settled between two yields to the loop (StoreClient._settle_all).
# Single-event appends, 256 in flight: 128 took 44.4k -> 50.3k events/s (medians of 5
# alternated runs); 64 made more, smaller messages and cost the server more than it won.
SETTLE_SLICE = 128

# An append that no attempt has brought to a node is not tried again when the attempt
# would start within this of its deadline (after the backoff): an attempt still under
# way at the deadline would make its outcome unknown, one failing to connect takes a
# millisecond or a round trip.
LAST_ATTEMPT_S = 0.1

# How long close() waits for the tasks it cancelled (and the blocking Client for those
# left on its loop, gRPC's own) to end: they end at their next step, within milliseconds.
CLOSE_WAIT_S = 1.0


def shed_wait_s(exc: grpc.aio.AioRpcError) -> float | None:
    """For a call a degradation tier refused before it ran (trailing xdc-shed-reason):
    how long the server asks to wait before retrying. None for any other error."""
    md = dict(exc.trailing_metadata() or ())
    if MD_SHED_REASON not in md:
        return None
    try:
        return max(0.01, int(md.get(MD_RETRY_AFTER_MS, "100")) / 1000)
    except ValueError:
        return 0.1


def channel_options(limits: Limits | None = None) -> list[tuple[str, Any]]:
    """Options of every channel xdc opens (clients, peers, tools).

    Each channel gets its own subchannels: with gRPC's process-wide pool, a node that was
    down leaves a subchannel in reconnect backoff that makes every new channel to the
    restarted node fail fast for up to the backoff; and the backoff is capped at a
    second, since a failover is measured in seconds.

    gRPC reads min_reconnect_backoff_ms as the least time a connection attempt (TCP,
    TLS, the server's HTTP/2 settings) is given. At 100 ms, a server whose process was
    not scheduled for a tenth of a second (a busy machine), or a TLS handshake over a
    WAN, failed the attempt, and every call on the channel then failed at once with
    UNAVAILABLE ("connection attempt timed out before receiving SETTINGS frame"),
    whatever its timeout. A refused connection still fails at once."""
    limits = limits or Limits()
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.enable_retries", 0),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 1000),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def _fail_closed(appends: Iterable[_Pending]) -> None:
    for p in appends:
        if not p.future.done():
            p.future.set_exception(AppendError(grpc.StatusCode.CANCELLED, "client closed"))


def _out_of_protocol(resp: pb.AppendStreamResponse,
                     inflight: collections.deque[tuple[int, list[_Pending], float, int]]) -> str:
    """What is wrong with an AppendStream answer, given the messages in flight ("" if
    nothing): answers come in order, one result per append sent."""
    if not inflight:
        return f"an answer (correlation id {resp.correlation_id}) to no message"
    cid, _, _, appends = inflight[0]
    if resp.correlation_id != cid:
        return f"correlation id {resp.correlation_id} where {cid} was next"
    if len(resp.results) != appends:
        return f"{len(resp.results)} results for the {appends} appends of message {cid}"
    return ""


def _bad_request(stream: object, expected: object, expected_revision: object,
                 events: list[Any]) -> str:
    """Why an append cannot even be built into a message ("" if it can): refused by the
    client, alone (in a message with others' appends it would fail them all)."""
    if type(stream) is not str:
        return f"stream: a str, not {type(stream).__name__}"
    if not stream.isascii():
        try:
            stream.encode()
        except UnicodeEncodeError as exc:
            return f"stream: not encodable as UTF-8 ({exc.reason} at {exc.start})"
    if type(expected) is not int or not -(1 << 31) <= expected < 1 << 31:
        return f"expected: an ExpectedKind (an int32), not {expected!r}"
    if type(expected_revision) is not int or not 0 <= expected_revision < 1 << 64:
        return (f"expected_revision: {expected_revision!r} is not a revision (an int in "
                f"0..2^64-1)")
    for i, e in enumerate(events):
        if type(e) is not _ProposedEvent:
            return f"events[{i}]: a ProposedEvent, not {type(e).__name__}"
    return ""


def _refused_now(loop: asyncio.AbstractEventLoop, why: str) -> asyncio.Future[Any]:
    """The future of an append refused by the client, alone and at once, with the
    INVALID_ARGUMENT the node would answer: it appended nothing."""
    fut = loop.create_future()
    fut.set_exception(AppendError(grpc.StatusCode.INVALID_ARGUMENT, why))
    return fut


def _new_ids(ids: list[set[bytes] | None], k: int, first: _Pending, p: _Pending) -> bool:
    """Whether none of the event ids of `p` is in group `k` yet (whose first append is
    `first`); if so they are now. A group's ids are collected once a second append
    joins it."""
    held = ids[k]
    if held is None:
        held = ids[k] = {e.id for e in first.proposed}
    new = [e.id for e in p.proposed]
    if not held.isdisjoint(new):
        return False
    held.update(new)
    return True


class StoreClient:
    def __init__(self, targets: str | Sequence[str], *, linger_s: float = 0.0,
                 max_batch_appends: int = 1024, max_inflight_messages: int = 32,
                 timeout_s: float = 10.0, attempt_timeout_s: float = 2.0,
                 limits: Limits | None = None, tier: str = "",
                 tls: Tls | None = None, token: str = "",
                 connect_timeout_s: float | None = None) -> None:
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        assert self.targets, "at least one target address"
        assert max_batch_appends >= 1 and max_inflight_messages >= 1 and linger_s >= 0
        self.linger_s = linger_s
        self.max_batch_appends = max_batch_appends
        self.max_inflight_messages = max_inflight_messages
        self.timeout_s = timeout_s
        # An AppendStream message unanswered for this long means the node is stuck
        # (paused, cut off, lost its quorum without noticing): the stream is dropped and
        # its appends re-sent elsewhere, with the same ids.
        self.attempt_timeout_s = attempt_timeout_s
        # An append none of whose attempts could connect anywhere (refused, TLS handshake
        # failed, name not resolved) is retried until shortly before its timeout, as
        # through a failover, then fails with UNAVAILABLE "not sent". With this, it
        # fails so once it has failed to connect for this long: short-lived tools (the
        # CLI) fail fast on a wrong address or port, as a read does.
        self.connect_timeout_s = connect_timeout_s
        self.limits = limits or Limits()
        # The most events and bytes one merged append holds (_coalesce): this client's
        # limits, cut to the node's once its NodeInfo is known (``_merge_limits_of``).
        self._merge_limits = (self.limits.max_append_events, self.limits.max_append_bytes)
        self._merge_limits_of = ""
        # The most appends one message holds: this client's, cut to the node's.
        self._message_appends = max_batch_appends
        self.tls = tls
        # The criticality of this client's reads and subscriptions (a tier or service
        # name of the tier file, e.g. "engine"): servers shed them by it when degraded.
        # With `token`, every call authenticates as its principal (store/auth.py). Appends
        # and NodeInfo carry only that: the tier names what a client reads.
        self.auth_metadata = bearer(token)
        self.metadata: tuple[tuple[str, str], ...] = (
            ((MD_TIER, tier),) if tier else ()) + self.auth_metadata
        self._target = self.targets[0]
        # The member the latest subscription call went to ("" before any): an engine
        # watches whether that member has a leader (engine/runner.py).
        self.subscribed_to = ""
        # Targets that failed us (transport error, no leader hint), until this loop time.
        self._unreachable: dict[str, float] = {}
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.EventStoreStub | None = None
        self._pending: list[_Pending] = []
        self._flush_handle: asyncio.Handle | None = None
        # (correlation id, appends, send time, number of appends sent once merged:
        # StoreClient._coalesce) of each message awaiting its answer.
        self._inflight: collections.deque[tuple[int, list[_Pending], float, int]] = (
            collections.deque())
        self._watchdog: asyncio.Task[None] | None = None
        self._outbox: collections.deque[list[_Pending]] = collections.deque()
        # Appends to send again (a stream reset, a refusal with a hint), in the order
        # they were first sent: the sender takes them before anything in `_outbox`.
        self._retrying: collections.deque[list[_Pending]] = collections.deque()
        # While it runs (a backoff, a move to another node), the sender sends nothing:
        # appends made meanwhile must not overtake the ones being retried.
        self._hold: asyncio.Task[None] | None = None
        self._outbox_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        # The batch the sender took last: between its queue and `_inflight` (waiting for
        # a free slot) it is nowhere else a sweep for expired appends would find it.
        self._sending: list[_Pending] = []
        # One timer for every append's deadline (no timer per append on the hot path): it
        # fires at `_expiry_at`, never later than the earliest deadline of an unanswered
        # append (_expire), so an append blocked anywhere in the client fails by its own.
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        # Set on every answer and every reset: the sender waits on it for a free slot.
        self._slot_free = asyncio.Event()
        self._call: Any = None
        # The timeout scope of the sender's write in progress (always on the current
        # call): a reset expires it at once (a write on a discarded call can hang until
        # the timeout).
        self._write_scope: asyncio.Timeout | None = None
        self._write_abandoned = False
        self._receiver: asyncio.Task[None] | None = None
        self._cids = itertools.count(1)
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        # CLIENT span of each AppendStream message in flight, by correlation id (tracing).
        self._spans: dict[int, Span] = {}

    # ---- connection ---------------------------------------------------------------

    def _open_channel(self, target: str) -> grpc.aio.Channel:
        return aio_channel(target, self.tls, options=channel_options(self.limits),
                           interceptors=telemetry.client_interceptors())

    @property
    def stub(self) -> pb_grpc.EventStoreStub:
        if self._stub is None:
            self._channel = self._open_channel(self._target)
            self._stub = pb_grpc.EventStoreStub(self._channel)
        return self._stub

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the current target (other services of the same node: health)."""
        self.stub  # noqa: B018 (opens it)
        assert self._channel is not None
        return self._channel

    def _next_target(self, target: str) -> str:
        """The target after `target`, skipping those that just failed us (unless all
        did)."""
        i = self.targets.index(target) if target in self.targets else -1
        ring = [self.targets[(i + k) % len(self.targets)] for k in range(1, len(self.targets) + 1)]
        return next((t for t in ring if not self._is_unreachable(t)), ring[0])

    def _is_unreachable(self, target: str) -> bool:
        until = self._unreachable.get(target)
        return until is not None and until > asyncio.get_running_loop().time()

    async def _switch(self, leader: str = "") -> None:
        """Drops the channel; the next call connects to `leader` or the next target."""
        if leader:
            self._target = leader
        elif len(self.targets) > 1:
            self._target = self._next_target(self._target)
        await self._reset_stream()
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None

    async def close(self) -> None:
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        _fail_closed(self._pending)
        self._pending = []
        # The sender fails the batch it holds, if it had not sent it (_unsent).
        if self._sender is not None:
            self._sender.cancel()
        for t in [*self._tasks, self._hold]:
            if t is not None:
                t.cancel()
        for queue in (self._retrying, self._outbox):
            for batch in queue:
                _fail_closed(batch)
            queue.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
        tasks = {t for t in (self._sender, self._hold, self._watchdog, self._receiver,
                             *self._tasks) if t is not None}
        await self._reset_stream(AppendError(grpc.StatusCode.CANCELLED, "client closed"))
        if self._channel is not None:
            await self._channel.close()
        # Cancelled above, they end at their next step: returning before would leave them
        # pending, and a loop closed right after (the blocking Client's, a CLI command's)
        # says "Task was destroyed but it is pending!" for each at exit.
        tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- appends ------------------------------------------------------------------

    async def append(self, stream: str, events: pb.ProposedEvent | Iterable[pb.ProposedEvent],
                     expected: int = ANY, expected_revision: int = 0,
                     timeout_s: float | None = None) -> pb.AppendResponse:
        """Appends events to one stream atomically; returns once committed. Raises
        AppendError when refused (wrong expected revision, invalid input, ...), and
        DEADLINE_EXCEEDED when not answered within `timeout_s` (default: the client's),
        however the attempt is stuck: the outcome is then unknown, and a retry with the
        same event ids resolves it. When no attempt can have reached a node (each failed
        to connect: refused, TLS handshake failed, name not resolved), the outcome is
        known instead: it fails with UNAVAILABLE "append not sent", naming the target and
        the transport's error: this call appended nothing (an earlier call with the same
        event ids, whose outcome was unknown, may have). Such an append is retried until
        shortly before its timeout (LAST_ATTEMPT_S), as through a failover, or until
        `connect_timeout_s`."""
        fut = self.append_nowait(stream, events, expected, expected_revision, timeout_s)
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                return await fut
        except TimeoutError:
            raise AppendError(grpc.StatusCode.DEADLINE_EXCEEDED, _IN_DOUBT) from None

    def append_nowait(self, stream: str,
                      events: pb.ProposedEvent | Iterable[pb.ProposedEvent],
                      expected: int = ANY, expected_revision: int = 0,
                      timeout_s: float | None = None) -> asyncio.Future[pb.AppendResponse]:
        """Queues an append and returns its future at once (a producer's `send`): many
        appends in flight from one task, each answered in order of its stream. The future
        fails by `timeout_s` at the latest, as `append` does: DEADLINE_EXCEEDED (outcome
        unknown), or UNAVAILABLE "append not sent"."""
        if isinstance(events, _ProposedEvent):
            events = [events]
        elif not isinstance(events, list):
            events = list(events)
        loop = asyncio.get_running_loop()
        n = len(events)
        if (type(stream) is not str or not stream.isascii() or type(expected) is not int
                or type(expected_revision) is not int or not 0 <= expected_revision < 1 << 64
                or not -(1 << 31) <= expected < 1 << 31
                or (type(events[0]) is not _ProposedEvent if n == 1 else
                    any(type(e) is not _ProposedEvent for e in events))):
            why = _bad_request(stream, expected, expected_revision, events)
            if why:
                return _refused_now(loop, why)
        if self._closed:
            raise AppendError(grpc.StatusCode.CANCELLED, "client closed")
        future = loop.create_future()
        pending = _Pending(stream, events, expected, expected_revision, future,
                           loop.time() + (self.timeout_s if timeout_s is None else timeout_s),
                           telemetry.current_span_context(), n,
                           events[0].ByteSize() if n == 1 else
                           sum([e.ByteSize() for e in events]))
        most_events, most_bytes = self._merge_limits
        if n > most_events or pending.size > most_bytes:
            # Over the node's limits (its own once known), as the node would refuse it:
            # sent, it would not even fit in a gRPC message (max_message_bytes), and
            # gRPC would fail the whole call, and every append in flight on it.
            return _refused_now(loop, f"events: {n} events exceeds max_append_events "
                                      f"({most_events})" if n > most_events else
                                f"events: {pending.size} bytes in all exceeds "
                                f"max_append_bytes ({most_bytes})")
        # Queued for the next message (no method call per append: this is the producer's
        # hot path).
        queue = self._pending
        queue.append(pending)
        if pending.deadline < self._expiry_at:  # rare: deadlines mostly come in order
            self._expire_at(pending.deadline)
        if len(queue) >= self.max_batch_appends:
            self._schedule_flush(0.0)
        elif self._flush_handle is None:
            self._schedule_flush(self.linger_s)
        return future

    def _expire_at(self, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = when
        self._expiry = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        """Fails with DEADLINE_EXCEEDED (outcome unknown) every unanswered append past its
        deadline, wherever it waits: queued, held by the sender, in flight on a stream
        that says nothing (a paused node: the watchdog notices only after
        ``attempt_timeout_s``), or waiting out a backoff. Elsewhere deadlines are looked
        at only where appends are retried. A pass over all of them, but only once a
        deadline is reached: then arms itself for the earliest deadline left.

        An expired append is still sent if it was not yet: its caller was told the
        outcome is unknown, and a retry with the same ids is answered with the original
        positions whichever attempt lands first."""
        self._expiry, self._expiry_at = None, math.inf
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = math.inf
        for batch in (self._pending, self._sending, *self._outbox, *self._retrying,
                      *[m[1] for m in self._inflight]):
            for p in batch:
                if p.future.done():
                    continue
                if p.deadline <= now:
                    p.future.set_exception(AppendError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                       _IN_DOUBT))
                elif p.deadline < earliest:
                    earliest = p.deadline
        if earliest < math.inf and not self._closed:
            self._expire_at(max(earliest, now + EXPIRY_SWEEP_S))

    def _expired(self, p: _Pending, refusal: AppendError | None = None) -> AppendError:
        """What an append given up on (_retry: its deadline, its connect timeout) fails
        with, once its attempt has ended: DEADLINE_EXCEEDED (outcome unknown) if an
        attempt may have written it; else the store's `refusal` it was to be retried
        after; else the refusal of a node that refused its call before running any of it
        (`not_run`); else, when every attempt failed to connect anywhere, UNAVAILABLE
        "not sent". In the last two cases it is not sent again: this call appended
        nothing, which the message says, with the caveat that an earlier call with the
        same event ids may have."""
        if not p.maybe_written:
            if refusal is not None:
                return refusal
            if p.not_run is not None:
                return AppendError(p.not_run.code, f"{p.not_run.message}; {_APPENDED_NOTHING}",
                                   leader=p.not_run.leader)
            if p.unreached:
                return AppendError(grpc.StatusCode.UNAVAILABLE,
                                   f"append not sent: no connection to {p.unreached}; "
                                   f"{_APPENDED_NOTHING}")
        return AppendError(grpc.StatusCode.DEADLINE_EXCEEDED, _IN_DOUBT)

    def _schedule_flush(self, delay: float) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        loop = asyncio.get_running_loop()
        if delay <= 0:
            self._flush_handle = loop.call_soon(self._flush)
        else:
            self._flush_handle = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._pending:
            return
        batch, self._pending = self._cut(self._pending)
        self._outbox.append(batch)
        self._kick()
        if self._pending:
            self._schedule_flush(0.0)

    def _cut(self, appends: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """(the first message's appends, the rest): at most the appends a message may
        hold, and at most the bytes one append may (the node's message limit is that plus
        room for framing); at least one append."""
        most, budget = self._message_appends, self._merge_limits[1]
        n = size = 0
        for p in appends:
            size += p.size
            if n and (n == most or size > budget):
                break
            n += 1
        return appends[:n], appends[n:]

    def _kick(self) -> None:
        self._outbox_ready.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    async def _send_loop(self) -> None:
        """The only task that writes to the AppendStream call (gRPC allows one write at
        a time), so messages leave in the order appends were made."""
        while not self._closed:
            hold = self._hold
            if hold is not None and not hold.done():
                await asyncio.wait([hold])  # its outcome is not ours to raise
                continue
            if self._retrying:
                batch = self._retrying.popleft()
            elif self._outbox:
                batch = self._outbox.popleft()
            else:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            self._sending = batch
            call = None
            try:
                if self._call is None:
                    log.debug("append stream to %s opened", self._target)
                    if self._merge_limits_of != self._target:
                        # In a context of its own: not a span of the caller whose
                        # append opened the stream.
                        self._spawn(self._learn_limits(self._target), contextvars.Context())
                    self._call = self.stub.AppendStream(metadata=self.auth_metadata)
                    self._receiver = asyncio.get_running_loop().create_task(
                        self._receive(self._call))
                    if self._watchdog is None or self._watchdog.done():
                        self._watchdog = asyncio.get_running_loop().create_task(
                            self._watch_stream())
                call = self._call
                while (len(self._inflight) >= self.max_inflight_messages
                       and call is self._call):
                    self._slot_free.clear()
                    await self._slot_free.wait()
                if call is not self._call:  # reset while we waited for a slot
                    raise _StreamBroken()
                cid = next(self._cids)
                msg = pb.AppendStreamRequest(correlation_id=cid)
                self._coalesce(batch, msg.appends.add)
                if telemetry.tracing():
                    self._trace_message(msg, batch)
                self._inflight.append((cid, batch, asyncio.get_running_loop().time(),
                                      len(msg.appends)))
                # Bounded: a write on a call whose channel went away can wait forever.
                # (A timeout scope, not wait_for: no task per message on the hot path.)
                self._write_abandoned = False
                async with asyncio.timeout(self.attempt_timeout_s) as scope:
                    self._write_scope = scope
                    try:
                        await call.write(msg)
                    finally:
                        self._write_scope = None
            except asyncio.CancelledError:
                if not cancelled_by_channel():  # close() cancels this task
                    if not any(m[1] is batch for m in self._inflight):
                        self._unsent(batch)  # taken from its queue, not sent: only we hold it
                    raise
                # gRPC's, for a call cancelled under the write: a broken stream like any
                self._after_write_error(batch, call)
            except TimeoutError:
                if self._write_abandoned:
                    # The call was reset under the write; the reset re-queued this batch
                    # with the rest of what was in flight on it.
                    self._write_abandoned = False
                elif call is not None and call is self._call:
                    await self._switch()  # re-sends everything in flight, this batch too
                else:
                    self._write_failed(batch, True)
            except Exception:
                self._after_write_error(batch, call)

    def _after_write_error(self, batch: list[_Pending], call: Any) -> None:
        """Whatever broke the stream: the receiver of the live stream re-queues what is in
        flight on it, as a reset under the write did; anything else is re-queued here."""
        if self._write_abandoned:  # the reset re-queued this batch with the rest
            self._write_abandoned = False
            return
        in_flight = any(m[1] is batch for m in self._inflight)
        if not (in_flight and call is not None and call is self._call):
            self._write_failed(batch, in_flight)

    def _write_failed(self, batch: list[_Pending], in_flight: bool) -> None:
        """A batch whose write failed off the live stream: out of the in-flight list, and
        sent again."""
        if in_flight:
            self._inflight = collections.deque(m for m in self._inflight if m[1] is not batch)
            for p in batch:  # its write may have gone out
                p.maybe_written = True
        self._end_orphan_spans()
        self._retry(batch, None)

    def _coalesce(self, batch: list[_Pending], add: Any) -> None:
        """Builds a message's appends with ``add`` (its repeated field's ``add``), and
        notes in each caller's append where the message holds it (``slot``, ``before``,
        ``after``).

        Appends to one stream with ``expected=ANY`` go as one append (Kafka's record batch
        per partition): the store's work per append (validation, sequencing, an answer)
        is then paid once for all of them. Measured with `xdc bench store` (256 single
        events in flight over 16 streams, 128 per message): ~1.5x the events/s, half the
        latency. Each caller's positions and revisions are its share of the merged
        answer, as they would have been appended one after the other.

        A merged append stops where an append to its stream with another expectation
        comes (that one checks the stream as the appends before it left it), at the
        store's limits, and before an event id it holds already (a retry sent while its
        first attempt is in flight: one append cannot hold an id twice). If the store
        refuses a merged append for what it holds (invalid, an id reused, not allowed),
        nothing of it was written and each of its appends is sent again alone, for its
        own answer; appends made after them to that stream may then land first. A
        producer that needs its appends in a strict order sends them with expected
        revisions, which are never merged."""
        groups: list[list[_Pending]] = []
        loads: list[list[int]] = []  # events and bytes of each group
        ids: list[set[bytes] | None] = []  # of each group, once a second append joins it
        open_groups: dict[str, int] = {}  # stream -> index of the group appends may join
        max_events, max_bytes = self._merge_limits
        # An id twice in one message is rare (a retry queued while its first attempt
        # still is): when the batch has none, no group needs its ids kept.
        every_id = [e.id for p in batch for e in p.proposed]
        repeats = len(set(every_id)) != len(every_id)
        for p in batch:
            if p.expected == ANY and not p.expected_revision and not p.solo and p.events:
                # (An append of no event goes alone: the store refuses it.)
                k = open_groups.get(p.stream)
                if k is not None:
                    load = loads[k]
                    if (load[0] + p.events <= max_events and load[1] + p.size <= max_bytes
                            and (not repeats or _new_ids(ids, k, groups[k][0], p))):
                        groups[k].append(p)
                        load[0] += p.events
                        load[1] += p.size
                        continue
                open_groups[p.stream] = len(groups)
            else:
                open_groups.pop(p.stream, None)
            groups.append([p])
            loads.append([p.events, p.size])
            ids.append(None)
        for slot, (g, load) in enumerate(zip(groups, loads, strict=True)):
            p = g[0]
            # Defaults left out: each keyword costs a field look-up by name.
            r = (add(stream=p.stream) if p.expected == ANY and not p.expected_revision else
                 add(stream=p.stream, expected=p.expected,
                     expected_revision=p.expected_revision))
            # Built in place (add, extend): an AppendRequest made apart and then put in
            # the message is copied once more.
            if len(g) == 1:
                r.events.extend(p.proposed)
                p.slot, p.before, p.after = slot, 0, 0
                continue
            r.events.extend([e for q in g for e in q.proposed])
            before = 0
            for q in g:
                q.slot, q.before, q.after = slot, before, load[0] - before - q.events
                before += q.events

    async def _learn_limits(self, target: str) -> None:
        """Cuts the merged appends' size to what ``target`` accepts (its NodeInfo), as the
        engine sizes its output appends: a node configured below this client's limits
        would otherwise refuse every full merged append, each costing a round trip more
        (its appends sent again alone); and a message's appends to the node's
        ``max_appends_per_message``. Runs beside the stream: until they are known, the
        limits known before apply (the client's own, or the previous node's). A failure
        leaves them, to be tried on the next open."""
        try:
            info = await self.node_info()  # a closed channel becomes an AioRpcError here
        except Exception as exc:  # unreachable, or the client moved on
            log.debug("limits of %s not read (%r): tried again on the next open", target,
                      exc)
            return
        if target != self._target or not info.HasField("limits"):
            return
        events, size = self.limits.max_append_events, self.limits.max_append_bytes
        if info.limits.max_append_events:
            events = min(events, info.limits.max_append_events)
        if info.limits.max_append_bytes:
            size = min(size, info.limits.max_append_bytes)
        self._message_appends = min(self.max_batch_appends,
                                    info.limits.max_appends_per_message or 1 << 62)
        self._merge_limits, self._merge_limits_of = (events, size), target

    def _trace_message(self, msg: pb.AppendStreamRequest, batch: list[_Pending]) -> None:
        """A CLIENT span for one message, carried in it (the stream's gRPC metadata is
        per call): the server's span for the message is its child. A message that
        coalesces appends of several callers links to each of them instead.
        ``xdc.append.count`` counts the callers' appends, ``xdc.append.sent`` the appends
        the message holds once merged (``_coalesce``): the server span's count."""
        # Comprehensions, not map(attrgetter(...)): reading a slot attribute that way
        # took three times as long, and these passes are most of this span's cost.
        parent, links = telemetry.parent_and_links(
            [p.caller for p in batch if p.caller is not None])
        attrs: dict[str, Any] = {
            telemetry.RPC_SYSTEM: "grpc", telemetry.RPC_SERVICE: "xdc.v1.EventStore",
            telemetry.RPC_METHOD: "AppendStream",
            telemetry.MESSAGING_BATCH_COUNT: sum([p.events for p in batch]),
            "xdc.append.count": len(batch), "xdc.append.sent": len(msg.appends),
            "server.address": self._target}
        telemetry.set_destination(attrs, batch)
        span = telemetry.open_span("xdc.v1.EventStore/AppendStream", context=parent,
                                   links=links, kind=SpanKind.CLIENT, attributes=attrs)
        msg.trace_context.update(telemetry.carrier_of(span))
        self._spans[msg.correlation_id] = span

    def _end_span(self, cid: int, answered: int = 0, refused: int = 0,
                  error: str = "") -> None:
        """Ends a message's span: `answered` appends, `refused` of them refused."""
        span = self._spans.pop(cid, None)
        if span is None:
            return
        if answered:
            span.set_attribute("xdc.append.result", "ok" if not refused else "refused"
                               if refused == answered else "partial")
            if refused:
                span.set_attribute("xdc.append.refused", refused)
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def _end_orphan_spans(self) -> None:
        """Ends the spans of messages no longer in flight (not sent; re-queued)."""
        if self._spans:
            live = {m[0] for m in self._inflight}
            for cid in [c for c in self._spans if c not in live]:
                self._end_span(cid, error="message not sent; appends re-queued")

    async def _watch_stream(self) -> None:
        loop = asyncio.get_running_loop()
        while self._call is not None and not self._closed:
            await asyncio.sleep(self.attempt_timeout_s / 4)
            if self._inflight and loop.time() - self._inflight[0][2] > self.attempt_timeout_s:
                stuck = self._target
                log.warning("append stream to %s unanswered for %.1f s: re-sending %d "
                            "messages elsewhere", stuck, loop.time() - self._inflight[0][2],
                            len(self._inflight))
                await self._switch()  # re-sends what was in flight, to the next node
                if self._target == stuck:
                    await asyncio.sleep(0.1)

    async def _receive(self, call: Any) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            async for resp in call:
                garbled = _out_of_protocol(resp, self._inflight)
                if garbled:
                    await self._left_out_of_protocol(call, garbled)
                    return
                cid, batch, sent, _ = self._inflight.popleft()
                self._slot_free.set()
                telemetry.metrics().client_append_duration.record(
                    asyncio.get_running_loop().time() - sent)
                await self._settle_all(batch, resp.results, cid)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            return
        if self._call is call:
            await self._reset_stream(error=error)

    async def _left_out_of_protocol(self, call: Any, what: str) -> None:
        """A node answering out of protocol (a bug, or not an xdc node) is a failed node:
        its stream is dropped and what is in flight on it is sent again, elsewhere if
        there is an elsewhere, else to it until the appends' deadlines."""
        log.error("append stream to %s answered out of protocol (%s): re-sending %d "
                  "messages", self._target, what, len(self._inflight))
        self._unreachable[self._target] = asyncio.get_running_loop().time() + UNREACHABLE_S
        if self._call is call:
            await self._switch()

    async def _settle_all(self, batch: list[_Pending], results: Sequence[pb.AppendResult],
                          cid: int = 0) -> None:
        """Settles a message's appends in order, SETTLE_SLICE at a time with a yield to
        the loop between slices: a producer whose window the message filled is woken by
        the first slice and sends its next appends while the server still works, instead
        of after all are settled (one message in flight, client and server taking turns).
        The next message's answers wait for these: futures resolve in order. Then the
        message's span (`cid`) ends, with the count of refusals met while settling.

        The appends to send again go back together once the whole message is settled,
        so they stay in order, ahead of the messages sent after this one (_retry)."""
        done = refused = 0
        again: list[tuple[_Pending, _Refusal | None]] = []
        outcomes = _outcomes(results)
        try:
            while done < len(batch):
                if done:
                    await asyncio.sleep(0)
                end = done + SETTLE_SLICE
                refused += self._settle(batch[done:end], results, outcomes, again)
                done = end
        finally:  # cancelled (the client closes): the rest were answered all the same
            if done < len(batch):
                refused += self._settle(batch[done:], results, outcomes, again)
            # Consecutive appends refused alike go back as one batch.
            for refusal, group in itertools.groupby(again, key=lambda a: a[1]):
                appends = [a[0] for a in group]
                if refusal is None:  # a merged append refused: each alone, no backoff
                    self._requeue(appends)
                else:
                    code, message, actual, leader, delay_s = refusal
                    self._retry(appends, AppendError(code, message, actual, leader), delay_s)
            if self._spans:
                self._end_span(cid, len(batch), refused)

    def _settle(self, appends: list[_Pending], results: Sequence[pb.AppendResult],
                outcomes: list[_Outcome | None],
                again: list[tuple[_Pending, _Refusal | None]]) -> int:
        """Answers each append from the result of the append that held it (its share,
        when merged with others: ``_coalesce``), or adds it to ``again`` (with the refusal
        to retry it after, None to send it again alone at once); returns how many the
        store refused. ``outcomes``: the results as ``_outcomes`` read them."""
        refused = 0
        for p in appends:
            outcome = outcomes[p.slot]
            if outcome is None:
                refused += 1
                self._refused(p, results[p.slot].error, again)
                continue
            future = p.future
            if future.done():
                continue
            before, after = p.before, p.after
            if not (before or after):
                future.set_result(outcome[0])
                continue
            first = outcome[1] + before
            rev = outcome[2] - after
            answer = _AppendResponse(first_position=first, last_position=first + p.events - 1,
                                     last_revision=rev, next_revision=rev + 1)
            if outcome[3]:
                answer.duplicate = True
            future.set_result(answer)
        return refused

    def _refused(self, p: _Pending, err: pb.AppendError,
                 again: list[tuple[_Pending, _Refusal | None]]) -> None:
        """An append the store refused: failed, or added to ``again`` as _settle says."""
        if p.future.done():
            return
        merged = p.before or p.after
        code = _CODES.get(err.code, grpc.StatusCode.UNKNOWN)
        if err.retry_after_ms or err.leader:
            again.append((p, (code, err.message, err.actual_last_revision, err.leader,
                              err.retry_after_ms / 1000)))
        elif not merged:
            p.future.set_exception(AppendError(code, err.message, err.actual_last_revision,
                                               err.leader))
        else:
            # Refused for what one of the merged appends holds: nothing of it was written.
            if not p.before:
                log.debug("merged append to %r refused (%s): its appends are sent again "
                          "one by one", p.stream, err.message)
            p.solo = True
            again.append((p, None))

    def _requeue(self, appends: list[_Pending]) -> None:
        """Sends appends again at once, before any made after them."""
        if self._closed:
            _fail_closed(appends)
            return
        while appends:
            batch, appends = self._cut(appends)
            self._retrying.append(batch)
        self._kick()

    def _unsent(self, batch: list[_Pending]) -> None:
        """A batch the sender took and did not send: first to go, or failed if closing."""
        if self._closed:
            _fail_closed(batch)
        else:
            self._retrying.appendleft(batch)

    def _retry(self, batch: list[_Pending], cause: AppendError | None,
               delay_s: float = 0.05, in_doubt: bool = False) -> None:
        """Re-sends appends, with the same event ids, after a backoff (and a move to
        another node when the cause says so): before anything made after them, and
        nothing is sent until the backoff is over (``_hold``). One past its deadline
        fails as _expired says: with the cause (a refusal) unless the appends were cut
        off in flight (`in_doubt`), else DEADLINE_EXCEEDED.

        One known not written (every attempt failed to connect: _expired answers "not
        sent") fails once its connect timeout has passed, or, so that no attempt of it
        is under way at its deadline (which would leave its outcome unknown), once
        another attempt could not end before the deadline: up to `delay_s` +
        LAST_ATTEMPT_S early."""
        if self._closed:  # not the refusal: the caller must learn its client closed
            _fail_closed(batch)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        again = []
        for p in batch:
            if p.future.done():
                continue
            end = p.deadline
            if (p.unreached or p.not_run is not None) and not p.maybe_written:
                end -= delay_s + LAST_ATTEMPT_S
                # (Only while no node was reached: one that refused it was.)
                if p.unreached and p.not_run is None and self.connect_timeout_s is not None:
                    end = min(end, p.unreached_at + self.connect_timeout_s)
            if now >= end:
                p.future.set_exception(self._expired(p, None if in_doubt else cause))
            else:
                again.append(p)
        if not again:
            return
        self._requeue(again)
        if self._hold is None or self._hold.done():
            self._hold = loop.create_task(self._recover(cause, self._target, delay_s,
                                                        len(again)))

    async def _recover(self, cause: AppendError | None, failed_on: str, delay_s: float,
                       n: int) -> None:
        """What the sender waits for before it sends the appends a failure put back: a
        backoff, and a move to the leader a refusal named or to another node."""
        leader = cause.leader if cause is not None else ""
        try:
            # A hint at a node that just failed us is stale (followers name the dead
            # leader until they hear of the next): following it would bounce between one
            # follower and the dead node while the others may know better.
            if leader and leader != self._target and not self._is_unreachable(leader):
                log.debug("%d appends refused by %s: following its hint to %s", n,
                          failed_on, leader)
                await self._switch(leader)
            elif len(self.targets) > 1 and self._target == failed_on and leader != failed_on \
                    and (self._is_unreachable(failed_on) or (
                        cause is not None and cause.code == grpc.StatusCode.UNAVAILABLE)):
                # Refused without a hint (this node does not know the leader; another
                # node may), or the node is down: staying would wait out gRPC's reconnect
                # backoff (up to a second per attempt) on a dead address. Not when the
                # hint names this very node: the appends were refused by the one before.
                await asyncio.sleep(delay_s)
                if self._target == failed_on:
                    await self._switch()
                    log.debug("%d appends refused by %s (%s): trying %s", n, failed_on,
                              cause.code.name if cause else "unreachable", self._target)
            else:
                await asyncio.sleep(delay_s)
        except Exception as exc:  # the appends still go, wherever the client is now
            log.warning("after appends were refused by %s: %r", failed_on, exc)

    def _spawn(self, coro: Any, context: contextvars.Context | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reset_stream(self, error: Exception | None = None) -> None:
        if self._inflight or error is not None:
            log.debug("append stream to %s reset (%d messages in flight): %r", self._target,
                      len(self._inflight), error)
        call, self._call = self._call, None
        receiver, self._receiver = self._receiver, None
        inflight = [p for m in self._inflight for p in m[1]]
        self._inflight.clear()
        self._slot_free.set()
        for cid in list(self._spans):
            self._end_span(cid, error=f"stream reset ({error!r}); appends re-sent")
        if call is not None:
            call.cancel()
            if self._write_scope is not None:
                # The sender is inside a write on this call: abandon it now, or appends
                # re-queued to the next node wait behind it for the write timeout.
                self._write_abandoned = True
                self._write_scope.reschedule(asyncio.get_running_loop().time())
        if receiver is not None and receiver is not asyncio.current_task():
            receiver.cancel()
        if isinstance(error, AppendError):
            for p in inflight:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        cause = None
        md: dict[str, Any] = {}
        if isinstance(error, grpc.aio.AioRpcError):
            md = dict(error.trailing_metadata() or ())
            # What the node refuses of a whole call (a message over its limits) ran none
            # of what is in flight; an error the call met (UNKNOWN: the handler failed;
            # INTERNAL: gRPC did) may come after appends were written: those are in
            # doubt, sent again with the same ids, as after a broken stream.
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                for p in inflight:
                    if not p.future.done():
                        p.future.set_exception(AppendError(error.code(), error.details() or ""))
                return
            cause = AppendError(error.code(), error.details() or "", leader=md.get(MD_LEADER, ""))
            if not cause.leader:  # the node itself failed us (down, unreachable, stuck)
                self._unreachable[self._target] = (asyncio.get_running_loop().time()
                                                   + UNREACHABLE_S)
        # The node refused the call before running any of it (shed by a tier, a voter
        # waiting for its fence): nothing of it was written, as for a call never sent;
        # one past its deadline fails with the refusal (_expired), not as in doubt.
        not_run = bool({MD_NOT_RUN, MD_SHED_REASON} & md.keys())
        if isinstance(error, grpc.aio.AioRpcError) and never_sent(error):
            # The call never reached the node: nothing of it can have been written.
            where, now = f"{self._target} ({error.details()})", asyncio.get_running_loop().time()
            for p in inflight:
                if not p.unreached:
                    p.unreached_at = now
                p.unreached = where
        elif not_run:
            for p in inflight:
                p.not_run = cause
        else:
            for p in inflight:
                p.maybe_written = True
        # Put back before the move below: as refused by this node (not the next), and
        # where the deadline sweep finds them (_expire) whatever the move awaits. Sent,
        # they may have been written: one past its deadline is in doubt, not refused.
        self._retry(inflight, cause, in_doubt=True)
        if cause is not None and not cause.leader and len(self.targets) > 1:
            await self._switch()

    # ---- reads --------------------------------------------------------------------

    async def read_batches(self, stream: str, *, start: int = 0, limit: int | None = 1000,
                           backwards: bool = False, min_position: int = 0,
                           timeout_s: float | None = None) -> AsyncIterator[pb.RecordBatch]:
        """The events of `stream` (or "$all") from revision (position, for "$all")
        `start`, inclusive (0: the start, or the end when `backwards`), in the batches the
        node sends (at most its max_batch_events and max_batch_bytes each): at most
        `limit` events, 1000 by default; None reads to the end, however many there are.

        The node serves at most max_read_count events a request (100,000; this client's
        `limits`): past that the read goes on in further requests, each from where the
        previous one ended, each with `timeout_s` (default: the client's), so memory is
        one batch at a time however long the stream. Raises grpc.aio.AioRpcError:
        NOT_FOUND for a missing stream; UNAVAILABLE when the client moved to another
        node after batches of a request were given out (read on from the last event)."""
        loop = asyncio.get_running_loop()
        page = self.limits.max_read_count
        left = limit
        while True:
            want = page if left is None else min(page, left)
            request = pb.ReadRequest(stream=stream, limit=want, min_position=min_position,
                                     direction=pb.BACKWARDS if backwards else pb.FORWARDS)
            setattr(request, "from", start)
            deadline = loop.time() + (timeout_s or self.timeout_s)
            got = 0
            last: pb.RecordedEvent | None = None
            while True:
                # The caller's span (if any) travels with the call: the server's Read
                # span is its child (the client interceptor covers unary calls only).
                call = self.stub.Read(request, timeout=max(0.001, deadline - loop.time()),
                                      metadata=telemetry.with_trace_context(self.metadata))
                try:
                    async for batch in call:
                        if batch.events:
                            got += len(batch.events)
                            last = batch.events[-1]
                        yield batch
                    break
                except grpc.aio.AioRpcError as exc:
                    # Shed by a degradation tier (before any batch): retry as the server
                    # asks, within the timeout.
                    wait = shed_wait_s(exc)
                    if wait is None or loop.time() + wait >= deadline:
                        raise
                except asyncio.CancelledError:
                    if not cancelled_by_channel():
                        raise
                    # Read again on the new channel, unless batches were already given out.
                    if got or loop.time() >= deadline:
                        raise _moved() from None
                    continue
                await asyncio.sleep(wait)
            if left is not None:
                left -= got
            if last is None or got < want or left == 0:
                return  # the end (as of the node's commit position), or the limit
            start = (last.position if stream == "$all" else last.revision) + (
                -1 if backwards else 1)
            if start == 0:  # backwards past the first event (0 would mean the end)
                return

    async def read(self, stream: str, *, start: int = 0, limit: int | None = 1000,
                   backwards: bool = False, min_position: int = 0,
                   timeout_s: float | None = None) -> list[pb.RecordedEvent]:
        """The events of `stream` (or "$all") from revision (position) `start` (0: the
        start, or the end when backwards), as one list of at most `limit` events: 1000
        by default, so a longer stream is cut there, silently. `limit=None` reads all of
        it, into memory; to go through a long stream one batch at a time, iterate
        `read_batches` (the same arguments). Raises grpc.aio.AioRpcError NOT_FOUND for a
        missing stream."""
        out: list[pb.RecordedEvent] = []
        async for batch in self.read_batches(stream, start=start, limit=limit,
                                             backwards=backwards, min_position=min_position,
                                             timeout_s=timeout_s):
            out.extend(batch.events)
        return out

    async def subscribe(self, *, after_position: int = 0, from_end: bool = False,
                        stream_prefix: str = "", event_types: Sequence[str] = (),
                        batches: bool = False, resume: bool = True, raw: bool = False,
                        ) -> AsyncIterator[SubscriptionItem]:
        """The events after `after_position` (or from the end, with `from_end`) in
        position order: those committed (the catch-up), then live ones as they commit.
        Besides the events (pb.RecordedEvent; whole pb.RecordBatch with `batches`), it
        yields markers, never events, so check each item's type:

        - `CaughtUp(position)`, once: everything committed when it caught up has been
          yielded (live events follow);
        - `Checkpoint(position)`, only when filtered (`stream_prefix`, `event_types`):
          events up to `position` were looked at and skipped, after 10,000 skipped in a
          row, and once caught up at most every 50 ms while skipped events commit. Keep
          it as the point to resume from (`after_position`), as after an event.

        With `resume`, a broken connection is re-established from the last position
        seen, so the caller sees no gap and no repeat (and no second CaughtUp).

        With `raw` (and `batches`), a batch comes as the server sent it, unparsed
        (`RawBatch`), when the server wrote its positions first (store.records
        batch_bytes); any other answer is parsed as without `raw`."""
        assert batches or not raw, "raw subscriptions deliver batches"
        position = after_position
        caught_up_sent = False
        first = True
        # A channel of its own: appends switch the shared channel to the leader (closing
        # the old one cancels every call on it), and a subscription must not die of that.
        # Any member serves a subscription up to its commit position.
        target = self.subscribed_to = self._target
        channel = self._open_channel(target)
        try:
            while True:
                request = pb.SubscribeRequest(after_position=position,
                                              from_end=from_end and first,
                                              stream_prefix=stream_prefix,
                                              event_types=event_types)
                metadata = telemetry.with_trace_context(self.metadata)
                call = (channel.unary_stream(_SUBSCRIBE, _SUBSCRIBE_REQUEST)(
                    request, metadata=metadata) if raw else
                    pb_grpc.EventStoreStub(channel).Subscribe(request, metadata=metadata))
                try:
                    async for msg in call:
                        # From here on a resume starts after `position`: a call that
                        # failed before its first answer said nothing of where the end
                        # is (from_end asks again).
                        first = False
                        if raw:
                            span = batch_span(msg)
                            if span is not None:
                                start, first_position, last_position = span
                                assert first_position > position, "subscription went backwards"
                                position = last_position
                                yield RawBatch(msg, start, first_position, last_position)
                                continue
                            msg = _SubscribeResponse.FromString(msg)
                        kind = msg.WhichOneof("kind")
                        if kind == "events":
                            events = msg.events.events
                            if not events:
                                continue
                            assert events[0].position > position, "subscription went backwards"
                            position = events[-1].position
                            if batches:
                                yield msg.events
                            else:
                                for event in events:
                                    yield event
                        elif kind == "caught_up":
                            position = max(position, msg.caught_up.position)
                            if not caught_up_sent:
                                caught_up_sent = True
                                yield CaughtUp(msg.caught_up.position)
                        elif kind == "checkpoint":
                            position = max(position, msg.checkpoint.position)
                            yield Checkpoint(msg.checkpoint.position)
                    return
                except grpc.aio.AioRpcError as exc:
                    wait = shed_wait_s(exc)  # shed by a tier: resumable, after its hint
                    if not resume or self._closed or (
                            exc.code() != grpc.StatusCode.UNAVAILABLE and wait is None):
                        raise
                    if wait is None and len(self.targets) > 1:
                        # Unreachable: resume at the next member.
                        await channel.close()
                        target = self.subscribed_to = self._next_target(target)
                        channel = self._open_channel(target)
                    await asyncio.sleep(max(0.1, wait or 0.0))
                finally:
                    # A consumer that stops iterating ends the call: the server stops
                    # streaming to it (and stops counting it in the subscription lag gauge).
                    call.cancel()
        finally:
            await channel.close()

    async def stream_info(self, stream: str) -> pb.StreamInfoResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                return await self.stub.StreamInfo(pb.StreamInfoRequest(stream=stream),
                                                  timeout=max(0.001, deadline - loop.time()),
                                                  metadata=self.metadata)
            except grpc.aio.AioRpcError as exc:
                wait = shed_wait_s(exc)  # shed by a degradation tier: retry as asked
                if wait is None or loop.time() + wait >= deadline:
                    raise
            except asyncio.CancelledError:
                if not cancelled_by_channel():
                    raise
                if loop.time() >= deadline:
                    raise _moved() from None
                continue
            await asyncio.sleep(wait)

    async def node_info(self) -> pb.NodeInfoResponse:
        try:
            return await self.stub.NodeInfo(pb.NodeInfoRequest(), timeout=self.timeout_s,
                                            metadata=self.auth_metadata)
        except asyncio.CancelledError:
            if not cancelled_by_channel():
                raise
            raise _moved() from None


# Reads and unary calls share the client's channel with appends. When an append stream
# fails over, the client closes that channel, and grpc.aio cancels every call on it: the
# caller sees asyncio.CancelledError although nobody cancelled its task. Left alone that
# error ends whatever loop made the call (a gateway's tier supervisor died of it).

def cancelled_by_channel() -> bool:
    """Whether a CancelledError just caught came from the call's channel being closed,
    not from a cancellation of the task awaiting it (for any grpc.aio caller)."""
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


def _moved() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        details="the client moved to another node while the call was in flight "
                "(its channel was closed); retry")


class _StreamBroken(Exception):
    pass


class Client:
    """Blocking flavour: the asyncio client on a private event loop thread."""

    def __init__(self, targets: str | Sequence[str], **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="xdc-client",
                                        daemon=True)
        self._thread.start()
        self._async = self._call(self._make(targets, options))

    @staticmethod
    async def _make(targets: str | Sequence[str], options: dict[str, Any]) -> StoreClient:
        return StoreClient(targets, **options)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def append(self, stream: str, events: pb.ProposedEvent | Iterable[pb.ProposedEvent],
               expected: int = ANY, expected_revision: int = 0) -> pb.AppendResponse:
        return self._call(self._async.append(stream, events, expected, expected_revision))

    def read(self, stream: str, **kw: Any) -> list[pb.RecordedEvent]:
        return self._call(self._async.read(stream, **kw))

    def stream_info(self, stream: str) -> pb.StreamInfoResponse:
        return self._call(self._async.stream_info(stream))

    def node_info(self) -> pb.NodeInfoResponse:
        return self._call(self._async.node_info())

    def subscribe(self, **kw: Any) -> Iterator[Any]:
        agen = self._async.subscribe(**kw)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def close(self) -> None:
        try:
            self._call(self._async.close())
            self._call(self._finish_tasks())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    @staticmethod
    async def _finish_tasks() -> None:
        """Lets the tasks still on this loop end before it is closed, as asyncio.run does:
        gRPC's own (a cancelled call's status handler ends once the cancellation comes
        back from its core, a loop iteration or two later), then cancels what is left.
        A loop closed with them pending printed "Task was destroyed but it is pending!"
        at the exit of about one `xdc append` in ten."""
        left = asyncio.all_tasks() - {asyncio.current_task()}
        if left:
            _, left = await asyncio.wait(left, timeout=CLOSE_WAIT_S)
        for t in left:
            t.cancel()
        if left:
            await asyncio.wait(left, timeout=CLOSE_WAIT_S)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
