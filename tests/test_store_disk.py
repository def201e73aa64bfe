"""A full disk: a clear refusal, nothing partial, the store keeps serving reads and
comes back intact. The disk is a real 3 MiB tmpfs (mounting needs root, as in CI)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from store.client import AppendError, StoreClient, new_event
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import run, running_store


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_refuses_cleanly_and_keeps_serving(small_disk: Path) -> None:
    data = small_disk / "node"
    acked: list[tuple[int, int]] = []

    async def fill() -> None:
        async with running_store(data) as (_, c):
            refusal = None
            for i in range(1000):
                try:
                    r = await c.append("s", [new_event("T", b"%06d" % i + b"x" * 1000)
                                             for _ in range(10)])
                    acked.append((r.first_position, r.last_position))
                except AppendError as err:
                    refusal = err
                    break
            assert refusal is not None, "a 3 MiB disk must fill up"
            assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "storage full or failing, nothing was written" in refusal.message
            assert "bytes free on the data volume" in refusal.message
            # Reads still work and show exactly what was acknowledged.
            events = await c.read("$all", limit=100_000)
            assert [e.position for e in events] == list(range(1, acked[-1][1] + 1))
            info = await c.node_info()
            assert info.last_position == info.commit_position == acked[-1][1]

    async def reopen() -> None:
        async with running_store(data) as (_, c):
            events = await c.read("s", limit=100_000)
            assert [e.revision for e in events] == list(range(1, acked[-1][1] + 1))
            assert all(e.data.endswith(b"x" * 1000) for e in events)

    run(fill)
    run(reopen)


def test_full_disk_on_a_cluster_node_fails_it_and_loses_nothing(
        etcd: EtcdCluster, small_disk: Path, tmp_path: Path) -> None:
    """A member whose disk fills must not linger with a dead writer: it fails visibly
    (`xdc node run` then exits non-zero), answers what waited on it, and the other two
    go on; every acknowledged event is on them afterwards."""
    async def body() -> None:
        base = tmp_path / "cluster"
        base.mkdir()
        (base / "eu-west-1").symlink_to(small_disk)
        cluster = LocalCluster.make(etcd.endpoints, base)
        await cluster.start()
        victim = cluster.nodes["eu-west-1"]
        acked = []
        try:
            async with StoreClient(cluster.client_targets(), timeout_s=20) as c:
                for i in range(2000):  # 20 MB offered: the 3 MiB disk fills long before
                    if victim.failure is not None:
                        break
                    r = await c.append("s", [new_event("T", b"%06d" % i + b"x" * 1000)
                                             for _ in range(10)])
                    acked.append(r)
                assert victim.failure is not None, "the 3 MiB disk must fill up"
                await asyncio.wait_for(victim.wait_failed(), 5)
                # The two others are a majority: writes go on (after an election if the
                # failed node led).
                for i in range(20):
                    acked.append(await c.append("after", [new_event("T", b"%d" % i)]))
            await cluster.stop("eu-west-1")
            upto = await cluster.converged()
            assert upto >= acked[-1].last_position
            leader = await cluster.leader()
            async with StoreClient(leader.address) as reader:
                records = {e.position: e for e in await reader.read("$all", limit=100_000)}
            for a in acked:
                assert all(p in records for p in range(a.first_position, a.last_position + 1))
            assert [e.data for e in records.values() if e.stream == "after"] == [
                b"%d" % i for i in range(20)]
        finally:
            await cluster.stop()
    run(body, timeout_s=120)
