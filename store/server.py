"""Runs a store node behind a gRPC server, with health checking and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from store.auth import AuthConfig, Guard, Rules
from store.limits import Limits
from store.node import StoreNode, WriterFactory
from store.service import AUTH_RULES, SERVICE, BadRequest, EventStoreService, Parser
from xdc import telemetry
from xdc.tls import Tls, server_credentials


def server_options(limits: Limits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Clients and peers ping every few seconds to notice dead links; allow it
        # instead of answering with GOAWAY "too_many_pings".
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class RequestGuard(grpc.aio.ServerInterceptor):
    """Answers a request whose bytes do not parse with INVALID_ARGUMENT naming the
    method, for every service of a server (a generated servicer's deserializer raises,
    which gRPC answers with UNKNOWN). The store's own handlers parse with Parser and
    refuse in order themselves (an AppendStream answers the messages before a bad one
    first): they pass through unchanged.

    Installed last, next to the services, so it sees their handlers, which are made
    once at registration: the wrapped handlers are cached by identity."""

    def __init__(self) -> None:
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or isinstance(
                handler.request_deserializer, Parser):
            return handler
        cached = self._wrapped.get(id(handler))
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guarded(handler, details.method)
        if len(self._wrapped) < MAX_GUARDED_HANDLERS:
            self._wrapped[id(handler)] = (handler, guarded)
        return guarded


# Distinct handlers RequestGuard keeps wrapped (one per method a server registers).
MAX_GUARDED_HANDLERS = 1024


def _guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that never raises and a behaviour that refuses a
    BadRequest with INVALID_ARGUMENT before the servicer sees it. Handlers that are not
    asyncio ones are left alone (gRPC runs those on threads; xdc has none)."""
    inner = (handler.unary_unary or handler.unary_stream or handler.stream_unary
             or handler.stream_stream)
    agen = inspect.isasyncgenfunction(inner)
    if not (agen or inspect.iscoroutinefunction(inner)):
        return handler

    async def one(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return request

    async def each(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                yield await one(request, context)
        return checked()

    check = each if handler.request_streaming else one
    # The same kind of callable as the servicer's: gRPC picks the calling convention
    # (async generator or coroutine) by inspecting it.
    if agen:
        async def behavior(arg: Any, context: grpc.aio.ServicerContext) -> Any:
            async with contextlib.aclosing(inner(await check(arg, context), context)) as out:
                async for item in out:
                    yield item
    else:
        async def behavior(arg: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(await check(arg, context), context)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return make(behavior, Parser(handler.request_deserializer, f"request of {method}"),
                handler.response_serializer)


def new_server(limits: Limits | None = None,
               interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """Every gRPC server xdc runs (store nodes, the gateway, engine control, the OTLP
    receiver): message sizes bounded by `limits`, and malformed request bytes refused
    with INVALID_ARGUMENT (RequestGuard, after `interceptors`)."""
    return grpc.aio.server(options=server_options(limits or Limits()),
                           interceptors=[*interceptors, RequestGuard()])


def listen_on(server: grpc.aio.Server, address: str, tls: Tls | None = None, *,
              peer: bool = False) -> int:
    """Binds `address`: plaintext without `tls`; with it TLS, demanding a client
    certificate on a peer port and, on a client port, as `tls.require_client_cert` says."""
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(
                tls, require_client_cert=peer or tls.require_client_cert))
    except RuntimeError as exc:  # gRPC reports a failed bind this way
        raise OSError(f"cannot listen on {address} (in use?): {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


class StoreServer:
    """A node and its gRPC server; `start` binds, `stop` drains and closes."""

    def __init__(self, node: StoreNode, listen: str, *,
                 writer_factory: WriterFactory | None = None,
                 extra_listen: Sequence[str] = (),
                 add_services: Callable[[grpc.aio.Server], None] | None = None,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 tls: Tls | None = None, auth: AuthConfig | None = None,
                 auth_rules: Rules | None = None) -> None:
        self.node = node
        self.listen = listen
        self.writer_factory = writer_factory
        # Peer ports (geo's replication): with TLS, they always demand a member's
        # client certificate.
        self.extra_listen = list(extra_listen)
        self.tls = tls
        # Called once the node is started and before the server starts (gRPC takes no
        # new services after that).
        self.add_services = add_services
        # Run on every call before its handler, in order (geo passes its tier
        # interceptor here: the store itself knows nothing of tiers).
        self.interceptors = list(interceptors)
        # With an auth file every call is authenticated and checked (store/auth.py), before
        # the interceptors above: an unknown caller learns nothing of tiers. `auth_rules`
        # are the rules of the services `add_services` adds.
        self.guard = (Guard(auth, {**AUTH_RULES, **(auth_rules or {})})
                      if auth is not None else None)
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._lag_gauge = 0

    async def start(self) -> None:
        await self.node.start(self.writer_factory)
        try:
            await self._serve()
        except BaseException:
            await self.node.stop()  # its log and the data directory's lock with it
            raise

    async def _serve(self) -> None:
        guard = [self.guard] if self.guard is not None else []
        server = new_server(self.node.limits,
                            [*telemetry.server_interceptors(), *guard, *self.interceptors])
        service = EventStoreService(self.node, guard=self.guard)
        server.add_generic_rpc_handlers((service.handler(),))
        self._lag_gauge = telemetry.add_gauge_source("xdc.subscription.lag.records",
                                                     service.subscription_lag)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.add_services is not None:
            self.add_services(server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = listen_on(server, self.listen, self.tls)
        for address in self.extra_listen:
            listen_on(server, address, self.tls, peer=True)
        await server.start()
        self.server = server
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float = 2.0) -> None:
        telemetry.remove_gauge_source("xdc.subscription.lag.records", self._lag_gauge)
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace_s)
        await self.node.stop()


async def run_until_signalled(start: Callable[[], Awaitable[str]],
                              stop: Callable[[], Awaitable[None]],
                              failed: Callable[[], Awaitable[object]] | None = None) -> bool:
    """Starts, prints one JSON `ready` line with the bound address (tests and scripts read
    it to learn a port chosen by the OS), and stops cleanly on SIGTERM or SIGINT, or
    when `failed` returns (then True: the caller exits non-zero so that a supervisor
    restarts the process from its durable state)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    address = await start()
    # What start-up built (modules, the gRPC and protobuf machinery, a restored engine
    # book) lives as long as the process: out of the cyclic GC's full collections, which
    # would re-scan it every time (~10 ms for the 40k objects of the imports alone: a
    # latency spike on whatever request is in flight).
    gc.collect()
    gc.freeze()
    print(json.dumps({"event": "ready", "listen": address, "pid": os.getpid()}), flush=True)
    waits = [asyncio.ensure_future(stopping.wait())]
    if failed is not None:
        waits.append(asyncio.ensure_future(failed()))
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in pending:
        w.cancel()
    has_failed = failed is not None and waits[1] in done
    await stop()
    print(json.dumps({"event": "failed" if has_failed else "stopped"}), flush=True)
    return has_failed


class Companion(Protocol):
    """Something that runs beside a standalone server (geo's tier supervisor): its
    interceptors and services are installed in the server, it starts once the server
    is up and stops before the server does."""

    interceptors: Sequence[grpc.aio.ServerInterceptor]
    auth_rules: Rules  # access rules of the services it adds (store/auth.py)

    def add_services(self, server: grpc.aio.Server) -> None: ...

    async def start(self, server: StoreServer) -> None: ...

    async def stop(self) -> None: ...


def serve(data_dir: str, listen: str, limits: Limits | None = None,
          node_id: str = "standalone",
          companion: Callable[[StoreNode], Companion] | None = None,
          tls: Tls | None = None, auth: AuthConfig | None = None) -> int:
    node = StoreNode(data_dir, limits, node_id=node_id)
    extra = companion(node) if companion is not None else None
    server = StoreServer(node, listen,
                         add_services=extra.add_services if extra is not None else None,
                         interceptors=extra.interceptors if extra is not None else (),
                         tls=tls, auth=auth,
                         auth_rules=extra.auth_rules if extra is not None else None)

    async def start() -> str:
        await server.start()
        node.client_address = server.address
        if extra is not None:
            await extra.start(server)
        return server.address

    async def stop() -> None:
        if extra is not None:
            await extra.stop()
        await server.stop()

    try:
        if asyncio.run(run_until_signalled(start, stop, node.wait_failed)):
            print(f"xdc serve: writer failed: {node.writer.fatal!r}",  # type: ignore[union-attr]
                  file=sys.stderr)
            return 1
    except OSError as exc:
        print(f"xdc serve: {exc}", file=sys.stderr)
        return 1
    return 0

