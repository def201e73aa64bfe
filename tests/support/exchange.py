"""Exchange fixtures for real-process engine tests: a seeded order workload as input
events, engine instances as `xdc engine run` processes, and the checks that compare what
the store holds with a no-failure replay of the same inputs."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import grpc

from engine import events as ev
from engine import wire
from engine.consumer import Consumer
from store.client import StoreClient
from store.process import ServeProcess
from tests.test_book_model import random_commands
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc

GROUP = "sim"


def workload(seed: int, n: int) -> list[pb.ProposedEvent]:
    """Setup (symbols, deposits) then ``n`` seeded random commands, as input events. Every
    50th is a poison input (a NewOrder whose bytes are not a command)."""
    out = []
    for i, cmd in enumerate(random_commands(seed, n)):
        out.append(wire.command_event(GROUP, dataclasses.replace(cmd, ts_ns=0),  # type: ignore[type-var]
                                      f"w{seed}:{i}"))
        if i % 50 == 49:
            out.append(pb.ProposedEvent(id=wire.derived_id("poison", seed, i), type="NewOrder",
                                        content_type=wire.COMMAND_CONTENT_TYPE,
                                        data=b"\x01poison"))
    return out


def start_engine(store: str, instance: str, lease: str, *, seed: int = 0,
                 snapshot_every: int = 300, role: str = "auto") -> ServeProcess:
    return ServeProcess(command=[
        "engine", "run", "--store", store, "--group", GROUP, "--instance", instance,
        "--lease", lease, "--snapshot-every", str(snapshot_every), "--role", role],
        env={"PYTHONHASHSEED": str(seed)}).start()


async def status(address: str) -> xpb.EngineStatus | None:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            return await xpb_grpc.EngineControlStub(ch).Status(xpb.EngineStatusRequest(),
                                                               timeout=5)
        except grpc.aio.AioRpcError:
            return None


async def read_all(client: StoreClient, stream: str) -> list[pb.RecordedEvent]:
    try:
        return await client.read(stream, limit=100_000)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise


async def check_exactly_once(client: StoreClient) -> tuple[list[pb.RecordedEvent],
                                                          list[pb.RecordedEvent]]:
    """The output stream holds, exactly once and in order, the outputs a single instance
    computes from the input stream with no failure; every order has one outcome."""
    inputs = await read_all(client, wire.input_stream(GROUP))
    outputs = await read_all(client, wire.output_stream(GROUP))
    ref = Consumer(GROUP)
    for e in inputs:
        ref.on_input(e.position, e.type, e.data, e.timestamp_ns)
    expected = [p.blob for p in ref.pending]
    committed = [b for o in outputs for b in wire.decode_output(o.data).blobs]
    assert len(committed) == len(expected), (len(committed), len(expected))
    assert committed == expected
    by_input = dict(wire.blob_outputs(b) for b in committed)
    for e in inputs:
        if e.type == "NewOrder":
            outcomes = [r for r in by_input[e.position] if r[0] in (ev.ACCEPTED, ev.REJECTED)]
            assert len(outcomes) == 1, (e.position, by_input[e.position])
    return inputs, outputs


async def wait_outputs_through(client: StoreClient, position: int, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        outputs = await client.read(wire.output_stream(GROUP), backwards=True, limit=1) \
            if await _exists(client) else []
        if outputs and int(outputs[0].metadata["last_input"]) >= position:
            return
        if loop.time() > deadline:
            raise AssertionError(f"outputs not committed through input {position}")
        await asyncio.sleep(0.05)


async def _exists(client: StoreClient) -> bool:
    try:
        await client.stream_info(wire.output_stream(GROUP))
        return True
    except grpc.aio.AioRpcError:
        return False


def lease_dir(tmp: Path) -> str:
    d = tmp / "leases"
    os.makedirs(d, exist_ok=True)
    return f"file:{d}"
