"""geo.leadership against a real etcd (the `etcd` fixture: one member on loopback).

Nothing here sleeps to synchronise: every wait polls a condition with a deadline. The
fixture runs etcd with geo/etcd_server.py's loopback timing (300 ms election timeout),
under which a 1 s TTL stays 1 s on the server (etcd's minimum is 1.5 election
timeouts): the leader gives up after ~0.9 s, before the key goes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import etcd3
import pytest
from etcd3 import etcdrpc

from geo.leadership import Leadership, LeadershipError, SeatView
from tests.support.etcd import EtcdCluster, free_ports
from tests.support.store import awaits

CLUSTER = "xdc-test"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def until(cond: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str,
                interval_s: float = 0.01) -> float:
    """Poll `cond` until true; returns the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = cond()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)  # poll interval, not synchronisation


class Node:
    """A Leadership plus a record of its on_lost calls (monotonic time, reason)."""

    def __init__(self, endpoints: list[str], node_id: str, ttl_s: int = 1, **kw: Any) -> None:
        self.id = node_id
        self.lost: list[tuple[float, str]] = []
        self.lost_event = threading.Event()
        self.info = {"id": node_id, "client": f"{node_id}:7000", "peer": f"{node_id}:7100",
                     "region": f"r-{node_id}"}
        self.lead = Leadership(endpoints, CLUSTER, node_id, self.info, ttl_s,
                               on_lost=self._on_lost, **kw)

    def _on_lost(self, reason: str) -> None:
        # Stamp first: the assertion is about when the node was told.
        self.lost.append((time.monotonic(), reason))
        self.lost_event.set()


async def nodes(etcd: EtcdCluster, *ids: str, ttl_s: int = 1, **kw: Any) -> list[Node]:
    return [Node(etcd.endpoints, i, ttl_s, **kw) for i in ids]


async def close(*ns: Node) -> None:
    for n in ns:
        await n.lead.close()


# ---- elections -----------------------------------------------------------------------


def test_only_one_concurrent_campaigner_wins(etcd: EtcdCluster) -> None:
    async def body() -> None:
        ns = await nodes(etcd, "a", "b", "c")
        try:
            terms = []
            for _ in range(5):
                results = await asyncio.gather(*(n.lead.campaign() for n in ns))
                winners = [n for n, t in zip(ns, results, strict=True) if t is not None]
                assert len(winners) == 1, results
                w = winners[0]
                term = w.lead.term
                assert term is not None and w.lead.is_leader
                assert [n.lead.is_leader for n in ns].count(True) == 1
                assert await ns[0].lead.current() == (w.info, term)
                # Losers revoked their unused lease and never started a keep-alive:
                assert all(n.lead.deadline() is None for n in ns if n is not w)
                terms.append(term)
                await w.lead.resign()
                assert await ns[0].lead.current() is None
            assert terms == sorted(set(terms)), terms
            assert not any(n.lost for n in ns)
        finally:
            await close(*ns)
    run(body())


def test_terms_strictly_increase_across_elections(etcd: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await nodes(etcd, "a", "b")
        try:
            terms = []
            for i in range(6):
                n = (a, b)[i % 2]
                term = await n.lead.campaign()
                assert term is not None
                # A second campaign while leading is idempotent.
                assert await n.lead.campaign() == term
                # The term is the key's create_revision, as any observer reads it.
                assert await (b, a)[i % 2].lead.current() == (n.info, term)
                terms.append(term)
                # Unrelated writes in between move the revision, never backwards.
                await a.lead.designate("nobody", 5)
                await a.lead.clear_designation()
                await n.lead.resign()
            assert all(x < y for x, y in itertools.pairwise(terms)), terms
        finally:
            await close(a, b)
    run(body())


def test_resigning_an_older_term_keeps_the_newer_one(etcd: EtcdCluster) -> None:
    """A step-down from term T1 handled after the node won T2 (its writer stalled while
    the lease lapsed and it was re-elected) resigns T1 only: T2's key and lease stay.
    Before, resign() revoked whatever term was held, and each re-won term was resigned
    by the step-down of the one before (a review found it)."""
    async def body() -> None:
        a, b = await nodes(etcd, "a", "b", ttl_s=2)
        try:
            old = await a.lead.campaign()
            assert old is not None
            await a.lead.resign(old)
            new = await a.lead.campaign()
            assert new is not None and new > old
            await a.lead.resign(old)  # late: a no-op
            assert await b.lead.current() == (a.info, new)
            assert a.lead.term == new
            await a.lead.resign(new)
            assert await b.lead.current() is None
        finally:
            await close(a, b)
    run(body())


def test_resign_vacates_the_key_and_wakes_a_waiter(etcd: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await nodes(etcd, "a", "b", ttl_s=2)
        try:
            # Nothing changes: the wait times out.
            t0 = time.monotonic()
            assert await b.lead.wait_change(None, timeout_s=0.3) is False
            assert time.monotonic() - t0 >= 0.3
            # A vacant seat filled wakes a wait_change(None).
            waiter = asyncio.create_task(b.lead.wait_change(None, timeout_s=10))
            await until(lambda: b.lead.watching > 0, 5, "b's watch")
            term = await a.lead.campaign()
            assert term is not None
            assert await asyncio.wait_for(waiter, 5) is True
            assert b.lead.vacancy_seen is False, "the seat was filled"

            waiter = asyncio.create_task(b.lead.wait_change(term, timeout_s=10))
            await until(lambda: b.lead.watching > 0, 5, "b's watch")
            t_resign = time.monotonic()
            await a.lead.resign()
            assert await asyncio.wait_for(waiter, 5) is True
            woke = time.monotonic() - t_resign
            # Through the watch, well below the lease TTL and the poll fallback.
            assert woke < 0.25, woke
            assert b.lead.vacancy_seen is True, "the watch saw the key deleted"
            assert not a.lead.is_leader and a.lead.term is None and a.lead.deadline() is None
            assert await b.lead.current() is None
            # Already vacant: returns at once; resign again is a no-op.
            assert await b.lead.wait_change(term, timeout_s=5) is True
            assert b.lead.vacancy_seen is True
            await a.lead.resign()
            await b.lead.resign()  # never led: no-op
            assert not a.lost, "resign is voluntary: no on_lost"
            # The seat is free for the other node, with a higher term.
            term_b = await b.lead.campaign()
            assert term_b is not None and term_b > term
        finally:
            await close(a, b)
    run(body())


# ---- losing the lease ----------------------------------------------------------------


def test_on_lost_fires_before_the_lease_expires_when_etcd_is_paused(
        etcd: EtcdCluster) -> None:
    ttl = 2

    async def body() -> None:
        (a,) = await nodes(etcd, "a", ttl_s=ttl)
        try:
            term = await a.lead.campaign()
            assert term is not None
            margin = a.lead.safety_margin_s
            # Let one refresh through so the deadline comes from a refresh, not the grant.
            await until(lambda: a.lead._term is not None and a.lead._term.refreshes > 0, 5,
                        "a first refresh")
            etcd.members[0].pause()
            try:
                assert await asyncio.to_thread(a.lost_event.wait, ttl + 2), "on_lost not called"
                t_lost, reason = a.lost[0]
                last_ok = a.lead.last_refresh_sent()
                assert last_ok is not None
                assert not a.lead.is_leader and a.lead.term is None
                assert a.lead.deadline() is None
                # On time: at the deadline, and before the earliest server-side expiry
                # (the TTL restarts no earlier than the refresh was sent).
                assert last_ok + ttl - margin - 0.02 <= t_lost < last_ok + ttl, (
                    t_lost - last_ok, reason)
                # Keep etcd frozen past that earliest expiry, as a long stall would.
                await until(lambda: time.monotonic() > last_ok + ttl + 0.1, ttl + 1,
                            "the lease's earliest expiry")
            finally:
                etcd.members[0].resume()
            t_gone = await until(lambda: _vacant(a), 10, "the leader key to disappear")
            assert t_lost < t_gone
            assert len(a.lost) == 1, a.lost
            assert "refresh" in a.lost[0][1]
        finally:
            await close(a)
    run(body())


async def _vacant(n: Node) -> bool:
    try:
        return await n.lead.current() is None
    except LeadershipError:
        return False


def test_a_frozen_leaders_lease_expires_and_another_node_wins(etcd: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await nodes(etcd, "a", "b", ttl_s=1)
        try:
            term_a = await a.lead.campaign()
            assert term_a is not None
            # Freeze a's keep-alive as SIGSTOP would freeze the whole process: no
            # refresh and nobody to call on_lost.
            a.lead._pause_keepalive()
            term_b = None
            start = time.monotonic()
            while term_b is None:
                assert time.monotonic() - start < 10, "b never won"
                await b.lead.wait_change(term_a, timeout_s=5)
                term_b = await b.lead.campaign()
            t_won = time.monotonic()
            assert term_b > term_a
            deadline_a = a.lead.deadline()
            assert deadline_a is not None, "a's keep-alive is frozen: it has not noticed"
            # a's own clock ended its leadership before the key could expire, even
            # without its keep-alive thread: no moment with two believed leaders.
            assert deadline_a < t_won
            assert not a.lead.is_leader and b.lead.is_leader
            assert not a.lost
            # The process thaws: it notices at once, exactly once, and b keeps the seat.
            a.lead._resume_keepalive()
            assert await asyncio.to_thread(a.lost_event.wait, 5)
            assert len(a.lost) == 1 and not a.lead.is_leader
            assert await a.lead.current() == (b.info, term_b)
            assert await a.lead.campaign() is None
            assert b.lead.is_leader and not b.lost
        finally:
            await close(a, b)
    run(body())


def test_etcd_restart_leader_keeps_its_lease_or_reports_the_loss(etcd: EtcdCluster) -> None:
    ttl = 2

    async def body() -> None:
        (a,) = await nodes(etcd, "a", ttl_s=ttl)
        try:
            term = await a.lead.campaign()
            assert term is not None
            t_restart = time.monotonic()
            await asyncio.to_thread(etcd.restart)
            # Either a refresh sent after the restart began succeeds, or on_lost fires.
            await until(lambda: bool(a.lost) or (a.lead.last_refresh_sent() or 0) > t_restart,
                        ttl + 5, "a refresh after the restart or on_lost")
            samples = 0
            while samples < 30:
                before = a.lead.is_leader
                try:
                    current = await a.lead.current()
                except LeadershipError:
                    continue
                after = a.lead.is_leader
                samples += 1
                if before and after:
                    # Believes it leads: the key must be its own.
                    assert current == (a.info, term), current
            assert len(a.lost) <= 1
            print(f"etcd restart: {'lost: ' + a.lost[0][1] if a.lost else 'lease kept'}")
            if a.lost:
                assert not a.lead.is_leader
                await until(lambda: _vacant(a), 3 * ttl + 5, "the lost lease's key to go")
            else:
                assert a.lead.is_leader
                assert await a.lead.current() == (a.info, term)
        finally:
            await close(a)
    run(body())


def test_a_lease_outlasts_the_loss_of_the_etcd_leader(tmp_path: Path) -> None:
    """A 3-member etcd loses its leader (SIGKILL), three times in a row, under a leader
    with the launcher's 2 s lease: etcd elects another within 1-2 election timeouts, and
    the leader's refreshes succeed again before its deadline, so it keeps its term (no
    store failover for the loss of one etcd member). Under etcd's default timing (1 s
    election timeout) this failed in 4 runs of 4."""
    from geo.config import DEFAULT_LEASE_TTL_S
    cluster = EtcdCluster(tmp_path / "etcd3", n=3).start()
    try:
        async def body() -> None:
            (a,) = await nodes(cluster, "a", ttl_s=DEFAULT_LEASE_TTL_S)
            try:
                term = await a.lead.campaign()
                assert term is not None
                for _ in range(3):
                    # One member lost at a time: the lease is refreshed with all three
                    # up before the next loss (its deadline counts from a refresh's send).
                    t_up = time.monotonic()
                    await until(lambda t=t_up: (a.lead.last_refresh_sent() or 0) > t,
                                DEFAULT_LEASE_TTL_S, "a refresh with every member up")
                    killed = await asyncio.to_thread(cluster.leader)
                    assert killed is not None
                    killed.kill()
                    t_kill = time.monotonic()
                    await until(lambda t=t_kill: bool(a.lost)
                                or (a.lead.last_refresh_sent() or 0) > t + 0.1,
                                DEFAULT_LEASE_TTL_S + 5, "a refresh after the new election")
                    assert not a.lost, a.lost
                    assert a.lead.is_leader and a.lead.term == term
                    await asyncio.to_thread(killed.start)
                    await asyncio.to_thread(cluster.wait_healthy, 30.0, [killed])
                async def own_key() -> bool:
                    try:  # a call may reach a member just restarted: ask again
                        return await a.lead.current() == (a.info, term)
                    except LeadershipError:
                        return False
                await until(own_key, 10, "the key read back as its own")
                assert not a.lost and a.lead.is_leader
            finally:
                await close(a)
        run(body())
    finally:
        cluster.stop()


def test_a_lease_is_kept_while_two_etcd_endpoints_swallow_its_refreshes(
        etcd: EtcdCluster) -> None:
    """The leader reaches etcd by three endpoints, two of them through proxies (the
    WAN proxy, geo/proxy.py) that then black-hole their established connections (a
    partition that drops packets): every refresh is sent to all three at once, so the
    direct one keeps the lease. Asked one endpoint after another (first the proxies,
    where the earlier refreshes went), the first alone used up most of the deadline
    and the lease was lost (6 runs of 6)."""
    from geo.proxy import Link

    async def body() -> None:
        (target,) = etcd.endpoints
        async with Link("p1", target) as p1, Link("p2", target) as p2:
            # Deadline 0.7 s after a refresh's send: one hung refresh (0.33 s, sent
            # 0.33 s after the last) leaves no time to try the others in turn.
            a = Node([p1.address, p2.address, target], "a", ttl_s=1, safety_margin_s=0.3)
            try:
                term = await a.lead.campaign()
                assert term is not None
                t_won = time.monotonic()
                await until(lambda: (a.lead.last_refresh_sent() or 0) > t_won, 5,
                            "a refresh through the proxies")
                p1.partition("blackhole")
                p2.partition("blackhole")
                t_cut = time.monotonic()
                await until(lambda: bool(a.lost)
                            or (a.lead.last_refresh_sent() or 0) > t_cut + 2.5,
                            10, "refreshes for 2.5 s")
                assert not a.lost, a.lost
                assert a.lead.is_leader and a.lead.term == term
            finally:
                p1.heal()
                p2.heal()
                await close(a)
    run(body())


def test_etcd_down_past_the_deadline_reports_loss_and_frees_the_seat(
        etcd: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await nodes(etcd, "a", "b", ttl_s=1)
        try:
            term_a = await a.lead.campaign()
            assert term_a is not None
            etcd.members[0].kill()
            t0 = time.monotonic()
            # Calls fail promptly with LeadershipError instead of hanging.
            with pytest.raises(LeadershipError):
                await b.lead.current()
            with pytest.raises(LeadershipError):
                await b.lead.campaign()
            with pytest.raises(LeadershipError):
                await b.lead.wait_change(None, timeout_s=5)
            assert time.monotonic() - t0 < 3 * b.lead.timeout_s + 1
            assert await asyncio.to_thread(a.lost_event.wait, 5)
            assert not a.lead.is_leader and len(a.lost) == 1
            etcd.members[0].start()
            await asyncio.to_thread(etcd.wait_healthy)
            # a keeps trying to revoke its dead lease, so the seat frees promptly.
            await until(lambda: _vacant(b), 10, "the seat to be free")
            term_b = await b.lead.campaign()
            assert term_b is not None and term_b > term_a
            assert len(a.lost) == 1
        finally:
            await close(a, b)
    run(body())


def _raft_leader(endpoint: str) -> bool:
    """True when the etcd member at `endpoint` is its cluster's raft leader."""
    host, port = endpoint.rsplit(":", 1)
    with etcd3.client(host, int(port), timeout=2) as c:
        resp = c.maintenancestub.Status(etcdrpc.StatusRequest(), 2)
        return resp.header.member_id == resp.leader


def test_keepalive_moves_to_another_member_when_its_member_freezes(tmp_path: Path) -> None:
    ttl = 2
    cluster = EtcdCluster(tmp_path / "etcd3", n=3).start()
    try:
        follower = next(m for m in cluster.members if not _raft_leader(m.endpoint))
        others = [m.endpoint for m in cluster.members if m is not follower]

        async def body() -> None:
            # The frozen member comes first: every connection starts on it.
            (a,) = [Node([follower.endpoint, *others], "a", ttl)]
            b = Node(others, "b", ttl)
            try:
                term = await a.lead.campaign()
                assert term is not None
                follower.pause()
                try:
                    t_pause = time.monotonic()
                    await until(lambda: (a.lead.last_refresh_sent() or 0) > t_pause, ttl,
                                "a refresh through another member")
                    assert a.lead.is_leader and not a.lost
                    assert await b.lead.current() == (a.info, term)
                    # Two more refresh rounds: the keep-alive stays on a live member.
                    assert a.lead._term is not None
                    done = a.lead._term.refreshes
                    await until(lambda: a.lead._term is not None
                                and a.lead._term.refreshes >= done + 2, 2 * ttl,
                                "two more refreshes")
                    assert a.lead.is_leader and not a.lost
                finally:
                    follower.resume()
                await a.lead.resign()
                assert await b.lead.current() is None
            finally:
                await close(a, b)
        run(body())
    finally:
        cluster.stop()


def test_unreachable_etcd_raises_promptly() -> None:
    (port,) = free_ports(1)

    async def body() -> None:
        n = Node([f"127.0.0.1:{port}"], "a", 1, timeout_s=0.5)
        try:
            t0 = time.monotonic()
            for call in (n.lead.current, n.lead.campaign, n.lead.designated,
                         n.lead.failover_mode):
                with pytest.raises(LeadershipError, match=r"127\.0\.0\.1"):
                    await call()
            assert time.monotonic() - t0 < 5
            assert not n.lead.is_leader
            await n.lead.resign()  # nothing to give up: no etcd call, no error
        finally:
            await n.lead.close()
        with pytest.raises(LeadershipError, match="closed"):
            await n.lead.current()
    run(body())


# ---- switchover and manual failover ------------------------------------------------------


def test_only_a_resignation_handing_over_makes_the_targets_term_a_handover(
        etcd: EtcdCluster) -> None:
    """A switchover designates its target before the target catches up; a leader lost
    then leaves the designation behind, and the target's designated campaign must not be
    taken for a handover. Only `resign(handover_to=...)` makes it one, for that target."""
    async def body() -> None:
        a, b, c = await nodes(etcd, "a", "b", "c")
        try:
            # The leader dies during the catch-up: its lease goes (as when it expires),
            # nothing handed over.
            assert await a.lead.campaign() is not None
            await a.lead.designate("b", 30)
            lease = a.lead._term.lease_id  # type: ignore[union-attr]
            host, port = etcd.endpoints[0].rsplit(":", 1)
            with etcd3.client(host, int(port), timeout=2) as raw:
                raw.revoke_lease(lease)
            await until(lambda: awaits(b.lead.current(), None), 5, "a's key gone")
            assert await b.lead.campaign(designated=True) is not None
            assert b.lead.handed_over is False
            await b.lead.resign()
            await a.lead.resign()  # its term is gone already: local state only
            assert a.lead.handed_over is False

            # The handover: b's term is one.
            assert await a.lead.campaign() is not None and a.lead.handed_over is False
            await a.lead.designate("b", 30)
            await a.lead.resign(handover_to="b")
            assert await a.lead.current() is None
            assert await b.lead.campaign(designated=True) is not None
            assert b.lead.handed_over is True
            # Consumed by that campaign: the next one is an election again.
            await b.lead.resign()
            assert await c.lead.campaign() is not None and c.lead.handed_over is False
            await c.lead.resign()

            # A handover to a target that never campaigned names it, not whoever wins.
            assert await a.lead.campaign() is not None
            await a.lead.resign(handover_to="b")
            assert await c.lead.campaign() is not None and c.lead.handed_over is False
            await c.lead.resign()
            # The record has a lease of its own: once it is gone, a win of the target is
            # no handover (the target did not take the seat in time).
            assert await a.lead.campaign() is not None
            await a.lead.resign(handover_to="b")
            host, port = etcd.endpoints[0].rsplit(":", 1)
            with etcd3.client(host, int(port), timeout=2) as raw:
                _, meta = raw.get(a.lead.handover_key)
                assert meta is not None and meta.lease_id != 0
                raw.revoke_lease(meta.lease_id)  # as its expiry would
            assert await b.lead.campaign() is not None and b.lead.handed_over is False
            await b.lead.resign()
            # A term resigned already (older than the one held) hands nothing over.
            assert await a.lead.campaign() is not None
            await a.lead.resign(term=1, handover_to="b")
            assert a.lead.is_leader
            await a.lead.resign()
            assert await b.lead.campaign() is not None and b.lead.handed_over is False
            await b.lead.resign()
        finally:
            await close(a, b, c)
    run(body())


def test_a_raised_term_base_puts_every_later_term_above_the_floor_in_one_write(
        etcd: EtcdCluster) -> None:
    """Terms are the term base plus the leader key's create_revision. After etcd lost its
    data its revisions restart far below the terms the voters promised; raising the base
    (only while the seat is vacant, never down) puts the next term above them at once,
    whatever the gap, where moving the revision took one write per term."""
    host, port = etcd.endpoints[0].rsplit(":", 1)

    async def body() -> None:
        a, b = await nodes(etcd, "a", "b")
        try:
            first = await a.lead.campaign()
            assert first is not None
            assert await b.lead.raise_term_base(10**9) is None, "refused: a leads"
            await a.lead.resign()
            with etcd3.client(host, int(port), timeout=2) as raw:
                before = int(raw.get_response("/x").header.revision)
            floor = 5_000_000_000
            assert await b.lead.raise_term_base(floor) == floor
            with etcd3.client(host, int(port), timeout=2) as raw:
                assert int(raw.get_response("/x").header.revision) == before + 1  # one write
            # a read the base before it was raised: its campaign retries with the new one
            term = await a.lead.campaign()
            assert term is not None and floor < term < floor + before + 10
            assert a.lead.term == term
            assert await b.lead.current() == (a.info | {"term_base": str(floor)}, term)
            (_, seen), _ = await b.lead.seat()
            view = await b.lead.seat_view()
            assert seen == term and view.leader is not None and view.leader[1] == term
            # a watcher's known term is the same sum: no change seen while a holds it
            assert await b.lead.wait_change(term, timeout_s=0.3) is False
            # a switchover's handover is recorded under a base too (its guard compares
            # the key's create_revision, not the term)
            await a.lead.designate("b", 30)
            await a.lead.resign(handover_to="b")
            term1 = await b.lead.campaign(designated=True)
            assert term1 is not None and term1 > term and b.lead.handed_over is True
            await b.lead.resign()
            # never down; a lower floor leaves it
            assert await a.lead.raise_term_base(floor - 1) == floor
            assert (await a.lead.membership()).revision > floor
            term2 = await b.lead.campaign()
            assert term2 is not None and term2 > term
            await b.lead.resign()
        finally:
            await close(a, b)
    run(body())


def test_record_members_writes_only_missing_keys(etcd: EtcdCluster) -> None:
    """members/<id> records are written only where missing: a present key keeps its
    value and revision (nodes call this every few seconds)."""
    async def body() -> None:
        (a,) = await nodes(etcd, "a")
        host, port = etcd.endpoints[0].rsplit(":", 1)
        try:
            await a.lead.join()
            with etcd3.client(host, int(port), timeout=2) as raw:
                value, meta = raw.get(a.lead.member_key)
            infos = {"a": {"id": "a", "client": "elsewhere"}, "b": {"id": "b"}}
            assert await a.lead.record_members(infos) == ["b"]
            assert await a.lead.record_members(infos) == []
            with etcd3.client(host, int(port), timeout=2) as raw:
                again, meta_again = raw.get(a.lead.member_key)
                assert (again, meta_again.mod_revision) == (value, meta.mod_revision)
                b, _ = raw.get(a.lead.prefix + "members/b")
            assert json.loads(b) == {"id": "b"}
        finally:
            await close(a)
    run(body())


def test_up_records_the_earlier_members_through_a_moment_of_unreachable_etcd(
        etcd: EtcdCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`up` on an earlier run's data records its members in the new etcd, just started,
    before any node starts (launcher._record_earlier_members). One failed call (here:
    etcd reached through a proxy that resets every connection for a moment) failed the
    whole `up`; it is retried, said in the log, until etcd answers (within a bound)."""
    import logging

    from geo import launcher
    from geo.config import load
    from geo.proxy import Link
    from tests.support.cluster import cluster_toml

    caplog.set_level(logging.WARNING, logger="xdc.launcher")

    def retried() -> bool:
        return any(r.name == "xdc.launcher" and "retrying" in r.getMessage()
                   for r in caplog.records)

    async def body() -> None:
        async with Link("etcd", etcd.endpoints[0]) as link:
            toml = tmp_path / "cluster.toml"
            toml.write_text(cluster_toml("t", [link.address], ["us-east", "eu-west", "ap-south"],
                                         tmp_path))
            config = load(toml)
            state = launcher.ClusterState(
                directory=str(tmp_path), cluster="t", config=str(toml),
                etcd_endpoints=[link.address], etcd_pids=[],
                nodes=[launcher.NodeProc(m.id, m.region, m.client, m.peer, m.voter,
                                         str(m.data_dir)) for m in config.members])
            ids = sorted(m.id for m in config.members)
            link.partition("reset")
            recording = asyncio.ensure_future(launcher._record_earlier_members(state, set(ids)))
            await until(lambda: recording.done() or retried(), 15, "a failed attempt")
            link.heal()
            assert sorted(await asyncio.wait_for(recording, 30)) == ids
        host, port = etcd.endpoints[0].rsplit(":", 1)
        with etcd3.client(host, int(port), timeout=2) as raw:
            keys = sorted(m.key.decode() for _, m in raw.get_prefix("/t/members/"))
        assert keys == [f"/t/members/{i}" for i in ids]
    run(body())


def test_designate_promote_and_failover_mode_round_trips(etcd: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await nodes(etcd, "a", "b")
        auto = Node(etcd.endpoints, "c", 1, default_failover="automatic")
        try:
            assert await a.lead.designated() is None
            assert await a.lead.promoted() is None
            assert await a.lead.ever_led() is False
            # Unset: each node falls back on its configured mode.
            assert await a.lead.failover_mode() == "manual"
            assert await auto.lead.failover_mode() == "automatic"
            await a.lead.set_failover_mode("automatic")
            assert await b.lead.failover_mode() == "automatic"
            await a.lead.set_failover_mode("manual")
            assert await auto.lead.failover_mode() == "manual"
            with pytest.raises(ValueError):
                await a.lead.set_failover_mode("sometimes")

            # Designation: visible to all, cleared explicitly or by its lease.
            await a.lead.designate("b", 30)
            assert await b.lead.designated() == "b"
            await a.lead.clear_designation()
            assert await b.lead.designated() is None
            await a.lead.designate("b", 1)
            assert await b.lead.designated() == "b"
            await until(lambda: awaits(b.lead.designated(), None), 5, "the designation to expire",
                        interval_s=0.05)

            # A promotion wakes a node waiting on a vacant seat.
            waiter = asyncio.create_task(b.lead.wait_change(None, timeout_s=10))
            await until(lambda: b.lead.watching > 0, 5, "b's watch")
            await a.lead.promote("b")
            assert await asyncio.wait_for(waiter, 5) is True
            assert await b.lead.promoted() == "b"

            # While the designation names b, a cannot win even if it skips the check
            # (the campaign's own guard); b wins and consumes the promotion and the
            # designation.
            await a.lead.designate("b", 30)
            assert await a.lead.campaign() is None
            assert await a.lead.current() is None
            term = await b.lead.campaign()
            assert term is not None
            assert await a.lead.promoted() is None
            assert await a.lead.designated() is None
            assert await a.lead.ever_led() is True
            await b.lead.resign()
            assert await a.lead.ever_led() is True, "survives the leader key"
            await a.lead.clear_promotion()
            assert await a.lead.promoted() is None

            # seat(): the leader and the designation in one read.
            assert await a.lead.seat() == (None, None)
            await a.lead.designate("a", 30)
            assert await b.lead.seat() == (None, "a")
            # A campaign as the designated target: b is not named, so it loses even
            # though it claims to be; a wins at once and consumes the designation.
            assert await b.lead.campaign(designated=True) is None
            term_a = await a.lead.campaign(designated=True)
            assert term_a is not None
            (info, seen_term), designation = await b.lead.seat()
            assert seen_term == term_a and info["id"] == "a" and designation is None
            await a.lead.resign()
            # A designation that expired before the campaign: a plain campaign wins.
            assert await b.lead.campaign(designated=True) is not None
            await b.lead.resign()
        finally:
            await close(a, b, auto)
    run(body())


def _lease_ttl(endpoint: str, lease_id: int) -> int:
    """The lease's remaining TTL in etcd, -1 when it does not exist (revoked/expired)."""
    host, port = endpoint.rsplit(":", 1)
    with etcd3.client(host, int(port), timeout=2) as c:
        return int(c.get_lease_info(lease_id).TTL)


def _key_lease(endpoint: str, key: str) -> int:
    host, port = endpoint.rsplit(":", 1)
    with etcd3.client(host, int(port), timeout=2) as c:
        _, meta = c.get(key)
        return int(meta.lease_id) if meta is not None else 0


def test_a_prepared_lease_is_the_campaigns_and_an_old_one_is_replaced(
        etcd: EtcdCluster) -> None:
    """prepare_campaign grants the lease a switchover's target campaigns with (the
    campaign is then one transaction); a prepared lease older than a quarter of the TTL
    is revoked and a fresh one granted, so a term never starts near its deadline."""
    shift = [0.0]

    def clock() -> float:
        return time.monotonic() + shift[0]

    async def body() -> None:
        a, b = await nodes(etcd, "a", "b", ttl_s=2, clock=clock)
        endpoint = etcd.endpoints[0].removeprefix("http://")
        try:
            await a.lead.prepare_campaign()
            assert a.lead._spare is not None
            spare_id, spare_sent = a.lead._spare[0].id, a.lead._spare[1]
            await a.lead.prepare_campaign()  # young: kept, not replaced
            assert a.lead._spare is not None and a.lead._spare[0].id == spare_id
            term = await a.lead.campaign()
            assert term is not None
            assert _key_lease(endpoint, a.lead.leader_key) == spare_id
            # The term counts from the prepared grant's send time.
            assert a.lead.last_refresh_sent() is not None
            assert a.lead.last_refresh_sent() >= spare_sent
            assert a.lead._spare is None, "a prepared lease serves one campaign"
            await a.lead.resign()

            await b.lead.prepare_campaign()
            assert b.lead._spare is not None
            old_id = b.lead._spare[0].id
            shift[0] += 0.25 * 2 + 0.1  # older than a quarter of the TTL
            term_b = await b.lead.campaign()
            assert term_b is not None and term_b > term
            new_id = _key_lease(endpoint, b.lead.leader_key)
            assert new_id not in (0, old_id)
            assert _lease_ttl(endpoint, old_id) == -1, "the old prepared lease is revoked"
            await b.lead.resign()
        finally:
            await close(a, b)
    run(body())


def test_a_promotion_is_written_only_while_the_seat_is_vacant(etcd: EtcdCluster) -> None:
    """In manual mode a promotion is the operator replacing a lost leader. One written
    while a leader holds the seat (a retried promotion, or one of another node) would
    stay armed and elect its target whenever that leader dies, with no operator there:
    it is refused, naming the holder, and nothing is written. One written on a vacant
    seat carries a lease, so a promotion nobody acted on cannot fire much later."""
    async def body() -> None:
        a, b, op = await nodes(etcd, "a", "b", "operator")
        endpoint = etcd.endpoints[0].removeprefix("http://")
        try:
            term = await a.lead.campaign()
            assert term is not None
            for target in ("b", "a"):  # another node; the leader itself (a retry)
                seated = await op.lead.promote(target)
                assert seated is not None, f"promotion of {target} accepted while a leads"
                info, seen_term = seated
                assert info["id"] == "a" and seen_term == term
                assert await op.lead.promoted() is None, "a refused promotion wrote nothing"
            await a.lead.resign()
            # The seat vacant: the promotion is written, on its own lease.
            assert await op.lead.promote("b") is None
            assert await b.lead.promoted() == "b"
            lease = _key_lease(endpoint, op.lead.promoted_key)
            assert lease != 0 and 0 < _lease_ttl(endpoint, lease) <= 60
            term_b = await b.lead.campaign()
            assert term_b is not None and term_b > term
            assert await op.lead.promoted() is None, "consumed by the winning campaign"
            await b.lead.resign()
            # Not acted on: the promotion expires with its lease.
            assert await op.lead.promote("a", ttl_s=1) is None
            assert await a.lead.promoted() == "a"
            await until(lambda: awaits(a.lead.promoted(), None), 5,
                        "the unused promotion to expire", interval_s=0.05)
        finally:
            await close(a, b, op)
    run(body())


def test_seat_view_shows_the_holder_mode_and_what_is_pending(etcd: EtcdCluster) -> None:
    """What `xdc cluster status` shows of the seat: one read of the holder, the mode,
    and each pending promotion or designation with its lease's seconds left; a key whose
    lease ended is not pending."""
    async def body() -> None:
        a, op = await nodes(etcd, "a", "operator")
        try:
            view = await op.lead.seat_view()
            assert view == SeatView(None, "manual", None, None)
            await op.lead.set_failover_mode("automatic")
            assert await op.lead.promote("a", ttl_s=60) is None
            await op.lead.designate("b", 30)
            view = await op.lead.seat_view()
            assert view.leader is None and view.failover == "automatic"
            assert view.promoted is not None and view.promoted.node == "a"
            assert 0 < view.promoted.expires_in_s <= 60
            assert view.designated is not None and view.designated.node == "b"
            assert 0 < view.designated.expires_in_s <= 30
            await op.lead.clear_designation()
            term = await a.lead.campaign()  # consumes the promotion
            assert term is not None
            view = await op.lead.seat_view()
            assert view.leader == (a.info, term)
            assert view.promoted is None and view.designated is None
            await a.lead.resign()
            await op.lead.designate("b", 1)
            await until(lambda: _no_designation(op.lead), 5, "the designation to expire",
                        interval_s=0.05)
        finally:
            await close(a, op)
    run(body())


async def _no_designation(lead: Leadership) -> bool:
    return (await lead.seat_view()).designated is None


def test_etcd_members_run_with_pre_vote(etcd: EtcdCluster) -> None:
    """Members are started with --pre-vote (off by default before etcd 3.5): a member
    back from a partition asks before it campaigns, instead of bumping the term and
    deposing a healthy etcd leader (an election during which no store lease is
    refreshed). Its raft log names the pre-candidate step of its first election."""
    (member,) = etcd.members
    assert "became pre-candidate" in member.log_tail(200), member.log_tail(200)
