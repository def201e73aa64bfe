"""The commit position's fencing: an append waiting for a commit that may never come
(its leader stepped down) is answered with the failure, never left hanging."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from store.commit import CommitTracker
from store.errors import StoreError
from tests.support.store import run

LOST = StoreError(grpc.StatusCode.UNAVAILABLE, "leadership lost")


def test_waiters_wake_in_order_and_fail_on_step_down() -> None:
    async def body() -> None:
        commit = CommitTracker(5)
        await commit.wait_for(5)  # already committed
        low = asyncio.ensure_future(commit.wait_for(7))
        high = asyncio.ensure_future(commit.wait_for(9))
        await asyncio.sleep(0)
        commit.advance(8)
        await low
        assert not high.done()
        commit.fail_waiters(LOST)
        with pytest.raises(StoreError, match="leadership lost"):
            await high
    run(body)


def test_a_wait_begun_before_a_step_down_fails_at_once() -> None:
    async def body() -> None:
        commit = CommitTracker(0)
        generation = commit.generation  # read before the append was queued
        commit.fail_waiters(LOST)  # the step-down lands before the wait starts
        with pytest.raises(StoreError, match="leadership lost"):
            await asyncio.wait_for(commit.wait_for(3, generation), 1)
        # Also once the position is committed: it may be a newer leader's record there
        # (the append's outcome is unknown; a retry with the same ids resolves it).
        commit.advance(3)
        with pytest.raises(StoreError, match="leadership lost"):
            await commit.wait_for(3, generation)
        # A wait begun after the step-down waits normally.
        later = asyncio.ensure_future(commit.wait_for(4, commit.generation))
        await asyncio.sleep(0)
        commit.advance(4)
        await asyncio.wait_for(later, 1)
    run(body)


def test_abandoned_waits_do_not_pile_up() -> None:
    """Reads with a min_position that never comes, each timing out: their waits leave
    the heap (before, every one stayed until the commit passed that position: a client
    polling with a foreign position grew the node's memory without bound)."""
    async def body() -> None:
        commit = CommitTracker(5)
        for _ in range(2_000):
            wait = asyncio.ensure_future(commit.wait_for(10**12))
            await asyncio.sleep(0)  # it waits (its entry is in the heap)
            wait.cancel()  # as a read's timeout does
            with pytest.raises(asyncio.CancelledError):
                await wait
        assert len(commit._waiters) <= 2 * 64 + 2
        live = asyncio.ensure_future(commit.wait_for(7))
        await asyncio.sleep(0)
        commit.advance(7)
        await asyncio.wait_for(live, 1)
    run(body)


def test_an_append_refused_while_the_node_stops_says_when_to_retry(tmp_path: Path) -> None:
    """Nothing of it was written: the refusal is UNAVAILABLE with a retry hint (the
    client then retries, here or at another node), standalone and in a cluster alike.
    Before, the standalone writer's refusal had no hint."""
    from store.limits import Limits
    from store.node import StoreNode
    from store.validation import prepare
    from xdc.v1 import eventstore_pb2 as pb

    async def body() -> None:
        node = StoreNode(tmp_path, Limits())
        await node.start()
        assert node.writer is not None
        req = prepare(pb.AppendRequest(stream="s", events=[pb.ProposedEvent(
            id=b"\x01" * 16, type="T", data=b"x")]), Limits())
        node.writer.stop()
        with pytest.raises(StoreError) as refused:
            node.writer.submit([req])
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.retry_after_ms == 200
        assert ("xdc-retry-after-ms", "200") in refused.value.metadata
        await node.stop()
    run(body)


def test_a_writer_that_dies_answers_what_it_held_and_fails_the_node(tmp_path: Path) -> None:
    """An unexpected error in the standalone writer thread (not a refusal, which the log
    answers itself): before, the thread died and every append waited for ever. Now the
    appends it held are answered UNAVAILABLE, outcome unknown (nothing of a failed write
    transaction is kept), later ones are refused, and StoreNode.wait_failed returns, so
    that `xdc serve` exits non-zero for its supervisor to restart it."""
    from store.limits import Limits
    from store.node import StoreNode
    from store.validation import prepare
    from xdc.v1 import eventstore_pb2 as pb

    async def body() -> None:
        node = StoreNode(tmp_path, Limits())
        await node.start()
        assert node.writer is not None and node.log is not None

        def req(i: int) -> object:
            return prepare(pb.AppendRequest(stream="s", events=[pb.ProposedEvent(
                id=bytes([i]) * 16, type="T", data=b"x")]), Limits())
        await node.append([req(1)])  # works

        def broken(*args: object) -> object:
            raise RuntimeError("an invariant broke")
        node.log.append_group = broken  # type: ignore[method-assign]
        (answer,) = await asyncio.wait_for(node.writer.submit([req(2)]), 5)  # type: ignore[list-item]
        assert isinstance(answer, StoreError), answer
        assert answer.code == grpc.StatusCode.UNAVAILABLE
        assert "outcome is unknown" in answer.message
        await asyncio.wait_for(node.wait_failed(), 5)
        assert isinstance(node.writer.fatal, RuntimeError)  # type: ignore[attr-defined]
        with pytest.raises(StoreError):
            node.writer.submit([req(3)])  # type: ignore[list-item]
        await node.stop()
    run(body)
