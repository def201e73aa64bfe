"""What a cluster member answers at the edges (geo/replicator.py, geo/node.py,
store/node.py): a writer thread that died, a data directory that is another member's,
a refusal read from an uncommitted tail. Found by helper-84's review; each test failed
on the code before its fix.

Each test drives the real classes: a real Replicator on a real LMDB log, or real
ClusterNodes with real etcd, gRPC on loopback and LMDB files. Waits poll conditions with
deadlines; nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import lmdb

from geo.config import ConfigError
from geo.node import ClusterNode
from geo.replication.messages import Effect, LeaderOpen
from geo.replicator import Replicator, term_start_record
from store.client import StoreClient, new_event
from store.errors import StoreError
from store.limits import Limits
from store.log import Log
from store.validation import prepare
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import run, wait_until
from xdc.v1 import eventstore_pb2 as pb


def _append(stream: str, n: int = 1, size: int = 1) -> Any:
    req = pb.AppendRequest(stream=stream, expected_revision=pb.EXPECTED_ANY, events=[
        pb.ProposedEvent(id=uuid.uuid4().bytes, type="T", data=b"x" * size)
        for _ in range(n)])
    return prepare(req, Limits())


# ---- a replicator whose writer thread died --------------


def test_appends_held_by_a_replicator_whose_writer_died_are_answered(tmp_path: Path) -> None:
    """The writer thread dies of a disk failure (here LMDB's MDB_MAP_FULL on a small map:
    a full disk or volume behaves the same). The standalone Writer answers every append
    it held with node_failed and refuses new ones (store/writer.py); the Replicator
    answered none: the group of the failed cycle, the groups still queued, and every
    append submitted afterwards waited for good (a cluster node's clients until the
    process was torn down; an embedded node's, for ever)."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        log = Log(str(tmp_path / "a"), map_size=2 << 20)
        opened: list[LeaderOpen] = []

        def on_effects(effects: list[Effect], answers: list[tuple[Any, Any]]) -> None:
            opened.extend(e for e in effects if isinstance(e, LeaderOpen))
            for fut, results in answers:
                if not fut.done():
                    fut.set_result(results)

        rep = Replicator(log, Limits(), loop, node_id="a", voters=["a"], standbys=[],
                         on_effects=on_effects, leader_address=lambda leader: "")
        try:
            rep.become_leader(1, term_start_record(1, "a", time.time_ns()))
            await wait_until(lambda: bool(opened) or (rep.tick() and False), 10,
                             "the single voter's term to open")
            # Fill the 2 MiB map: 64 KiB events until the writer dies of MapFullError.
            futures = []
            deadline = loop.time() + 20
            while rep.fatal is None:
                assert loop.time() < deadline, "the map never filled"
                with contextlib.suppress(StoreError):
                    futures.append(rep.submit([_append("big", 4, 64 * 1024)]))
                await asyncio.sleep(0.002)
            assert isinstance(rep.fatal, lmdb.MapFullError), repr(rep.fatal)
            # Everything submitted before the failure is answered, one way or the other.
            _, pending = await asyncio.wait(futures, timeout=5)
            if pending:
                left = len(pending)
                raise AssertionError(
                    f"{left} of {len(futures)} appends held by the replicator when its "
                    f"writer died ({type(rep.fatal).__name__}) were never answered")
            # And one submitted after it is refused or answered, not held for ever.
            try:
                late = rep.submit([_append("after")])
            except StoreError:
                return
            _, pending = await asyncio.wait([late], timeout=5)
            assert not pending, "an append submitted after the writer died was accepted " \
                                "and never answered"
        finally:
            await asyncio.to_thread(rep.stop)
            log.close()

    run(body, timeout_s=60)


# ---- a member started on another member's data directory -----------------------


def test_a_member_refuses_a_data_directory_written_by_another_member(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """A region is rebuilt from a healthy replica's disk (a copy of another member's
    data directory, the quickest way to skip the catch-up): the directory is marked with
    the cluster and not empty, so _check_data_dir took it for this member's own and the
    member voted at once with the other member's log and promises, although its own
    promises and acknowledgements were gone (the lost-disk hazard the start-up check
    exists for). The log records which member created it (meta node_id): the start is
    refused, naming the owner."""
    async def body() -> None:
        cluster = LocalCluster.make(etcd.endpoints, tmp_path)
        _, b, c = (m.id for m in cluster.config.members)
        await cluster.start()
        try:
            leader = await cluster.leader()
            async with StoreClient(leader.address, timeout_s=10) as client:
                for i in range(5):
                    await client.append("orders", new_event("Placed", str(i).encode()))
            await cluster.converged()
        finally:
            await cluster.stop()
        b_dir, c_dir = (cluster.config.member(x).data_dir for x in (b, c))
        assert b_dir is not None and c_dir is not None
        with contextlib.closing(Log(str(b_dir))) as log_:
            assert log_.node_id == b  # the directory says whose it is
        shutil.rmtree(c_dir)
        shutil.copytree(b_dir, c_dir)
        node = ClusterNode(cluster.config, c, tick_s=0.05)
        try:
            await node.start()
        except ConfigError as exc:
            assert f"holds member {b!r}'s log, not {c!r}'s" in str(exc), str(exc)
        else:
            st = await node.status()
            await node.stop()
            raise AssertionError(
                f"{c} started on {b}'s data directory (role {st.role!r}, promised term "
                f"{st.promised_term} = {b}'s): nothing checked whose log it is")

    run(body, timeout_s=90)


# ---- a refusal read from records that are not committed ---------------------


def test_a_wrong_expected_revision_is_not_answered_from_an_uncommitted_record(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """The leader checked an append's expected revision against its log, uncommitted
    tail included, and StoreNode.append answered a refusal at once (only appends that
    succeeded waited for the commit): a client was told "the stream is at revision 2" by
    a record no quorum held and none ever would (helper-84's review). Here the leader is
    cut off from both followers once "Debited 1" is written on it, and the client that
    sent it goes away (nothing retries it); another client's append expecting revision 1
    must not be refused from that record: it is answered once what it was read from is
    committed, here never on that leader, so it is retried at the new one, where the
    stream is at revision 1 and it lands. A refusal, if any, must show in the
    committed stream."""
    from geo.proxy import Link
    from store.client import EXACT, AppendError

    async def body() -> None:
        cluster = LocalCluster.make(etcd.endpoints, tmp_path)
        ids = [m.id for m in cluster.config.members]
        links: dict[tuple[str, str], Link] = {}
        try:
            for src in ids:
                for dst in ids:
                    if src != dst:
                        links[src, dst] = await Link(f"{src}->{dst}",
                                                     cluster.config.member(dst).peer).start()
            for m in ids:  # every peer link through the proxy
                node = ClusterNode(cluster.config, m, tick_s=0.05, routes={
                    d: links[m, d].address for d in ids if d != m})
                await node.start()
                cluster.nodes[m] = node
            leader = await cluster.leader()
            addresses = [cluster.config.member(m).client for m in ids]
            async with StoreClient(addresses, timeout_s=20) as client:
                await client.append("acct", new_event("Opened", b"0"), expected=EXACT,
                                    expected_revision=0)
                await cluster.converged()
                # The leader is cut off from both followers (it still reaches etcd, and
                # the clients reach it): nothing it writes from now on can commit.
                for (src, dst), link in links.items():
                    if leader.id in (src, dst):
                        link.partition("blackhole")
                assert leader.store.log is not None
                before = leader.store.log.last_position
                gone = StoreClient(leader.address, timeout_s=20)
                gone.append_nowait("acct", new_event("Debited", b"1"), expected=EXACT,
                                   expected_revision=1)
                await wait_until(lambda: leader.store.log.last_position > before, 5,
                                 "the first append written on the leader")
                await gone.close()  # its client went away: nothing sends it again
                try:
                    r = await client.append("acct", new_event("Debited", b"2"),
                                            expected=EXACT, expected_revision=1)
                    refused = None
                except AppendError as exc:
                    refused = exc
                # What the new leader (elected without the cut-off one) has committed.
                new = await cluster.leader(timeout_s=30, exclude=(leader.id,))
                async with StoreClient(new.address, timeout_s=20) as reader:
                    committed = await reader.read("acct")
                if refused is None:
                    assert [e.data for e in committed] == [b"0", b"2"], committed
                    assert r.last_revision == 2
                else:  # a refusal the committed stream bears out
                    assert refused.actual_last_revision == len(committed), (
                        f"refused ({refused}) at a revision the committed stream does not "
                        f"have: {[e.data for e in committed]}")
        finally:
            await cluster.stop()
            for link in links.values():
                await link.close()

    run(body, timeout_s=90)
