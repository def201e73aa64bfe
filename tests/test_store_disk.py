"""A full disk: a clear refusal, nothing partial, the store keeps serving reads and
comes back intact. The disk is a real 3 MiB tmpfs (mounting needs root, as in CI)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from store.client import AppendError, StoreClient, new_event
from store.process import ServeProcess
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import run, running_store
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc


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


async def _fill(client: StoreClient) -> None:
    """Appends 10 KiB until the disk refuses (RESOURCE_EXHAUSTED, storage full)."""
    for i in range(2000):
        try:
            await client.append("fill", [new_event("T", b"%06d" % i + b"x" * 1000)
                                         for _ in range(10)])
        except AppendError as err:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "storage full" in err.message, err.message
            return
    raise AssertionError("a 3 MiB disk must fill up")


def test_a_retry_grouped_with_new_appends_on_a_full_disk_gets_its_original_positions(
        small_disk: Path) -> None:
    """DESIGN §3: an append whose event ids are in the log with the same content is
    answered with the original positions. On a full disk that held only while the retry
    was alone in its group commit (a group of duplicates writes nothing): grouped with a
    new append (one AppendStream message here; any concurrent producer's append does the
    same), the group's write failed and the retry was answered RESOURCE_EXHAUSTED
    "storage full ..., nothing was written" although its events are in the log,
    acknowledged: a caller retrying to learn an outcome was told its order was not
    written (helper-88's review)."""
    data = str(small_disk / "node")

    async def body(address: str) -> None:
        async with StoreClient(address) as client:
            original = [new_event("OrderPlaced", b"order-1")]
            first = await client.append("orders", original)
            await _fill(client)
            # Alone, the retry is answered as the original (its group writes nothing).
            alone = await client.append("orders", original)
            assert (alone.first_position, alone.last_position) == (
                first.first_position, first.last_position)
        # One message: the retry and a new 400 KiB append (more than the full disk
        # takes), so both go to the writer as one group.
        channel = grpc.aio.insecure_channel(address)
        try:
            stub = pb_grpc.EventStoreStub(channel)
            msg = pb.AppendStreamRequest(correlation_id=1, appends=[
                pb.AppendRequest(stream="orders", events=original),
                pb.AppendRequest(stream="other", events=[
                    new_event("T", os.urandom(100_000)) for _ in range(4)]),
            ])
            call = stub.AppendStream()
            await call.write(msg)
            await call.done_writing()
            answers = [a async for a in call]
        finally:
            await channel.close(None)
        assert len(answers) == 1 and len(answers[0].results) == 2
        retry, new = answers[0].results
        assert new.WhichOneof("result") == "error", new  # the disk is still full
        assert retry.WhichOneof("result") == "ok", (
            f"a retry of an acknowledged append was refused: {retry.error}")
        assert (retry.ok.first_position, retry.ok.last_position) == (
            first.first_position, first.last_position)

    with ServeProcess(data) as node:
        run(lambda: body(node.address), timeout_s=120)


def test_a_store_started_on_a_full_disk_says_so_instead_of_dying_of_sigbus(
        small_disk: Path) -> None:
    """A full disk must give a clear error. `xdc serve` on a new data directory of a
    full volume died of SIGBUS, silently (exit -7, nothing on stderr): LMDB creates
    lock.mdb with ftruncate (a sparse file) and writes its header through a shared
    mapping, and a page the full file system cannot allocate is a SIGBUS, not an error
    return (helper-88's review). The lock file's blocks are allocated first now."""
    with open(small_disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    free = os.statvfs(small_disk)
    assert free.f_bavail == 0, "the volume must be full"
    data = str(small_disk / "node")
    done = subprocess.run([sys.executable, "-m", "xdc.cli", "serve", "--data", data,
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60)
    assert '"ready"' not in done.stdout
    assert done.returncode == 1, (
        f"exit {done.returncode} (-7: SIGBUS), stderr: {done.stderr[-300:]!r}")
    assert "space" in done.stderr.lower() or "full" in done.stderr.lower(), done.stderr
