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
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from geo import launcher
from geo.config import load
from geo.demo import wait_for
from geo.leadership import Leadership
from store.client import StoreClient, new_event
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
    """The members' statuses of `status --json` (without its `_seat`)."""
    r = ops(state, "status", "--json")
    assert r.returncode == 0, r.stderr
    sts = json.loads(r.stdout)
    assert "_seat" in sts
    return {k: v for k, v in sts.items() if k != "_seat"}


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
    # Each member's client address (what `xdc append --target` needs), in both forms.
    assert {k: s["client"] for k, s in sts.items()} == {n.id: n.client for n in cluster.nodes}
    # As `xdc info` prints: snake_case keys, integers as numbers (was "commitPosition": "7").
    assert isinstance(sts[leader]["commit_position"], int) and sts[leader]["commit_position"] > 0
    table = ops(cluster, "status")
    assert table.returncode == 0, table.stderr
    assert "leader (open)" in table.stdout
    assert table.stdout.splitlines()[0].split()[:3] == ["node", "region", "client"]
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert all(rows[n.id][:3] == [n.id, n.region, n.client] for n in cluster.nodes), table.stdout
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
    assert retry.stdout == f"{to.id} already leads term {st.term}; nothing handed over\n"
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
    assert {s["refused"] for k, s in json.loads(r.stdout).items()
            if k != "_seat"} == {"UNAUTHENTICATED"}
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
        assert sts[leader.id] == {"client": leader.client, "unreachable": True}
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


# ---- promote asks its target first; status shows what is pending ----------------------------

def _kill(state: launcher.ClusterState, node_id: str) -> None:
    for n in launcher.signal_node(state, node_id, signal.SIGKILL):
        launcher.reap(n.pid)


def _restart_the_dead(state: launcher.ClusterState) -> None:
    for n in state.nodes:
        if not launcher.alive(n.pid, state):
            launcher.start_node(state, n)


def _back_to_automatic(state: launcher.ClusterState) -> None:
    """What every test of the module leaves: automatic failover, every node up, one open
    leader, every replica converged."""
    assert ops(state, "failover", "automatic").returncode == 0
    _restart_the_dead(state)
    asyncio.run(launcher.wait_leader(state, timeout_s=30))
    asyncio.run(launcher.wait_converged(state, 60))


async def _status_until(state: launcher.ClusterState, node: launcher.NodeProc,
                        ok: Callable[[rpb.NodeStatus], bool], what: str,
                        timeout_s: float = 30) -> rpb.NodeStatus:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        st = await launcher.node_status(state, node)
        if st is not None and ok(st):
            return st
        if loop.time() > deadline:
            raise AssertionError(f"{node.id}: no {what} within {timeout_s} s: {st}")
        await asyncio.sleep(0.05)  # poll interval


def test_promote_refuses_a_target_that_does_not_answer(cluster: launcher.ClusterState) -> None:
    """A promotion of a dead node used to be written: no other voter may campaign while
    it stands (60 s), and the dead node never does. Refused now, naming who could; once
    it answers it is promoted, and promote returns only when it leads, open."""
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    dead, alive = [n for n in cluster.nodes if n.voter and n.id != leader.id]
    assert ops(cluster, "failover", "manual").returncode == 0
    try:
        _kill(cluster, dead.id)
        _kill(cluster, leader.id)
        r = ops(cluster, "promote", dead.region)
        assert r.returncode == 1, r.stdout
        assert f"promote {dead.id} refused: it does not answer (its status call at " \
               f"{dead.client})" in r.stderr, r.stderr
        assert f"promote a voter that answers: {alive.id} (last " in r.stderr, r.stderr
        assert asyncio.run(_pending_promotion(cluster)) is None, "nothing written"
        launcher.start_node(cluster, dead)
        r = ops(cluster, "promote", dead.region)
        assert r.returncode == 0, r.stderr
        assert f"promoted {dead.id}: leader of term " in r.stdout, r.stdout
        assert "open for writes" in r.stdout
        st = asyncio.run(launcher.node_status(cluster, dead))
        assert st is not None and st.role == "leader" and st.open, st
        assert f"promoted {dead.id}: leader of term {st.term}, " in r.stdout
    finally:
        _back_to_automatic(cluster)


async def _append(state: launcher.ClusterState, count: int) -> int:
    """`count` events appended (each committed) through the leader; the last position."""
    leader, _ = await launcher.wait_leader(state)
    last = 0
    async with StoreClient(leader.client, tls=launcher.client_tls(state), timeout_s=10) as c:
        for i in range(count):
            last = (await c.append("promote-lag", new_event("Placed", b"%d" % i))).last_position
    return last


def test_promote_refuses_a_target_behind_the_commit_unless_forced(
        cluster: launcher.ClusterState) -> None:
    """A voter that missed committed records (down while they were written) is refused
    naming the positions and the up-to-date voter; --force promotes it anyway and it
    opens holding every committed record (its promise round fetched them)."""
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    behind, ahead = [n for n in cluster.nodes if n.voter and n.id != leader.id]
    assert ops(cluster, "failover", "manual").returncode == 0
    try:
        _kill(cluster, behind.id)
        last = asyncio.run(_append(cluster, 30))
        # `ahead` learns of the commit with the leader's next message.
        asyncio.run(_status_until(cluster, ahead, lambda s: s.commit_position >= last,
                                  f"commit position {last}"))
        _kill(cluster, leader.id)
        launcher.start_node(cluster, behind)
        lag = asyncio.run(launcher.node_status(cluster, behind))
        top = asyncio.run(launcher.node_status(cluster, ahead))
        assert lag is not None and top is not None
        known = max(top.commit_position, top.leader_commit)
        assert lag.last_position < last <= known
        r = ops(cluster, "promote", behind.region)
        assert r.returncode == 1, r.stdout
        assert f"promote {behind.id} refused: it is behind: its log ends at position " \
               f"{lag.last_position} (commit {lag.commit_position}) while position " \
               f"{known} is known committed (" in r.stderr, r.stderr
        seen = r.stderr.split("is known committed (", 1)[1].split(")", 1)[0].split(", ")
        assert ahead.id in seen and behind.id not in seen, r.stderr  # the standby knows too
        assert f"fetch the {known - lag.last_position} records it lacks" in r.stderr
        assert f"Promote an up-to-date voter: {ahead.id} (last {top.last_position}, " \
               f"commit {top.commit_position})" in r.stderr, r.stderr
        assert "--force" in r.stderr
        assert asyncio.run(_pending_promotion(cluster)) is None, "nothing written"
        r = ops(cluster, "promote", behind.id, "--force")
        assert r.returncode == 0, r.stderr
        assert f"promoted {behind.id}: leader of term " in r.stdout, r.stdout
        st = asyncio.run(launcher.node_status(cluster, behind))
        assert st is not None and st.role == "leader" and st.open
        assert st.commit_position > last, "it opened holding every committed record"
    finally:
        _back_to_automatic(cluster)


def test_status_shows_a_pending_promotion_and_designation(
        cluster: launcher.ClusterState) -> None:
    """Both keep every other voter from campaigning while they stand: the operator sees
    them, the node they name and the seconds left, in the table and in --json."""
    leader, st = asyncio.run(launcher.wait_leader(cluster))
    standby = next(n for n in cluster.nodes if not n.voter)  # never campaigns: stays pending
    op = _operator(cluster)
    try:
        asyncio.run(op.designate(standby.id, 30))
        table = ops(cluster, "status")
        assert table.returncode == 0, table.stderr
        assert f"leader seat: held by {leader.id} (term {st.term}); failover automatic" \
            in table.stdout, table.stdout
        assert f"switchover pending: {standby.id} designated (expires in " in table.stdout
        assert "promotion pending" not in table.stdout
        seat = seat_json(cluster)
        assert seat["leader"] == leader.id and seat["term"] == st.term
        assert seat["failover"] == "automatic" and seat["promoted"] is None
        assert seat["designated"]["node"] == standby.id
        assert 0 < seat["designated"]["expires_in_s"] <= 30
        asyncio.run(op.clear_designation())
        assert ops(cluster, "failover", "manual").returncode == 0
        _kill(cluster, leader.id)
        asyncio.run(_until_vacant(op))
        assert asyncio.run(op.promote(standby.id, 60)) is None
        table = ops(cluster, "status")
        assert table.returncode == 0, table.stderr
        assert "leader seat: vacant; failover manual" in table.stdout, table.stdout
        assert f"promotion pending: {standby.id} (expires in " in table.stdout
        assert "no other voter campaigns meanwhile" in table.stdout
        assert "switchover pending" not in table.stdout
        seat = seat_json(cluster)
        assert seat["leader"] is None and seat["term"] is None
        assert seat["failover"] == "manual" and seat["designated"] is None
        assert seat["promoted"]["node"] == standby.id
        assert 0 < seat["promoted"]["expires_in_s"] <= 60
        asyncio.run(op.clear_promotion())
    finally:
        asyncio.run(op.close())
        _back_to_automatic(cluster)


def test_promote_says_when_its_target_does_not_take_the_seat(
        cluster: launcher.ClusterState, monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that answered but then does not campaign (frozen here right after it
    answered) leaves the seat vacant: promote says so after --timeout, with how long the
    promotion stays armed, and exits non-zero; it used to report success at once."""
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    target = next(n for n in cluster.nodes if n.voter and n.id != leader.id)
    check = launcher.check_candidate
    frozen: list[launcher.NodeProc] = []

    async def check_then_freeze(t: launcher.Target, n: launcher.NodeProc,
                                force: bool = False) -> rpb.NodeStatus:
        st = await check(t, n, force)
        frozen.extend(launcher.signal_node(cluster, n.id, signal.SIGSTOP))
        return st

    monkeypatch.setattr(launcher, "check_candidate", check_then_freeze)
    assert ops(cluster, "failover", "manual").returncode == 0
    try:
        _kill(cluster, leader.id)
        with pytest.raises(launcher.PromotionNotSeated) as failed:
            asyncio.run(launcher.promote(cluster, target.region, timeout_s=3))
        assert frozen, "the check ran"
        msg = str(failed.value)
        assert msg.startswith(f"promoted {target.id}, but the leader seat is still vacant "
                              f"after 3 s: {target.id} has not taken it (it does not answer "
                              f"now); the promotion stays armed for "), msg
        seat = seat_json(cluster)
        assert seat["leader"] is None and seat["promoted"]["node"] == target.id
        for n in launcher.signal_node(cluster, target.id, signal.SIGCONT):
            frozen.remove(n)
        new, _ = asyncio.run(launcher.wait_leader(cluster, timeout_s=30))
        assert new.id == target.id, "the promotion still stood: it takes the seat"
    finally:
        for n in frozen:
            launcher.signal_node(cluster, n.id, signal.SIGCONT)
        _back_to_automatic(cluster)


def test_promote_refuses_a_rejoining_target(cluster: launcher.ClusterState) -> None:
    """A voter that lost its disk rejoins: it neither campaigns nor votes until a leader
    elected since commits to it. Promoting it used to be accepted and kept the seat vacant
    (and the old leader out of it) for 60 s; refused now, with --force too, nothing is
    written, and the old leader, back, takes its seat again by itself. Last in the module:
    the wiped node may restart rejoining again until it persists that it is whole.

    The wiped voter is fenced only once both other voters told it their promises (n -
    quorum + 1 of 2), answers of every round counted: it hears the leader's while the
    other is paused, the leader dies, then the other's; the seat is then vacant (manual
    failover) with the wiped voter rejoining."""
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    wiped, other = [n for n in cluster.nodes if n.voter and n.id != leader.id]
    assert ops(cluster, "failover", "manual").returncode == 0
    paused: list[launcher.NodeProc] = []
    try:
        _kill(cluster, wiped.id)
        shutil.rmtree(wiped.data_dir)  # the disk is lost while it is down
        paused = launcher.signal_node(cluster, other.id, signal.SIGSTOP)
        ready_file, proc = launcher._spawn_node(cluster, wiped)
        node_log = Path(cluster.directory, "nodes", wiped.id, "node.log")
        deadline = time.monotonic() + 30
        while f"answered: {leader.id}; waiting for: {other.id}" not in node_log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, \
                "the wiped voter did not hear the leader's promise"
            time.sleep(0.05)
        _kill(cluster, leader.id)
        launcher.signal_node(cluster, other.id, signal.SIGCONT)
        paused = []
        launcher._wait_ready_line(ready_file, proc, 30)
        st = asyncio.run(_status_until(cluster, wiped, lambda s: s.role == "rejoining",
                                       "rejoining role"))
        for force in ((), ("--force",)):
            r = ops(cluster, "promote", wiped.id, *force)
            assert r.returncode == 1, r.stdout
            assert f"promote {wiped.id} refused: it is rejoining after a lost disk (fenced " \
                   f"at term {st.rejoin_term};" in r.stderr, r.stderr
            assert f"Promote a voter that is whole: {other.id} (last " in r.stderr
            assert asyncio.run(_pending_promotion(cluster)) is None, "nothing written"
        launcher.start_node(cluster, leader)
        new, _ = asyncio.run(launcher.wait_leader(cluster, timeout_s=30))
        assert new.id == leader.id
        asyncio.run(_status_until(cluster, wiped, lambda s: s.role == "follower",
                                  "follower role (whole again)"))
    finally:
        for n in paused:
            os.kill(n.pid, signal.SIGCONT)
        _back_to_automatic(cluster)


def _operator(state: launcher.ClusterState) -> Leadership:
    return Leadership(list(state.etcd_endpoints), state.cluster, "test-operator",
                      {"id": "test-operator"}, 2, access=launcher.etcd_access_of(state),
                      on_lost=lambda reason: None)


async def _until_vacant(op: Leadership, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (cur := await op.current()) is not None:
        if loop.time() > deadline:
            raise AssertionError(f"the seat is still held: {cur}")
        await op.wait_change(cur[1], deadline - loop.time())


def seat_json(state: launcher.ClusterState) -> dict[str, Any]:
    r = ops(state, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["_seat"]  # type: ignore[no-any-return]


# ---- the WAN proxy: `xdc cluster partition/heal` (local clusters) --------------------------

def test_partition_cuts_a_region_off_and_heal_ends_it(cluster: launcher.ClusterState) -> None:
    """`partition REGION` cuts every WAN link to and from the region in the proxy: the
    leader there loses its quorum and a voter of another region takes over; status shows
    the cut (table and --json `_wan`); `heal` ends it and the region catches up."""
    local = ("--dir", cluster.directory)
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    cut = {n.id for n in cluster.nodes if n.region == leader.region}
    links = {name for name in cluster.links if cut & set(name.split("->"))}
    assert links
    try:
        r = xdc("cluster", "partition", leader.region, *local)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (f"{leader.region} cut off from the other regions (blackhole, "
                            f"{len(links)} WAN links); `xdc cluster heal {leader.region}` "
                            f"ends it\n")
        new, _ = asyncio.run(launcher.wait_leader(cluster, timeout_s=30, exclude=tuple(cut)))
        assert new.region != leader.region
        table = xdc("cluster", "status", *local)
        assert table.returncode == 0, table.stderr
        assert f"; partitioned: {leader.region} cut off (blackhole)" in table.stdout, \
            table.stdout
        r = xdc("cluster", "status", "--json", *local)
        assert r.returncode == 0, r.stderr
        wan = json.loads(r.stdout)["_wan"]
        assert wan["control"] == cluster.proxy_control
        assert wan["partitioned"] == dict.fromkeys(sorted(links), "blackhole")
    finally:
        healed = xdc("cluster", "heal", *local)
    assert healed.returncode == 0, healed.stderr
    assert healed.stdout == f"healed {len(links)} partitioned WAN links\n"
    table = xdc("cluster", "status", *local)
    assert f"rtt {cluster.rtt_ms:g} ms; no partition" in table.stdout, table.stdout
    again = xdc("cluster", "heal", leader.region, *local)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"no WAN link of {leader.region} was partitioned; nothing to heal\n"
    unknown = xdc("cluster", "partition", "mars", *local)
    assert unknown.returncode == 1 and "no node or region 'mars'" in unknown.stderr
    asyncio.run(launcher.wait_converged(cluster))
