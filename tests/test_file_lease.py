"""engine.lease.FileLease: the lease is the flock on the file its path names.

A flock belongs to an inode, not to a path: when the lock file is removed or replaced
(a tmp cleaner, an operator's cleanup, a re-provisioned directory) while one instance
holds it, another instance creates a new file at the path and locks that. Only the
second one may then believe it holds the lease.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import lease as lease_module
from engine.lease import FileLease

GROUP = "crypto"


def test_a_removed_lock_file_loses_the_lease(tmp_path: Path) -> None:
    async def body() -> None:
        a, b = FileLease(tmp_path, GROUP, "a"), FileLease(tmp_path, GROUP, "b")
        try:
            assert await a.try_acquire() and a.held
            assert not await b.try_acquire()
            os.unlink(a.path)
            assert not a.held, "the lock no longer guards the path"
            assert await b.try_acquire() and b.held
            assert not a.held
            assert not await a.try_acquire(), "b holds the file the path names now"
            await b.release()
            assert await a.try_acquire() and a.held and not b.held
        finally:
            await a.close()
            await b.close()
    asyncio.run(body())


def test_a_replaced_lock_file_loses_the_lease(tmp_path: Path) -> None:
    async def body() -> None:
        a, b = FileLease(tmp_path, GROUP, "a"), FileLease(tmp_path, GROUP, "b")
        try:
            assert await a.try_acquire()
            other = tmp_path / "other"
            other.write_text("")
            os.replace(other, a.path)  # e.g. a directory restored from a copy
            assert await b.try_acquire() and b.held
            assert not a.held
            assert (tmp_path / f"{GROUP}.lock").read_text() == "b"
        finally:
            await a.close()
            await b.close()
    asyncio.run(body())


class _SwapAtFirstFlock:
    """`fcntl` as engine.lease sees it, except that the first `flock` first runs `swap`
    on the lock file's path: the file `try_acquire` opened is then no longer the one the
    path names when it locks it (the race between its open and its flock)."""

    def __init__(self, swap: Callable[[], None]) -> None:
        self.swap = swap
        self.opened: list[tuple[int, int]] = []  # (dev, inode) of the fd the swap hit

    def __getattr__(self, name: str) -> object:
        return getattr(fcntl, name)

    def flock(self, fd: int, operation: int) -> None:
        if not self.opened:
            st = os.fstat(fd)
            self.opened.append((st.st_dev, st.st_ino))
            self.swap()
        fcntl.flock(fd, operation)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


@pytest.mark.parametrize("swap", ["removed", "replaced"])
def test_a_lock_file_swapped_between_open_and_flock_is_opened_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str) -> None:
    """The file is removed, or replaced by another inode, after `try_acquire` opened it
    and before it locked it: the lease ends on the file the path names now (not on the
    orphan it locked first), and another instance cannot take it."""
    path = tmp_path / f"{GROUP}.lock"

    def swap_it() -> None:
        if swap == "removed":
            os.unlink(path)
        else:  # e.g. a directory restored from a copy
            other = tmp_path / "other"
            other.write_text("")
            os.replace(other, path)

    shim = _SwapAtFirstFlock(swap_it)
    monkeypatch.setattr(lease_module, "fcntl", shim)

    async def body() -> None:
        a, b = FileLease(tmp_path, GROUP, "a"), FileLease(tmp_path, GROUP, "b")
        try:
            assert await a.try_acquire()
            assert shim.opened, "the swap did not happen between open and flock"
            assert a._fd is not None
            assert path.exists(), "the lease locked an orphan: no file at the path"
            assert _identity(os.fstat(a._fd)) == _identity(os.stat(path)), \
                "the lease locked the file it opened first, not the one at the path"
            if swap == "replaced":  # (a removed inode's number may be reused)
                assert shim.opened[0] != _identity(os.stat(path))
            assert a.held
            assert path.read_text() == "a"
            # The file at the path is locked (by a), so no other instance can take it.
            fd = os.open(path, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
            assert not await b.try_acquire() and not b.held
            assert a.held
        finally:
            await a.close()
            await b.close()
    asyncio.run(body())


def test_a_lock_file_replaced_and_locked_by_another_between_open_and_flock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another instance replaces the file and locks the new one between `try_acquire`'s
    open and flock: the retry finds that lock, so this instance does not take the lease
    (locking the orphan, it would have believed itself primary beside the other)."""
    path = tmp_path / f"{GROUP}.lock"
    other_fd: list[int] = []

    def replace_and_lock() -> None:
        other = tmp_path / "other"
        other.write_text("b")
        fd = os.open(other, os.O_RDWR)
        other_fd.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(other, path)

    shim = _SwapAtFirstFlock(replace_and_lock)
    monkeypatch.setattr(lease_module, "fcntl", shim)

    async def body() -> None:
        a = FileLease(tmp_path, GROUP, "a")
        try:
            assert not await a.try_acquire(), "a took the lease the other instance holds"
            assert shim.opened and not a.held and a._fd is None
            assert path.read_text() == "b"
        finally:
            await a.close()
    try:
        asyncio.run(body())
    finally:
        for fd in other_fd:
            os.close(fd)
