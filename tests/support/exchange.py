"""Exchange fixtures for real-process engine tests: a seeded order workload as input
events, engine instances as `xdc engine run` processes, and the checks that compare what
the store holds with a no-failure replay of the same inputs."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from engine.workload import check_exactly_once as _check_exactly_once
from engine.workload import command_events, outputs_through
from store.client import StoreClient
from store.process import ServeProcess
from tests.test_book_model import random_commands
from xdc.v1 import eventstore_pb2 as pb

GROUP = "sim"


@dataclass(frozen=True)
class Rec:
    """A RecordedEvent as Consumer.on_record reads it (engine.consumer.RecordLike)."""

    stream: str
    type: str
    position: int
    revision: int
    timestamp_ns: int
    data: bytes


def workload(seed: int, n: int) -> list[pb.ProposedEvent]:
    """Setup (symbols, deposits) then ``n`` seeded random commands, as input events. Every
    50th is a poison input (a NewOrder whose bytes are not a command)."""
    return list(command_events(GROUP, random_commands(seed, n), f"w{seed}", poison_every=50))


def start_engine(store: str, instance: str, lease: str, *, seed: int = 0,
                 snapshot_every: int = 300, role: str = "auto",
                 verify_window: int = 100_000, extra: tuple[str, ...] = ()) -> ServeProcess:
    return ServeProcess(command=[
        "engine", "run", "--store", store, "--group", GROUP, "--instance", instance,
        "--lease", lease, "--snapshot-every", str(snapshot_every), "--role", role,
        "--verify-window", str(verify_window), *extra],
        env={"PYTHONHASHSEED": str(seed)}).start()


async def check_exactly_once(client: StoreClient) -> tuple[list[pb.RecordedEvent],
                                                          list[pb.RecordedEvent]]:
    """engine.workload.check_exactly_once for the tests' group (AssertionError on a
    violation)."""
    return await _check_exactly_once(client, GROUP)


async def wait_outputs_through(client: StoreClient, position: int, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await outputs_through(client, GROUP) < position:
        if loop.time() > deadline:
            raise AssertionError(f"outputs not committed through input {position}")
        await asyncio.sleep(0.05)


def lease_dir(tmp: Path) -> str:
    d = tmp / "leases"
    os.makedirs(d, exist_ok=True)
    return f"file:{d}"
