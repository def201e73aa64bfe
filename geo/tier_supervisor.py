"""The imperative shell around geo/tiers.py: a supervisor task, gRPC health, the
`xdc.v1.Tiers` status service and the server interceptor that sheds requests.

Who runs one
------------
* every cluster node (geo/node.py) and the standalone `xdc serve` (store.server.serve's
  companion), observing their own store: role and leader, quorum, writer queue, commit lag;
* any other gRPC server, e.g. the order gateway, mirroring a store node (`RemoteReader`)::

      from geo.tier_supervisor import gateway_supervisor
      sup = gateway_supervisor(store_targets, node_id="gw-1")     # tier file: default
      server = new_server(interceptors=sup.interceptors)      # store.server
      add_OrderGatewayServicer_to_server(..., server)
      sup.add_services(server)                  # xdc.v1.Tiers/Status (optional)
      health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
      await server.start()
      await sup.start(health_servicer)          # publishes xdc.tier.<name>, xdc.tiers
      ...
      await sup.stop()

What a client sees
------------------
A request may name its criticality in the metadata key ``xdc-tier`` (``x-xdc-tier`` is
accepted too): a tier name or a service name. Without it (or with a name the tier file does
not know) the method decides (geo.tiers.service_of). A request of a tier that is not
admitted is refused before its handler runs: ``UNAVAILABLE`` (starting, failover,
no_quorum, dependency, settling) or ``RESOURCE_EXHAUSTED`` (overload), the message names the
tier and the reason, and trailing metadata carries ``xdc-retry-after-ms`` (the store's own
key, store/errors.py), ``xdc-tier`` and ``xdc-shed-reason``. Streaming calls are checked
once, when they start: a subscription already running is not cut by shedding.

Health: each tier is the service ``xdc.tier.<name>`` (SERVING when admitted and healthy),
``xdc.tiers`` is SERVING when every tier is. DR drills read recovery times from
``xdc.v1.Tiers/Status`` (TiersStatus: per tier recovered_at/down_at, and the transitions).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from geo import tiers as tiers_mod
from geo.tiers import (
    READ_METHOD,
    Observation,
    Reason,
    Refusal,
    State,
    TierMachine,
    TierSpec,
    Transition,
    service_of,
)
from store import auth
from store.client import cancelled_by_channel, channel_options
from store.errors import MD_SHED_REASON, MD_TIER, StoreError
from store.node import StoreNode
from xdc.tls import Tls, aio_channel
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc
from xdc.v1 import tiers_pb2 as tpb
from xdc.v1 import tiers_pb2_grpc as tpb_grpc

log = logging.getLogger("xdc.tiers")

# MD_TIER ("xdc-tier") and MD_SHED_REASON ("xdc-shed-reason") live in store/errors.py
# with the store's other metadata keys: its client retries shed calls by them.
MD_TIER_ALIAS = "x-xdc-tier"
__all__ = ["MD_SHED_REASON", "MD_TIER", "MD_TIER_ALIAS", "TierInterceptor", "TierSupervisor"]
HEALTH_ALL = "xdc.tiers"
# An observation that takes longer than this (or fails) counts as "failover": the node
# cannot tell whether it still leads, so it must not claim the upper tiers are fine.
MIN_READ_TIMEOUT_S = 1.0
# Unknown xdc-tier values are logged once each, up to this many.
MAX_WARNED_NAMES = 64
# One Tiers/Status (or NodeInfo) call of a RemoteReader: well under the supervisor's
# observation timeout (MIN_READ_TIMEOUT_S), with the gateway's engine probes beside it.
REMOTE_TIMEOUT_S = 0.5


def health_name(tier: str) -> str:
    return f"xdc.tier.{tier}"


async def wait_health(stub: Any, service: str, *, serving: bool = True,
                      timeout_s: float = 20.0) -> None:
    """Polls `stub` (a grpc_health HealthStub on an aio channel) until `service` is
    SERVING (or NOT_SERVING); TimeoutError after `timeout_s`. A server that does not
    answer yet (UNAVAILABLE: restarting, not listening yet) is polled again, not an
    error: a drill waits this way on processes it has just restarted."""
    want = (health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen = "no answer"
    while True:
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            if r.status == want:
                return
            seen = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            seen = f"UNAVAILABLE: {exc.details()}"
        if loop.time() > deadline:
            raise TimeoutError(f"{service} not {'SERVING' if serving else 'NOT_SERVING'} "
                               f"within {timeout_s}s (last: {seen})")
        await asyncio.sleep(0.02)


@dataclass(frozen=True, slots=True)
class Reading:
    """One observation as the shell takes it; the supervisor adds the times."""

    failover: bool = False
    quorum: bool = True
    pending_events: int = 0
    max_pending_events: int = 0
    commit_lag: int = 0
    down: frozenset[str] = frozenset()
    # Not inputs of the machine: reported in Tiers/Status for servers in front of the
    # store, which tell by them whether a consumer is current (engine/matching_health.py).
    term: int = 0
    commit_position: int = 0
    term_began: str = ""  # geo.replicator.HANDOVER or ELECTION; "" unknown
    # With `failover`, when no store target answered at all (RemoteReader): which, and
    # why. The machine counts it as a failover; refusals and status say this instead.
    unreachable: str = ""


Reader = Callable[[], Awaitable[Reading]]


# ---- the interceptor ----------------------------------------------------------------------

async def _abort(context: grpc.aio.ServicerContext, r: Refusal) -> None:
    err = StoreError(r.code, r.message, metadata=((MD_TIER, r.tier),
                                                  (MD_SHED_REASON, r.reason.value)),
                     retry_after_ms=r.retry_after_ms)
    await context.abort(err.code, err.message, trailing_metadata=err.metadata)


def _refusing(handler: grpc.RpcMethodHandler, r: Refusal) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses before `handler` runs."""
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await _abort(context, r)
    return auth.guarded(handler, refuse)


class TierInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls of tiers the machine does not admit (see the module docstring)."""

    def __init__(self, spec: TierSpec, machine: TierMachine,
                 explain: Callable[[Refusal], Refusal] | None = None) -> None:
        self.spec = spec
        self.machine = machine
        # Rewords a refusal's message with what the machine does not know (a store that
        # does not answer at all); never changes whether or how a call is refused.
        self.explain = explain
        self._warned: set[str] = set()
        # Calls refused, per tier name (for status and tests; keys bounded by the file).
        self.refused: collections.Counter[str] = collections.Counter()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or self.machine.all_admitted:
            return handler  # the common case costs one attribute read
        index = self._declared(handler_call_details.invocation_metadata)
        method = handler_call_details.method
        if index is None:
            if method == READ_METHOD and handler.unary_stream is not None:
                return self._read_guard(handler)  # $all or a stream: the request decides
            service = service_of(method)
            if service is None:
                return handler  # health, reflection, NodeInfo...: never shed
            index = self.spec.tier_of(service)
        refusal = self.machine.refusal(index)
        if refusal is None:
            return handler
        self.refused[refusal.tier] += 1
        return _refusing(handler, self.explain(refusal) if self.explain else refusal)

    def _declared(self, metadata: Sequence[tuple[str, Any]] | None) -> int | None:
        for key, value in metadata or ():
            if key not in (MD_TIER, MD_TIER_ALIAS):
                continue
            name = value.decode() if isinstance(value, bytes) else str(value)
            index = self.spec.resolve(name)
            if index is None and name not in self._warned and \
                    len(self._warned) < MAX_WARNED_NAMES:
                self._warned.add(name)
                log.warning("request names unknown tier or service %r in %s; its method "
                            "decides (tiers: %s)", name, key, ", ".join(self.spec.names))
            return index
        return None

    def _read_guard(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_stream
        machine, spec, refused, explain = self.machine, self.spec, self.refused, self.explain

        def refusal(request: Any) -> Refusal | None:
            service = service_of(READ_METHOD, request)
            assert service is not None
            r = machine.refusal(spec.tier_of(service))
            if r is not None:
                refused[r.tier] += 1
                if explain is not None:
                    r = explain(r)
            return r

        if inspect.isasyncgenfunction(inner):
            async def read(request: Any, context: grpc.aio.ServicerContext) -> Any:
                r = refusal(request)
                if r is not None:
                    await _abort(context, r)
                async with contextlib.aclosing(inner(request, context)) as items:
                    async for item in items:
                        yield item
        else:  # a coroutine handler writing with context.write
            async def read(request: Any, context: grpc.aio.ServicerContext) -> Any:
                r = refusal(request)
                if r is not None:
                    await _abort(context, r)
                return await inner(request, context)

        return grpc.unary_stream_rpc_method_handler(read, handler.request_deserializer,
                                                    handler.response_serializer)


# ---- the supervisor -----------------------------------------------------------------------

class TierSupervisor:
    """Feeds the machine every `interval_s`, publishes tier health, answers Tiers/Status.

    Implements store.server.Companion (interceptors, add_services, start, stop)."""

    def __init__(self, spec: TierSpec, read: Reader, *, node_id: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], int] = time.time_ns) -> None:
        self.spec = spec
        self.node_id = node_id
        self._read = read
        self._clock = clock
        self._wall = wall_clock
        self.machine = TierMachine(spec, clock(), wall_clock())
        self.interceptor = TierInterceptor(spec, self.machine, self._explain)
        self.interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (self.interceptor,)
        # Tiers/Status is status, not control: the gateway sheds by the store's (its
        # RemoteReader), so any authenticated principal may read it.
        self.auth_rules: auth.Rules = {"/xdc.v1.Tiers/Status": auth.authenticated}
        self._health: health.aio.HealthServicer | None = None
        self._task: asyncio.Task[None] | None = None
        self._read_failing = False
        self.reading = Reading(failover=True)  # the last one
        self._read_timeout_s = max(MIN_READ_TIMEOUT_S, 10 * spec.supervisor.interval_s)

    # -- life cycle

    def add_services(self, server: grpc.aio.Server) -> None:
        tpb_grpc.add_TiersServicer_to_server(_TiersService(self), server)

    async def start(self, target: Any) -> None:
        """`target`: a StoreServer, or a grpc_health HealthServicer (aio) to publish in."""
        self._health = getattr(target, "health", target)
        await self._publish(None)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        closer = getattr(self._read, "close", None)
        if closer is not None:
            await closer()

    # -- observing

    async def observe_once(self) -> list[Transition]:
        try:
            async with asyncio.timeout(self._read_timeout_s):
                reading = await self._read()
            if self._read_failing:
                log.info("%s: tier observation works again", self.node_id)
            self._read_failing = False
        except (Exception, asyncio.CancelledError) as exc:  # TimeoutError included
            # A CancelledError from a gRPC call of the reader whose channel was closed
            # under it is one failed observation; this task's own cancellation stops it.
            if isinstance(exc, asyncio.CancelledError) and not cancelled_by_channel():
                raise
            if not self._read_failing:
                log.warning("%s: tier observation failed (%r): counted as a failover",
                            self.node_id, exc)
            self._read_failing = True
            reading = Reading(failover=True)
        self.reading = reading
        obs = Observation(
            at=self._clock(), wall_ns=self._wall(), failover=reading.failover,
            quorum=reading.quorum, pending_events=reading.pending_events,
            max_pending_events=reading.max_pending_events, commit_lag=reading.commit_lag,
            down=reading.down)
        changes = self.machine.observe(obs)
        if changes:
            for t in changes:
                log.info("%s: tier %s %s -> %s %s", self.node_id, t.tier, t.old.value,
                         t.new.value, t.reason.value)
            await self._publish(changes)
        return changes

    async def _run(self) -> None:
        interval = self.spec.supervisor.interval_s
        while True:
            try:
                await self.observe_once()
            except Exception:
                # The tiers must keep being observed: a supervisor that stopped would
                # leave them in whatever state they were, for good.
                log.exception("%s: tier observation failed", self.node_id)
            await asyncio.sleep(interval)

    async def _publish(self, changes: list[Transition] | None) -> None:
        if self._health is None:
            return
        states = self.machine.states
        touched = range(len(states)) if changes is None else sorted({t.index for t in changes})
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        # In tier order, so that a watcher sees tier n serve before tier n+1.
        for i in touched:
            st = states[i]
            await self._health.set(health_name(st.name),
                                   serving if st.state == State.SERVING else not_serving)
        everything = all(st.state == State.SERVING for st in states)
        await self._health.set(HEALTH_ALL, serving if everything else not_serving)

    # -- status

    def _why(self, st: Any) -> str:
        """A tier state's detail, saying that the store does not answer when that is
        what the machine counts as a failover."""
        unreachable = self.reading.unreachable
        if not unreachable or st.reason != Reason.FAILOVER:
            return st.detail
        head = f"tier {st.name!r} (tier {st.index}) is {st.state.value}: {unreachable}"
        return head if st.admitted else f"{head}; retry after {st.retry_after_ms} ms"

    def _explain(self, r: Refusal) -> Refusal:
        if not self.reading.unreachable or r.reason != Reason.FAILOVER:
            return r
        return replace(r, message=self._why(self.machine.states[r.index]))

    def status(self) -> tpb.TiersStatus:
        m = self.machine
        last = m.last
        return tpb.TiersStatus(
            node_id=self.node_id, cause=m.cause.value,
            observed_at_unix_ns=last.wall_ns if last else 0,
            pending_events=last.pending_events if last else 0,
            max_pending_events=last.max_pending_events if last else 0,
            commit_lag=last.commit_lag if last else 0,
            max_commit_lag=self.spec.supervisor.max_commit_lag,
            observations=m.observations,
            term=self.reading.term, commit_position=self.reading.commit_position,
            term_began=self.reading.term_began,
            tiers=[tpb.TierStatus(
                name=st.name, index=st.index, services=self.spec.tiers[st.index].services,
                state=st.state.value, reason=st.reason.value,
                detail=self._why(st), retry_after_ms=st.retry_after_ms,
                since_unix_ns=st.since_wall_ns, recovered_at_unix_ns=st.recovered_at_ns,
                down_at_unix_ns=st.down_at_ns) for st in m.states],
            transitions=[tpb.TierTransition(
                at_unix_ns=t.wall_ns, tier=t.tier, index=t.index, from_state=t.old.value,
                to_state=t.new.value, reason=t.reason.value) for t in m.transitions])


class _TiersService(tpb_grpc.TiersServicer):
    def __init__(self, supervisor: TierSupervisor) -> None:
        self.supervisor = supervisor

    async def Status(self, request: tpb.TiersStatusRequest,
                     context: grpc.aio.ServicerContext) -> tpb.TiersStatus:
        return self.supervisor.status()


# ---- readers ------------------------------------------------------------------------------

def standalone_reader(node: StoreNode) -> Reader:
    """A standalone node is its own majority: only its load can degrade it."""
    async def read() -> Reading:
        writer, log_, commit = node.writer, node.log, node.commit
        if writer is None or log_ is None or commit is None:
            return Reading(failover=True)  # not started, or stopping
        return Reading(pending_events=writer.pending_events,
                       max_pending_events=node.limits.max_pending_events,
                       commit_lag=max(0, log_.last_position - commit.position),
                       commit_position=commit.position)
    return read


def standalone_companion(spec: TierSpec | None = None) -> Callable[[StoreNode], TierSupervisor]:
    """For store.server.serve(companion=...): a supervisor over the standalone node."""
    chosen = spec or tiers_mod.load()
    return lambda node: TierSupervisor(chosen, standalone_reader(node), node_id=node.node_id)


class RemoteReader:
    """Observes a store node through its Tiers/Status: what the order gateway (or any
    server in front of the store) sheds by. Several targets are asked at once: the first
    healthy answer (a leader with its quorum) counts, else the first answer in target
    order. A target that hangs (a paused or cut-off store) so costs no more than the
    call's timeout, whatever its place; before, targets were asked one after the other
    and a hung first one used up the supervisor's whole observation time, every time.
    A store that no target reaches counts as a failover (Reading.unreachable says which
    targets did not answer and why: refusals name them, not a failover)."""

    def __init__(self, targets: str | Sequence[str],
                 timeout_s: float = REMOTE_TIMEOUT_S, tls: Tls | None = None,
                 token: str = "") -> None:
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.tls = tls
        if not self.targets:
            raise ValueError("RemoteReader needs at least one target")
        self.timeout_s = timeout_s
        self.metadata = auth.bearer(token)  # the reader's principal at the store
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._errors: dict[str, str] = {}  # target -> why it did not answer last time
        self._unreachable = ""  # what the last reading said (logged when it changes)

    async def __call__(self) -> Reading:
        asks = [asyncio.ensure_future(self._ask(t)) for t in self.targets]
        try:
            for done in asyncio.as_completed(asks):
                reading = await done
                if reading is not None and not reading.failover and reading.quorum:
                    return self._reached(reading)
            answered = [a.result() for a in asks if a.result() is not None]
            if answered:
                return self._reached(answered[0])
            why = "; ".join(f"{t}: {self._errors.get(t, 'no answer')}" for t in self.targets)
            unreachable = (f"the store does not answer ({why})" if len(self.targets) == 1
                           else f"no store target answers ({why})")
            if not self._unreachable:
                log.warning("%s: counted as a failover until one answers", unreachable)
            self._unreachable = unreachable
            return Reading(failover=True, unreachable=unreachable)
        finally:
            for a in asks:
                a.cancel()

    def _reached(self, reading: Reading) -> Reading:
        if self._unreachable:
            log.info("the store answers again (%s)", ", ".join(self.targets))
            self._unreachable = ""
        return reading

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = aio_channel(target, self.tls,
                                                           options=channel_options())
        return channel

    async def _node_info(self, target: str) -> pb.NodeInfoResponse | None:
        """`target`'s NodeInfo; None when it does not answer in time."""
        try:
            return await pb_grpc.EventStoreStub(self._channel(target)).NodeInfo(
                pb.NodeInfoRequest(), timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            self._errors[target] = _failure(exc, self.timeout_s)
            return None

    async def role(self, target: str) -> str:
        """`target`'s role by its NodeInfo (store/service.py); "" when it does not
        answer in time."""
        info = await self._node_info(target)
        return info.role if info is not None else ""

    async def _ask(self, target: str) -> Reading | None:
        """One target's reading; None when it does not answer in time."""
        channel = self._channel(target)
        try:
            st = await tpb_grpc.TiersStub(channel).Status(tpb.TiersStatusRequest(),
                                                          timeout=self.timeout_s,
                                                          metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                self._errors[target] = _failure(exc, self.timeout_s)
                return None
            # A store without its own tiers (embedded in a test, or one that runs none):
            # it answers, so it is up; its NodeInfo gives the commit lag.
            info = await self._node_info(target)
            if info is None:
                return None
            return Reading(commit_lag=max(0, info.last_position - info.commit_position),
                           term=info.term, commit_position=info.commit_position)
        return Reading(failover=st.cause in ("failover", "starting"),
                       quorum=st.cause != "no_quorum",
                       pending_events=st.pending_events,
                       max_pending_events=st.max_pending_events,
                       commit_lag=st.commit_lag, term=st.term,
                       commit_position=st.commit_position, term_began=st.term_began)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _failure(exc: grpc.aio.AioRpcError, timeout_s: float) -> str:
    """How a call of a RemoteReader failed, in a few words."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout_s:g} s"
    return f"{exc.code().name}: {exc.details()}" if exc.details() else exc.code().name


def gateway_supervisor(store_targets: str | Sequence[str], spec: TierSpec | None = None,
                       node_id: str = "gateway", tls: Tls | None = None,
                       token: str = "",
                       wrap: Callable[[Reader], Reader] | None = None) -> TierSupervisor:
    """A supervisor for a server in front of the store (the order gateway): it sheds by
    the store's state (RemoteReader, as `token`'s principal); `wrap` adds what the server
    observes itself (the gateway: engine/matching_health.MatchingWatch)."""
    reader: Reader = RemoteReader(store_targets, tls=tls, token=token)
    return TierSupervisor(spec or tiers_mod.load(), wrap(reader) if wrap else reader,
                          node_id=node_id)
