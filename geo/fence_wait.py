"""What a voter that lost its disk serves while it waits for its fence (geo/node.py,
"Lost disks"): it asks the other voters for their promised terms and may not vote,
acknowledge or serve data before n - quorum + 1 of them answered. Serving nothing at all,
`xdc cluster status` showed it "unreachable", as a dead node; now its client port
answers, for that wait only:

- Replication.Status: role "fencing", with the voters it needs, those that answered and
  those it still waits for (NodeStatus.fence_*), so that an operator sees whom to bring
  back;
- every other call with UNAVAILABLE naming the wait and whom it waits for (and
  xdc-retry-after-ms): EventStore (appends, reads, subscriptions, NodeInfo), Tiers, and
  Replication's Stream, Tip and Switchover. Tip above all: a waiting voter has promised
  nothing yet, and an answer of 0 would count towards another wiped voter's fence.
  Stream: it must acknowledge nothing before it is fenced.

Health says NOT_SERVING. The peer port stays unbound (peers see it as unreachable, as
before). Authentication is the node's own: the same TLS, and with an auth file the same
Guard and rules as the server that replaces this one once the fence is persisted (the
port is handed over: this server is stopped first).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geo.transport import ReplicationService
from store.auth import Guard
from store.errors import MD_NOT_RUN, MD_RETRY_AFTER_MS
from store.limits import Limits
from store.server import listen_on, new_server
from store.service import SERVICE
from xdc.tls import Tls
from xdc.v1 import eventstore_pb2, tiers_pb2
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc

ROLE = "fencing"
# What a refused caller is told to wait before it asks again.
RETRY_AFTER_MS = 1000
# The services refused whole while the voter waits (Replication answers Status).
REFUSED_SERVICES = (eventstore_pb2.DESCRIPTOR.services_by_name["EventStore"],
                    tiers_pb2.DESCRIPTOR.services_by_name["Tiers"])


@dataclass
class FenceWait:
    """A voter's wait for the promised terms of `needed` of the `others` (the other
    voters); `answered` maps those that answered to the highest term they promised."""

    node_id: str
    region: str
    others: list[str]
    needed: int
    answered: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert 0 <= self.needed <= len(self.others), (self.needed, self.others)

    @property
    def missing(self) -> list[str]:
        return [p for p in self.others if p not in self.answered]

    @property
    def done(self) -> bool:
        return len(self.answered) >= self.needed

    def describe(self) -> str:
        return (f"it lost its disk and waits for the promised terms of "
                f"{self.needed - len(self.answered)} more of the other voters before it can "
                f"be fenced (answered: {', '.join(sorted(self.answered)) or 'none'}; "
                f"waiting for: {', '.join(self.missing)})")

    def refusal(self, what: str) -> str:
        return f"{self.node_id} serves no {what} yet: {self.describe()}"

    def status(self) -> rpb.NodeStatus:
        return rpb.NodeStatus(node_id=self.node_id, region=self.region, role=ROLE,
                              voter=True, fence_needed=self.needed,
                              fence_answered=sorted(self.answered),
                              fence_waiting_for=self.missing)


async def _refuse(context: grpc.aio.ServicerContext, message: str) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, message,
                        trailing_metadata=((MD_RETRY_AFTER_MS, str(RETRY_AFTER_MS)),
                                           (MD_NOT_RUN, "1")))


def _not_served(*args: Any) -> Any:
    raise AssertionError("not served while waiting for the fence")


class _FenceWaitReplication(ReplicationService):
    """Status answered from the wait; Stream, Tip and Switchover refused, after the same
    certificate checks as the node's own service (so a stranger learns nothing)."""

    def __init__(self, wait: FenceWait, cluster: str, members: set[str],
                 secure: bool) -> None:
        async def status() -> rpb.NodeStatus:
            return wait.status()
        super().__init__(cluster, wait.node_id, members, _not_served, _not_served, status,
                         _not_served, secure=secure)
        self.wait = wait

    async def Stream(self, request_iterator: Any,
                     context: grpc.aio.ServicerContext) -> rpb.StreamSummary:
        await self._caller(context, "replication", ("member",))
        await _refuse(context, self.wait.refusal("replication"))
        raise AssertionError("unreachable")

    async def Tip(self, request: rpb.TipRequest,
                  context: grpc.aio.ServicerContext) -> rpb.TipResponse:
        await self._caller(context, "Tip", ("member",))
        await _refuse(context, self.wait.refusal("Tip (it has promised nothing yet)"))
        raise AssertionError("unreachable")

    async def Switchover(self, request: rpb.SwitchoverRequest,
                         context: grpc.aio.ServicerContext) -> rpb.SwitchoverResponse:
        await self._caller(context, "Switchover", ("admin",))
        await _refuse(context, self.wait.refusal("switchover"))
        raise AssertionError("unreachable")


def _refusing(method: MethodDescriptor, wait: FenceWait) -> grpc.RpcMethodHandler:
    """A handler of `method`'s kind that refuses every call. The request is parsed with
    the method's own type, so that a Guard's rules see what they expect."""
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    what = f"{method.containing_service.name}.{method.name}"

    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await _refuse(context, wait.refusal(what))

    make: Callable[..., grpc.RpcMethodHandler] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]
    return make(refuse, request.FromString, response.SerializeToString)


@contextlib.asynccontextmanager
async def serving(wait: FenceWait, *, address: str, cluster: str, members: set[str],
                  tls: Tls | None, limits: Limits, guard: Guard | None) -> AsyncIterator[None]:
    """Serves `wait` on `address` (the node's client port) until the block ends; the
    port is free again then."""
    server = new_server(limits, [guard] if guard is not None else [])
    server.add_generic_rpc_handlers(tuple(
        grpc.method_handlers_generic_handler(
            service.full_name, {m.name: _refusing(m, wait) for m in service.methods})
        for service in REFUSED_SERVICES))
    rpb_grpc.add_ReplicationServicer_to_server(
        _FenceWaitReplication(wait, cluster, members, secure=tls is not None), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        # In the block that stops it: the port is bound from here, and a cancel can land
        # in start() (it awaits).
        listen_on(server, address, tls)
        await server.start()
        yield
    finally:
        await server.stop(None)
