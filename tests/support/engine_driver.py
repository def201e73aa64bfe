"""A synchronous TEST DRIVER standing in for a matching engine, not the engine.

It reads one group's input stream, runs the pure core (``engine.book.Engine``) on each
command and appends the outputs as ``wire.OutputBatch`` events to the group's output
stream: just enough for the gateway's tests to see real outputs. It has none of the
real consumer's duties (``engine/consumer.py``, ``engine/runner.py``): no leases, no
warm replica, no snapshots, no controls, no resume after a restart. Inputs it cannot
decode produce no outputs here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from engine import wire
from engine.book import Engine
from engine.codec import GENESIS, CodecError, encode_event
from store.client import EXACT, CaughtUp, Checkpoint, StoreClient
from xdc.v1 import eventstore_pb2 as pb


@dataclass
class EngineDriver:
    client: StoreClient
    group: str
    engine: Engine = field(default_factory=Engine)
    input_revision: int = 0  # last input stream revision processed
    last_input: int = 0  # its global position
    output_revision: int = 0  # the output stream's last revision (we are its only writer)
    chain: bytes = GENESIS
    batches: int = 0
    # Rewrites each input's encoded output events before they are emitted (tests of what
    # a gateway makes of outputs it does not know: an engine at a newer output version).
    splice: Callable[[list[bytes]], list[bytes]] | None = None

    def _process(self, events: list[pb.RecordedEvent]) -> wire.OutputBatch | None:
        if not events:
            return None
        blobs = []
        chain = self.chain
        for e in events:
            out: list[tuple] = []
            if e.type in wire.COMMAND_TYPES:
                try:
                    self.engine.process(wire.decode_input(e.data, e.timestamp_ns), out)
                except CodecError:
                    out = []
            if out:
                encoded = [encode_event(raw) for raw in out]
                if self.splice is not None:
                    encoded = self.splice(encoded)
                blob = wire.input_blob(e.position, encoded)
                chain = wire.chain_next(chain, blob)
                blobs.append(blob)
            self.input_revision = e.revision
            self.last_input = e.position
        self.chain = chain
        return wire.OutputBatch(events[0].position, events[-1].position, chain, tuple(blobs))

    async def _emit(self, batches: list[wire.OutputBatch | None]) -> None:
        events = [b.event(self.group) for b in batches if b is not None]
        if not events:
            return
        r = await self.client.append(wire.output_stream(self.group), events, EXACT,
                                     self.output_revision)
        self.output_revision = r.last_revision
        self.batches += len(events)

    async def step(self, split: bool = False) -> int:
        """Processes every input appended since the last step as one output batch (with
        ``split``, one batch per input, all appended together); returns the number of
        inputs processed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while True:
            try:
                events = await self.client.read(wire.input_stream(self.group),
                                                start=self.input_revision + 1, limit=10_000)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return 0
                # A store that is still starting (or shedding reads) answers UNAVAILABLE:
                # retried until it serves, as any consumer would.
                if exc.code() != grpc.StatusCode.UNAVAILABLE or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        if split:
            await self._emit([self._process([e]) for e in events])
        else:
            await self._emit([self._process(events)])
        return len(events)

    async def run(self) -> None:
        """Follows the input stream live: one output batch per delivered RecordBatch.
        Starts after the last input processed so far; run it as a task and cancel it."""
        stream = wire.input_stream(self.group)
        async for item in self.client.subscribe(after_position=self.last_input,
                                                stream_prefix=stream, batches=True):
            if isinstance(item, CaughtUp | Checkpoint):
                continue
            await self._emit([self._process([e for e in item.events if e.stream == stream])])


@contextlib.asynccontextmanager
async def running_driver(driver: EngineDriver):  # type: ignore[no-untyped-def]
    """``driver.run()`` as a task for the duration of the block, cancelled after it."""
    task = asyncio.get_running_loop().create_task(driver.run())
    try:
        yield driver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
