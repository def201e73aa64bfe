"""Peer messages on the wire: the codec between geo/replication/messages.py and
proto/xdc/v1/replication.proto, one outbound stream per peer, and the inbound service.

The protocol tolerates lost, duplicated and reordered messages, so the transport is
best effort: a full outbound queue drops the oldest messages, a broken stream is
reopened after a short backoff, and nothing here retries a message on its own."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import operator
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

import grpc

from geo.replication.messages import (
    ENTRY_PAYLOAD,
    ENTRY_TERM,
    Append,
    AppendReply,
    Entry,
    Fetch,
    FetchReply,
    Message,
    Promise,
    PromiseReply,
    Tip,
    entries_of,
)
from store import auth
from store.client import channel_options
from store.errors import show
from store.records import varint
from xdc.tls import ROLES, Identity, Tls, aio_channel, describe_peer, peer_identity
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc

log = logging.getLogger("xdc.transport")

_KINDS: dict[type, int] = {
    Promise: rpb.PROMISE, PromiseReply: rpb.PROMISE_REPLY, Append: rpb.APPEND,
    AppendReply: rpb.APPEND_REPLY, Fetch: rpb.FETCH, FetchReply: rpb.FETCH_REPLY,
}
_CLASSES = {v: k for k, v in _KINDS.items()}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _KINDS}

# Outbound messages (and their bytes) waiting per peer; past either the oldest are
# dropped (the protocol retransmits what matters).
MAX_QUEUED = 4096
MAX_QUEUED_BYTES = 64 << 20
# Messages and bytes per PeerBatch on the wire (one message at least): well under the
# peers' gRPC message limit, which a batch past it would fail on every retry.
MAX_BATCH = 256
MAX_BATCH_BYTES = 8 << 20
RECONNECT_S = 0.1
_STREAM_METHOD = "/xdc.v1.Replication/Stream"
# The key of PeerBatch.messages (field 3, length-delimited).
_MESSAGES_TAG = bytes((3 << 3 | 2,))
# PeerMessage.first_position (field 21, fixed64): its key, then 8 bytes little-endian.
_FIRST_POSITION = struct.Struct("<HQ")
_FIRST_POSITION_KEY = 0x01A9
# Messages queued longer than this are dropped, not sent late (a peer that was down or
# slow gets what the protocol sends it next instead).
STALE_AFTER_S = 1.0
# Switchover.timeout_ms: 0 means the default; larger values are refused (a call that
# waits for days holds the leader's writes paused that long).
DEFAULT_SWITCHOVER_MS = 5_000
MAX_SWITCHOVER_MS = 60_000
# Peer links: the client's channel options, with keep-alives that notice a dead or cut
# peer within seconds.
CHANNEL_OPTIONS = [
    *(o for o in channel_options() if o[0] != "grpc.keepalive_time_ms"),
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def encode(msg: Message) -> rpb.PeerMessage:
    out = rpb.PeerMessage()
    out.MergeFromString(b"".join(encode_parts(msg)))
    return out


def encode_parts(msg: Message, trace_context: Mapping[str, str] | None = None) -> list[bytes]:
    """A PeerMessage, serialized, in parts to be joined (protobuf merges the fields of
    concatenated messages): its entries are serialized apart and once for every peer they
    go to (a leader ships the same records to each follower), and joined only once, into
    the batch the message travels in."""
    cls = type(msg)
    head = rpb.PeerMessage(kind=_KINDS[cls])
    entries: Sequence[Entry] = ()
    for name in _FIELDS[cls]:
        value = getattr(msg, name)
        if name == "entries":
            entries = value
        elif name == "tip":
            head.tip_term, head.tip_position = value.term, value.position
        else:
            setattr(head, name, value)
    if trace_context:
        head.trace_context.update(trace_context)
    parts = [head.SerializeToString()]
    if entries:
        _add_entries(parts, entries)
    return parts


# Entries serialized (the entry_terms and entry_payloads fields of a PeerMessage) by
# blocks of BLOCK positions, aligned on multiples of BLOCK: a message holds runs back to
# back, which parse as one list. A leader ships the same records to each follower, but
# in slices cut differently (one follower may be a proposal behind the other); every
# whole block in a slice is serialized once for all of them. A cached block is used only
# if it holds the very same Entry objects (immutable).
BLOCK = 64
MAX_BLOCKS = 256
_BLOCKS: dict[int, tuple[tuple[Entry, ...], bytes]] = {}


def _add_entries(parts: list[bytes], entries: Sequence[Entry]) -> None:
    first = entries[0].position
    n = len(entries)
    assert entries[-1].position == first + n - 1, "entries not consecutive"
    parts.append(_FIRST_POSITION.pack(_FIRST_POSITION_KEY, first))
    i = 0
    while i < n:
        pos = first + i
        k = min(BLOCK - pos % BLOCK, n - i)  # to the end of pos's block, or of entries
        run = tuple(entries[i:i + k])
        whole = k == BLOCK
        cached = _BLOCKS.get(pos) if whole else None
        if cached is not None and all(map(operator.is_, cached[0], run)):
            parts.append(cached[1])
        else:
            data = rpb.PeerMessage(entry_terms=list(map(ENTRY_TERM, run)),
                                   entry_payloads=list(map(ENTRY_PAYLOAD, run))
                                   ).SerializeToString()
            if whole:
                _BLOCKS.pop(pos, None)
                _BLOCKS[pos] = (run, data)
                if len(_BLOCKS) > MAX_BLOCKS:
                    del _BLOCKS[next(iter(_BLOCKS))]
            parts.append(data)
        i += k


def decode(pm: rpb.PeerMessage) -> Message:
    cls = _CLASSES.get(pm.kind)
    if cls is None:
        raise ValueError(f"unknown peer message kind {pm.kind}")
    kwargs: dict[str, Any] = {}
    for name in _FIELDS[cls]:
        if name == "entries":
            # Slices: one C call each makes the lists; zipping the repeated fields
            # themselves indexes them one by one (~25% more per entry, measured).
            terms, payloads = pm.entry_terms[:], pm.entry_payloads[:]
            if len(terms) != len(payloads):
                raise ValueError(f"{len(terms)} entry terms for {len(payloads)} payloads")
            first = pm.first_position
            kwargs[name] = tuple(entries_of(first, terms, payloads))
        elif name == "tip":
            kwargs[name] = Tip(pm.tip_term, pm.tip_position)
        else:
            kwargs[name] = getattr(pm, name)
    return cls(**kwargs)


class PeerSender:
    """Sends this node's messages to one peer on a long-lived client stream."""

    def __init__(self, cluster: str, node_id: str, peer_id: str, address: str,
                 tls: Tls | None = None, token: str = "") -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.peer_id = peer_id
        self.address = address
        self.tls = tls
        # The member token (a cluster without TLS but with an auth file): its bearer
        # metadata on every stream.
        self.metadata = auth.bearer(token)
        # (queued at, bytes, parts): each message serialized and framed as a
        # PeerBatch.messages field, so that a batch on the wire is the batch's head and
        # these bytes, joined.
        self._queue: collections.deque[tuple[float, int, list[bytes]]] = collections.deque()
        self._queued_bytes = 0
        self._head = rpb.PeerBatch(cluster=cluster, src=node_id).SerializeToString()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0  # stale or over the queue's bounds
        self.connected = False  # the last write went through

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def send(self, msg: Message, trace_context: Mapping[str, str] | None = None) -> None:
        parts = encode_parts(msg, trace_context)
        size = sum(map(len, parts))
        parts[:0] = (_MESSAGES_TAG, varint(size))
        self._queue.append((time.monotonic(), size, parts))
        self._queued_bytes += size
        self._trim()
        self._ready.set()

    def _trim(self) -> None:
        """Drops the oldest messages past the queue's bounds."""
        while len(self._queue) > MAX_QUEUED or self._queued_bytes > MAX_QUEUED_BYTES:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._queued_bytes -= self._queue.popleft()[1]
        self.dropped += 1

    def _next_batch(self, now: float) -> list[tuple[float, int, list[bytes]]]:
        """The messages of the next write, oldest first: stale ones dropped, at most
        MAX_BATCH of them and MAX_BATCH_BYTES (one at least)."""
        q = self._queue
        while q and now - q[0][0] > STALE_AFTER_S:
            self._drop_oldest()
        batch: list[tuple[float, int, list[bytes]]] = []
        size = 0
        while q and len(batch) < MAX_BATCH and (not batch or size + q[0][1] <= MAX_BATCH_BYTES):
            item = q.popleft()
            size += item[1]
            batch.append(item)
        self._queued_bytes -= size
        return batch

    def _requeue(self, batch: list[tuple[float, int, list[bytes]]]) -> None:
        """A failed write's messages go first on the next stream (until they are
        stale), within the queue's bounds."""
        self._queue.extendleft(reversed(batch))
        self._queued_bytes += sum(item[1] for item in batch)
        self._trim()

    async def _run(self) -> None:
        # Writes go through call.write() from this one task: with a request iterator,
        # gRPC's own consumer task would keep pulling from the queue after the call
        # failed and drop what the next stream should carry.
        loop = asyncio.get_running_loop()
        while True:
            batch: list[tuple[float, int, list[bytes]]] = []
            opened = loop.time()
            try:
                # With TLS the peer's certificate must name `peer_id` (the address may
                # be a proxy's): a node that is not that member fails the handshake.
                async with aio_channel(self.address, self.tls, options=CHANNEL_OPTIONS,
                                       server_name=self.peer_id) as channel:
                    # Raw bytes out (PeerBatch, serialized here): no copy of the records
                    # into a message object per peer.
                    call = channel.stream_unary(
                        _STREAM_METHOD,
                        response_deserializer=rpb.StreamSummary.FromString)(
                            metadata=self.metadata)
                    # An idle stream that failed (the peer was down when it opened, or
                    # went away) is replaced at once, not found dead by the next write:
                    # that write would carry a reply an election is waiting for.
                    ended = asyncio.ensure_future(_ended(call))
                    ended.add_done_callback(lambda _: self._ready.set())
                    try:
                        while True:
                            while not self._queue:
                                if ended.done():
                                    raise ended.result() or ConnectionError(
                                        "stream ended while idle")
                                self._ready.clear()
                                await self._ready.wait()
                            batch = self._next_batch(time.monotonic())
                            if not batch:
                                continue  # all of it was stale
                            await call.write(b"".join(itertools.chain(
                                (self._head,), *(item[2] for item in batch))))
                            self.connected = True
                            self.sent += len(batch)
                            batch = []
                    finally:
                        ended.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any stream failure: reconnect, never give up
                if _refused(exc):  # a certificate problem does not heal by retrying
                    log.warning("%s -> %s: refused: %s", self.node_id, self.peer_id,
                                _details(exc))
                else:
                    log.debug("%s -> %s: stream ended: %r", self.node_id, self.peer_id, exc)
            finally:
                self.connected = False
            self._requeue(batch)
            if loop.time() - opened < RECONNECT_S:  # failing fast: do not spin
                await asyncio.sleep(RECONNECT_S)


async def _ended(call: Any) -> Exception | None:
    """How a stream call ended (its error, or None for a normal end)."""
    try:
        await call
    except Exception as exc:
        return exc
    return None


def _details(exc: BaseException) -> str:
    return exc.details() or "" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)


def _refused(exc: BaseException) -> bool:
    if not isinstance(exc, grpc.aio.AioRpcError):
        return False
    return exc.code() in (grpc.StatusCode.PERMISSION_DENIED,
                          grpc.StatusCode.UNAUTHENTICATED) or "Verification" in _details(exc)


def auth_rules(secure: bool) -> auth.Rules:
    """Access rules of tokens (store/auth.py), for a server with an auth file. Stream and
    Tip are node-to-node: with TLS a peer proves it is a member with its certificate
    (ReplicationService below checks it; the Guard lets them through), without TLS with
    the member token (a principal granted `replicate`, geo/config.py peer_token_file),
    checked by the Guard before the handler like every other rule. Status is read by any
    authenticated principal; only admins may move the leadership (with TLS, also only
    callers with an admin certificate)."""
    return {
        "/xdc.v1.Replication/Stream": None if secure else auth.replicate_rule("replication"),
        "/xdc.v1.Replication/Tip": None if secure else auth.replicate_rule("Tip"),
        "/xdc.v1.Replication/Status": auth.authenticated,
        "/xdc.v1.Replication/Switchover": auth.admin_rule("switch the cluster's leader over"),
    }


class ReplicationService(rpb_grpc.ReplicationServicer):
    """Inbound peer messages, handed to `deliver` (the replicator's input queue).

    With `secure` (the cluster runs TLS), every call is checked against the caller's
    certificate (xdc/tls.py): replication (Stream, Tip) only from a member of this
    cluster, speaking as itself; Status from any holder of a certificate of this
    cluster; Switchover from an operator (admin) only. Without TLS, the server's Guard
    checks tokens (`auth_rules`): replication needs the member token, which speaks for
    any member. Without TLS and without an auth file, the service is open: anyone who
    reaches the peer port could forge promises and stall the cluster."""

    def __init__(self, cluster: str, node_id: str, members: set[str],
                 deliver: Callable[[list[Message]], None],
                 tip: Callable[[], rpb.TipResponse],
                 status: Callable[[], Awaitable[rpb.NodeStatus]],
                 switchover: Callable[[str, float], Awaitable[rpb.SwitchoverResponse]],
                 observe: Callable[[Message, Mapping[str, str]], None] | None = None,
                 secure: bool = False) -> None:
        self.cluster = cluster
        self.secure = secure
        # Sees each message before `deliver`, with the trace context it came with
        # (geo/tracing.py: replication spans and lag).
        self.observe = observe
        self.node_id = node_id
        self.members = members
        self.deliver = deliver
        self.tip = tip
        self.status = status
        self.switchover = switchover

    async def _caller(self, context: grpc.aio.ServicerContext, what: str,
                      roles: tuple[str, ...]) -> Identity | None:
        """The caller's identity when it may call `what` (None without TLS); aborts
        with a status naming the caller and the reason otherwise."""
        if not self.secure:
            return None
        who = peer_identity(context)
        if who is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{what} refused: {describe_peer(context)}; a certificate "
                                f"of cluster {self.cluster!r} is required")
        assert who is not None
        if who.cluster != self.cluster:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{what} refused: {who} is of cluster {who.cluster!r}, "
                                f"not {self.cluster!r}")
        if who.role not in roles or (who.role == "member" and who.name not in self.members):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{what} refused: {who} is not a {' or '.join(roles)} of "
                                f"cluster {self.cluster!r}"
                                + (f" (members: {', '.join(sorted(self.members))})"
                                   if "member" in roles else ""))
        return who

    async def Stream(self, request_iterator: Any,
                     context: grpc.aio.ServicerContext) -> rpb.StreamSummary:
        who = await self._caller(context, "replication", ("member",))
        received = 0
        async for batch in request_iterator:
            if batch.cluster != self.cluster or batch.src not in self.members:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"node {show(batch.src)} of cluster {show(batch.cluster)} is "
                                    f"not a member of cluster {self.cluster!r}")
            if who is not None and batch.src != who.name:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"replication refused: {who} cannot speak as member "
                                    f"{show(batch.src)}")
            msgs = []
            for i, pm in enumerate(batch.messages):
                if pm.dst != self.node_id or pm.src != batch.src:
                    continue  # misrouted: drop, as a network would
                if pm.kind not in _CLASSES:
                    # Nothing of this batch is delivered: a peer that sends what this
                    # node cannot read runs another version of the protocol.
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"messages[{i}].kind: unknown PeerKind {pm.kind}")
                try:
                    msg = decode(pm)
                except ValueError as exc:  # entries that do not add up: nothing delivered
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"messages[{i}]: {exc}")
                if self.observe is not None:
                    self.observe(msg, pm.trace_context)
                msgs.append(msg)
            received += len(msgs)
            if msgs:
                self.deliver(msgs)
        return rpb.StreamSummary(received=received)

    async def Tip(self, request: rpb.TipRequest,
                  context: grpc.aio.ServicerContext) -> rpb.TipResponse:
        await self._caller(context, "Tip", ("member",))
        if request.cluster != self.cluster:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"cluster {show(request.cluster)} is not {self.cluster!r}")
        return self.tip()

    async def Status(self, request: rpb.StatusRequest,
                     context: grpc.aio.ServicerContext) -> rpb.NodeStatus:
        await self._caller(context, "Status", ROLES)
        return await self.status()

    async def Switchover(self, request: rpb.SwitchoverRequest,
                         context: grpc.aio.ServicerContext) -> rpb.SwitchoverResponse:
        await self._caller(context, "Switchover", ("admin",))
        if request.target not in self.members:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"target: {show(request.target)} is not a member")
        if request.timeout_ms > MAX_SWITCHOVER_MS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"timeout_ms: {request.timeout_ms} exceeds the maximum "
                                f"({MAX_SWITCHOVER_MS}; 0: {DEFAULT_SWITCHOVER_MS})")
        try:
            return await self.switchover(request.target,
                                         (request.timeout_ms or DEFAULT_SWITCHOVER_MS) / 1000)
        except SwitchoverError as exc:
            await context.abort(exc.code, str(exc))
            raise AssertionError("unreachable") from None


class SwitchoverError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
