"""The imperative shell of one engine instance: store subscription, primary lease, output
appends, snapshots, control server (DESIGN §2, §5). All decisions about outputs are the
pure ``engine.consumer.Consumer``'s; this module moves bytes and time.

Life of an instance:

1. Load the group's latest snapshot from the store (if any) and restore it, or start
   empty; then subscribe to the group's records after the snapshot's input position:
   inputs, controls and committed outputs, in log order.
2. Until the subscription has caught up, only replay (and verify committed outputs).
3. With ``role = auto`` and no alarm, campaign for the group's lease; the holder is the
   primary and appends its pending outputs to the output stream, one append in flight
   (each takes all outputs pending, in up to MAX_APPEND_BATCHES batches of bounded
   size, one event each), with the exact expected revision. Never two in flight: if
   the first were refused because another writer's batch took its revision, the
   second's expected revision would match and land it after that batch, whatever
   inputs that batch covered (a gap or a repeat). A refused
   append (another writer, a stale view) rewinds emission until the subscription has
   shown the output stream up to the revision the store reported.
4. A warm instance (not holding the lease) checks every committed batch against its own
   outputs. On a difference it raises an alarm, stops campaigning and never emits.
5. A primary whose store member has had no leader for STORE_CUT_OFF_S (the member is
   cut off from the ledger's leader, as in a partition of its region, or unreachable),
   or for STORE_CUT_OFF_CONFIRMED_S while another of its store targets has had one,
   gives up the lease, and an instance whose member is cut off does not campaign:
   inputs stall there, while a warm instance beside a member of the majority can take
   over at the exact position and let orders flow again. A failover of the ledger
   itself (a crash: ~2 s) has no leader anywhere until it ends, ends before
   STORE_CUT_OFF_S, and moves nothing.
6. A switchover marker in the input stream holds emission after its position. The old
   primary designates the target once its outputs up to the marker are committed and
   releases the lease; the target takes it, lifts the hold and resumes right after the
   marker.
7. Every ``snapshot_every`` inputs (and at each snapshot request) the primary captures a
   snapshot and writes it once the outputs up to its input are committed.
8. An activation in the input stream switches the output format at its position
   (engine/wire.py); an instance that does not support the version alarms there, as on
   a divergence (a primary demotes and releases the lease). Status reports the version
   in force and the ones this instance supports (`xdc engine activate` checks them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import gc
import logging
import socket
import zlib
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanContext, SpanKind, Status, StatusCode

from engine import wire
from engine.book import GcFreezer, gc_paused, young_collected
from engine.codec import CodecError, state_hash
from engine.constants import OUTPUT_VERSIONS
from engine.consumer import MAX_PENDING_INPUTS, Capture, Consumer
from engine.lease import PrimaryLease
from geo.tier_supervisor import RemoteReader
from store import auth
from store.client import (
    EXACT,
    AppendError,
    CaughtUp,
    Checkpoint,
    RawBatch,
    StoreClient,
    channel_options,
    shed_wait_s,
)
from xdc import telemetry
from xdc.tls import Tls, aio_channel
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc

log = logging.getLogger("xdc.engine")

# 1.1.0: output format versions (output version 2: cancels and rejects with side and price).
ENGINE_VERSION = "1.1.0"
SNAPSHOT_CHUNK = 512 * 1024  # compressed bytes per snapshot event (event limit 1 MiB)
MAX_SNAPSHOT_CHUNKS = 32  # one atomic append of at most 16 MiB
# A snapshot chunk's event beside its data (id, types, metadata), at most.
SNAPSHOT_ENVELOPE = 1024
# How long a primary waits for the store's limits before it emits with the defaults,
# and how long it pauses emission after an append refused as invalid (sized past a limit).
STORE_LIMITS_TIMEOUT_S = 2.0
REFUSED_PAUSE_S = 1.0
# Emission held this long for the output stream to reach the revision a refusal named:
# the primary asks the store where the stream really ends (EngineRunner._check_resync).
RESYNC_CHECK_S = 2.0
# Inputs between two freezes of what survived (engine.book.GcFreezer), each after a
# collection of the young generations only. In `xdc bench engine`'s bursts (5 x 100k
# orders, one engine), the longest collection was 36-38 ms without freezing (a full one),
# 10-13 ms freezing every 50k inputs, 4-5 ms every 5k.
GC_FREEZE_EVERY = 5_000
DESIGNATION_TTL_S = 10
# A store member without a leader for this long is cut off, not failing over: a crash
# failover takes the 2 s lease plus an election (drills: ~2 s, target 3 s).
STORE_CUT_OFF_S = 5.0
# Sooner when another store member of the instance's list has had a leader with its
# quorum for STORE_OTHERS_LED_S while this one had none for STORE_CUT_OFF_CONFIRMED_S and
# is not that leader: in a failover no member has a leader until one is elected, then
# its followers follow it at its first message, while the new leader itself reads as
# without one until its term opens (asked apart: NodeInfo's role). "None" includes "did
# not answer in 0.5 s". Without it, a partitioned leader region held matching ~6.4 s
# (drill leader-partition) where the ledger was back in ~1.5 s.
STORE_CUT_OFF_CONFIRMED_S = 1.5
STORE_OTHERS_LED_S = 1.0
CAMPAIGN_INTERVAL_S = 0.2  # an instance that may campaign tries for the lease this often
ADVERTISE_RETRY_MAX_S = 5.0
STORE_WATCH_S = 0.5  # how often an instance asks its store member for its tiers
# How long an instance waits at start for its store to answer (`--startup-timeout`),
# each attempt at most STARTUP_ATTEMPT_S (a store that hangs is reported as early as one
# that refuses the connection).
STARTUP_TIMEOUT_S = 60.0
STARTUP_ATTEMPT_S = 5.0
# The last attempt has what is left of the timeout, often a millisecond: timed out in less
# than this, it says nothing of the store, and the error of the attempt before it is the
# one reported (on a busy machine "DEADLINE_EXCEEDED" replaced "UNAVAILABLE: ... refused").
STARTUP_ATTEMPT_MIN_S = 0.5
MAX_CAPTURES_WAITING = 2  # snapshots captured, waiting for their outputs' commit
# Traced input batches whose spans an output append may still hang under (_spans_of):
# more than the batches whose outputs one append carries (consumer.MAX_APPEND_BATCHES).
MAX_TRACED_BATCHES = 1_024
# Committed inputs whose outputs a catching-up instance checks at least (RunnerConfig):
# as many as `--snapshot-every` puts between snapshots by default, so an instance that
# restarts from the latest snapshot checks everything after it.
VERIFY_WINDOW = 100_000
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    group: str
    instance: str
    store: tuple[str, ...]
    role: str = "auto"  # auto: campaign for the lease; warm: never (verify only)
    snapshot_every: int = 100_000  # inputs between snapshots (0: only on request)
    campaign_interval_s: float = CAMPAIGN_INTERVAL_S
    # TLS to the store and on the control port (xdc/tls.py); None: plaintext.
    tls: Tls | None = None
    token: str = ""  # its principal's bearer token at the store (store/auth.py)
    # Catching up, the outputs of at least this many of the last committed inputs are
    # computed and checked; those before them are replayed for the state alone
    # (Consumer.trust). 0: every committed output is checked.
    verify_window: int = VERIFY_WINDOW
    # Inputs whose outputs are not seen committed, at most: past it a warm instance
    # sheds them, a primary stops (EmissionStalled).
    max_pending_inputs: int = MAX_PENDING_INPUTS
    # How long the start waits for the store to answer before it gives up
    # (StoreUnreachable).
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    # The output format versions this instance may be activated to (`--max-output-version`
    # caps them: an instance then alarms at an activation of a newer one, as an instance
    # of an older release would, and `xdc engine activate` refuses while it is up).
    output_versions: tuple[int, ...] = OUTPUT_VERSIONS

    def __post_init__(self) -> None:
        wire.check_group(self.group)
        assert 1 in self.output_versions and set(self.output_versions) <= set(
            OUTPUT_VERSIONS), self.output_versions
        assert self.role in ("auto", "warm"), self.role
        assert self.snapshot_every >= 0 and self.verify_window >= 0
        assert self.max_pending_inputs > 0 and self.startup_timeout_s > 0


def batch_positions(item: object) -> tuple[int, int] | None:
    """(first, last) position of a delivered batch of a subscription with ``batches``,
    raw (``RawBatch``) or parsed; None for any other item (a marker, an empty batch)."""
    if isinstance(item, RawBatch):
        return item.first_position, item.last_position
    if isinstance(item, pb.RecordBatch) and item.events:
        return item.events[0].position, item.events[-1].position
    return None


def feed(c: Consumer, batch: RawBatch | pb.RecordBatch) -> None:
    """The batch's records to the consumer: read where they lie when raw."""
    if isinstance(batch, RawBatch):
        c.on_raw_batch(batch.data, batch.start)
    else:
        c.on_records(batch.events)


class StoreUnreachable(RuntimeError):
    """The store did not answer within RunnerConfig.startup_timeout_s of the start: the
    message names its targets and the last error (`xdc engine run` prints it, exit 1)."""


class EmissionStalled(RuntimeError):
    """A primary's outputs have not been committed for RunnerConfig.max_pending_inputs
    inputs: the instance stops (fail-stop) rather than hold them without bound."""


class EngineRunner:
    def __init__(self, config: RunnerConfig, lease: PrimaryLease,
                 client: StoreClient | None = None) -> None:
        self.config = config
        self.lease = lease
        # Its reads recover with the matching tier, not with analytics.
        self.client = client or StoreClient(list(config.store), timeout_s=30.0, tier="engine",
                                            tls=config.tls, token=config.token)
        self.consumer = Consumer(config.group, output_versions=config.output_versions)
        self.input_stream = wire.input_stream(config.group)
        self.output_stream = wire.output_stream(config.group)
        self.primary = False
        self.caught_up = False
        # (committed input, inputs processed) when outputs were last seen committed, or
        # when it caught up or was promoted; and the least backlog since it caught up or
        # was promoted: the pending limit counts from these (_over_pending_limit).
        self._progress = (0, 0)
        self._floor = 0
        self.snapshot_position = 0
        self.store_position = 0
        # Every input committed up to here has been delivered and processed (events,
        # caught-up markers and checkpoints of the subscription advance it).
        self.delivered_position = 0
        self._hash_at: tuple[int, str] = (-1, "")  # (input position, state hash hex)
        self._captures: list[Capture] = []
        self._since_capture = 0
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self.failure: BaseException | None = None
        self._stopping = False
        # Since when the store member this instance reads has had no leader (None: it
        # has one); see STORE_CUT_OFF_S. Meanwhile, since when another member has had
        # one (None: none has, or none answers); see STORE_CUT_OFF_CONFIRMED_S.
        self.leaderless_since: float | None = None
        self.others_led_since: float | None = None
        self._advertiser: asyncio.Task | None = None
        # What the store refuses past (NodeInfo), once known: output batches, appends
        # and snapshot chunks are sized to fit.
        self.store_limits: pb.StoreLimits | None = None
        self._emit_paused_until = 0.0
        # (first input, last input, CONSUMER span) of the batches processed lately, when
        # traced: an output append hangs under the spans of the inputs it carries outputs
        # of (_emit), not under whichever span was current when it was sent.
        self._batch_spans: collections.deque[tuple[int, int, SpanContext]] = \
            collections.deque(maxlen=MAX_TRACED_BATCHES)
        self.limit_refusals = 0
        self.output_event_bytes = 0  # as fitted to the store's limits; 0: not yet
        self._refit: asyncio.Future[None] | None = None
        # Cyclic garbage gives signs: the young collections find some, or a trace export
        # fails (its frames stay in a cycle: xdc.telemetry._BatchReleased).
        self._gc = GcFreezer(GC_FREEZE_EVERY, signs=lambda: young_collected()
                             + telemetry.failed_exports())
        self._resync_since: float | None = None  # emission resyncing since (loop time)
        # The task writing snapshots (_flush_soon): one at a time, so that they are
        # written in input order (the newest in the stream is the one a restart loads).
        self._flush_task: asyncio.Task[None] | None = None
        self._lease_problem = ""  # the lease's problem when last looked at (_check_lease)
        # The start-up reads' clients, one per store target, and the target they read from
        # now (_startup_reader): a target that does not answer passes them to the next.
        self._startup_clients: dict[str, StoreClient] = {}
        self._startup_target = 0

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        try:
            await self._load_snapshot()
            point = await self._trust_point()
        finally:
            await self._close_startup_clients()
        if point is not None:
            self.consumer.trust(*point)
            log.info("instance %s replays inputs %d..%d of %s for the state alone (their "
                     "outputs are committed); it checks the outputs of the %d inputs after",
                     self.config.instance, self.consumer.position + 1, point[0],
                     self.config.group, self.config.verify_window)
        self._tasks = [asyncio.create_task(self._consume(), name="engine-consume"),
                       asyncio.create_task(self._leadership(), name="engine-lease"),
                       asyncio.create_task(self._watch_store(), name="engine-store-watch")]
        for t in self._tasks:
            t.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if self._stopping:
            return
        # Either task ending, even by a cancel nobody asked for, leaves an engine that
        # looks alive and does nothing: fail, so the process exits and is restarted.
        self._fail(task.get_name(), RuntimeError(f"task {task.get_name()} cancelled")
                   if task.cancelled() else task.exception()
                   or RuntimeError(f"task {task.get_name()} returned"))

    def _fail(self, where: str, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            log.error("engine %s failed: %r", where, exc)
            self._stopped.set()

    async def wait_failed(self) -> None:
        await self._stopped.wait()

    def advertise(self, address: str) -> None:
        """Records, in the group's instances stream, where this instance answers
        EngineControl: gateways that discover engines (`xdc gateway --discover-engines`)
        then judge matching by instances they were not configured with, such as a new
        release taking over. In the background; a refusal other than a transient one is
        logged, not fatal (matching does not depend on it)."""
        self._advertiser = asyncio.create_task(self._advertise(address), name="engine-advertise")

    async def _advertise(self, address: str) -> None:
        event = wire.instance_event(self.config.group, self.config.instance, address,
                                    ENGINE_VERSION)
        delay = 0.1
        while True:
            try:
                await self.client.append(wire.instances_stream(self.config.group), [event])
                log.info("instance %s of %s advertised at %s", self.config.instance,
                         self.config.group, address)
                return
            except AppendError as exc:
                if exc.code not in _TRANSIENT:
                    log.warning("instance %s not advertised at %s: %s", self.config.instance,
                                address, exc)
                    return
            except Exception as exc:  # never fatal: the engine matches without it
                log.warning("instance %s not advertised at %s yet: %r", self.config.instance,
                            address, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, ADVERTISE_RETRY_MAX_S)

    async def stop(self) -> None:
        self._stopping = True
        if self._advertiser is not None:
            self._advertiser.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._advertiser
        tasks = [*self._tasks, *([self._flush_task] if self._flush_task else [])]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.lease.held:
            await self.lease.release()
        await self.lease.close()
        await self._close_startup_clients()
        await self.client.close()

    # ---------------------------------------------------------------- start-up reads

    def _startup_reader(self) -> StoreClient:
        """The client of the start-up reads (the latest snapshot, the trust point): the
        instance's own with one store target. With several, a client of one target, the
        one that answered last: ``client.read`` stays on its current target, where the
        subscription and the appends move on to the next one that answers, so with the
        first target down the start would wait for it alone (``_next_startup_target``)."""
        targets = self.config.store
        if len(targets) == 1:
            return self.client
        target = targets[self._startup_target]
        client = self._startup_clients.get(target)
        if client is None:
            client = self._startup_clients[target] = StoreClient(
                target, timeout_s=self.client.timeout_s, tier="engine", tls=self.config.tls,
                token=self.config.token)
        return client

    def _next_startup_target(self) -> None:
        """The current start-up target did not answer: the next reads go to the next."""
        self._startup_target = (self._startup_target + 1) % len(self.config.store)

    async def _close_startup_clients(self) -> None:
        clients, self._startup_clients = self._startup_clients, {}
        for client in clients.values():
            await client.close()

    # ---------------------------------------------------------------- snapshots

    async def _load_snapshot(self) -> None:
        stream = wire.snapshot_stream(self.config.group)
        loop = asyncio.get_running_loop()
        limit = self.config.startup_timeout_s
        deadline = loop.time() + limit
        targets = ",".join(self.config.store)
        waiting = False
        why = ""
        while True:
            reader = self._startup_reader()
            attempt_s = max(0.001, min(STARTUP_ATTEMPT_S, deadline - loop.time()))
            try:
                tail = await reader.read(stream, backwards=True, limit=1, timeout_s=attempt_s)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    tail = []  # no snapshot: the store answers
                    break
                # A store that is starting, electing or shedding load: wait for it, and
                # ask the next target meanwhile (one down must not hold the start).
                if exc.code() not in _TRANSIENT:
                    raise
                self._next_startup_target()
                if not (why and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                        and attempt_s < STARTUP_ATTEMPT_MIN_S):
                    why = f"{exc.code().name}: {exc.details()}"
                    if len(self.config.store) > 1:
                        why = f"{reader.targets[0]}: {why}"
                if loop.time() >= deadline:
                    raise StoreUnreachable(f"the store ({targets}) did not answer within "
                                           f"{limit:g} s ({why})") from None
                if not waiting:
                    waiting = True
                    log.warning("instance %s of %s: the store (%s) does not answer (%s); "
                                "retrying for up to %g s", self.config.instance,
                                self.config.group, targets, why, limit)
                await asyncio.sleep(min(2.0, shed_wait_s(exc) or 0.1,
                                        max(0.0, deadline - loop.time())))
        if waiting:
            log.info("instance %s of %s: the store (%s) answers", self.config.instance,
                     self.config.group, targets)
        if not tail:
            return
        md = tail[0].metadata
        try:
            index, count = (int(x) for x in md["chunk"].split("/"))
            if not 0 <= index < count <= MAX_SNAPSHOT_CHUNKS or index >= tail[0].revision:
                raise ValueError(f"chunk {index}/{count}")
            chunks = await reader.read(stream, start=tail[0].revision - index, limit=count)
            assert [int(c.metadata["chunk"].split("/")[0]) for c in chunks] == list(range(count))
            data = zlib.decompress(b"".join(c.data for c in chunks))
            self.consumer = Consumer.from_snapshot(
                self.config.group, data, int(md["input_position"]), bytes.fromhex(md["chain"]),
                int(md["output_revision"]), bytes.fromhex(md["state_hash"]),
                self.config.output_versions, wire.snapshot_in_force(md))
        except Exception as exc:
            # A bad snapshot costs a full replay, never a wrong state (nor the start:
            # every restart of every instance would meet the same snapshot).
            log.error("snapshot at revision %d unusable (%s): replaying the whole log",
                      tail[0].revision, exc)
            self.consumer = Consumer(self.config.group,
                                     output_versions=self.config.output_versions)
            return
        self.snapshot_position = self.consumer.position

    async def _trust_point(self) -> tuple[int, bytes] | None:
        """(last input, chain) of the newest committed output batch that ends at least
        ``verify_window`` inputs before the newest one, found by a binary search on the
        output stream's revisions (batches are in input order); None when there is none
        past this instance's position, or when the store cannot say (a full replay)."""
        window, stream = self.config.verify_window, self.output_stream
        if not window:
            return None
        reader = self._startup_reader()  # the target the snapshot was read from
        try:
            tail = await reader.read(stream, backwards=True, limit=1)
            if not tail:
                return None
            target = wire.output_header(tail[0].data)[1] - window
            lo, hi, found = 1, tail[0].revision, None
            while lo <= hi and target > self.consumer.position:
                mid = (lo + hi) // 2
                _, last, chain, _ = wire.output_header(
                    (await reader.read(stream, start=mid, limit=1))[0].data)
                if last <= target:
                    found, lo = (last, chain), mid + 1
                else:
                    hi = mid - 1
        except IndexError:  # a revision the read did not return: the store's view moved
            log.warning("no trusted catch-up (the output stream changed under the search): "
                        "every committed output is checked")
            return None
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("no trusted catch-up (%s): every committed output is checked",
                            exc.details())
            return None
        except CodecError as exc:
            log.warning("no trusted catch-up (%s): every committed output is checked", exc)
            return None
        return found if found is not None and found[0] > self.consumer.position else None

    def _snapshot_chunking(self) -> tuple[int, int]:
        """(bytes per chunk, chunks per snapshot): one atomic append the store accepts."""
        size, most = SNAPSHOT_CHUNK, MAX_SNAPSHOT_CHUNKS
        lim = self.store_limits
        if lim is not None:
            if lim.max_event_bytes:
                size = max(1, min(size, lim.max_event_bytes - SNAPSHOT_ENVELOPE))
            if lim.max_append_events:
                most = min(most, lim.max_append_events)
            if lim.max_append_bytes:
                most = min(most, lim.max_append_bytes // (size + SNAPSHOT_ENVELOPE))
        return size, most

    async def _write_snapshot(self, cap: Capture) -> None:
        """Writes a snapshot; traced, under a root INTERNAL span `snapshot <group>` of its
        own (its append is that span's child): a snapshot is no part of the processing
        of the orders before it, whichever batch or task it is written after."""
        if not telemetry.tracing():
            await self._put_snapshot(cap, INVALID_SPAN)
            return
        span = telemetry.open_span(
            f"snapshot {self.config.group}", context=Context(), kind=SpanKind.INTERNAL,
            attributes={"xdc.engine.group": self.config.group,
                        "xdc.engine.instance": self.config.instance,
                        "xdc.engine.input_position": cap.position})
        with trace.use_span(span, end_on_exit=True):
            await self._put_snapshot(cap, span)

    async def _put_snapshot(self, cap: Capture, span: Span) -> None:
        # Off the loop (zlib lets go of the GIL): inputs go on being processed meanwhile
        # (~18 ms per 100k resting orders), the writes being a task of their own.
        packed = await asyncio.to_thread(zlib.compress, cap.data, 1)
        size, most = self._snapshot_chunking()
        chunks = [packed[i:i + size] for i in range(0, len(packed), size)]
        if span.is_recording():
            span.set_attributes({"xdc.snapshot.bytes": len(packed),
                                 "xdc.snapshot.chunks": len(chunks)})
        if len(chunks) > most:
            log.error("snapshot at input %d is %d bytes compressed, over %d chunks of %d "
                      "bytes (the store's limits): not written", cap.position, len(packed),
                      most, size)
            span.set_status(Status(StatusCode.ERROR, "over the store's limits: not written"))
            return
        events = [pb.ProposedEvent(
            id=wire.derived_id("snap", self.config.group, cap.position, i),
            type=wire.SNAPSHOT_TYPE, content_type="application/x-xdc-snapshot+zlib",
            data=chunk, metadata={
                "input_position": str(cap.position), "output_revision": str(cap.out_revision),
                "chain": cap.chain.hex(), "state_hash": cap.state_hash.hex(),
                "chunk": f"{i}/{len(chunks)}", "engine_version": ENGINE_VERSION,
                **wire.snapshot_in_force_metadata(cap.in_force)})
            for i, chunk in enumerate(chunks)]
        await self.client.append(wire.snapshot_stream(self.config.group), events)
        self.snapshot_position = cap.position

    def _maybe_capture(self, requested: bool) -> None:
        every = self.config.snapshot_every
        if requested or (every and self._since_capture >= every):
            self._since_capture = 0
            if len(self._captures) >= MAX_CAPTURES_WAITING:
                # Each holds a whole book; the later ones are newer anyway.
                log.warning("snapshot at input %d not taken: %d wait for their outputs' "
                            "commit", self.consumer.position, len(self._captures))
                return
            self._captures.append(self.consumer.capture())

    def _flush_soon(self) -> None:
        """Writes the captures whose outputs are committed from a task of their own, so
        that this one goes on with the next inputs meanwhile (compressing and appending
        took ~20 ms per 100k resting orders); never two such tasks, which keeps them in
        input order. The lease task calls it too, for captures whose outputs are
        committed while no input comes; neither task waits for a write."""
        if self._captures and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.create_task(self._flush_captures(),
                                                   name="engine-snapshot-write")
            self._flush_task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is not None:  # as when the consume task wrote them itself: fail
            self._fail(task.get_name(), exc)

    async def _flush_captures(self) -> None:
        """The flush task's body (_flush_soon): the captures whose outputs are committed,
        oldest first."""
        while self._captures and self.consumer.committed_input >= self._captures[0].wait_for:
            cap = self._captures.pop(0)
            try:
                await self._write_snapshot(cap)
            except (AppendError, grpc.aio.AioRpcError) as exc:
                log.warning("snapshot at input %d not written: %s", cap.position, exc)
                if isinstance(exc, AppendError) and \
                        exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                    self._refused_as_invalid(f"snapshot at input {cap.position}", exc)

    # ---------------------------------------------------------------- the log

    async def _consume(self) -> None:
        c = self.consumer
        # Untraced, batches come unparsed: the consumer reads their records where they
        # lie (Consumer.on_raw_batch). Traced, each input's metadata is read for the
        # CONSUMER span's links.
        raw = not telemetry.tracing()
        agen = self.client.subscribe(after_position=c.position,
                                     stream_prefix=wire.group_prefix(self.config.group),
                                     event_types=wire.CONSUMED_TYPES, batches=True, raw=raw)
        async for item in agen:
            c = self.consumer
            if isinstance(item, CaughtUp):
                self.caught_up = True
                # The backlog caught up with is what a primary has to emit: the limit
                # counts from here.
                self._mark_pending()
                self._delivered(item.position)
                self._wake.set()
                continue
            if isinstance(item, Checkpoint):
                self._delivered(item.position)
                continue
            delivered = batch_positions(item)
            if delivered is None:
                continue
            before, first = c.inputs, c.position + 1
            # One CONSUMER span per delivered batch, linked to each order's producer
            # span (its traceparent); the output append of its outputs is its child. It
            # ends before any snapshot is taken or written (those are not the orders').
            with telemetry.consumer_span(
                    self.input_stream, () if isinstance(item, RawBatch) else (
                        e.metadata for e in item.events if e.stream == self.input_stream),
                    consumer_group=self.config.group,
                    attributes={"xdc.engine.instance": self.config.instance}) as span:
                with gc_paused():  # the cyclic GC would re-scan the whole book
                    feed(c, item)
                if span.is_recording():
                    span.set_attribute("xdc.engine.input_position", c.position)
                    span.set_attribute("xdc.engine.primary", self.primary)
                if span.get_span_context().is_valid:
                    # Warm too: the outputs it holds at a takeover are emitted then. And
                    # unsampled too: the output append of an unsampled order's outputs
                    # must be its (unsampled) child, not a root of its own, and its output
                    # event must carry its context, not a sampled neighbour's.
                    self._batch_spans.append((first, c.position, span.get_span_context()))
                requested = await self._after_batch(c, delivered[1], before)
            if self.primary:
                self._maybe_capture(requested)
                self._flush_soon()
        raise RuntimeError("subscription ended")

    def _delivered(self, position: int) -> None:
        self.delivered_position = max(self.delivered_position, position)
        self.store_position = max(self.store_position, position)

    async def _after_batch(self, c: Consumer, last: int, before: int) -> bool:
        """What follows a batch's processing, in its span: positions, alarms, the backlog
        bound, emission. Returns whether a snapshot was requested (taken after the span:
        the capture reads nothing emission changes)."""
        self._delivered(last)
        self._since_capture += c.inputs - before
        if self._gc.advance(c.inputs - before):
            log.info("instance %s of %s: full collection of the frozen objects: %d "
                     "unreachable found, %.1f ms", self.config.instance, self.config.group,
                     self._gc.thaw_collected, self._gc.thaw_s * 1e3)
        requested = False
        for control in c.controls:
            if control.kind == wire.SNAPSHOT_REQUEST_TYPE:
                requested = True
            elif control.kind == wire.ACTIVATE_TYPE:
                log.log(logging.ERROR if control.body["outcome"].endswith("alarm")
                        else logging.INFO,
                        "instance %s of %s: activation of output version %s at input %d: %s",
                        self.config.instance, self.config.group,
                        control.body["output_version"] or "(none)", control.position,
                        control.body["outcome"])
        c.controls.clear()
        if c.alarm and self.primary:
            await self._demote(f"alarm: {c.alarm}")
            # Its state disagrees with the committed outputs: let an instance that
            # agrees take over (held, the lease barred every other one for good).
            await self.lease.release()
        if self._over_pending_limit():
            if self.primary:
                # Its appends have failed for that long (a store refusing them, outputs
                # no event it accepts can hold): stop before memory runs out. A restart
                # (the service manager's) replays from the latest snapshot and emits as
                # soon as the cause is gone; a warm instance may take over meanwhile.
                raise EmissionStalled(
                    f"outputs of {c.backlog} inputs not committed (limit "
                    f"{self.config.max_pending_inputs}): emission failed, or fell behind "
                    f"the inputs, for too long"
                    + (f" ({c.emit_blocked})" if c.emit_blocked else ""))
            if self.caught_up:
                # No primary has emitted for a long time. Stop checking (memory bound)
                # and stay out of the race for the lease until outputs past this point
                # are seen committed: emitting from here would leave a gap.
                c.shed_backlog()
            # Catching up, the backlog is what it has to emit once primary: shed, it
            # could never take over, and a group whose instances all restart after a
            # long outage would stall for good. It is bounded by the log itself.
        if self.primary:
            self._emit()
        self._wake.set()
        return requested

    def _mark_pending(self) -> None:
        """Caught up or promoted: the backlog now is what this instance has to emit
        (after an outage it may be far over the limit), and the limit counts from it."""
        c = self.consumer
        self._progress = (c.committed_input, c.inputs)
        self._floor = c.backlog

    def _over_pending_limit(self) -> bool:
        """Whether outputs wait for their commit past RunnerConfig.max_pending_inputs:
        over it, and either no output seen committed for that many inputs (emission
        stopped), or the backlog that much above its least since catching up or
        promotion (emission falls behind the inputs). A backlog caught up with, or one
        promoted on, drained one append after another, is neither."""
        c, limit = self.consumer, self.config.max_pending_inputs
        if c.committed_input != self._progress[0]:
            self._progress = (c.committed_input, c.inputs)
        self._floor = min(self._floor, c.backlog)
        return c.backlog > limit and (c.inputs - self._progress[1] > limit
                                      or c.backlog - self._floor > limit)

    # ---------------------------------------------------------------- emission

    def _emit(self) -> None:
        # Only the primary: an answer to an append made before a demotion calls this too.
        if not self.primary or not self.caught_up \
                or asyncio.get_running_loop().time() < self._emit_paused_until:
            return
        c = self.consumer
        blocked = c.emit_blocked
        nxt = c.next_append()
        if c.emit_blocked and c.emit_blocked != blocked:
            log.error("instance %s holds the outputs of %s: %s", self.config.instance,
                      self.config.group, c.emit_blocked)
        if nxt is None:
            return
        generation, expected, batches = nxt
        spans = self._spans_of(batches[0].first_input, batches[-1].last_input)
        with telemetry.serving(spans, f"emit {self.output_stream}") as span:
            if spans:  # traced: each output event carries the context its outputs hang under
                events = self._traced_events(batches, spans, span)
            else:
                events = [b.event(self.config.group, self.config.instance) for b in batches]
            fut = self.client.append_nowait(self.output_stream, events, EXACT, expected)
        # In an empty context: the answer's callback sends the next append, which must not
        # inherit this one's spans (it would, from the context copied here).
        fut.add_done_callback(lambda done: self._appended(done, generation, expected, span),
                              context=contextvars.Context())

    def _spans_of(self, first: int, last: int) -> list[SpanContext]:
        """The CONSUMER spans of the batches that held inputs first..last (outputs are
        emitted in input order: spans of earlier inputs are dropped)."""
        spans = self._batch_spans
        while spans and spans[0][1] < first:
            spans.popleft()
        return [sc for lo, _hi, sc in spans if lo <= last]

    def _traced_events(self, batches: list[wire.OutputBatch], spans: list[SpanContext],
                       emit: Span) -> list[pb.ProposedEvent]:
        """The output events of `batches`, each with the `traceparent` (metadata) of the
        CONSUMER span that made its outputs when that is one span, else of the "emit"
        span the append is made under (linked to each of `spans`): what the gateway's
        `deliver` spans of these outputs hang under (engine/gateway.py)."""
        group, instance = self.config.group, self.config.instance
        if len(spans) == 1:
            tp = telemetry.traceparent_of(spans[0])
            return [b.event(group, instance, tp) for b in batches]
        emitted = emit.get_span_context()
        shared = telemetry.traceparent_of(emitted) if emitted.is_valid else ""
        last = batches[-1].last_input
        entries = []  # (first, last input, span) of the batches `spans` came from
        for entry in self._batch_spans:  # those before the append's first input are gone
            if entry[0] > last:
                break
            entries.append(entry)
        events = []
        for b in batches:
            mine = [sc for lo, hi, sc in entries if lo <= b.last_input and hi >= b.first_input]
            events.append(b.event(group, instance, telemetry.traceparent_of(mine[0])
                                  if len(mine) == 1 else shared))
        return events

    def _appended(self, fut: asyncio.Future, generation: int, expected: int,
                  span: Span) -> None:
        span.end()  # the emit span, when the append served several batches' spans
        try:
            self._on_answer(fut, generation, expected)
        except Exception as exc:  # a broken invariant in a callback: not to be lost
            self._fail("output append answer", exc)

    def _on_answer(self, fut: asyncio.Future, generation: int, expected: int) -> None:
        c = self.consumer
        exc = None if fut.cancelled() else fut.exception()
        if exc is None and not fut.cancelled():
            last = fut.result().last_revision
            if c.on_appended(generation, last):
                log.info("output append at revision %d answered as an earlier append of "
                         "the same batches, through revision %d; resync to it", expected, last)
            self._emit()
            self._wake.set()
            return
        if generation != c.generation:
            return
        code = getattr(exc, "code", None)
        c.on_refused(generation, getattr(exc, "actual_last_revision", 0),
                     code == grpc.StatusCode.ALREADY_EXISTS)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            self._refused_as_invalid(f"output append at revision {expected}", exc)
        else:
            log.info("output append at revision %d refused (%s); resync to revision %d",
                     expected, exc or "cancelled", c.resync_to)
        self._wake.set()

    async def _check_resync(self) -> None:
        """Emission held RESYNC_CHECK_S for the output stream to reach the revision a
        refusal named: ask the store where the stream ends (committed) and let the
        consumer decide (``Consumer.reconcile``). Without this, a revision that is never
        committed, or events of another type at the stream's end, held the outputs of
        every later order for good."""
        c, loop = self.consumer, asyncio.get_running_loop()
        if not (self.caught_up and c.resyncing):
            self._resync_since = None
            return
        if self._resync_since is None:
            self._resync_since = loop.time()
        if loop.time() - self._resync_since < RESYNC_CHECK_S:
            return
        self._resync_since = loop.time()
        try:
            async with asyncio.timeout(RESYNC_CHECK_S / 2):  # the lease loop waits
                info = await self.client.stream_info(self.output_stream)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            log.warning("output stream not read while resyncing to revision %d: %s",
                        c.resync_to, exc)
            return
        found = c.reconcile(info.last_revision, self.delivered_position >= info.last_position)
        if found:
            log.warning("instance %s, %s: %s; emission goes on after revision %d",
                        self.config.instance, self.config.group, found, c.resync_to)
            self._emit()

    def _refused_as_invalid(self, what: str, exc: BaseException | None) -> None:
        """An append sized past a limit of the store (one restarted with smaller ones, or
        a member that states other ones): learn them again; no hot retry meanwhile."""
        log.warning("%s refused as invalid (%s): fitting the store's limits again", what, exc)
        self.limit_refusals += 1
        self._emit_paused_until = asyncio.get_running_loop().time() + REFUSED_PAUSE_S
        self._refit = asyncio.ensure_future(self._fit_store())

    async def _fit_store(self) -> None:
        """Learns the store's limits (NodeInfo) and sizes emission to them; the defaults
        (or what was learnt before) stay when the store does not answer in time."""
        try:
            async with asyncio.timeout(STORE_LIMITS_TIMEOUT_S):
                info = await self.client.node_info()
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            log.warning("store limits not learnt (%s): output appends keep their sizes", exc)
            return
        lim = info.limits
        self.store_limits = lim
        self.output_event_bytes = self.consumer.fit_store(
            lim.max_event_bytes, lim.max_append_events, lim.max_append_bytes,
            self.config.instance)
        self._wake.set()

    # ---------------------------------------------------------------- the lease

    async def _leadership(self) -> None:
        interval = self.config.campaign_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):  # no task per wake-up
                    await self._wake.wait()
            self._wake.clear()
            c = self.consumer
            if self.primary:
                if not self.lease.held:
                    await self._demote("lease lost")
                elif c.hold_after and c.handover_to and c.handover_to != self.config.instance \
                        and c.handed_over():
                    await self.lease.designate(c.handover_to, DESIGNATION_TTL_S)
                    await self._demote(f"switchover to {c.handover_to} after input "
                                       f"{c.hold_after}")
                    await self.lease.release()
                else:
                    if c.hold_after and c.handover_to in ("", self.config.instance):
                        # A marker naming this very instance (a switchover repeated, or
                        # one a failover overtook) or none: nothing to hand over.
                        log.info("instance %s: switchover marker at input %d names it; "
                                 "emission goes on", self.config.instance, c.hold_after)
                        c.release_hold()
                    self._emit()
                    await self._check_resync()
                    self._flush_soon()  # not awaited: a write never holds up the lease
                continue
            if not self._may_campaign():
                continue
            designated = await self.lease.designated()
            self._check_lease()
            if designated is not None and designated != self.config.instance:
                continue
            if c.hold_after and c.handover_to == self.config.instance and not c.handed_over():
                continue  # the old primary still owes outputs up to the marker
            acquired = await self.lease.try_acquire()
            self._check_lease()
            if acquired:
                await self._promote()

    def _check_lease(self) -> None:
        """Logs when the lease stops or starts working (an etcd that does not answer or
        refuses this instance): without it, such an instance stayed warm for good and
        said nothing."""
        problem = getattr(self.lease, "problem", "")
        if bool(problem) != bool(self._lease_problem):
            if problem:
                log.warning("instance %s of %s cannot campaign for the group's lease: %s",
                            self.config.instance, self.config.group, problem)
            else:
                log.info("instance %s of %s reaches the group's lease again",
                         self.config.instance, self.config.group)
        self._lease_problem = problem

    def _may_campaign(self) -> bool:
        return not self._campaign_gate()

    def campaign_blocker(self) -> str:
        """Why this instance may not campaign for the group's lease now, or why its
        campaigns fail (a lease it cannot reach: it keeps trying); "" if it may. Reported
        by Status, so an operator sees why a warm instance does not take over."""
        gate = self._campaign_gate()
        if gate:
            return gate
        problem = getattr(self.lease, "problem", "")
        return f"lease unavailable: {problem}" if problem else ""

    def _campaign_gate(self) -> str:
        """Why this instance must not campaign now; "" if it may."""
        c = self.consumer
        if self.config.role != "auto":
            return f"role {self.config.role}: verifies only, never campaigns"
        if c.alarm:
            return "diverged (see alarm)"
        if not self.caught_up:
            return "not caught up with the log"
        if c.committed_input < c.promotable_after:
            return (f"backlog shed: waits to see outputs committed through input "
                    f"{c.promotable_after}")
        cut_off = self._cut_off()
        if cut_off:
            return f"cut off from the ledger: {cut_off}"
        return ""

    def _cut_off(self) -> str:
        """Why this instance's store member counts as cut off from the ledger's leader
        (not in a failover); "" when it does not."""
        if self.leaderless_since is None:
            return ""
        now = asyncio.get_running_loop().time()
        since = now - self.leaderless_since
        others = self.others_led_since
        if (since >= STORE_CUT_OFF_CONFIRMED_S and others is not None
                and now - others >= STORE_OTHERS_LED_S):
            return (f"its store member has had no leader for {since:.1f} s while another "
                    f"member has had one for {now - others:.1f} s")
        if since >= STORE_CUT_OFF_S:
            return (f"its store member has had no leader for {since:.1f} s (limit "
                    f"{STORE_CUT_OFF_S:.0f} s)")
        return ""

    async def _watch_store(self) -> None:
        """Follows whether the store member of the subscription has a leader (its
        Tiers/Status: geo/tier_supervisor.RemoteReader; a standalone store always has),
        and while it has none, whether another of the instance's store targets has one
        that is not that member (see STORE_CUT_OFF_CONFIRMED_S)."""
        readers: dict[str | tuple[str, ...], RemoteReader] = {}

        def reader_of(targets: str | tuple[str, ...]) -> RemoteReader:
            reader = readers.get(targets)
            if reader is None:
                reader = readers[targets] = RemoteReader(targets, tls=self.config.tls,
                                                         token=self.config.token)
            return reader

        async def leads(target: str) -> bool:
            """Whether `target` holds the leader key of its term: a new leader reads as
            without one until its term opens (its partners caught up), while its
            followers already follow it; that is a failover, not a member cut off. Until
            the term opens, its NodeInfo role is "candidate" (it won the key: geo/node.py),
            then "leader". No answer: it leads nothing this instance can read."""
            return await reader_of(target).role(target) in ("candidate", "leader")

        loop = asyncio.get_running_loop()
        watched = ""
        try:
            while True:
                await asyncio.sleep(STORE_WATCH_S)
                target = self.client.subscribed_to
                if not target:
                    continue
                if target != watched:  # what was seen of another member says nothing
                    watched = target
                    self.leaderless_since = self.others_led_since = None
                reading = await reader_of(target)()
                if not (reading.failover or not reading.quorum):
                    self.leaderless_since = self.others_led_since = None
                    continue
                if self.leaderless_since is None:
                    self.leaderless_since = loop.time()
                others = tuple(t for t in self.config.store if t != target)
                if others:
                    # The first healthy answer of any of them counts (RemoteReader).
                    seen = await reader_of(others)()
                    if seen.failover or not seen.quorum or await leads(target):
                        self.others_led_since = None
                    elif self.others_led_since is None:
                        self.others_led_since = loop.time()
                cut_off = self._cut_off()
                if self.primary and cut_off:
                    await self._demote(f"its store member {target} is cut off from the "
                                       f"ledger: {cut_off}")
                    await self.lease.release()
        finally:
            for r in readers.values():
                await r.close()

    async def _promote(self) -> None:
        await self._fit_store()
        c = self.consumer
        # Read again after the wait: inputs delivered meanwhile may have changed it (a
        # backlog shed, an alarm).
        why = self._campaign_gate()
        if why:
            log.warning("instance %s of %s: not primary after all (%s): lease released",
                        self.config.instance, self.config.group, why)
            await self.lease.release()
            return
        c.release_hold()
        c.rewind_emission()
        self._mark_pending()
        self.primary = True
        log.info("instance %s is primary of %s from input %d (outputs committed through %d)",
                 self.config.instance, self.config.group, c.position, c.committed_input)
        self._emit()

    async def _demote(self, why: str) -> None:
        self.primary = False
        self.consumer.rewind_emission()
        self._captures.clear()
        log.warning("instance %s is no longer primary of %s: %s", self.config.instance,
                    self.config.group, why)

    # ---------------------------------------------------------------- status

    async def status(self, brief: bool = False) -> xpb.EngineStatus:
        """`brief`: role and positions only, for health probes (no store round trip,
        no state hash, no count of frozen objects: each of these walks something whole,
        and a poller asks many times a second on the loop that processes orders)."""
        c = self.consumer
        if not brief:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                async with asyncio.timeout(1.0):
                    info = await self.client.node_info()
                self.store_position = max(self.store_position, info.commit_position)
        role = ("diverged" if c.alarm else "primary" if self.primary
                else "warm" if self.caught_up else "starting")
        return xpb.EngineStatus(
            group=self.config.group, instance=self.config.instance, role=role,
            input_position=c.position, committed_input_position=c.committed_input,
            store_position=self.store_position,
            lag=max(0, self.store_position - max(c.position, self.delivered_position)),
            chain_hash="" if brief else c.chain.hex(),
            state_hash="" if brief else self._state_hash(), engine_version=ENGINE_VERSION,
            alarm=c.alarm, snapshot_position=self.snapshot_position,
            inputs_processed=c.inputs, delivered_position=self.delivered_position,
            handover_to=c.handover_to if c.hold_after else "",
            campaign_blocked="" if self.primary else self.campaign_blocker(),
            emit_blocked=c.emit_blocked if self.primary else "",
            trusted_through=c.trusted_through,
            output_event_bytes=self.output_event_bytes,
            output_append_events=c.append_batches if self.output_event_bytes else 0,
            limit_refusals=self.limit_refusals,
            # gc.get_freeze_count() walks the frozen list: every resting order is on it
            gc_frozen_objects=0 if brief else gc.get_freeze_count(),
            gc_thaws=self._gc.thaws, gc_thaw_collected=self._gc.thaw_collected,
            gc_thaw_ms=round(self._gc.thaw_s * 1e3, 3),
            output_version=c.engine.output_version,
            supported_output_versions=c.output_versions)


    def _state_hash(self) -> str:
        """The state hash after the last input: a full canonical encoding of the engine,
        so computed once per input position, not once per status request (monitors and
        drills poll status many times a second on the loop that processes orders)."""
        c = self.consumer
        if self._hash_at[0] != c.position:
            self._hash_at = (c.position, state_hash(c.engine).hex())
        return self._hash_at[1]


async def fetch_status(address: str, timeout_s: float = 5.0,
                       tls: Tls | None = None, token: str = "",
                       brief: bool = False) -> xpb.EngineStatus:
    """An engine instance's status through its EngineControl address (raises
    grpc.aio.AioRpcError when it does not answer or refuses). ``brief``: no state hash
    (a whole snapshot of the book) and no store round trip, for polling."""
    async with aio_channel(address, tls, options=channel_options()) as ch:
        return await xpb_grpc.EngineControlStub(ch).Status(
            xpb.EngineStatusRequest(brief=brief), timeout=timeout_s,
            metadata=auth.bearer(token))


async def status_or_none(address: str, timeout_s: float = 5.0, tls: Tls | None = None,
                         token: str = "", brief: bool = False) -> xpb.EngineStatus | None:
    try:
        return await fetch_status(address, timeout_s, tls, token, brief)
    except grpc.aio.AioRpcError:
        return None


# EngineControl is status only (controls travel as input events, which the store's ACLs
# reserve for admins): any authenticated principal may read it.
AUTH_RULES: auth.Rules = {"/xdc.v1.EngineControl/Status": auth.authenticated}


class EngineControlService(xpb_grpc.EngineControlServicer):
    def __init__(self, runner: EngineRunner) -> None:
        self.runner = runner

    async def Status(self, request: xpb.EngineStatusRequest,
                     context: grpc.aio.ServicerContext) -> xpb.EngineStatus:
        return await self.runner.status(request.brief)


def advertised(address: str) -> str:
    """The address others reach a listener bound to `address` at: a wildcard host
    (0.0.0.0, ::) is replaced by this machine's name."""
    host, port = address.rsplit(":", 1)
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"


async def run_engine(config: RunnerConfig, lease: PrimaryLease, control_listen: str,
                     auth_config: auth.AuthConfig | None = None) -> int:
    """`xdc engine run`: the runner plus its EngineControl server (callers authenticated
    against `auth_config` when given); stops on SIGTERM/INT, exits non-zero when the
    runner fails."""
    from store.server import listen_on, new_server, run_until_signalled

    runner = EngineRunner(config, lease)
    server = new_server(interceptors=[auth.Guard(auth_config, AUTH_RULES)]
                        if auth_config is not None else ())
    xpb_grpc.add_EngineControlServicer_to_server(EngineControlService(runner), server)
    port = listen_on(server, control_listen, config.tls)
    host = control_listen.rsplit(":", 1)[0]

    async def start() -> str:
        try:
            await runner.start()
        except BaseException:
            await runner.stop()  # its lease and store client: nothing left running
            raise
        await server.start()
        address = f"{host}:{port}"
        runner.advertise(advertised(address))
        return address

    async def stop() -> None:
        await server.stop(0.5)
        await runner.stop()

    return 1 if await run_until_signalled(start, stop, runner.wait_failed) else 0

