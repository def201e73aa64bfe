"""A full disk: a clear refusal, nothing partial, the store keeps serving reads and
comes back intact. The disk is a real 3 MiB tmpfs (mounting needs root, as in CI)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from store.client import AppendError, new_event
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
