"""`xdc cluster status|switchover|promote|failover --config TOML`: the operator's commands
against a deployment known only by its cluster TOML, run as subprocesses.

The deployment is a launcher cluster (real etcd with TLS and authentication, real `xdc
node run` processes, TLS, client auth) with three voters and one standby; the commands
get only the TOML the launcher wrote (members, [etcd] with its user and password file,
[tls] with the admin certificate) and `--dir` pointing nowhere, so nothing of the local
state is used. One cluster for the module: the tests run in file order and each leaves
an open leader behind.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from geo import launcher
from geo.config import load
from geo.demo import wait_for
from geo.leadership import Leadership
from tests.test_cli import xdc
from tests.test_cluster_faults import check_cluster, loaded
from xdc.tls import sync_channel
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.ClusterState]:
    state = launcher.up(str(tmp_path_factory.mktemp("ops") / "cluster"), regions=3,
                        standbys=1)
    try:
        asyncio.run(launcher.wait_leader(state))
        yield state
    finally:
        launcher.down(state.directory)


def ops(state: launcher.ClusterState, *args: str) -> subprocess.CompletedProcess[str]:
    """`xdc cluster ARGS --config TOML`, with a --dir that holds no cluster."""
    return xdc("cluster", *args, "--config", state.config,
               "--dir", str(Path(state.directory) / "no-such-dir"))


def status_json(state: launcher.ClusterState) -> dict[str, dict[str, object] | None]:
    r = ops(state, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def leader_of(sts: dict[str, dict[str, object] | None]) -> str:
    leaders = [k for k, s in sts.items() if s is not None and s.get("role") == "leader"]
    assert len(leaders) == 1, sts
    return leaders[0]


def test_status_from_the_toml(cluster: launcher.ClusterState) -> None:
    sts = status_json(cluster)
    assert sorted(sts) == sorted(n.id for n in cluster.nodes)
    leader = leader_of(sts)
    assert leader == asyncio.run(launcher.wait_leader(cluster))[0].id
    standby = next(n.id for n in cluster.nodes if not n.voter)
    assert sts[standby] is not None and sts[standby]["role"] != "leader"
    table = ops(cluster, "status")
    assert table.returncode == 0, table.stderr
    assert "leader (open)" in table.stdout
    assert all(n.id in table.stdout for n in cluster.nodes)
    assert f"etcd: {len(cluster.etcd_endpoints)}/{len(cluster.etcd_endpoints)} healthy" \
        in table.stdout
    assert "tls: on" in table.stdout


def test_status_without_the_etcd_password_still_shows_the_members(
        cluster: launcher.ClusterState, tmp_path: Path) -> None:
    """An operator host may lack the [etcd] password file: status needs only gRPC."""
    toml = Path(cluster.config).read_text()
    password = f'{cluster.directory}/etcd-node.password'
    assert password in toml
    copy = tmp_path / "cluster.toml"
    copy.write_text(toml.replace(password, str(tmp_path / "missing.password")))
    r = xdc("cluster", "status", "--config", str(copy))
    assert r.returncode == 0, r.stderr
    assert "leader (open)" in r.stdout and "etcd: not checked" in r.stdout
    assert "missing.password" in r.stdout


def test_unknown_region_and_standby_target_are_refused(cluster: launcher.ClusterState) -> None:
    before = leader_of(status_json(cluster))
    r = ops(cluster, "switchover", "--to", "mars")
    assert r.returncode == 1
    assert "no node or region 'mars'" in r.stderr and "us-east" in r.stderr, r.stderr
    standby = next(n for n in cluster.nodes if not n.voter)
    r = ops(cluster, "switchover", "--to", standby.id)
    assert r.returncode == 1
    assert f"switchover to {standby.id} refused" in r.stderr and "non-voter" in r.stderr
    # The leader itself refuses too (a client that skips the CLI's check).
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    with (sync_channel(leader.client, launcher.client_tls(cluster)) as ch,
          pytest.raises(grpc.RpcError) as refused):
        rpb_grpc.ReplicationStub(ch).Switchover(
            rpb.SwitchoverRequest(target=standby.id, timeout_ms=5000), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "non-voter" in refused.value.details()
    r = ops(cluster, "promote", "mars")
    assert r.returncode == 1 and "no node or region 'mars'" in r.stderr
    assert leader_of(status_json(cluster)) == before


def test_switchover_under_load_moves_the_leader_and_loses_nothing(
        cluster: launcher.ClusterState) -> None:
    async def body() -> None:
        leader, st = await launcher.wait_leader(cluster)
        to = next(n for n in cluster.nodes if n.voter and n.id != leader.id)
        async with loaded(cluster) as load:
            before = len(load.acked)
            # Explicit --tls-* (the admin's) rather than the TOML's [tls]: the same.
            r = await asyncio.to_thread(ops, cluster, "switchover", "--to", to.region,
                                        *launcher.tls_args(cluster, "admin"))
            assert r.returncode == 0, r.stderr
            assert f"switchover to {to.id}" in r.stdout
            await wait_for(lambda: len(load.acked) >= before + 200, 30,
                           "writes after the switchover")
        new, new_st = await launcher.wait_leader(cluster)
        assert new.id == to.id and new_st.term > st.term
        await check_cluster(cluster, load)

    asyncio.run(asyncio.wait_for(body(), 120))


def test_a_switchover_retried_after_it_succeeded_reports_the_leader(
        cluster: launcher.ClusterState) -> None:
    """A retry (the operator did not see the first answer) finds its target leading:
    success with the target's term, nothing moves."""
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    to = next(n for n in cluster.nodes if n.voter and n.id != leader.id)
    first = ops(cluster, "switchover", "--to", to.id)
    assert first.returncode == 0, first.stderr
    _, st = asyncio.run(launcher.wait_leader(cluster))
    assert f"switchover to {to.id}: term {st.term}," in first.stdout
    retry = ops(cluster, "switchover", "--to", to.region)
    assert retry.returncode == 0, retry.stderr
    assert f"switchover to {to.id}: term {st.term}, writes paused 0.0 ms" in retry.stdout
    new, new_st = asyncio.run(launcher.wait_leader(cluster))
    assert new.id == to.id and new_st.term == st.term


def test_switchover_as_a_non_admin_is_refused(cluster: launcher.ClusterState) -> None:
    before = leader_of(status_json(cluster))
    to = next(n for n in cluster.nodes if n.voter and n.id != before)
    r = ops(cluster, "switchover", "--to", to.id, *launcher.tls_args(cluster, "trader"))
    assert r.returncode == 1
    assert "PERMISSION_DENIED" in r.stderr, r.stderr
    assert leader_of(status_json(cluster)) == before


def test_refused_credentials_are_named_not_shown_as_unreachable(
        cluster: launcher.ClusterState) -> None:
    """A wrong token is refused by every node: status says so (exit 1), and switchover
    fails at once naming the refusal (it waited for an open leader until --timeout)."""
    before = leader_of(status_json(cluster))
    r = ops(cluster, "status", "--token", "wrong")
    assert r.returncode == 1, r.stdout
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:len(cluster.nodes) + 1]}
    assert sorted(rows) == sorted(n.id for n in cluster.nodes)
    assert all("refused (UNAUTHENTICATED)" in row for row in rows.values()), r.stdout
    assert "unreachable" not in r.stdout
    assert "refused the call: UNAUTHENTICATED: " in r.stdout
    assert "unknown bearer token" in r.stderr, r.stderr
    r = ops(cluster, "status", "--json", "--token", "wrong")
    assert r.returncode == 1
    assert {s["refused"] for s in json.loads(r.stdout).values()} == {"UNAUTHENTICATED"}
    to = next(n for n in cluster.nodes if n.voter and n.id != before)
    r = ops(cluster, "switchover", "--to", to.id, "--token", "wrong", "--timeout", "10")
    assert r.returncode == 1
    assert "refused the call: UNAUTHENTICATED: " in r.stderr, r.stderr
    assert "no open leader" not in r.stderr
    assert leader_of(status_json(cluster)) == before


def test_promote_in_manual_mode_after_the_leader_is_killed(
        cluster: launcher.ClusterState) -> None:
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    to = next(n for n in cluster.nodes if n.voter and n.id != leader.id)
    r = ops(cluster, "promote", to.region)
    assert r.returncode == 1
    assert "failover is automatic" in r.stderr and "switchover" in r.stderr, r.stderr
    assert ops(cluster, "failover", "manual").returncode == 0
    try:
        for n in launcher.signal_node(cluster, leader.id, signal.SIGKILL):
            launcher.reap(n.pid)
        # Manual failover: the seat stays vacant, the dead leader shows as unreachable.
        sts = status_json(cluster)
        assert sts[leader.id] is None
        table = ops(cluster, "status")
        assert table.returncode == 0
        assert any(line.startswith(leader.id) and "unreachable" in line
                   for line in table.stdout.splitlines()), table.stdout
        r = ops(cluster, "promote", to.region)
        assert r.returncode == 0, r.stderr
        assert f"promoted {to.id}" in r.stdout
        new, _ = asyncio.run(launcher.wait_leader(cluster, timeout_s=30))
        assert new.id == to.id
        assert leader_of(status_json(cluster)) == to.id
    finally:
        assert ops(cluster, "failover", "automatic").returncode == 0
        launcher.start_node(cluster, leader)
    asyncio.run(launcher.wait_converged(cluster))


async def _pending_promotion(state: launcher.ClusterState) -> str | None:
    lead = Leadership(list(state.etcd_endpoints), state.cluster, "test-reader",
                      {"id": "test-reader"}, 2, access=launcher.etcd_access_of(state),
                      on_lost=lambda reason: None)
    try:
        return await lead.promoted()
    finally:
        await lead.close()


async def _leaders(state: launcher.ClusterState) -> list[str]:
    sts = launcher.answered(await launcher.statuses(state))
    return [k for k, s in sts.items() if s is not None and s.role in ("leader", "candidate")]


def test_promote_while_the_seat_is_held_writes_nothing_and_elects_nobody(
        cluster: launcher.ClusterState) -> None:
    """Manual mode promises that only an operator replaces a lost leader. A promotion
    of the leader (a retry) is a no-op; one of another node while the leader lives is
    refused naming the holder; neither leaves anything armed: when the leader dies
    later, the seat stays vacant until an operator promotes."""
    leader, st = asyncio.run(launcher.wait_leader(cluster))
    other = next(n for n in cluster.nodes if n.voter and n.id != leader.id)
    assert ops(cluster, "failover", "manual").returncode == 0
    try:
        r = ops(cluster, "promote", leader.region)
        assert r.returncode == 0, r.stderr
        assert asyncio.run(_pending_promotion(cluster)) is None
        r = ops(cluster, "promote", other.id)
        assert r.returncode == 1
        assert f"{leader.id} holds the leader seat (term {st.term})" in r.stderr, r.stderr
        assert asyncio.run(_pending_promotion(cluster)) is None
        done = asyncio.run(launcher.promote(cluster, leader.id))
        assert done == launcher.Promotion(leader.id, st.term)
        assert done.message == f"{leader.id} already leads term {st.term}"
        for n in launcher.signal_node(cluster, leader.id, signal.SIGKILL):
            launcher.reap(n.pid)

        async def vacant_for(window_s: float) -> None:
            # Long enough for the dead leader's lease to expire and an armed promotion
            # to win: nobody may take the seat.
            loop = asyncio.get_running_loop()
            end = loop.time() + window_s
            while loop.time() < end:
                assert await _leaders(cluster) == []
                await asyncio.sleep(0.1)  # poll interval, not synchronisation
        ttl_s = load(cluster.config).lease_ttl_s
        asyncio.run(vacant_for(2 * ttl_s + 2))
        r = ops(cluster, "promote", other.region)
        assert r.returncode == 0, r.stderr
        assert f"promoted {other.id}" in r.stdout
        new, _ = asyncio.run(launcher.wait_leader(cluster, timeout_s=30))
        assert new.id == other.id
    finally:
        assert ops(cluster, "failover", "automatic").returncode == 0
        if not launcher.alive(leader.pid, cluster):
            launcher.start_node(cluster, leader)
    asyncio.run(launcher.wait_converged(cluster))
