"""The commit position as the event loop sees it: what reads may return, when appends
may be answered, and the wake-up for live subscriptions.

In a standalone node the commit position is the durable position. In a cluster the
replication layer advances it when a quorum holds a record (DESIGN §4)."""

from __future__ import annotations

import asyncio
import heapq
import itertools

from store.errors import StoreError


class CommitTracker:
    """Loop-thread only."""

    def __init__(self, position: int) -> None:
        self.position = position
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        # Bumped by fail_waiters: a wait begun under an older generation is answered with
        # the failure instead of waiting for a commit that may never come.
        self.generation = 0
        self._failure: StoreError | None = None
        self._abandoned = 0  # waits cancelled while their entries stay in the heap

    def advance(self, position: int) -> None:
        if position <= self.position:
            return
        self.position = position
        while self._waiters and self._waiters[0][0] <= position:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():
                fut.set_result(None)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, position: int, generation: int | None = None) -> None:
        """Returns once `position` is committed; raises the error given to fail_waiters,
        also when it came after `generation` (read before the append was queued).

        The generation is checked first: after a step-down, a commit position past
        `position` may be a newer leader's, whose record now sits there (the loop can
        process the step-down and the new leader's commit before the append's waiter
        runs). The outcome is then unknown, never "committed"."""
        if generation is not None and generation != self.generation:
            assert self._failure is not None
            raise self._failure
        if position <= self.position:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (position, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            # A read whose min_position never came (timed out, or its caller went away):
            # its entry is dropped once such entries are half the heap, so that polling
            # with an unreachable position cannot grow it without bound.
            self._abandoned += 1
            if self._abandoned > 64 and 2 * self._abandoned > len(self._waiters):
                self._waiters = [w for w in self._waiters if not w[2].done()]
                heapq.heapify(self._waiters)
                self._abandoned = 0
            raise

    async def wait_beyond(self, position: int) -> None:
        """Returns once the commit position is past `position`."""
        while self.position <= position:
            await self._changed.wait()

    def fail_waiters(self, err: StoreError) -> None:
        """Answers every append still waiting for commit: their outcome is in doubt
        (a retry with the same event ids resolves it)."""
        self.generation += 1
        self._failure = err
        waiters, self._waiters = self._waiters, []
        for _, _, fut in waiters:
            if not fut.done():
                fut.set_exception(err)
