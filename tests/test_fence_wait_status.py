"""A voter that lost its disk waits, serving no data, until n - quorum + 1 of the other
voters told it their promised terms (geo/node.py "Lost disks"). Meanwhile it answers its
status, saying whom it waits for (role "fencing", geo/fence_wait.py), and refuses
everything else with UNAVAILABLE naming the wait; before, it served nothing at all and
`xdc cluster status` showed it "unreachable", like a dead node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from geo import launcher
from store import auth
from store.client import AppendError, StoreClient, new_event
from store.errors import MD_RETRY_AFTER_MS
from store.log import stored_cluster
from tests.support.cli import xdc_cli as xdc
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import run, wait_until
from xdc.tls import Tls, aio_channel
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc

WAITS = "waits for the promised terms of"


async def _status(address: str, tls: Tls | None = None,
                  token: str = "") -> rpb.NodeStatus | None:
    """The node's Status, None when it does not answer (what `cluster status` asks)."""
    try:
        async with aio_channel(address, tls) as ch:
            return await rpb_grpc.ReplicationStub(ch).Status(
                rpb.StatusRequest(), timeout=2, metadata=auth.bearer(token))
    except grpc.aio.AioRpcError as exc:
        if exc.code() in launcher.UNREACHABLE:
            return None
        raise


async def _refusal(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def test_a_wiped_voter_waiting_for_its_fence_answers_its_status_and_refuses_the_rest(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """In one process (no TLS, no auth): the waiting voter's Status names the voters it
    waits for and those that answered; Tip is refused (it promised nothing yet: an answer
    of 0 would count towards another wiped voter's fence), and so are appends, reads and
    NodeInfo, with UNAVAILABLE naming the wait; health says NOT_SERVING. Once the voter it
    waits for is back it is fenced and serves as a rejoining voter on the same port."""
    async def body() -> None:
        async with LocalCluster.running(etcd.endpoints, tmp_path) as cluster:
            a = await cluster.leader()
            async with StoreClient(a.address, timeout_s=10) as client:
                await client.append("orders", new_event("Placed", b"x"))
            await cluster.converged()
            b_id, c_id = sorted(m for m in cluster.nodes if m != a.id)
            b = cluster.config.member(b_id)
            assert b.data_dir is not None
            await cluster.stop(b_id, c_id)
            shutil.rmtree(b.data_dir)  # b's disk is lost while it is down
            starting = asyncio.ensure_future(cluster.start(b_id))
            try:
                async def fencing() -> bool:
                    st = await _status(b.client)
                    return st is not None and list(st.fence_answered) == [a.id]
                await wait_until(fencing, 15, f"{b_id} to say it waits, {a.id} having answered")
                st = await _status(b.client)
                assert st is not None and not starting.done()
                assert (st.node_id, st.role, st.voter) == (b_id, "fencing", True)
                assert (st.fence_needed, list(st.fence_waiting_for)) == (2, [c_id])
                assert st.term == st.promised_term == st.commit_position == 0
                async with grpc.aio.insecure_channel(b.client) as ch:
                    tip = await _refusal(rpb_grpc.ReplicationStub(ch).Tip(
                        rpb.TipRequest(cluster="t", src=a.id), timeout=2))
                    append = await _refusal(pb_grpc.EventStoreStub(ch).Append(
                        pb.AppendRequest(stream="orders", events=[new_event("Placed")]),
                        timeout=2))
                    read = await _refusal(_drain(pb_grpc.EventStoreStub(ch).Read(
                        pb.ReadRequest(stream="orders"), timeout=2)))
                    info = await _refusal(pb_grpc.EventStoreStub(ch).NodeInfo(
                        pb.NodeInfoRequest(), timeout=2))
                    health = await health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=2)
                for refused in (tip, append, read, info):
                    assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
                    details = refused.details() or ""
                    assert details.startswith(f"{b_id} serves no ") and WAITS in details \
                        and f"waiting for: {c_id}" in details, details
                    assert (MD_RETRY_AFTER_MS, "1000") in tuple(refused.trailing_metadata())
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
                await cluster.start(c_id)
                await asyncio.wait_for(asyncio.shield(starting), 15)
            finally:
                if not starting.done():
                    starting.cancel()
                with contextlib.suppress(BaseException):
                    await starting
            st = await _status(b.client)
            assert st is not None and st.role in ("rejoining", "follower")
            assert st.rejoin_term > 0 or st.role == "follower"
            assert not st.fence_waiting_for and st.fence_needed == 0
            await wait_until(lambda: cluster.nodes[b_id].store.role.name == "follower", 20,
                             f"{b_id} whole again")
            await cluster.converged()

    run(body, timeout_s=90)


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    async for _ in call:
        pass


def test_cluster_status_shows_a_voter_waiting_for_its_fence_and_whom_it_waits_for(
        tmp_path: Path) -> None:
    """Real processes (`xdc cluster up`: TLS, client auth): a voter's data directory is
    removed while it is down, and another voter is stopped too, so that it must wait for
    that one's promised term. `xdc cluster status` (text and --json) shows it up and
    fencing, waiting for the stopped voter, the leader having answered; a promotion of it
    and an append to it are refused naming the wait; SIGTERM still ends it at once,
    cleanly. Once the stopped voter is back it is fenced, rejoins and catches up."""
    d = tmp_path / "cluster"
    state = launcher.up(str(d), regions=3)
    try:
        leader, _ = asyncio.run(launcher.wait_leader(state))
        wiped, other = sorted((n for n in state.nodes if n.voter and n.id != leader.id),
                              key=lambda n: n.id)

        async def append(n: int) -> None:
            async with StoreClient([x.client for x in state.nodes], timeout_s=20,
                                   tls=launcher.client_tls(state), token=state.token()) as c:
                for i in range(n):
                    await c.append("kept", new_event("T", b"%d" % i))
        asyncio.run(append(10))
        asyncio.run(launcher.wait_converged(state))
        launcher.stop_node(state, wiped.id)
        launcher.stop_node(state, other.id)
        shutil.rmtree(wiped.data_dir)  # the disk is lost while it is down
        ready_file, proc = launcher._spawn_node(state, wiped)
        tls, token = launcher.client_tls(state), state.token()

        async def fencing() -> bool:
            st = await _status(wiped.client, tls, token)
            return st is not None and list(st.fence_answered) == [leader.id]
        asyncio.run(_until(fencing, proc, f"{wiped.id} to say it waits for its fence"))

        r = xdc("cluster", "status", "--dir", str(d))
        assert r.returncode == 0, r.stderr
        row = next(line for line in r.stdout.splitlines() if line.startswith(wiped.id))
        assert "unreachable" not in row, row
        assert (f"fencing: lost disk, waiting for the promised terms of 1 more of {other.id} "
                f"(answered: {leader.id})") in row, row
        assert str(proc.pid) in row, row
        other_row = next(line for line in r.stdout.splitlines() if line.startswith(other.id))
        assert "unreachable (down)" in other_row, other_row
        r = xdc("cluster", "status", "--json", "--dir", str(d))
        assert r.returncode == 0, r.stderr
        mine = json.loads(r.stdout)[wiped.id]
        assert mine["role"] == "fencing" and mine["voter"] is True, mine
        assert (mine["fence_needed"], mine["fence_answered"], mine["fence_waiting_for"]) \
            == (2, [leader.id], [other.id]), mine
        assert json.loads(r.stdout)[other.id] == {"client": other.client, "unreachable": True}

        # A promotion of it is refused before anything is written: it cannot campaign.
        with pytest.raises(launcher.PromotionRefused,
                           match=f"waits for the promised terms of {other.id} before"):
            asyncio.run(launcher.check_candidate(state, wiped, force=True))

        async def refused_append() -> grpc.aio.AioRpcError:
            async with aio_channel(wiped.client, tls) as ch:
                return await _refusal(pb_grpc.EventStoreStub(ch).Append(
                    pb.AppendRequest(stream="kept", events=[new_event("T")]), timeout=5,
                    metadata=auth.bearer(token)))
        refused = asyncio.run(refused_append())
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        assert WAITS in (refused.details() or "") and other.id in (refused.details() or "")

        # SIGTERM while it waits, serving its status: a clean exit, nothing written.
        launcher.signal_node(state, wiped.id, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        node_log = Path(d, "nodes", wiped.id, "node.log")
        assert "stopped by signal 15 while waiting to be fenced" in node_log.read_text()
        assert not stored_cluster(wiped.data_dir), "the wait marked the data directory"
        ready_file, proc = launcher._spawn_node(state, wiped)
        asyncio.run(_until(fencing, proc, f"{wiped.id} to wait for its fence again"))

        launcher.start_node(state, other)
        launcher._wait_ready_line(ready_file, proc, 30)
        assert "LOST DISK: " in Path(d, "nodes", wiped.id, "node.log").read_text()
        asyncio.run(launcher.wait_leader(state, timeout_s=30))
        asyncio.run(launcher.wait_converged(state, 60))
        sts = launcher.answered(asyncio.run(launcher.statuses(state)))
        st = sts[wiped.id]
        assert st is not None and st.role in ("rejoining", "follower"), st
        assert st.commit_position >= 10
    finally:
        launcher.down(str(d))


async def _until(predicate: Callable[[], Awaitable[bool]], proc: subprocess.Popen[bytes],
                 what: str, timeout_s: float = 30) -> None:
    """`wait_until`, failing at once when the node process exited."""
    async def holds() -> bool:
        assert proc.poll() is None, f"the node exited ({proc.returncode})"
        return await predicate()
    await wait_until(holds, timeout_s, what)


class _SlowStart:
    """A real gRPC server whose start() returns only once `release` is set: a cancel of
    the wait's task can then land inside it, after the port is bound and served."""

    def __init__(self, server: grpc.aio.Server, started: asyncio.Event,
                 release: asyncio.Event) -> None:
        self._server, self._started, self._release = server, started, release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    async def start(self) -> None:
        await self._server.start()
        self._started.set()
        await self._release.wait()


def test_a_fence_wait_cancelled_while_its_server_starts_frees_the_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait's server bound the node's client port before `start()`, outside the
    block that stops it: a cancel landing in `start()` (it awaits) left the port bound,
    and the node's real server could not bind it."""
    from geo import fence_wait
    from geo.etcd_server import free_ports
    from store.limits import Limits

    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    started, release = asyncio.Event(), asyncio.Event()
    real = fence_wait.new_server
    monkeypatch.setattr(fence_wait, "new_server",
                        lambda *a, **kw: _SlowStart(real(*a, **kw), started, release))

    async def scenario() -> None:
        wait = fence_wait.FenceWait("a", "r", ["b", "c"], 2)

        async def hold() -> None:
            async with fence_wait.serving(wait, address=address, cluster="x",
                                          members={"a", "b", "c"}, tls=None,
                                          limits=Limits(), guard=None):
                await asyncio.Event().wait()

        task = asyncio.create_task(hold())
        async with asyncio.timeout(10):
            await started.wait()
        assert (await _status(address)).role == fence_wait.ROLE  # served, port bound
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The port is free again: a new server binds it.
        server = grpc.aio.server()
        try:
            assert server.add_insecure_port(address) == port
        finally:
            await server.stop(None)
    run(scenario)


async def _refused_append(client: StoreClient, address: str) -> tuple[AppendError, float]:
    """An append through `client` while `address` serves a voter waiting for its fence
    (in this process): its error, and how long it took."""
    from geo import fence_wait
    from store.limits import Limits

    wait = fence_wait.FenceWait("a", "r", ["b", "c"], 2)
    async with fence_wait.serving(wait, address=address, cluster="x",
                                  members={"a", "b", "c"}, tls=None, limits=Limits(),
                                  guard=None), client:
        start = asyncio.get_running_loop().time()
        with pytest.raises(AppendError) as err:
            await client.append("orders", new_event("Placed", b"x"))
        return err.value, asyncio.get_running_loop().time() - start


def test_an_append_refused_by_a_voter_waiting_for_its_fence_fails_as_refused_not_in_doubt(
        ) -> None:
    """The waiting voter refuses an AppendStream call before running any of it, and says
    so (xdc-not-run): the client's append fails at its deadline with that refusal
    (UNAVAILABLE naming the wait: nothing was written), where it failed with
    DEADLINE_EXCEEDED "outcome unknown", as if the voter might have written it."""
    from geo.etcd_server import free_ports

    address = f"127.0.0.1:{free_ports(1)[0]}"
    err, _ = run(lambda: _refused_append(StoreClient(address, timeout_s=1.5), address))
    assert err.code == grpc.StatusCode.UNAVAILABLE, err
    assert err.message.startswith("a serves no EventStore.AppendStream") and \
        WAITS in err.message, err
    assert err.message.endswith("this call appended nothing (an earlier append of "
                                "the same event ids may have been: retry with them)")


def test_a_refusal_before_running_keeps_an_append_trying_past_its_connect_timeout(
        ) -> None:
    """The connect timeout ends an append that never reached any node; one that a node
    refused before running it (here a voter waiting for its fence, after a target that
    refuses connections) did reach one: it is tried until its own deadline, and then
    fails with that refusal."""
    from geo.etcd_server import free_ports

    dead, port = free_ports(2)
    address = f"127.0.0.1:{port}"
    err, took = run(lambda: _refused_append(StoreClient(
        [f"127.0.0.1:{dead}", address], timeout_s=3.0, connect_timeout_s=0.5), address))
    assert err.code == grpc.StatusCode.UNAVAILABLE and WAITS in err.message, err
    assert 2.0 < took < 3.5, took  # its deadline, not the connect timeout (0.5 s)
