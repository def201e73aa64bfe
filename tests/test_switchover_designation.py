"""A planned switchover's designation must stand when the leader resigns, however long
the target took to catch up (geo/node.py `ClusterNode.switchover`): three nodes in one
process (real etcd, real LMDB, real gRPC on loopback), every peer link through the
fault-injecting proxy (geo/proxy.py) so that the target can be cut off from the leader."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import etcd3
import grpc
import pytest

from geo.node import ClusterNode, designation_ttl_s
from geo.proxy import ProxyServer
from store.client import StoreClient, new_event
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import awaits, run, wait_until


@contextlib.asynccontextmanager
async def proxied_cluster(etcd: EtcdCluster, base: Path) -> AsyncIterator[
        tuple[LocalCluster, ProxyServer]]:
    """Every node started, each sending to each peer through its own proxy link
    ("<from>-><to>"); nodes and links stopped on the way out."""
    cluster = LocalCluster.make(etcd.endpoints, base)
    members = cluster.config.members
    proxy = ProxyServer(seed=61, control=None)
    for a in members:
        for b in members:
            if a.id != b.id:
                proxy.add_link(f"{a.id}->{b.id}", b.peer)
    async with proxy:
        try:
            for m in members:
                routes = {b.id: proxy.links[f"{m.id}->{b.id}"].address
                          for b in members if b.id != m.id}
                node = ClusterNode(cluster.config, m.id, tick_s=0.05, routes=routes)
                await node.start()
                cluster.nodes[m.id] = node
            yield cluster, proxy
        finally:
            await cluster.stop()


def _etcd_client(etcd: EtcdCluster) -> Any:
    host, port = etcd.endpoints[0].rsplit(":", 1)
    return etcd3.client(host, int(port), timeout=5)


def designation_at_resignation(etcd: EtcdCluster, cluster: str = "t") -> tuple[str, str | None]:
    """(the node the last resignation handed over to, the designation etcd held at that
    revision), read from etcd's history: the resignation wrote the handover key and
    deleted the leader key in one transaction; the winning campaign after it deleted the
    handover key when it created the leader key again."""
    prefix = f"/{cluster}/"
    with _etcd_client(etcd) as c:
        leader = c.get_response(prefix + "leader")
        assert leader.count == 1, "no leader key"
        created = int(leader.kvs[0].create_revision)
        handover = c.get_response(prefix + "handover", revision=created - 1)
        assert handover.count == 1, "the resignation before this term recorded no handover"
        resigned_at = int(handover.kvs[0].mod_revision)
        assert c.get_response(prefix + "leader", revision=resigned_at - 1).count == 1
        assert c.get_response(prefix + "leader", revision=resigned_at).count == 0, \
            "the handover was not written with the leader key's deletion"
        designated = c.get_response(prefix + "designated", revision=resigned_at)
        return (handover.kvs[0].value.decode(),
                designated.kvs[0].value.decode() if designated.count else None)


def test_a_switchover_whose_target_catches_up_after_the_designation_expired_hands_over(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """The target is cut off from the leader (its inbound link black-holed) while the
    switchover, with a long timeout, waits for it; the first designation's lease
    (twice the TTL) runs out meanwhile. Healed, the target catches up and the leader
    resigns: the designation must stand at that moment, or every voter may campaign and
    another than the target win (the switchover then said the target "did not take the
    leader key" and that the old leader "takes the seat back", with a third node leading).
    Before, the designation was written once, at the start: etcd held none when the
    leader key was deleted."""
    async def body() -> None:
        async with proxied_cluster(etcd, tmp_path) as (cluster, proxy):
            old = await cluster.leader()
            target = sorted(m for m in cluster.nodes if m != old.id)[0]
            async with StoreClient(old.address, timeout_s=10) as client:
                await client.append("orders", new_event("Placed", b"before"))
            await cluster.converged()
            link = proxy.links[f"{old.id}->{target}"]
            link.partition("blackhole")
            async with StoreClient(old.address, timeout_s=10) as client:
                behind = [await client.append("orders", new_event("Placed", b"%d" % i))
                          for i in range(5)]  # committed by the leader and the third voter

            async def designated() -> str | None:
                return await old.leadership.designated()

            switchover = asyncio.ensure_future(old.switchover(target, timeout_s=60))
            try:
                await wait_until(lambda: awaits(designated(), target), 10,
                                 "the target designated")
                await wait_until(lambda: awaits(designated(), None),
                                 designation_ttl_s(cluster.config.lease_ttl_s) + 10,
                                 "the first designation's lease to run out")
                assert not switchover.done(), switchover
                assert cluster.nodes[target].store.log.last_position \
                    < behind[-1].last_position, "the target was not behind"
                link.heal()
                resp = await asyncio.wait_for(asyncio.shield(switchover), 30)
            finally:
                if not switchover.done():
                    switchover.cancel()
                with contextlib.suppress(BaseException):
                    await switchover
            assert resp.new_leader == target
            assert resp.handover_position >= behind[-1].last_position
            handed_to, standing = await asyncio.to_thread(designation_at_resignation, etcd)
            assert (handed_to, standing) == (target, target), \
                "the designation was not in etcd when the leader key was deleted"
            new = await cluster.leader(exclude=(old.id,))
            assert new.id == target and new.store.role.term == resp.new_term
            assert await new.leadership.designated() is None  # consumed by its campaign
            async with StoreClient(new.address, timeout_s=10) as client:
                got = await client.read("orders", limit=100)
            assert [e.data for e in got] == [b"before"] + [b"%d" % i for i in range(5)]
            await cluster.converged()

    run(body, timeout_s=120)


def test_a_cancelled_switchover_leaves_no_designation_behind(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A switchover cancelled while its designation is being written (a slow etcd: held
    here until the designation is cleared, or 3 s) clears it once the write is done.
    Before, the write was cancelled, which stops only the waiting, not the etcd call on
    its thread: the designation landed after the clearing and outlived the failed
    switchover for its whole lease, with no other voter allowed to campaign."""
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            old, stuck, switchover = await _switchover_slowly_designating(cluster,
                                                                          monkeypatch)
            lead, written, cleared = old.leadership, stuck.written, stuck.cleared
            switchover.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(switchover, 10)
            assert cleared.is_set(), "the designation was not cleared"
            await wait_until(written.is_set, 10, "the designation's write to end")
            assert await lead.designated() is None, \
                "the cancelled switchover's designation outlived it"
            assert old.store.role.name == "leader" and lead.is_leader

    run(body, timeout_s=60)


@dataclass
class _SlowDesignation:
    """Events of a designation's etcd write that waits (at most 3 s) for its clearing."""

    entered: threading.Event = field(default_factory=threading.Event)
    written: threading.Event = field(default_factory=threading.Event)
    cleared: threading.Event = field(default_factory=threading.Event)


async def _switchover_slowly_designating(
        cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> tuple[ClusterNode, _SlowDesignation, asyncio.Future[Any]]:
    """The leader's switchover to a target deaf to it (it never catches up: the
    switchover waits), started once its designation's write is under way; that write
    waits for the designation's clearing, as a slow etcd would."""
    old = await cluster.leader()
    target = sorted(m for m in cluster.nodes if m != old.id)[0]
    lead = old.leadership
    stuck = _SlowDesignation()
    put, delete = lead._put, lead._delete

    def slow_put(key: str, value: str, lease: int | None = None) -> None:
        if key == lead.designated_key:
            stuck.entered.set()
            stuck.cleared.wait(3.0)  # the slow etcd: until the clearing, at most 3 s
        put(key, value, lease)
        if key == lead.designated_key:
            stuck.written.set()

    def observed_delete(key: str) -> None:
        delete(key)
        if key == lead.designated_key:
            stuck.cleared.set()

    monkeypatch.setattr(lead, "_put", slow_put)
    monkeypatch.setattr(lead, "_delete", observed_delete)
    replicator = cluster.nodes[target].replicator
    assert replicator is not None
    deliver = replicator.deliver
    monkeypatch.setattr(replicator, "deliver",
                        lambda msgs: deliver([m for m in msgs if m.src != old.id]))
    async with StoreClient(old.address, timeout_s=10) as client:
        await client.append("orders", new_event("Placed", b"behind"))
    switchover = asyncio.ensure_future(old.switchover(target, timeout_s=60))
    await wait_until(stuck.entered.is_set, 10, "the designation's write under way")
    return old, stuck, switchover


def test_a_switchover_cancelled_again_while_it_cleans_up_leaves_no_designation_behind(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, but the switchover is cancelled again and again (a client's cancel, then
    the server's stop) while it waits for its designation's write to end before clearing
    it: each cancellation must leave that wait alone. Before, the second one ended it
    (the wait swallowed it): the designation was cleared before its write landed, and
    then stood for its whole lease after the failed switchover."""
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            old, stuck, switchover = await _switchover_slowly_designating(cluster,
                                                                          monkeypatch)
            lead, written, cleared = old.leadership, stuck.written, stuck.cleared
            cancels = 0
            while not switchover.done() and cancels < 2000:  # bounded: 20 s at most
                switchover.cancel()
                cancels += 1
                await asyncio.sleep(0.01)  # the pace of the cancellations, not a wait
            assert cancels > 1, "cancelled once only: nothing tested"
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(switchover, 10)
            await wait_until(written.is_set, 10, "the designation's write to end")
            assert cleared.is_set(), "the designation was not cleared"
            assert await lead.designated() is None, \
                "the cancelled switchover's designation outlived it"
            assert old.store.role.name == "leader" and lead.is_leader
            assert old.replicator is not None and old.replicator.redirect_to is None

    run(body, timeout_s=60)


def test_a_switchover_that_cannot_designate_its_target_answers_unavailable_naming_it(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """etcd refuses the designation's write, and then its clearing too (as it does when
    it is unreachable): the switchover fails with UNAVAILABLE naming the designation, the
    node keeps leading and takes writes again. Before, the failed clearing's
    LeadershipError replaced that answer (gRPC then said UNKNOWN, "Unexpected error")."""
    from geo.leadership import LeadershipError
    from geo.transport import SwitchoverError

    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            old = await cluster.leader()
            target = sorted(m for m in cluster.nodes if m != old.id)[0]
            lead = old.leadership
            put, delete = lead._put, lead._delete
            refused: list[str] = []

            def refuse(what: str) -> None:
                refused.append(what)
                raise LeadershipError(f"etcd 127.0.0.1:1: {what}: unavailable (injected)")

            def failing_put(key: str, value: str, lease: int | None = None) -> None:
                if key == lead.designated_key:
                    refuse(f"write {key}")
                put(key, value, lease)

            def failing_delete(key: str) -> None:
                if key == lead.designated_key:
                    refuse(f"delete {key}")
                delete(key)

            monkeypatch.setattr(lead, "_put", failing_put)
            monkeypatch.setattr(lead, "_delete", failing_delete)
            with pytest.raises(SwitchoverError) as err:
                await old.switchover(target, timeout_s=10)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
            assert f"{target} could not be designated in etcd" in str(err.value) \
                and f"{old.id} keeps leading" in str(err.value), err.value
            assert refused == [f"write {lead.designated_key}",
                               f"delete {lead.designated_key}"], refused
            assert old.store.role.name == "leader" and lead.is_leader
            assert old.replicator is not None and old.replicator.redirect_to is None
            async with StoreClient(old.address, timeout_s=10) as client:
                await client.append("orders", new_event("Placed", b"after"))

    run(body, timeout_s=60)
