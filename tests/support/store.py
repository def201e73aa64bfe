"""In-process store servers for API tests: a real LMDB environment in a temporary
directory behind a real gRPC server on a loopback port chosen by the OS."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from store.auth import AuthConfig
from store.client import StoreClient
from store.errors import StoreError
from store.limits import Limits
from store.node import StoreNode
from store.server import StoreServer

T = TypeVar("T")


@contextlib.asynccontextmanager
async def running_store(data_dir: Path, limits: Limits | None = None,
                        auth: AuthConfig | None = None,
                        **client_options: Any) -> AsyncIterator[tuple[StoreServer, StoreClient]]:
    server = StoreServer(StoreNode(data_dir, limits), "127.0.0.1:0", auth=auth)
    await server.start()
    client = StoreClient(server.address, limits=limits, **client_options)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(grace_s=0.5)


def run(coro_fn: Callable[[], Awaitable[T]], timeout_s: float = 60.0) -> T:
    """Runs an async test body with a hard timeout, so a hang fails instead of stalling."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout_s)
    return asyncio.run(bounded())


async def awaits(value: Awaitable[Any], expected: object) -> bool:
    """Whether `value` awaits to `expected`: a predicate for wait_until."""
    return await value == expected


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0,
                     what: str = "condition") -> None:
    """Polls `predicate` (plain or async) until it holds; AssertionError after the
    timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    async def holds() -> bool:
        got = predicate()
        return bool(await got) if inspect.isawaitable(got) else bool(got)
    while not await holds():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


class LoopThread:
    """An event loop of its own in a background thread, for synchronous test code (e.g.
    hypothesis, which cannot drive a coroutine) that talks to real asyncio servers."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop",
                                        daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs `coro` on the loop; its result, or its exception, here."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self.timeout_s)
        self.loop.close()


@contextlib.contextmanager
def refusing_port() -> Iterator[str]:
    """HOST:PORT of a port bound and not listening (held for the test): connections to it
    are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def streams_opened(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client's "append stream to X opened" log lines (logger xdc.client, DEBUG), in
    order: where its appends went."""
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("append stream to")
            and r.getMessage().endswith("opened")]


@contextlib.contextmanager
def in_thread(manager: Callable[[], AbstractAsyncContextManager[T]],
              timeout_s: float = 60.0) -> Iterator[tuple[T, LoopThread]]:
    """Enters the async context manager `manager()` (running_store, a cluster...) on a
    LoopThread and yields its value with the thread; exits it there afterwards."""
    thread = LoopThread(timeout_s)
    try:
        cm = manager()
        value = thread.call(cm.__aenter__())
        try:
            yield value, thread
        finally:
            thread.call(cm.__aexit__(None, None, None))
    finally:
        thread.close()


@dataclass
class HeldWriter:
    """A standalone node's writer held before its next group (`held` is set once it
    waits there) until `gate` is set: the queue then fills deterministically, as it
    would behind a slow disk."""

    gate: threading.Event
    held: threading.Event


def hold_writer(node: StoreNode, timeout_s: float = 30.0) -> HeldWriter:
    """Holds `node`'s writer in its `admit` hook (asked before each group) until the
    returned gate is set; set it before stopping the node."""
    hold = HeldWriter(threading.Event(), threading.Event())
    standalone_admit = node.admit

    def held_admit() -> int | StoreError:
        hold.held.set()
        hold.gate.wait(timeout_s)
        return standalone_admit()

    node.admit = held_admit
    return hold
