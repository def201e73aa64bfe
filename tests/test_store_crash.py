"""Nothing acknowledged is lost: a real `xdc serve` under concurrent append load is
SIGKILLed at seeded random moments; after each restart every acknowledged event is
there, intact and in order, positions are gapless, and no batch is half-visible; and
idempotency held through the kill: every acknowledged append retried is answered with
its original positions, and nothing is appended twice (half the producers use random
ids, which wait in memory before they reach the ids index: store/recent_ids.py)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from store.client import EXACT, AppendError, StoreClient, new_event
from store.process import ServeProcess
from xdc.v1 import eventstore_pb2 as pb

SEED = 20261122
ROUNDS = 5
PRODUCERS = 6


@dataclass
class Acked:
    stream: str
    first_position: int
    last_position: int
    last_revision: int
    ids: list[bytes]
    payloads: list[bytes]
    events: list[pb.ProposedEvent]


async def _load(address: str, rng: random.Random, rnd: int, acked: list[Acked],
                stop: asyncio.Event) -> None:
    async with StoreClient(address, timeout_s=0.5) as client:
        async def producer(k: int) -> None:
            stream = f"p{k}"
            try:
                info = await client.stream_info(stream)
                revision = info.last_revision
            except Exception:  # a new stream
                revision = 0
            seq = 0
            while not stop.is_set():
                n = rng.randint(1, 20)
                tag = f"{rnd}-{k}-{seq}"
                events = [new_event("Tick", json.dumps({"tag": tag, "i": i, "n": n}).encode()
                                    + bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))),
                                    metadata={"batch": tag, "size": str(n)})
                          for i in range(n)]
                if k % 2:  # random ids (a gateway's derived ids are), not time-ordered
                    for e in events:
                        e.id = rng.randbytes(16)
                try:
                    r = await client.append(stream, events, EXACT, revision)
                except (AppendError, Exception):
                    return  # the server died: outcome of this batch unknown
                assert r.last_revision == revision + n
                revision = r.last_revision
                acked.append(Acked(stream, r.first_position, r.last_position, r.last_revision,
                                   [e.id for e in events], [e.data for e in events], events))
                seq += 1

        await asyncio.gather(*(producer(k) for k in range(PRODUCERS)))


async def _verify(address: str, acked: list[Acked]) -> int:
    async with StoreClient(address) as client:
        everything = []
        async for batch in client.read_batches("$all", limit=100_000):
            everything.extend(batch.events)
    positions = [e.position for e in everything]
    assert positions == list(range(1, len(positions) + 1)), "positions must be gapless from 1"
    by_position = {e.position: e for e in everything}
    for a in acked:
        for i, p in enumerate(range(a.first_position, a.last_position + 1)):
            e = by_position.get(p)
            assert e is not None, f"acknowledged position {p} lost"
            assert (e.stream, e.id, e.data) == (a.stream, a.ids[i], a.payloads[i]), \
                f"acknowledged event at {p} changed"
        assert by_position[a.last_position].revision == a.last_revision
    # No partial batch: every batch tag present is present whole, contiguously.
    seen: dict[str, list[int]] = defaultdict(list)
    for e in everything:
        seen[e.metadata["batch"]].append(e.position)
    for tag, ps in seen.items():
        size = int(by_position[ps[0]].metadata["size"])
        assert len(ps) == size and ps == list(range(ps[0], ps[0] + size)), f"partial batch {tag}"
    # Revisions per stream are dense.
    revisions: dict[str, list[int]] = defaultdict(list)
    for e in everything:
        revisions[e.stream].append(e.revision)
    for stream, revs in revisions.items():
        assert revs == list(range(1, len(revs) + 1)), f"stream {stream} has a revision gap"
    return len(everything)


async def _retry_all(address: str, acked: list[Acked]) -> None:
    """Every acknowledged append again, as a client unsure of its outcome would send it."""
    async with StoreClient(address) as client:
        async def retry(a: Acked) -> None:
            before = a.last_revision - len(a.events)
            r = await client.append(a.stream, a.events, EXACT, before)
            assert (r.first_position, r.last_position, r.last_revision) == (
                a.first_position, a.last_position, a.last_revision), \
                f"retried append of {a.stream} at {a.first_position} not answered as the original"
        for i in range(0, len(acked), 200):
            await asyncio.gather(*(retry(a) for a in acked[i:i + 200]))


async def _crash_round(node: ServeProcess, rng: random.Random, rnd: int,
                       acked: list[Acked]) -> None:
    stop = asyncio.Event()
    load = asyncio.ensure_future(_load(node.address, rng, rnd, acked, stop))
    await asyncio.sleep(rng.uniform(0.2, 0.8))  # the random moment of the crash
    node.signal(signal.SIGKILL)
    stop.set()
    await asyncio.wait_for(load, 30)


@pytest.mark.parametrize("seed", [SEED])
def test_sigkill_under_load_loses_no_acknowledged_event(tmp_path: Path, seed: int) -> None:
    data = str(tmp_path / "node")
    acked: list[Acked] = []
    total_before = 0
    for rnd in range(ROUNDS):
        rng = random.Random(seed * 100 + rnd)
        with ServeProcess(data) as node:
            acked_before = len(acked)
            asyncio.run(asyncio.wait_for(_crash_round(node, rng, rnd, acked), 60))
            assert len(acked) > acked_before, "the load must have made progress before the kill"
        with ServeProcess(data) as node:
            total = asyncio.run(asyncio.wait_for(_verify(node.address, acked), 60))
            assert total >= total_before
            total_before = total
            asyncio.run(asyncio.wait_for(_retry_all(node.address, acked), 60))
            assert asyncio.run(asyncio.wait_for(_verify(node.address, acked), 60)) == total, \
                "a retried acknowledged append was written again"
    assert sum(a.last_position - a.first_position + 1 for a in acked) <= total_before


def test_a_second_process_on_a_data_directory_in_use_is_refused(tmp_path: Path) -> None:
    """LMDB lets two processes write one environment, but each store keeps the log's tip
    in memory: a second `xdc serve` on the same directory handed out the first one's
    positions, and an event it acknowledged was gone from the first one's reads. Now the
    second exits 1 naming the directory, and writes nothing, even with the holder's pid
    file removed (the lock is on the directory); once
    the holder is SIGKILLed the directory opens again with every acknowledged event."""
    data = str(tmp_path / "n")

    async def append(address: str, k: int) -> int:
        async with StoreClient(address) as client:
            return (await client.append("dup", new_event("T", b"%d" % k))).first_position

    with ServeProcess(data) as first:
        assert first.proc is not None
        assert asyncio.run(append(first.address, 1)) == 1
        # The pid file is only what the message quotes: removed as stale, the directory
        # is still locked (a lock on a file in it was not, once the file was gone).
        (tmp_path / "n" / "xdc.lock").unlink()
        second = subprocess.run([sys.executable, "-m", "xdc.cli", "serve", "--data", data,
                                 "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                                timeout=30)
        assert second.returncode == 1, second.stdout
        assert f"data directory {data} is in use by another store process" in second.stderr, \
            second.stderr
        assert '"ready"' not in second.stdout
        assert asyncio.run(append(first.address, 2)) == 2
        first.signal(signal.SIGKILL)
        first.proc.wait(10)
    with ServeProcess(data) as again:
        async def read() -> list[bytes]:
            async with StoreClient(again.address) as client:
                return [e.data for e in await client.read("dup")]
        assert asyncio.run(read()) == [b"1", b"2"]
