"""Who is the primary of an engine group: an etcd lease (clusters) or a file lock (one
machine, `xdc serve`), behind one small interface.

Safety does not rest on the lease: the primary appends outputs with the output stream's
exact expected revision, so a stale primary's writes are refused by the store. The lease
decides liveness: which instance should be emitting, and how fast a warm one notices
that the primary is gone (a file lock is released by the kernel the moment its process
dies; an etcd lease expires after its TTL).

A planned switchover names its target (``designate``): while a designation for another
instance stands, an instance does not campaign, so the old primary cannot take the seat
back before the target does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Protocol

from geo.leadership import EtcdAccess, Leadership, LeadershipError


class PrimaryLease(Protocol):
    async def try_acquire(self) -> bool: ...

    @property
    def held(self) -> bool: ...

    async def release(self) -> None: ...

    async def designate(self, instance: str, ttl_s: int) -> None: ...

    async def designated(self) -> str | None: ...

    async def close(self) -> None: ...


class FileLease:
    """``flock`` on ``<dir>/<group>.lock``. Only for instances on one machine."""

    def __init__(self, directory: str | os.PathLike[str], group: str, instance: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{group}.lock"
        self.designation = self.dir / f"{group}.designated"
        self.instance = instance
        self._fd: int | None = None

    async def try_acquire(self) -> bool:
        if self.held:
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # The lock is on the inode opened, the lease on the path: if the file was
            # removed or replaced between open and flock, this lock guards an orphan
            # while another instance can lock the file the path names now. Try again.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, self.instance.encode())
        self._fd = fd
        if await self.designated() == self.instance:
            with contextlib.suppress(FileNotFoundError):
                self.designation.unlink()
        return True

    @property
    def held(self) -> bool:
        """Whether the lock is held on the file the path names now. A lock file removed
        or replaced (a tmp cleaner, an operator's cleanup) loses the lease: another
        instance may already lock the new file. The lost lock is then dropped, so that
        `try_acquire` starts afresh."""
        fd = self._fd
        if fd is None:
            return False
        if _same_file(fd, self.path):
            return True
        self._fd = None
        os.close(fd)
        return False

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    async def designate(self, instance: str, ttl_s: int) -> None:
        tmp = self.designation.with_suffix(".tmp")
        tmp.write_text(json.dumps({"to": instance, "until": time.time() + ttl_s}))
        os.replace(tmp, self.designation)

    async def designated(self) -> str | None:
        try:
            d = json.loads(self.designation.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return d.get("to") if d.get("until", 0) > time.time() else None

    async def close(self) -> None:
        await self.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` names the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)


class EtcdLease:
    """The key ``/<cluster>/engines/<group>/leader`` on a lease of ``ttl_s`` (the store
    leadership code, reused: keep-alive on a monotonic schedule, step down before the
    lease can expire, designation for planned switchovers)."""

    def __init__(self, endpoints: list[str], cluster: str, group: str, instance: str,
                 ttl_s: int = 2, access: EtcdAccess | None = None) -> None:
        self.instance = instance
        self._lost = asyncio.Event()
        self._plain = access is None
        # Why the last campaign or designation read failed ("" when it worked): an etcd
        # that does not answer or refuses this instance (TLS, user) leaves it warm for
        # good, which the runner reports (EngineStatus.campaign_blocked) and logs.
        self.problem = ""
        self._lead = Leadership(endpoints, f"{cluster}/engines/{group}", instance,
                                {"instance": instance}, ttl_s, on_lost=self._on_lost,
                                default_failover="automatic", access=access)

    def _on_lost(self, reason: str) -> None:
        pass  # `held` turns False by itself; the runner polls it

    async def try_acquire(self) -> bool:
        if self._lead.is_leader:
            return True
        try:
            won = await self._lead.campaign() is not None
        except LeadershipError as exc:
            self._failed(exc)
            return False
        self.problem = ""
        return won

    def _failed(self, exc: LeadershipError) -> None:
        hint = (" (an etcd with TLS or users: --lease etcd --config CLUSTER.toml)"
                if self._plain else "")
        self.problem = f"{exc}{hint}"

    @property
    def held(self) -> bool:
        return self._lead.is_leader

    async def release(self) -> None:
        with contextlib.suppress(LeadershipError):
            await self._lead.resign()

    async def designate(self, instance: str, ttl_s: int) -> None:
        await self._lead.designate(instance, ttl_s)

    async def designated(self) -> str | None:
        try:
            found = await self._lead.designated()
        except LeadershipError as exc:
            self._failed(exc)
            return None
        self.problem = ""
        return found

    async def close(self) -> None:
        await self._lead.close()


def make_lease(spec: str, group: str, instance: str, cluster: str = "xdc",
               ttl_s: int = 2, access: EtcdAccess | None = None) -> PrimaryLease:
    """``file:DIR`` or ``etcd:HOST:PORT[,HOST:PORT]`` (`access`: etcd's TLS and user)."""
    kind, _, rest = spec.partition(":")
    if kind == "file" and rest:
        return FileLease(rest, group, instance)
    if kind == "etcd" and rest:
        return EtcdLease(rest.split(","), cluster, group, instance, ttl_s, access)
    raise ValueError(f"lease {spec!r}: use file:DIR or etcd:HOST:PORT[,HOST:PORT]")
