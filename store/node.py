"""One store node: the log, its single writer and its commit position, composed.

A standalone node commits what is durable, through the group-commit Writer. A cluster
node (geo/node.py) replaces the writer with its replicator (`start(writer_factory)`),
which advances `commit` when a quorum holds a record and fails the waiting appends
(`commit.fail_waiters`) when leadership is lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from store.commit import CommitTracker
from store.errors import StoreError
from store.limits import Limits
from store.log import Appended, Log, PreparedAppend
from store.writer import AdmitHook, Results, Writer
from xdc import telemetry


class AppendWriter(Protocol):
    """What a node's writer offers: the standalone Writer, or a cluster replicator."""

    def submit(self, reqs: list[PreparedAppend]) -> asyncio.Future[Results]: ...

    def stop(self) -> None: ...

    @property
    def pending_events(self) -> int: ...


WriterFactory = Callable[[Log, asyncio.AbstractEventLoop], AppendWriter]


@dataclass(slots=True)
class Role:
    name: str = "standalone"
    term: int = 0
    leader: str = ""  # the leader's client address, when known


class StoreNode:
    def __init__(self, data_dir: str | os.PathLike[str], limits: Limits | None = None,
                 node_id: str = "standalone", client_address: str = "") -> None:
        self.data_dir = str(data_dir)
        self.limits = limits or Limits()
        self.node_id = node_id
        self.client_address = client_address
        self.role = Role()
        self.log: Log | None = None
        self.writer: AppendWriter | None = None
        self.commit: CommitTracker | None = None
        self.admit: AdmitHook = self._standalone_admit
        # Commits need a quorum (a cluster member's writer), not only this disk.
        self.quorum = False

    async def start(self, writer_factory: WriterFactory | None = None) -> None:
        """Opens the log and starts its writer: the standalone group-commit Writer, or
        what `writer_factory(log, loop)` makes (a cluster node's replicator)."""
        loop = asyncio.get_running_loop()
        self.log = log = await loop.run_in_executor(
            None, lambda: Log(self.data_dir, node_id=self.node_id))
        if writer_factory is not None:
            # A cluster node: only what a quorum holds is committed.
            self.quorum = True
            self.commit = CommitTracker(log.commit_position)
            self.writer = writer_factory(log, loop)
            return
        # Standalone: everything durable is committed.
        self.commit = CommitTracker(log.last_position)
        self.role.term = max(1, log.promised_term)
        self.writer = Writer(log, self.limits, loop, self.commit.advance, lambda: self.admit())

    async def stop(self) -> None:
        if self.writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.writer.stop)
            self.writer = None
        if self.commit is not None:
            self.commit.fail_waiters(StoreError(grpc.StatusCode.UNAVAILABLE,
                                                "node stopped before the append committed; "
                                                "retry with the same event ids",
                                                retry_after_ms=100))
        if self.log is not None:
            self.log.close()
            self.log = None

    async def wait_failed(self) -> None:
        """Returns when the standalone writer has died of an unexpected error (it has
        answered what it held; `xdc serve` then exits non-zero so that its supervisor
        restarts it from its durable state). A cluster node's failure is its own
        (geo/node.py)."""
        failed = getattr(self.writer, "failed", None)
        if failed is None:
            await asyncio.Event().wait()
        await failed.wait()

    def _standalone_admit(self) -> int | StoreError:
        return self.role.term

    async def append(self, reqs: list[PreparedAppend]) -> Results:
        """Appends and waits until each successful append is committed."""
        assert self.writer is not None and self.commit is not None
        generation = self.commit.generation
        results = await self.writer.submit(reqs)
        last = max((r.last_position for r in results if isinstance(r, Appended)), default=0)
        if self.quorum:
            # A refusal read from the log (a wrong expected revision, an id reused) is
            # answered once what it was read from is committed too: a leader's log has
            # an uncommitted tail that may never commit (a leader cut off from its
            # followers), and a refusal from it would be a read past the commit position.
            last = max(last, max((r.as_of for r in results if isinstance(r, StoreError)),
                                 default=0))
        if last and self.quorum:
            # A cluster leader: durable here, committed once a quorum holds it (standalone
            # nodes commit what is durable before answering). The span is there even when
            # the quorum was first (the leader ships before its own fsync): a trace shows
            # the commit of every order, waited for or not.
            span = (telemetry.tracer().start_as_current_span(
                "xdc.commit", attributes={"xdc.position.last": last, "xdc.node": self.node_id})
                if telemetry.tracing() else contextlib.nullcontext())
            with span:
                t0, waits = time.perf_counter(), last > self.commit.position
                # Also when the position looks committed: not if leadership was lost
                # since the append was queued (CommitTracker.wait_for).
                await self.commit.wait_for(last, generation)
                if waits:
                    telemetry.metrics().commit_duration.record(time.perf_counter() - t0)
        return results
