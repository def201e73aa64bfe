"""The public `xdc.v1.EventStore` gRPC service.

Read and Subscribe send stored records as they lie in the log (store/records.py):
their handlers return serialized bytes and are registered with an identity serializer,
so no record is decoded or re-encoded on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from operator import attrgetter
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from store import auth, records
from store.auth import READ, SUBSCRIBE, Guard, Principal, Rules
from store.errors import StoreError, invalid
from store.limits import Limits
from store.log import Appended, PreparedAppend
from store.node import StoreNode
from store.validation import (
    ALL,
    ScannedAppend,
    check_read,
    check_stream_name,
    check_subscribe,
    prepare,
    prepare_scanned,
    refuse,
    scan_append_stream,
)
from xdc import telemetry
from xdc.v1 import eventstore_pb2 as pb

SERVICE = "xdc.v1.EventStore"
# A filtered subscription reports its position after skipping this many events...
CHECKPOINT_EVERY = 10_000
# ...and, caught up after skipping some, at most this often: a checkpoint for every
# commit (e.g. an engine's own inputs, skipped by a subscriber of its outputs) doubled
# the messages of such a subscriber and added ~1 ms to the latency it saw at 500
# commits/s. The first after a quiet spell goes out at once.
CHECKPOINT_INTERVAL_S = 0.05
# Test failpoint, 0 (off) unless the environment sets it: the AppendStream calls of this
# many messages fail (UNKNOWN, an unexpected error of the handler) once their appends are
# durable, before they are answered: the client cannot tell whether they were written
# (tests/test_client_recovery.py). Read once, at import.
_FAIL_AFTER_COMMIT = [int(os.environ.get("XDC_FAILPOINT_APPEND_FAIL_AFTER_COMMIT", "0"))]

# Span attributes of Read and Subscribe (the rpc.* ones and the stream,
# messaging.destination.name, are the shared ones of xdc/telemetry.py).
PRINCIPAL = "xdc.principal"                   # the caller's principal, when auth is on
READ_DIRECTION = "xdc.read.direction"         # "forwards" or "backwards"
READ_FROM = "xdc.read.from"                   # as asked: revision, or position for $all
READ_LIMIT = "xdc.read.limit"
READ_MIN_POSITION = "xdc.read.min_position"   # when asked for
READ_START = "xdc.read.start"                 # where it started (`from` 0: first or last)
READ_COMMIT_POSITION = "xdc.read.commit_position"  # read as of this commit position
READ_COUNT = "xdc.read.count"                 # records returned
SUBSCRIPTION_PREFIX = "xdc.subscription.stream_prefix"
SUBSCRIPTION_TYPES = "xdc.subscription.event_types"
SUBSCRIPTION_FROM_END = "xdc.subscription.from_end"
SUBSCRIPTION_FROM = "xdc.subscription.from_position"  # delivers what follows it
SUBSCRIPTION_DELIVERED = "xdc.subscription.catch_up.delivered"  # records, to caught-up
SUBSCRIPTION_CAUGHT_UP = "xdc.subscription.caught_up"  # reached it (bool)
SUBSCRIPTION_CAUGHT_UP_POSITION = "xdc.subscription.caught_up.position"


class BadRequest:
    """A request whose bytes did not parse; answered with INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Parser:
    """A request deserializer that never raises: gRPC answers an exception raised while
    deserializing with UNKNOWN, so malformed bytes become a BadRequest that the handler
    (or store.server.RequestGuard) refuses with INVALID_ARGUMENT."""

    __slots__ = ("deserialize", "what")

    def __init__(self, deserialize: Callable[[bytes], Any], what: str) -> None:
        self.deserialize = deserialize
        self.what = what

    @classmethod
    def of(cls, message: Any) -> Parser:
        return cls(message.FromString, message.DESCRIPTOR.name)

    def __call__(self, data: bytes) -> Any:
        try:
            return self.deserialize(data)
        except DecodeError as exc:
            return BadRequest(f"not a valid {self.what}: {exc}")


class ScannedMessage:
    """An AppendStream message read straight from its bytes (validation.scan_append_stream):
    its appends are ScannedAppend tuples, its events checked already."""

    __slots__ = ("appends", "correlation_id", "trace_context")

    def __init__(self, correlation_id: int, appends: list[ScannedAppend],
                 trace_context: dict[str, str]) -> None:
        self.correlation_id = correlation_id
        self.appends = appends
        self.trace_context = trace_context


def append_stream_parser(limits: Limits) -> Parser:
    """AppendStream's deserializer: the scan, else protobuf (which also names what is
    wrong with a message the scan does not take)."""
    slow = pb.AppendStreamRequest.FromString

    def parse(data: bytes) -> ScannedMessage | pb.AppendStreamRequest:
        scanned = scan_append_stream(data, limits)
        return slow(data) if scanned is None else ScannedMessage(*scanned)

    return Parser(parse, pb.AppendStreamRequest.DESCRIPTOR.name)


def _identity(data: bytes) -> bytes:
    return data


def _set_ok(ok: pb.AppendResponse, r: Appended) -> None:
    """An append's answer, filled in place (one mapping for the unary and stream calls)."""
    ok.first_position = r.first_position
    ok.last_position = r.last_position
    ok.last_revision = r.last_revision
    ok.next_revision = r.last_revision + 1
    if r.duplicate:
        ok.duplicate = True


def _ok(r: Appended) -> pb.AppendResponse:
    ok = pb.AppendResponse()
    _set_ok(ok, r)
    return ok


def _stream_response(correlation_id: int,
                     slots: list[pb.AppendResult | Appended | None]) -> pb.AppendStreamResponse:
    """The answer to one AppendStream message, a result per append in order. Results are
    filled in place (results.add()): building each as a message of its own and copying
    it in took three times as long, per append."""
    resp = pb.AppendStreamResponse(correlation_id=correlation_id)
    add = resp.results.add
    for slot in slots:
        if isinstance(slot, Appended):
            _set_ok(add().ok, slot)
        else:
            assert slot is not None, "every append is answered"
            add().CopyFrom(slot)
    return resp


async def _abort(context: grpc.aio.ServicerContext, err: StoreError) -> None:
    await context.abort(err.code, err.message, trailing_metadata=err.metadata)


def _label(total: int, refused: int) -> str:
    """The result of an append message: ok, partial or refused."""
    return "ok" if not refused else "refused" if refused == total else "partial"


_TYPE = attrgetter("type")


def _annotate(span: Span, prepared: list[PreparedAppend], results: list[Any], total: int,
              refused: int, label: str) -> None:
    """Sets an append span's attributes: counts, result, the stream when there is one,
    the first and last position answered. A message can hold thousands of appends and
    this runs for each message: one pass (a comprehension: map(attrgetter(...)) took
    three times as long) and telemetry.set_destination's, the rest O(1) (the exact
    positions written are the group commit span's)."""
    attrs: dict[str, Any] = {
        telemetry.MESSAGING_BATCH_COUNT: sum([len(p.ids) for p in prepared]),
        "xdc.append.count": total, "xdc.append.result": label}
    if refused:
        attrs["xdc.append.refused"] = refused
    telemetry.set_destination(attrs, prepared)
    if results and isinstance(results[0], Appended) and isinstance(results[-1], Appended):
        attrs["xdc.position.first"] = results[0].first_position
        attrs["xdc.position.last"] = results[-1].last_position
    span.set_attributes(attrs)


def _stream_span(parent: Any) -> Span:
    """The SERVER span of one AppendStream message."""
    return telemetry.open_span(
        f"{SERVICE}/AppendStream", context=parent, kind=SpanKind.SERVER,
        attributes={telemetry.RPC_SYSTEM: "grpc", telemetry.RPC_SERVICE: SERVICE,
                    telemetry.RPC_METHOD: "AppendStream"})


# ---- access rules (store/auth.py): a request whose bytes did not parse is let through to
# its handler, which refuses it with INVALID_ARGUMENT.

def _append_rule(principal: Principal, request: Any) -> None:
    if not isinstance(request, BadRequest):
        principal.require_append(request.stream, map(_TYPE, request.events[:]))


def _read_rule(principal: Principal, request: Any) -> None:
    if isinstance(request, BadRequest):
        return
    if request.stream != ALL:
        principal.require(READ, request.stream)
    elif not principal.covers(READ, ""):
        raise auth.denied(f"principal {principal.name!r} may not read {ALL!r} (the whole "
                          "log): that needs a read grant on '*'")


def _subscribe_rule(principal: Principal, request: Any) -> None:
    if not isinstance(request, BadRequest):
        principal.require_prefix(SUBSCRIBE, request.stream_prefix)


def _stream_info_rule(principal: Principal, request: Any) -> None:
    if not isinstance(request, BadRequest):
        principal.require(READ, request.stream)


# AppendStream authenticates and checks in its handler, per append: a refused append gets
# its own UNAUTHENTICATED or PERMISSION_DENIED result and the others of the message go on.
# (Aborting the call instead races with the client's writes: grpc-python then reports
# INTERNAL to the client rather than the status.)
AUTH_RULES: Rules = {
    f"/{SERVICE}/Append": _append_rule,
    f"/{SERVICE}/AppendStream": None,
    f"/{SERVICE}/Read": _read_rule,
    f"/{SERVICE}/Subscribe": _subscribe_rule,
    f"/{SERVICE}/StreamInfo": _stream_info_rule,
    f"/{SERVICE}/NodeInfo": auth.authenticated,
}


class EventStoreService:
    def __init__(self, node: StoreNode, *, guard: Guard | None = None) -> None:
        self.node = node
        self.limits = node.limits
        lim = self.limits
        self._limits_message = pb.StoreLimits(
            max_event_bytes=lim.max_event_bytes, max_append_events=lim.max_append_events,
            max_append_bytes=lim.max_append_bytes,
            max_appends_per_message=lim.max_appends_per_message,
            max_stream_name_bytes=lim.max_stream_name_bytes,
            max_batch_events=lim.max_batch_events, max_batch_bytes=lim.max_batch_bytes)
        # The server's auth.Guard: AppendStream authenticates and checks with it.
        self.guard = guard
        # Live subscriptions -> the position each has delivered up to (lag gauge).
        self.subscriptions: dict[int, int] = {}
        self._subscription_ids = itertools.count(1)
        self._open_subscriptions = 0

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Append": grpc.unary_unary_rpc_method_handler(
                self.Append, Parser.of(pb.AppendRequest), pb.AppendResponse.SerializeToString),
            "AppendStream": grpc.stream_stream_rpc_method_handler(
                self.AppendStream, append_stream_parser(self.limits),
                pb.AppendStreamResponse.SerializeToString),
            "Read": grpc.unary_stream_rpc_method_handler(
                self.Read, Parser.of(pb.ReadRequest), _identity),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self.Subscribe, Parser.of(pb.SubscribeRequest), _identity),
            "StreamInfo": grpc.unary_unary_rpc_method_handler(
                self.StreamInfo, Parser.of(pb.StreamInfoRequest),
                pb.StreamInfoResponse.SerializeToString),
            "NodeInfo": grpc.unary_unary_rpc_method_handler(
                self.NodeInfo, Parser.of(pb.NodeInfoRequest),
                pb.NodeInfoResponse.SerializeToString),
        })

    # ---- appends ------------------------------------------------------------------

    async def Append(self, request: Any, context: grpc.aio.ServicerContext) -> pb.AppendResponse:
        # Its SERVER span is the interceptor's (telemetry.ServerInterceptor): current here.
        t0 = time.perf_counter()
        label = "ok"
        try:
            if isinstance(request, BadRequest):
                raise StoreError(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            prepared = [prepare(request, self.limits)]
            result = (await self.node.append(prepared))[0]
            if telemetry.tracing():
                failed = isinstance(result, StoreError)
                _annotate(trace.get_current_span(), prepared, [result], 1, int(failed),
                          "refused" if failed else "ok")
            if isinstance(result, StoreError):
                raise result
            return _ok(result)
        except StoreError as err:
            label = "refused"
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        finally:
            telemetry.metrics().append_duration.record(
                time.perf_counter() - t0, {telemetry.RPC_METHOD: "Append",
                                           "xdc.append.result": label})

    def _start_message(
        self, msg: pb.AppendStreamRequest, call_context: Mapping[str, str] | None = None,
        principal: Principal | StoreError | None = None,
    ) -> asyncio.Future[pb.AppendStreamResponse]:
        """Validates and queues one AppendStream message; the future is its answer.
        Queuing happens now, so one call's appends reach the writer in order."""
        span = None
        if telemetry.tracing():
            # The message's own trace context, else the call's (a client that traces the
            # whole stream), else a new trace.
            span = _stream_span(telemetry.extract(
                msg.trace_context if msg.trace_context else call_context))
        slots: list[pb.AppendResult | Appended | None] = [None] * len(msg.appends)
        prepared = []
        if isinstance(principal, StoreError):  # the call did not authenticate
            slots = [refuse(principal)] * len(msg.appends)
        else:
            scanned = isinstance(msg, ScannedMessage)
            # Slices: a for loop over a repeated field ends on a raised IndexError
            # (store/validation.py, prepare).
            for i, req in enumerate(msg.appends[:]):
                try:
                    if principal is not None:
                        if scanned:  # (stream, ..., event types)
                            principal.require_append(req[0], req[6])
                        else:
                            principal.require_append(req.stream, map(_TYPE, req.events[:]))
                except StoreError as err:
                    slots[i] = refuse(err)
                    continue
                try:
                    prepared.append((i, prepare_scanned(req, self.limits) if scanned
                                     else prepare(req, self.limits)))
                except StoreError as err:
                    # Its fields are named from the append down; this says which append.
                    # (Formatted only here: an f-string per append cost ~2% of prepare.)
                    slots[i] = refuse(StoreError(err.code, f"appends[{i}].{err.message}"))
        return asyncio.ensure_future(self._finish_message(msg.correlation_id, slots, prepared,
                                                          span))

    async def _finish_message(self, correlation_id: int,
                              slots: list[pb.AppendResult | Appended | None],
                              prepared: list, span: Span | None = None,
                              ) -> pb.AppendStreamResponse:
        t0 = time.perf_counter()
        results: list[Any] = []
        refused = len(slots) - len(prepared)  # refused by validation already
        appends = [p for _, p in prepared]
        if prepared:
            try:
                # The span is current while the append runs: the writer links its group
                # commit to it and the commit wait is its child.
                with trace.use_span(span) if span is not None else contextlib.nullcontext():
                    results = await self.node.append(appends)
                if _FAIL_AFTER_COMMIT[0]:
                    _FAIL_AFTER_COMMIT[0] -= 1
                    raise RuntimeError("failpoint XDC_FAILPOINT_APPEND_FAIL_AFTER_COMMIT")
            except StoreError as err:
                results = [err] * len(prepared)
            except BaseException as exc:
                # The call ends with it (UNKNOWN; CANCELLED at shutdown): the message's
                # span ends too, with the error, or its group commit's parent never
                # shows in a trace.
                if span is not None:
                    code = ("CANCELLED" if isinstance(exc, asyncio.CancelledError)
                            else "UNKNOWN")
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{code}: {exc!r}"))
                    span.end()
                raise
            for (i, _), result in zip(prepared, results, strict=True):
                if isinstance(result, StoreError):
                    refused += 1
                    slots[i] = refuse(result)
                else:
                    slots[i] = result
        label = _label(len(slots), refused)
        if span is not None:
            _annotate(span, appends, results, len(slots), refused, label)
            span.end()
        telemetry.metrics().append_duration.record(
            time.perf_counter() - t0, {telemetry.RPC_METHOD: "AppendStream",
                                       "xdc.append.result": label})
        return _stream_response(correlation_id, slots)

    def _refuse_message(self, msg: Any) -> StoreError | None:
        """Why a whole AppendStream message is refused (it ends the call), or None."""
        if isinstance(msg, BadRequest):
            return StoreError(grpc.StatusCode.INVALID_ARGUMENT, msg.reason)
        n = len(msg.appends)
        if n > self.limits.max_appends_per_message:
            return invalid("appends", f"{n} appends in one message exceeds "
                                      f"max_appends_per_message "
                                      f"({self.limits.max_appends_per_message})")
        return None

    async def AppendStream(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.AppendStreamResponse]:
        answers: asyncio.Queue[asyncio.Future[pb.AppendStreamResponse] | StoreError | None] = (
            asyncio.Queue(self.limits.max_inflight_messages))

        call_context = None
        if telemetry.tracing():
            call_context = {k: v for k, v in (context.invocation_metadata() or ())
                            if isinstance(v, str)}
        principal: Principal | StoreError | None = None
        if self.guard is not None:
            try:
                principal = self.guard.authenticate(context, f"/{SERVICE}/AppendStream")
            except StoreError as err:
                principal = err

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    refusal = self._refuse_message(msg)
                    if refusal is not None:
                        await answers.put(refusal)
                        return
                    await answers.put(self._start_message(msg, call_context, principal))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                if isinstance(item, StoreError):
                    # The messages before it have been answered: the call ends here.
                    await _abort(context, item)
                yield await item
            await reader  # surfaces a failure of the request side
        finally:
            reader.cancel()

    # ---- reads --------------------------------------------------------------------

    async def _wait_min_position(self, min_position: int,
                                 context: grpc.aio.ServicerContext) -> None:
        commit = self.node.commit
        assert commit is not None
        if min_position <= commit.position:
            return
        wait_s = self.limits.max_read_wait_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining)
        try:
            async with asyncio.timeout(wait_s):
                await commit.wait_for(min_position)
        except TimeoutError:
            raise StoreError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"min_position: position {min_position} not committed on this node "
                             f"within {wait_s:.3f}s, the call's deadline or max_read_wait_ms "
                             f"({self.limits.max_read_wait_ms}) (commit position "
                             f"{commit.position})") from None

    def _batches(self, values: list[bytes]) -> list[bytes]:
        """Splits records into RecordBatch payloads of at most max_batch_bytes."""
        limit = self.limits.max_batch_bytes
        if sum(map(len, values)) <= limit:  # the usual case, in one C-level pass
            return [records.batch_bytes(values)] if values else []
        out: list[bytes] = []
        start = 0
        size = 0
        for i, v in enumerate(values):
            if size and size + len(v) > limit:
                out.append(records.batch_bytes(values[start:i]))
                start, size = i, 0
            size += len(v)
        if start < len(values):
            out.append(records.batch_bytes(values[start:]))
        return out

    async def Read(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # Its SERVER span (tracing only: the one check of the call; nothing per record or
        # batch): attributes at its start and end, the outcome from how the body ends.
        span = self._read_span(request, context) if telemetry.tracing() else None
        limit = remaining = 0
        failure: BaseException | None = None
        try:
            try:
                reader, start, upto, backwards = await self._read_plan(request, context)
            except StoreError as err:
                await _abort(context, err)
                return
            limit = remaining = request.limit
            if span is not None:
                span.set_attributes({READ_START: start, READ_COMMIT_POSITION: upto})
            step = self.limits.max_batch_events
            while remaining > 0:
                values = reader(start, min(step, remaining), upto, backwards)
                if not values:
                    return
                # Counted as handed over: a call cancelled at a yield counts what it sent.
                remaining -= len(values)
                for payload in self._batches(values):
                    yield payload
                last = values[-1]
                nxt = (records.position_of(last) if request.stream == ALL
                       else records.revision_of(last))
                start = nxt - 1 if backwards else nxt + 1
                if backwards and start == 0:
                    return
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if span is not None:
                span.set_attribute(READ_COUNT, limit - remaining)
                telemetry.end_server_span(span, context, failure)

    async def _read_plan(self, request: Any, context: grpc.aio.ServicerContext
                         ) -> tuple[Callable[[int, int, int, bool], list[bytes]], int, int,
                                    bool]:
        """A Read validated: (the reader of its steps, where it starts, the commit position
        it reads up to, backwards), or StoreError naming what is wrong."""
        log = self.node.log
        assert log is not None and self.node.commit is not None
        if isinstance(request, BadRequest):
            raise StoreError(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        key = check_read(request, self.limits)
        await self._wait_min_position(request.min_position, context)
        upto = self.node.commit.position
        backwards = request.direction == pb.BACKWARDS
        # A step holds one batch's bytes at most while it waits for a slow client
        # (max_batch_events records of up to max_event_bytes each would be ~2 GiB).
        max_bytes = self.limits.max_batch_bytes
        start = getattr(request, "from")
        if request.stream == ALL:
            def reader(s: int, n: int, u: int, b: bool) -> list[bytes]:
                return log.read_all(s, n, u, b, max_bytes)
            return reader, start or (upto if backwards else 1), upto, backwards
        state = log.stream_state(key)
        if state is None or state.first_position > upto:
            raise StoreError(grpc.StatusCode.NOT_FOUND, f"stream {request.stream!r} not found")

        def stream_reader(s: int, n: int, u: int, b: bool) -> list[bytes]:
            return log.read_stream(key, s, n, u, b, max_bytes)
        return (stream_reader, start or (state.last_revision if backwards else 1), upto,
                backwards)

    def _read_span(self, request: Any, context: grpc.aio.ServicerContext) -> Span:
        """The SERVER span of one Read call: who (peer, principal) read what (the stream
        or "$all", direction, from, limit); the handler adds where it started, the commit
        position it read up to, how many records it returned and the outcome."""
        attrs: dict[str, Any] = {}
        if not isinstance(request, BadRequest):
            attrs[telemetry.MESSAGING_DESTINATION] = request.stream
            attrs[READ_DIRECTION] = ("backwards" if request.direction == pb.BACKWARDS
                                     else "forwards")
            attrs[READ_FROM] = getattr(request, "from")
            attrs[READ_LIMIT] = request.limit
            if request.min_position:
                attrs[READ_MIN_POSITION] = request.min_position
        self._principal(context, "Read", attrs)
        return telemetry.server_span(SERVICE, "Read", context, attrs)

    def _principal(self, context: grpc.aio.ServicerContext, method: str,
                   attrs: dict[str, Any]) -> None:
        """Names the caller's principal in a span's attributes when the server checks
        callers (the Guard has let the call through already: it authenticates)."""
        if self.guard is not None:
            with contextlib.suppress(StoreError):
                attrs[PRINCIPAL] = self.guard.authenticate(context, f"/{SERVICE}/{method}").name

    def subscription_lag(self) -> list[tuple[float, dict[str, Any]]]:
        """The largest lag of a live subscription, in records (a gauge source; it runs
        on the metric reader's thread, so it reads a copy)."""
        commit = self.node.commit
        positions = list(self.subscriptions.copy().values())
        if commit is None or not positions:
            return []
        return [(float(max(0, commit.position - min(positions))), {})]

    async def Subscribe(self, request: Any,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # Its SERVER span covers the start and the catch-up only: _subscribe ends it at
        # the caught-up marker (nothing per live batch); ended here if the call ends
        # first (refused, failed, cancelled). Tracing off: this one check per call.
        span = self._subscribe_span(request, context) if telemetry.tracing() else None
        failure: BaseException | None = None
        try:
            if self._open_subscriptions >= self.limits.max_subscriptions:
                await _abort(context, StoreError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"subscriptions: {self._open_subscriptions} open on this node, "
                    f"max_subscriptions ({self.limits.max_subscriptions}); retry later",
                    retry_after_ms=1000))
            token = next(self._subscription_ids)
            self._open_subscriptions += 1
            try:
                async for item in self._subscribe(request, context, token, span):
                    yield item
            finally:
                self._open_subscriptions -= 1
                self.subscriptions.pop(token, None)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if span is not None and span.is_recording():  # not ended at caught-up
                span.set_attribute(SUBSCRIPTION_CAUGHT_UP, False)
                telemetry.end_server_span(span, context, failure)

    def _subscribe_span(self, request: Any, context: grpc.aio.ServicerContext) -> Span:
        """The SERVER span of one subscription's start and catch-up: who subscribed to
        what (filter, from where); _subscribe adds the position it started after, the
        records it delivered catching up and the position it caught up at."""
        attrs: dict[str, Any] = {telemetry.MESSAGING_SYSTEM: telemetry.SYSTEM,
                                 telemetry.MESSAGING_DESTINATION: ALL}
        if not isinstance(request, BadRequest):
            if request.stream_prefix:
                attrs[SUBSCRIPTION_PREFIX] = request.stream_prefix
            if request.event_types:
                attrs[SUBSCRIPTION_TYPES] = tuple(request.event_types)
            if request.from_end:
                attrs[SUBSCRIPTION_FROM_END] = True
        self._principal(context, "Subscribe", attrs)
        return telemetry.server_span(SERVICE, "Subscribe", context, attrs)

    async def _subscribe(self, request: Any, context: grpc.aio.ServicerContext,
                         token: int, span: Span | None = None) -> AsyncIterator[bytes]:
        log, commit = self.node.log, self.node.commit
        assert log is not None and commit is not None
        try:
            if isinstance(request, BadRequest):
                raise StoreError(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            prefix, types = check_subscribe(request, self.limits)
        except StoreError as err:
            await _abort(context, err)
        filtered = bool(prefix or types)
        type_keys = frozenset(t.encode() for t in types)
        position = commit.position if request.from_end else request.after_position
        caught_up = False
        skipped = 0
        checkpoint_at = 0.0  # loop time of the last checkpoint
        loop = asyncio.get_running_loop()
        step = self.limits.max_batch_events
        # Traced, the catch-up's count is worked out at the end, not counted per step:
        # records read (positions are dense) less those skipped, `skipped` plus what its
        # checkpoints reset (`reset`; after catching up they are no longer counted).
        start = position
        reset = 0
        if span is not None:
            span.set_attribute(SUBSCRIPTION_FROM, position)
        while True:
            self.subscriptions[token] = position
            upto = commit.position
            if position >= upto:
                if not caught_up:
                    caught_up = True
                    if span is not None:
                        span.set_attributes({SUBSCRIPTION_DELIVERED:
                                             position - start - reset - skipped,
                                             SUBSCRIPTION_CAUGHT_UP: True,
                                             SUBSCRIPTION_CAUGHT_UP_POSITION: position})
                        telemetry.end_server_span(span, context)
                        span = None  # live from here: no span
                    yield pb.SubscribeResponse(
                        caught_up=pb.CaughtUp(position=position)).SerializeToString()
                elif filtered and skipped:
                    due = checkpoint_at + CHECKPOINT_INTERVAL_S - loop.time()
                    if due > 0:  # a commit may come first; else the checkpoint is due
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(due):
                                await commit.wait_beyond(position)
                        continue
                    skipped, checkpoint_at = 0, loop.time()
                    yield pb.SubscribeResponse(
                        checkpoint=pb.Checkpoint(position=position)).SerializeToString()
                await commit.wait_beyond(position)
                continue
            values = log.read_all(position + 1, step, upto, max_bytes=self.limits.max_batch_bytes)
            assert values, f"committed records {position + 1}..{upto} missing from the log"
            position += len(values)
            assert records.position_of(values[-1]) == position, "log positions must be dense"
            if filtered:
                kept = records.select(values, prefix, type_keys)
                skipped += len(values) - len(kept)
                values = kept
                if skipped >= CHECKPOINT_EVERY and not values:
                    if span is not None:  # catching up, traced (once per checkpoint)
                        reset += skipped
                    skipped, checkpoint_at = 0, loop.time()
                    yield pb.SubscribeResponse(
                        checkpoint=pb.Checkpoint(position=position)).SerializeToString()
            for payload in self._batches(values):
                yield records.wrap_field(1, payload)

    # ---- info ---------------------------------------------------------------------

    async def StreamInfo(self, request: Any,
                         context: grpc.aio.ServicerContext) -> pb.StreamInfoResponse:
        log, commit = self.node.log, self.node.commit
        assert log is not None and commit is not None
        try:
            if isinstance(request, BadRequest):
                raise StoreError(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            key = check_stream_name(request.stream, self.limits)
            state = log.stream_state(key)
            upto = commit.position
            if state is None or state.first_position > upto:
                raise StoreError(grpc.StatusCode.NOT_FOUND, f"stream {request.stream!r} not found")
            last_revision, last_position = state.last_revision, state.last_position
            if last_position > upto:
                # Only committed events count: the stream's last committed one.
                last = log.read_stream(key, last_revision, 1, upto, backwards=True)[0]
                last_revision, last_position = records.revision_of(last), records.position_of(last)
            return pb.StreamInfoResponse(stream=request.stream, last_revision=last_revision,
                                         count=last_revision, first_position=state.first_position,
                                         last_position=last_position)
        except StoreError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None

    async def NodeInfo(self, request: Any,
                       context: grpc.aio.ServicerContext) -> pb.NodeInfoResponse:
        node = self.node
        assert node.log is not None and node.commit is not None
        return pb.NodeInfoResponse(
            cluster_id=node.log.cluster_id, node_id=node.node_id, role=node.role.name,
            term=node.role.term, commit_position=node.commit.position,
            last_position=node.log.last_position, leader=node.role.leader,
            stream_count=node.log.stream_count(), limits=self._limits_message)
