"""engine.lease.FileLease: the lease is the flock on the file its path names.

A flock belongs to an inode, not to a path: when the lock file is removed or replaced
(a tmp cleaner, an operator's cleanup, a re-provisioned directory) while one instance
holds it, another instance creates a new file at the path and locks that. Only the
second one may then believe it holds the lease.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

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
