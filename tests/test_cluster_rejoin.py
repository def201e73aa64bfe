"""A voter that lost its disk (geo/node.py "Lost disks", geo/replication/core.py "Wiped
voters"): three nodes in one process with real etcd, real LMDB files and real gRPC on
loopback. The wiped voter restarts rejoining, votes for no one and counts for no commit
until it holds a committed record of a term elected after it came back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import types
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import etcd3
import pytest

from geo import launcher
from geo.config import ConfigError, load
from geo.node import ClusterNode
from geo.replicator import HANDOVER
from store.client import StoreClient, new_event
from store.log import Log
from tests.support.cluster import LocalCluster, cluster_toml
from tests.support.etcd import EtcdCluster
from tests.support.store import run, wait_until


async def role_of(node: ClusterNode) -> str:
    return (await node.status()).role


async def status_table(cluster: LocalCluster, etcd: EtcdCluster) -> str:
    """`xdc cluster status` of the in-process cluster (stopped nodes: unreachable)."""
    cfg = cluster.config
    state = launcher.ClusterState(
        directory=str(Path(cfg.source).parent), cluster=cfg.cluster, config=cfg.source,
        etcd_endpoints=etcd.endpoints, etcd_pids=[],
        nodes=[launcher.NodeProc(m.id, m.region, m.client, m.peer, m.voter,
                                 str(m.data_dir), pid=os.getpid()) for m in cfg.members])
    sts = {m: await n.status() for m, n in cluster.nodes.items()}
    return launcher.format_status(state, {m.id: sts.get(m.id) for m in cfg.members})


def waiting_for(caplog: pytest.LogCaptureFixture, node: str) -> list[tuple[str, str]]:
    """(answered, waiting for) of every 'waiting for the promised terms' line of `node`."""
    pattern = re.compile(rf"^{re.escape(node)}: LOST DISK: waiting for the promised terms .*"
                         r"answered: (.*); waiting for: (.*) \(unreachable")
    return [(m[1], m[2]) for r in caplog.records if (m := pattern.match(r.getMessage()))]


def test_wiped_follower_rejoins_without_a_vote_and_no_acknowledged_event_is_lost(
        etcd: EtcdCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The hole: A leads and commits with B's acks while C is down; B loses its disk and
    restarts; A is stopped; C (which lacks those records) and the wiped B are a majority.
    Counting B's vote would elect C and lose every acknowledged event; rejoining, B
    refuses, C cannot lead, and once A is back nothing is lost and B votes again.
    B's fence needs the promises of both other voters (n - quorum + 1 = 2 of 3): it waits,
    serving nothing, while C is down, and counts A's answer given before A stops."""
    caplog.set_level(logging.INFO, logger="xdc.node")

    async def body() -> None:
        toml = tmp_path / "cluster.toml"
        toml.write_text(cluster_toml("t", etcd.endpoints, ["us-east", "eu-west", "ap-south"],
                                     tmp_path))
        cluster = LocalCluster(load(toml))
        await cluster.start()
        try:
            a = await cluster.leader()
            assert all([await role_of(n) in ("leader", "follower")
                        for n in cluster.nodes.values()])  # a new cluster: nobody rejoins
            b_id, c_id = sorted(m for m in cluster.nodes if m != a.id)
            b_dir = cluster.config.member(b_id).data_dir
            assert b_dir is not None
            await cluster.stop(c_id)
            async with StoreClient(a.address, timeout_s=10) as client:
                acked = [await client.append("orders", new_event("Placed", b"%d" % i))
                         for i in range(50)]  # each committed by a + b
            old_term = a.store.role.term
            await cluster.stop(b_id)
            shutil.rmtree(b_dir)  # the disk is lost while b is down
            starting = asyncio.ensure_future(cluster.start(b_id))
            try:
                await wait_until(lambda: (a.id, c_id) in waiting_for(caplog, b_id), 10,
                                 f"b to wait for {c_id}, {a.id} having answered")
                assert not starting.done() and b_id not in cluster.nodes  # serves nothing
                await cluster.stop(a.id)  # a's answer (its promise) is counted already
                await cluster.start(c_id)
                await asyncio.wait_for(asyncio.shield(starting), 10)
            finally:
                if not starting.done():
                    starting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await starting
            c = cluster.nodes[c_id]
            b = cluster.nodes[b_id]
            st = await b.status()
            assert st.role == "rejoining" and st.rejoin_term > old_term
            assert st.promised_term >= st.rejoin_term and st.last_position == 0
            async with StoreClient(b.address) as reader:
                assert (await reader.node_info()).role == "rejoining"
            row = next(line for line in (await status_table(cluster, etcd)).splitlines()
                       if line.startswith(b_id))
            assert re.search(r" rejoining \d+/\d+ ", row), row
            # Without a no majority can form around the rejoining b, so it stays
            # rejoining. A restart keeps that (meta), and needs no answer (marked).
            await cluster.stop(b_id)
            with contextlib.closing(Log(b_dir)) as log_:
                assert log_.rejoin_term == st.rejoin_term and log_.cluster == "t"
            await cluster.start(b_id)
            b = cluster.nodes[b_id]
            assert await role_of(b) == "rejoining"
            # c campaigns, b refuses its promise: c never opens, its recovery times out
            roles: set[str] = set()

            async def c_gave_up() -> bool:
                roles.add(c.store.role.name)
                assert "leader" not in roles, "c led with the wiped b's vote"
                return "candidate" in roles and c.store.role.name == "follower"
            await wait_until(c_gave_up, 20, "c to campaign and give up")
            assert await role_of(b) == "rejoining"
            # a is back: a + c elect a leader holding every acknowledged event
            await cluster.start(a.id)
            await cluster.leader()
            await wait_until(lambda: b.store.role.name == "follower", 20,
                             "b to be whole again: a voter")
            st = await b.status()
            assert st.rejoin_term == 0 and st.commit_position >= acked[-1].last_position
            upto = await cluster.converged()
            async with StoreClient(b.address) as reader:
                got = await reader.read("orders", limit=1000)
            assert [e.data for e in got] == [b"%d" % i for i in range(50)]
            assert [e.position for e in got] == [r.first_position for r in acked]
            assert upto >= acked[-1].last_position
            # b counts again: with c down, a + b commit
            await cluster.stop(c_id)
            leader = await cluster.leader()
            async with StoreClient(leader.address, timeout_s=10) as client:
                more = await client.append("orders", new_event("Placed", b"after"))
            assert more.last_revision == 51
            await cluster.converged()
        finally:
            await cluster.stop()

    run(body, timeout_s=120)


def test_a_data_dir_of_another_cluster_is_refused(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body() -> None:
        cluster = LocalCluster.make(etcd.endpoints, tmp_path)
        member = cluster.config.members[0]
        assert member.data_dir is not None
        with contextlib.closing(Log(member.data_dir)) as log_, log_.write() as txn:
            log_.set_meta(txn, cluster="other")
        node = ClusterNode(cluster.config, member.id)
        with pytest.raises(ConfigError, match="holds a log of cluster 'other', not 't'"):
            await node.start()
        assert node.server is None  # nothing was served

    run(body, timeout_s=30)


def test_a_member_starting_after_the_first_election_is_new_not_wiped(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """A cluster brought up one node at a time elects and writes before the last member
    first starts: that member never promised or acknowledged anything, so it is a plain
    voter at once (no fence, no forced election)."""
    async def body() -> None:
        cluster = LocalCluster.make(etcd.endpoints, tmp_path)
        first, second, last = (m.id for m in cluster.config.members)
        await cluster.start(first, second)
        try:
            leader = await cluster.leader()
            async with StoreClient(leader.address, timeout_s=10) as client:
                await client.append("orders", new_event("Placed", b"x"))
            term = leader.store.role.term
            await cluster.start(last)
            st = await cluster.nodes[last].status()
            assert st.role == "follower" and st.rejoin_term == 0
            await cluster.converged()
            assert leader.store.role.name == "leader" and leader.store.role.term == term
        finally:
            await cluster.stop()

    run(body, timeout_s=60)


def test_in_manual_failover_the_fenced_leader_takes_its_seat_back_without_an_operator(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """The wiped voter's fence deposes the leader of the moment; no leader was lost, so
    that leader campaigns again at once (manual failover would otherwise wait for an
    operator), and the wiped voter catches up from it and votes again."""
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path, failover="manual") as cluster:
            a = await cluster.leader()
            async with StoreClient(a.address, timeout_s=10) as client:
                acked = [await client.append("orders", new_event("Placed", b"%d" % i))
                         for i in range(20)]
            old_term = a.store.role.term
            b_id = sorted(m for m in cluster.nodes if m != a.id)[0]
            b_dir = cluster.config.member(b_id).data_dir
            assert b_dir is not None
            await cluster.stop(b_id)
            shutil.rmtree(b_dir)
            await cluster.start(b_id)
            b = cluster.nodes[b_id]
            st = await b.status()
            assert st.role == "rejoining" and st.rejoin_term > old_term
            await wait_until(lambda: b.store.role.name == "follower", 20,
                             "b to be whole again")
            # ...and durably so at once: killed now, it would come back a voter (the
            # end of a rejoin was written lazily, up to COMMIT_PERSIST_S later).
            assert b.store.log is not None and b.store.log.rejoin_term == 0
            assert await cluster.leader() is a and a.store.role.term >= st.rejoin_term
            # It handed the seat to itself: its new term is a handover, not a failover.
            assert a._term_began(a.store.role.term) == HANDOVER
            async with StoreClient(b.address) as reader:
                got = await reader.read("orders", limit=100)
            assert [e.position for e in got] == [r.first_position for r in acked]
            await cluster.converged()

    run(body, timeout_s=60)


def test_etcd_losing_its_data_under_the_nodes_loses_no_acknowledged_event(
        etcd: EtcdCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """etcd loses its data while every node keeps its log (as under `xdc cluster up` on an
    old directory, which starts a new, empty etcd): its revisions, the terms, restart from
    1, so term numbers granted before are granted again. The voters' promises (to one
    node each: geo/replication/core.py rule 1) refuse them. Nothing acknowledged is lost,
    writes resume, and every voter's promise is on disk with the node it was made to. The
    old terms are above 800 (etcd's revision was moved there first): a candidate that wins
    a term not above the promises raises the term base past them in one write
    (Leadership.raise_term_base) instead of campaigning some 400 times, two revisions
    each."""
    caplog.set_level(logging.WARNING, logger="xdc.node")
    _push_revision(etcd, OLD_TERMS)

    async def body() -> None:
        cluster = LocalCluster.make(etcd.endpoints, tmp_path)
        await cluster.start()
        try:
            a, acked, old_term = await _leader_with_orders(cluster)

            async def all_promised() -> bool:  # a node may still be catching up
                for n in cluster.nodes.values():
                    if await n.replicator.query(lambda c: (c.promised_term, c.promised_to)) \
                            != (old_term, a.id):
                        return False
                return True
            await wait_until(all_promised, 10, f"every node promised {old_term} to {a.id}")
            _wipe_etcd(etcd)
            leader = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while leader is None:
                assert loop.time() < deadline, "no leader after etcd lost its data"
                leader = next((n for n in cluster.nodes.values()
                               if n.store.role.name == "leader"
                               and n.store.role.term > old_term), None)
                await asyncio.sleep(0.05)
            # A handful of campaigns, not some 400 (6 s without raising the base).
            stale = [r for r in caplog.records if "were promised before" in r.getMessage()]
            assert 0 < len(stale) <= 3 * len(cluster.nodes), len(stale)
            async with StoreClient(leader.address, timeout_s=10) as client:
                got = await client.read("orders", limit=100)
                assert [e.data for e in got] == [b"%d" % i for i in range(20)]
                assert [e.position for e in got] == [r.first_position for r in acked]
                more = await client.append("orders", new_event("Placed", b"after"))
            assert more.last_revision == 21 and more.first_position > acked[-1].last_position
            await cluster.converged()
            term = leader.store.role.term
            # the leader last, so that no election happens meanwhile
            await cluster.stop(*(m for m in cluster.nodes if m != leader.id))
            await cluster.stop(leader.id)
        finally:
            await cluster.stop()
        for m in cluster.config.members:
            assert m.data_dir is not None
            with contextlib.closing(Log(m.data_dir)) as log_:
                assert (log_.promised_term, log_.promised_to) == (term, leader.id)

    run(body, timeout_s=90)


# Terms granted before etcd loses its data, in the tests that wipe it: above this.
OLD_TERMS = 800


def _push_revision(etcd: EtcdCluster, n: int) -> None:
    """Moves etcd's revision (so the next terms) up by `n` writes of another key."""
    host, port = etcd.endpoints[0].rsplit(":", 1)
    with etcd3.client(host, int(port), timeout=5) as c:
        for _ in range(n):
            c.put("/filler", "x")


def _wipe_etcd(etcd: EtcdCluster) -> None:
    """etcd loses its data: restarted on the same endpoints with none (revision 1 again)."""
    etcd.stop()
    for m in etcd.members:
        shutil.rmtree(m.data_dir)
    etcd.restart()


async def _leader_with_orders(cluster: LocalCluster, n: int = 20
                              ) -> tuple[ClusterNode, list[Any], int]:
    """The leader, the answers to `n` appends to "orders" through it, and its term (above
    OLD_TERMS)."""
    a = await cluster.leader()
    async with StoreClient(a.address, timeout_s=10) as client:
        acked = [await client.append("orders", new_event("Placed", b"%d" % i))
                 for i in range(n)]
    assert a.store.role.term > OLD_TERMS
    return a, acked, a.store.role.term


def etcd_revision_and_key(etcd: EtcdCluster, key: str) -> tuple[int, bool]:
    """etcd's current revision, and whether `key` exists (a blocking read)."""
    host, port = etcd.endpoints[0].rsplit(":", 1)
    with etcd3.client(host, int(port), timeout=5) as c:
        got = c.get_response(key)
        return int(got.header.revision), got.count > 0


def test_a_voter_losing_its_disk_after_etcd_lost_its_data_is_fenced_above_every_promise(
        etcd: EtcdCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The double fault (geo/replication/core.py, "Wiped voters"): etcd loses its data, so
    its revision, the next term, is far below the terms granted before (above 800 here);
    then a voter loses its disk. Fenced at etcd's revision + 1 (the rule before), it could
    be used by a leader of a term that counted its lost acknowledgements. Its fence takes
    the other voters' promises too: it is above every term they promised, persisted in
    its meta before it serves; nothing acknowledged is lost, and writes resume once a
    leader of a term above the fence is elected (the candidates raise the term base past
    it: Leadership.raise_term_base). The running nodes, which heard from the wiped one,
    record again in etcd that it joined (etcd lost that too), so it is known for a lost
    disk, not taken for a new member; etcd's record of a leader is gone (no election
    yet), and the other voters' promises tell instead that terms were granted. Elections
    are held back meanwhile (as after a lost quorum) so that etcd's revision is still
    below the old terms when the voter restarts."""
    caplog.set_level(logging.INFO, logger="xdc.node")
    _push_revision(etcd, OLD_TERMS)

    async def body() -> None:
        cluster = LocalCluster.make(etcd.endpoints, tmp_path)
        await cluster.start()
        try:
            a, acked, old_term = await _leader_with_orders(cluster)
            b_id = sorted(m for m in cluster.nodes if m != a.id)[0]
            b_dir = cluster.config.member(b_id).data_dir
            assert b_dir is not None

            async def promises() -> dict[str, int]:
                return {m: await n.replicator.query(lambda c: c.promised_term)
                        for m, n in cluster.nodes.items()}

            await wait_until(lambda: _all_equal(promises(), old_term), 10,
                             f"every node promised {old_term}")
            for n in cluster.nodes.values():
                n._campaign_after = math.inf  # elections held back (see the docstring)
            await cluster.stop(b_id)
            shutil.rmtree(b_dir)  # b's disk is lost
            _wipe_etcd(etcd)

            async def b_recorded() -> bool:
                _, present = await asyncio.to_thread(etcd_revision_and_key, etcd,
                                                     f"/t/members/{b_id}")
                return present
            await wait_until(b_recorded, 20, f"a and c to record again that {b_id} joined")
            others = await promises()
            await cluster.start(b_id)
            b = cluster.nodes[b_id]
            revision, _ = await asyncio.to_thread(etcd_revision_and_key, etcd, "/t/leader")
            assert revision < old_term, "etcd's revision was moved up: the test proves nothing"
            fence = b.store.log.rejoin_term  # as read back from its LMDB meta at start
            assert fence > max(others.values()) >= old_term > revision + 1, (fence, others)
            st = await b.status()
            assert st.role == "rejoining" and st.rejoin_term == fence
            assert st.promised_term == fence and st.last_position == 0
            assert any(f"{b_id}: LOST DISK: " in r.getMessage()
                       and f"fenced at term {fence} " in r.getMessage()
                       for r in caplog.records)
            for n in cluster.nodes.values():
                n._campaign_after = 0.0
            leader = await cluster.leader(timeout_s=30)
            assert leader.id != b_id and leader.store.role.term >= fence
            # The first won term is below the fence: its winner gives it back and raises
            # the term base past every promise it read (the fence among them) at once:
            # a handful of campaigns, not one per two revisions up to the fence.
            stale = [r for r in caplog.records if "were promised before" in r.getMessage()]
            assert 0 < len(stale) <= 3 * len(cluster.nodes), len(stale)
            async with StoreClient(leader.address, timeout_s=10) as client:
                got = await client.read("orders", limit=100)
                assert [e.data for e in got] == [b"%d" % i for i in range(20)]
                assert [e.position for e in got] == [r.first_position for r in acked]
                more = await client.append("orders", new_event("Placed", b"after"))
            assert more.last_revision == 21 and more.first_position > acked[-1].last_position
            await wait_until(lambda: b.store.role.name == "follower", 20,
                             "b to be whole again: a voter")
            upto = await cluster.converged()
            assert upto >= more.last_position
            async with StoreClient(b.address) as reader:
                got = await reader.read("orders", limit=100)
            assert [e.data for e in got] == [b"%d" % i for i in range(20)] + [b"after"]
        finally:
            await cluster.stop()

    run(body, timeout_s=120)


async def _all_equal(values: Awaitable[dict[str, int]], expected: int) -> bool:
    return set((await values).values()) == {expected}


def test_a_signal_while_waiting_to_be_fenced_ends_the_process_cleanly() -> None:
    """A wiped voter waiting for the other voters' promises serves nothing yet, and the
    server's own SIGTERM handling starts only once it serves: SIGTERM or SIGINT during
    the wait exits at once with status 0, also when the signal comes as the wait ends
    (its task's cancel would otherwise land on the next await, a traceback)."""
    node = types.SimpleNamespace(id="n1")
    handled: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: handled.append(signum))

    async def during() -> None:
        with ClusterNode._stop_on_signals(node):  # type: ignore[arg-type]
            asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)

    async def as_it_ends() -> None:
        # As start() does: its clean-up awaits before SystemExit goes on; a cancel queued
        # by the signal must not land there.
        try:
            with ClusterNode._stop_on_signals(node):  # type: ignore[arg-type]
                os.kill(os.getpid(), signal.SIGTERM)
                handled.append(0)  # the handler runs before this line
        except SystemExit:
            await asyncio.sleep(0.05)
            raise

    try:
        for body in (during, as_it_ends):
            with pytest.raises(SystemExit) as stopped:
                asyncio.run(body())
            assert stopped.value.code == 0
        # the handler in place before was called too, and is in place again
        assert handled == [signal.SIGTERM, signal.SIGTERM, 0]
        assert signal.getsignal(signal.SIGTERM) is not None
        os.kill(os.getpid(), signal.SIGTERM)
        assert handled[-1] == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
