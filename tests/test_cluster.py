"""Replication through real etcd leadership: three nodes in one process (real LMDB,
real gRPC on loopback). Process-level fault tests live in test_cluster_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from geo.node import ClusterNode
from geo.replicator import ELECTION, HANDOVER
from store.client import StoreClient, new_event
from store.limits import Limits
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import run, wait_until
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import tiers_pb2 as tpb
from xdc.v1 import tiers_pb2_grpc as tpb_grpc


def test_three_regions_elect_replicate_and_fail_over(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            leader = await cluster.leader()
            followers = [n for n in cluster.nodes.values() if n is not leader]
            # A client that knows only a follower is redirected to the leader; its
            # subscription to the follower lives on through that switch.
            async with StoreClient(followers[0].address, timeout_s=10) as client:
                seen: list[int] = []
                caught_up = asyncio.Event()

                async def follow() -> None:
                    async for e in client.subscribe(stream_prefix="orders"):
                        if isinstance(e, pb.RecordedEvent):
                            seen.append(e.position)
                        else:
                            caught_up.set()
                follower_task = asyncio.create_task(follow())
                await asyncio.wait_for(caught_up.wait(), 10)
                acked = [await client.append("orders", new_event("Placed", b"%d" % i))
                         for i in range(20)]
                acked += await asyncio.gather(*(client.append(f"s{i % 4}", new_event(
                    "Placed", b"x")) for i in range(200)))
                await wait_until(lambda: follower_task.done() or len(seen) == 20,
                                 what="the subscription to deliver all 20 orders")
                assert not follower_task.done(), follower_task
                assert seen == [a.first_position for a in acked[:20]]
                follower_task.cancel()
            upto = await cluster.converged()
            assert upto >= max(a.last_position for a in acked)
            # Followers serve committed reads.
            async with StoreClient(followers[1].address) as reader:
                events = await reader.read("orders")
                assert [e.data for e in events] == [b"%d" % i for i in range(20)]
                info = await reader.node_info()
                assert info.role == "follower" and info.leader == leader.address
            # Writes to a follower are refused with the leader's address.
            async with grpc.aio.insecure_channel(followers[1].address) as ch:
                from xdc.v1 import eventstore_pb2_grpc as pb_grpc
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await pb_grpc.EventStoreStub(ch).Append(pb.AppendRequest(
                        stream="x", events=[new_event("T")]))
                assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
                assert leader.address in (rpc.value.details() or "")
            # Graceful stop of the leader: another takes over, nothing acknowledged lost.
            old_term = leader.store.role.term
            await cluster.stop(leader.id)
            new_leader = await cluster.leader()
            assert new_leader.store.role.term > old_term
            async with StoreClient(cluster.client_targets(), timeout_s=15) as client:
                more = [await client.append("orders", new_event("Placed", b"after"))
                        for _ in range(5)]
                got = await client.read("orders", limit=1000)
            assert [e.data for e in got][:20] == [b"%d" % i for i in range(20)]
            assert more[-1].last_revision == 25
            await cluster.converged()

    run(body, timeout_s=120)


def test_planned_switchover_under_load_loses_nothing(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            leader = await cluster.leader()
            target = next(n for n in cluster.nodes.values() if n is not leader)
            acked: list[tuple[int, bytes]] = []
            stop = asyncio.Event()

            async def load(client: StoreClient, k: int) -> None:
                i = 0
                while not stop.is_set():
                    e = new_event("Tick", b"%d-%d" % (k, i))
                    r = await client.append(f"load-{k}", e)
                    acked.append((r.first_position, e.id))
                    i += 1

            # Every member tells how the term it is in began (its start record): the
            # first term by an election, the switchover's by a handover.
            first_term = leader.store.role.term
            for node in cluster.nodes.values():
                await wait_until(lambda n=node: _term_began(n, first_term, ELECTION),
                                 what=f"{node.id} reports term {first_term} elected")
            async with StoreClient(cluster.client_targets(), timeout_s=15) as client:
                tasks = [asyncio.ensure_future(load(client, k)) for k in range(4)]
                while len(acked) < 100:
                    await asyncio.sleep(0.01)
                resp = await leader.switchover(target.id, timeout_s=10)
                assert resp.new_leader == target.id and resp.new_term > leader.store.role.term - 1
                for node in cluster.nodes.values():
                    await wait_until(lambda n=node: _term_began(n, resp.new_term, HANDOVER),
                                     what=f"{node.id} reports term {resp.new_term} handed over")
                before = len(acked)
                while len(acked) < before + 100:
                    await asyncio.sleep(0.01)
                stop.set()
                await asyncio.gather(*tasks)
                now_leader = await cluster.leader()
                assert now_leader is target
                # Probes send writes by the writes health: only the open leader serves.
                for node, want in ((leader, NOT_SERVING), (target, SERVING)):
                    await wait_until(lambda n=node, w=want: _writes_health(n, w),
                                     what=f"{node.id} writes health {want}")
                everything = {e.position: e.id for e in await client.read("$all", limit=100_000)}
            for position, event_id in acked:
                assert everything[position] == event_id, f"acknowledged position {position} lost"
            await cluster.converged()
            print(f"switchover took {resp.took_us / 1000:.1f} ms")

    run(body, timeout_s=120)


def test_a_switchover_is_a_handover_whichever_resignation_comes_first(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The switchover steps down, then resigns handing over; the step-down makes a
    resignation of its own in the background. When that one came first (under load it
    did: CI), it revoked the lease, the handover's guarded transaction found no key, and
    the target's term was taken for an election. Forced here: the switchover's own
    resignation waits until the step-down's has run."""
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            old = await cluster.leader()
            target = next(n for n in cluster.nodes.values() if n is not old)
            resign = old.leadership.resign
            stepped_down_resigned = asyncio.Event()

            async def ordered(term: int | None = None, handover_to: str | None = None) -> None:
                if term is None and handover_to is not None:  # the switchover's own
                    await asyncio.wait_for(stepped_down_resigned.wait(), 10)
                await resign(term, handover_to)
                if term is not None:
                    stepped_down_resigned.set()
            monkeypatch.setattr(old.leadership, "resign", ordered)
            resp = await old.switchover(target.id, timeout_s=10)
            assert resp.new_leader == target.id
            for node in cluster.nodes.values():
                await wait_until(lambda n=node: _term_began(n, resp.new_term, HANDOVER),
                                 what=f"{node.id} reports term {resp.new_term} handed over")

    run(body, timeout_s=60)


def test_a_leader_lost_during_a_switchover_makes_the_target_term_an_election(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The designation is written while the target catches up. If the leader is lost
    then, the target still campaigns as designated, but nobody handed it the seat: its
    term is a failover (ELECTION), not a planned handover (which would give servers in
    front of the store the grace of a handover and the tiers a planned window)."""
    import etcd3

    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            old = await cluster.leader()
            target = next(n for n in cluster.nodes.values() if n is not old)
            term = old.store.role.term
            assert target.replicator is not None
            deliver = target.replicator.deliver
            # Deaf to the old leader's term: the target never catches up.
            monkeypatch.setattr(target.replicator, "deliver",
                                lambda msgs: deliver([m for m in msgs if m.term != term]))
            async with StoreClient(old.address, timeout_s=10) as client:
                await client.append("orders", new_event("Placed", b"behind"))
            switchover = asyncio.ensure_future(old.switchover(target.id, timeout_s=30))
            try:
                async def designated() -> bool:
                    return await old.leadership.designated() == target.id
                await wait_until(designated, 10, "the target designated")
                assert not switchover.done()
                # The old leader is lost as a crash loses it: its lease goes, nothing
                # is handed over.
                lease = old.leadership._term.lease_id  # type: ignore[union-attr]
                host, port = etcd.endpoints[0].rsplit(":", 1)
                with etcd3.client(host, int(port), timeout=2) as raw:
                    raw.revoke_lease(lease)
                new = await cluster.leader(exclude=(old.id,))
                assert new is target
                new_term = target.store.role.term
                assert new_term > term
                for node in cluster.nodes.values():
                    await wait_until(lambda n=node: _term_began(n, new_term, ELECTION),
                                     what=f"{node.id} reports term {new_term} elected")
            finally:
                switchover.cancel()
                with contextlib.suppress(BaseException):
                    await switchover

    run(body, timeout_s=120)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _term_began(node: ClusterNode, term: int, began: str) -> bool:
    async with grpc.aio.insecure_channel(node.address) as ch:
        st = await tpb_grpc.TiersStub(ch).Status(tpb.TiersStatusRequest(), timeout=2)
    return st.term == term and st.term_began == began


async def _writes_health(node: ClusterNode, want: int) -> bool:
    async with grpc.aio.insecure_channel(node.address) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="xdc.v1.EventStore.writes"), timeout=2)
    return r.status == want


def test_manual_failover_waits_for_an_operator(etcd: EtcdCluster, tmp_path: Path) -> None:
    from geo.leadership import Leadership

    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path, failover="manual") as cluster:
            leader = await cluster.leader()  # a cluster's first election needs no operator
            await cluster.stop(leader.id)
            # The seat stays vacant: watched over two lease TTLs, no one takes it.
            loop = asyncio.get_running_loop()
            window = loop.time() + 2 * cluster.config.lease_ttl_s + 0.5
            while loop.time() < window:
                assert not [n for n in cluster.nodes.values()
                            if n.store.role.name in ("leader", "candidate")]
                await asyncio.sleep(0.05)
            target = sorted(cluster.nodes)[-1]
            operator = Leadership(etcd.endpoints, cluster.config.cluster, "operator",
                                  {"id": "operator"}, 2, on_lost=lambda reason: None)
            try:
                await operator.promote(target)
            finally:
                await operator.close()
            assert (await cluster.leader()).id == target

    run(body, timeout_s=60)


def test_a_refused_replication_group_acknowledges_none_of_its_appends(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """One AppendStream message carrying an append and its retry (same ids) becomes one
    replication group; when replication refuses the group after sequencing it (here:
    the machine's proposal limit, shrunk below the group's size, since groups are cut
    to fit it), the retry must be refused too. Answering it as a duplicate would
    acknowledge positions that were never written."""
    import dataclasses

    from xdc.v1 import eventstore_pb2 as pb
    from xdc.v1 import eventstore_pb2_grpc as pb_grpc

    limits = Limits(max_group_events=4, max_append_events=2)

    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path, regions=1,
                                        limits=limits) as cluster:
            leader = await cluster.leader()
            assert leader.replicator is not None
            core = leader.replicator.core
            core.limits = dataclasses.replace(core.limits, max_propose_entries=1)
            first = pb.AppendRequest(stream="s", events=[new_event("T"), new_event("T")])
            retry = pb.AppendRequest()
            retry.CopyFrom(first)
            async with grpc.aio.insecure_channel(leader.address) as ch:
                call = pb_grpc.EventStoreStub(ch).AppendStream()
                await call.write(pb.AppendStreamRequest(correlation_id=1,
                                                        appends=[first, retry]))
                reply = await call.read()
                await call.done_writing()
            kinds = [r.WhichOneof("result") for r in reply.results]
            assert kinds == ["error", "error"], reply
            assert all(r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                       for r in reply.results)
            assert leader.store.log is not None and leader.store.log.last_position <= 1
    run(body, timeout_s=20)


def test_a_queue_longer_than_one_proposal_is_proposed_in_parts(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """More events queued than one proposal takes (max_group_events) are written over
    several cycles, never refused as a whole (that refusal came back on every retry)."""
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path, limits=Limits(
                max_group_events=64, max_append_events=16)) as cluster:
            leader = await cluster.leader()
            async with StoreClient(leader.address, timeout_s=20) as client:
                acks = await asyncio.gather(*(client.append(
                    f"s{i % 8}", [new_event("T", b"%d" % i) for _ in range(16)])
                    for i in range(300)))
            spans = sorted((a.first_position, a.last_position) for a in acks)
            assert all(b - a == 15 for a, b in spans)
            assert [a for a, _ in spans] == list(range(spans[0][0], spans[-1][1], 16))
            await cluster.converged()
    run(body)


def test_a_leader_past_its_lease_deadline_acknowledges_no_append(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """A leader whose lease deadline has passed (a paused process, a late loop: its
    step-down may still be queued) answers no append: the one it holds is committed, but
    its client is told the outcome is unknown, and a retry with the same id finds it at
    the newer leader. Before, the commit answered it OK (a reviewer saw a resumed leader
    acknowledge 14 appends after a newer term existed). The keep-alive thread is frozen,
    as SIGSTOP would freeze it, and the leader's clock moved past its deadline."""
    import time

    from xdc.v1 import eventstore_pb2_grpc as pb_grpc

    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            leader = await cluster.leader()
            async with StoreClient(leader.address, timeout_s=15) as client:
                await client.append("s", new_event("T"))
                lead = leader.leadership
                lead._pause_keepalive()
                lead.clock = lambda: time.monotonic() + 3600  # the deadline is past
                assert not lead.is_leader and leader.store.role.name == "leader"
                event = new_event("T")
                async with grpc.aio.insecure_channel(leader.address) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await pb_grpc.EventStoreStub(ch).Append(
                            pb.AppendRequest(stream="s", events=[event]), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
                assert "lapsed" in (err.value.details() or ""), err.value.details()
                lead.clock = time.monotonic
                lead._resume_keepalive()
                # The retry lands once a leader is open again: the write was committed.
                again = await client.append("s", event)
                assert again.duplicate and again.first_position >= 2, again
    run(body, timeout_s=60)


def test_a_switchover_to_a_dead_voter_is_refused_and_the_leader_stays(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """The target's last acknowledgement still matches the log when nothing was written
    since it died: the switchover must also have heard from it lately. Before, the
    leader designated the dead voter and resigned; the command failed later and, in
    manual failover mode, no node ever campaigned again."""
    import time

    from geo.node import SWITCHOVER_HEARD_S
    from geo.transport import SwitchoverError

    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path, failover="manual") as cluster:
            leader = await cluster.leader()
            async with StoreClient(leader.address, timeout_s=15) as client:
                await client.append("s", new_event("T"))
            await cluster.converged()
            dead = next(n for n in cluster.nodes if n != leader.id)
            await cluster.stop(dead)
            await wait_until(lambda: time.monotonic() - leader._heard[dead]
                             > SWITCHOVER_HEARD_S, 10, "the dead voter silent")
            with pytest.raises(SwitchoverError) as err:
                await leader.switchover(dead, 1.0)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
            assert "not heard from" in str(err.value) and "keeps leading" in str(err.value)
            assert leader.leadership.is_leader and leader.store.role.name == "leader"
            async with StoreClient(leader.address, timeout_s=15) as client:
                await client.append("s", new_event("T"))  # still taking writes
    run(body, timeout_s=60)


def test_in_manual_mode_a_leader_that_lost_only_its_lease_takes_its_seat_back(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """An etcd stall (here: the keep-alive frozen, as SIGSTOP would freeze it) outlasts
    the lease: the leader steps down, alive. Nobody replaced it, so in manual mode too it
    campaigns again (it won the key last); before, the seat stayed vacant until an
    operator promoted a node, with every node healthy."""
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path, failover="manual") as cluster:
            leader = await cluster.leader()
            term = leader.store.role.term
            leader.leadership._pause_keepalive()
            await wait_until(lambda: not leader.leadership.is_leader, 10,
                             "the lease deadline past")
            leader.leadership._resume_keepalive()
            await wait_until(lambda: leader.store.role.name != "leader", 10,
                             "the step-down")

            async def leads_again() -> bool:
                return (leader.store.role.name == "leader" and leader.store.role.term > term
                        and leader.leadership.is_leader)
            await wait_until(leads_again, 20, "the same node leading a new term")
            assert [n.id for n in cluster.nodes.values()
                    if n.store.role.name == "leader"] == [leader.id]
    run(body, timeout_s=60)


def test_a_switchover_the_target_does_not_complete_leaves_the_old_leader_leading(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """The target is caught up and answering, so the leader resigns, but the target never
    campaigns (here: held back by its campaign timer). In manual mode nobody else would
    take the seat: the old leader, the last to win it, takes it back in a new term."""
    import time

    from geo.transport import SwitchoverError

    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path, failover="manual") as cluster:
            leader = await cluster.leader()
            term = leader.store.role.term
            target = next(n for n in cluster.nodes.values() if n is not leader)
            target._campaign_after = time.monotonic() + 3600
            with pytest.raises(SwitchoverError) as err:
                await leader.switchover(target.id, 1.5)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
            assert "takes the seat back" in str(err.value)

            async def leads_again() -> bool:
                return (leader.store.role.name == "leader" and leader.store.role.term > term
                        and leader.leadership.is_leader)
            await wait_until(leads_again, 20, "the old leader leading a new term")
            async with StoreClient(leader.address, timeout_s=15) as client:
                await client.append("s", new_event("T"))
    run(body, timeout_s=60)
