"""The single writer: one thread owns every write transaction of the log.

Appends queue up while the previous group is being fsync'd; the writer then takes
everything queued (bounded by Limits.max_group_events) and commits it in one write
transaction with one fsync (group commit). The per-event work happens once, here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from store.errors import StoreError, node_failed, shutting_down
from store.limits import Limits
from store.log import Appended, Log, PreparedAppend
from xdc import telemetry

log = logging.getLogger("xdc.writer")

Results = list[Appended | StoreError]
# Called on the loop thread after a group is durable: (last position, new stored records).
DurableHook = Callable[[int], None]  # the last durable position
# Called on the writer thread before each group: the term to append in, or a refusal.
AdmitHook = Callable[[], int | StoreError]


@dataclass(slots=True)
class QueueLoad:
    """What a writer's queue holds, counted when appends are admitted and released when
    the writer takes them; used under the writer's lock."""

    events: int = 0
    bytes: int = 0

    def admit(self, reqs: list[PreparedAppend], limits: Limits) -> tuple[int, int]:
        """Counts `reqs` in, or refuses them when the queue holds a limit already (load
        shedding with a retry hint; an empty queue takes any one append). Returns what
        to release later: (events, bytes)."""
        n = size = 0
        for r in reqs:
            n += len(r.ids)
            size += r.size
        return self.admit_counted(n, size, limits)

    def admit_counted(self, n: int, size: int, limits: Limits) -> tuple[int, int]:
        """`admit` for appends already counted: `n` events of `size` bytes."""
        for pending, more, limit, name, unit in (
                (self.events, n, limits.max_pending_events, "max_pending_events", "events"),
                (self.bytes, size, limits.max_pending_bytes, "max_pending_bytes", "bytes")):
            if pending and pending + more > limit:
                raise StoreError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"write queue full: {pending} {unit} pending, {name} ({limit}); retry "
                    "shortly", retry_after_ms=50)
        self.events += n
        self.bytes += size
        return n, size

    def release(self, events: int, size: int) -> None:
        self.events -= events
        self.bytes -= size


class Writer:
    def __init__(self, log: Log, limits: Limits, loop: asyncio.AbstractEventLoop,
                 on_durable: DurableHook, admit: AdmitHook) -> None:
        self._log = log
        self._limits = limits
        self._loop = loop
        self._on_durable = on_durable
        self._admit = admit
        self._cond = threading.Condition()
        # (appends, answer, the submitter's span context when tracing)
        self._queue: collections.deque[_Queued] = collections.deque()
        self._load = QueueLoad()
        self._stopping = False
        # Set when the writer thread died of an unexpected error: appends can no longer
        # be written, and the process should exit (StoreNode.wait_failed) so that its
        # supervisor restarts it from its durable state.
        self.fatal: BaseException | None = None
        self.failed = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="xdc-writer", daemon=True)
        self._thread.start()

    @property
    def pending_events(self) -> int:
        return self._load.events

    def submit(self, reqs: list[PreparedAppend]) -> asyncio.Future[Results]:
        """Queues appends (loop thread); the future resolves once they are durable."""
        fut: asyncio.Future[Results] = self._loop.create_future()
        caller = telemetry.current_span_context()  # outside the writer's lock
        with self._cond:
            if self._stopping:
                raise shutting_down()
            load = self._load.admit(reqs, self._limits)
            self._queue.append((reqs, fut, caller, load))
            self._cond.notify()
        return fut

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[_Queued] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            taken = []
            events = size = 0
            while self._queue and (not taken or events < self._limits.max_group_events):
                item = self._queue.popleft()
                events += item[3][0]
                size += item[3][1]
                taken.append(item)
            self._load.release(events, size)
            return taken

    def _run(self) -> None:
        taken: list[_Queued] | None = None
        try:
            while (taken := self._take()) is not None:
                self._write(taken)
                taken = None  # answered
        except BaseException as exc:  # anything but a refusal append_group answers itself
            log.exception("writer thread failed: this node stops")
            self.fatal = exc
            with self._cond:
                self._stopping = True
                left = list(taken or ()) + list(self._queue)
                self._queue.clear()
            err = node_failed(exc)
            self._loop.call_soon_threadsafe(
                _deliver_all, [(fut, [err] * len(reqs)) for reqs, fut, _, _ in left])
            self._loop.call_soon_threadsafe(self.failed.set)

    def _write(self, taken: list[_Queued]) -> None:
        admitted = self._admit()
        if isinstance(admitted, StoreError):
            self._loop.call_soon_threadsafe(
                _deliver_all, [(fut, [admitted] * len(reqs)) for reqs, fut, _, _ in taken])
            return
        flat = [r for reqs, _, _, _ in taken for r in reqs]
        start_ns = time.time_ns()
        results, values = self._log.append_group(flat, admitted, start_ns)
        last = self._log.last_position
        # Only timestamps here: the span is made on the loop thread, off this thread's
        # path from one fsync to the next, in the same wake-up as the answers.
        span = ([c for _, _, c, _ in taken], len(flat), admitted, start_ns,
                time.time_ns(), last - len(values) + 1, last) if telemetry.tracing() else None
        out = []
        i = 0
        for reqs, fut, _, _ in taken:
            out.append((fut, results[i:i + len(reqs)]))
            i += len(reqs)
        self._loop.call_soon_threadsafe(self._delivered, last, out, span)

    def _delivered(self, last: int, out: list[tuple[asyncio.Future[Results], Results]],
                   span: tuple[Any, ...] | None = None) -> None:
        # The hook first: in a standalone node it commits, so answers can go out at once.
        # (A group that wrote nothing leaves `last` where it was: the hook ignores it.)
        self._on_durable(last)
        _deliver_all(out)
        if span is not None:  # after the answers: they are what callers wait for
            emit_group_span(*span)


# (appends, future, caller's span context, (events, bytes) of the appends: counted once)
_Queued = tuple[list[PreparedAppend], asyncio.Future[Results], Any, tuple[int, int]]


def emit_group_span(contexts: list[Any], appends: int, term: int, start_ns: int,
                    end_ns: int, first: int, last: int) -> None:
    """The INTERNAL span of one group commit (one write transaction, one fsync), made
    after the fact from the writer's timestamps: the child of the one message it served,
    or linked to each of several (xdc/telemetry.py). `first..last`: the positions
    written (none when every append was refused or a duplicate)."""
    parent, links = telemetry.parent_and_links(contexts)
    attrs: dict[str, Any] = {"xdc.group.appends": appends, "xdc.term": term}
    if last >= first:
        attrs.update({"xdc.position.first": first, "xdc.position.last": last,
                      telemetry.MESSAGING_BATCH_COUNT: last - first + 1})
    telemetry.open_span("xdc.group_commit", context=parent, links=links, start_time=start_ns,
                        attributes=attrs).end(end_time=end_ns)


def _deliver_all(out: list[tuple[asyncio.Future[Results], Results]]) -> None:
    for fut, results in out:
        if not fut.done():
            fut.set_result(results)
