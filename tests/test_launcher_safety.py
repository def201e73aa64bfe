"""The local launcher (`xdc cluster up/down/signal`) must never touch what it did not
start: a second `up` on a running cluster's directory, a state.json whose PIDs now
belong to other processes, a bad option or an interrupted start.

One real cluster for the module (`launcher.up --insecure --regions 2`: etcd, the WAN
proxy and two `xdc node run` processes), its nodes exporting their telemetry to an OTLP
receiver; the commands under test run as `xdc` processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from geo import launcher
from geo.signals_held import signals_held
from store.client import StoreClient, new_event
from tests.support.cli import xdc_cli as xdc
from xdc.otlp_receiver import OtlpReceiver

OTEL_ENV = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_SCHEDULE_DELAY": "100"}


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.02)


def processes_naming(directory: Path) -> list[int]:
    """PIDs of the processes whose command line names `directory` (every etcd, proxy and
    node the launcher starts there does)."""
    needle = os.fsencode(str(directory))
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass  # gone meanwhile
    return found


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            otlp: OtlpReceiver) -> Iterator[launcher.ClusterState]:
    env = {**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.grpc_endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # only for the nodes `up` starts: restored at once
    try:
        state = launcher.up(str(tmp_path_factory.mktemp("safety") / "cluster"), regions=2,
                            tls=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    started = state.pids()
    try:
        asyncio.run(launcher.wait_leader(state))
        yield state
    finally:
        launcher.down(state.directory)
        assert [p for p in started if launcher.alive(p, state)] == []


# ---- 1. `up` on a running cluster's directory -------------------------------------------------

def test_up_on_a_running_cluster_is_refused_and_leaves_it_alone(
        cluster: launcher.ClusterState) -> None:
    base = Path(cluster.directory)
    auth = {p: p.read_bytes() for p in Path(cluster.auth_dir).iterdir()}
    before = (base / "state.json").read_text()
    pids = cluster.pids()
    assert len(pids) == 4  # etcd, the proxy, two nodes
    try:
        r = xdc("cluster", "up", "--insecure", "--regions", "2", "--dir", str(base))
    finally:
        if (base / "state.json").read_text() != before:  # a second cluster was started
            second = launcher.ClusterState.load(base)
            for pid in second.pids():
                launcher._stop_pid(pid, second)
            (base / "state.json").write_text(before)
            for p, content in auth.items():
                p.write_bytes(content)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"a cluster is already running in {base}" in r.stderr, r.stderr
    assert all(str(pid) in r.stderr for pid in pids), r.stderr
    assert "Traceback" not in r.stderr
    # Nothing of it was touched: same processes, same state, same tokens.
    assert (base / "state.json").read_text() == before
    assert {p: p.read_bytes() for p in Path(cluster.auth_dir).iterdir()} == auth
    assert all(launcher.alive(pid, cluster) for pid in pids)
    asyncio.run(launcher.wait_leader(cluster, timeout_s=10))


# ---- 2. PIDs are signalled only while they are still the launcher's ----------------------------

def test_state_records_who_each_pid_is(cluster: launcher.ClusterState) -> None:
    state = launcher.ClusterState.load(cluster.directory)
    assert sorted(state.identities) == sorted(str(p) for p in state.pids())
    for pid in state.pids():
        assert state.identities[str(pid)] == launcher.proc_identity(pid) != ""
        assert launcher.alive(pid, state)
    # A state file of an older launcher (no identities): its processes are still found
    # (they name the cluster's directory), others are not.
    legacy = launcher.ClusterState.load(cluster.directory)
    legacy.identities = {}
    assert all(launcher.alive(pid, legacy) for pid in state.pids())
    assert not launcher.alive(os.getpid(), legacy)


@pytest.mark.parametrize("recorded", ["another process's identity", "no identities (old file)"])
def test_down_and_signal_spare_a_process_that_took_a_recorded_pid(
        tmp_path: Path, recorded: str) -> None:
    """A state.json left by a crash or a reboot: its PIDs now belong to others."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        node = launcher.NodeProc("us-east-1", "us-east", "127.0.0.1:1", "127.0.0.1:2", True,
                                 str(tmp_path / "data"), pid=victim.pid)
        state = launcher.ClusterState(str(tmp_path), "xdc-local", str(tmp_path / "cluster.toml"),
                                      ["127.0.0.1:1"], [victim.pid], [node],
                                      proxy_pid=victim.pid)
        if recorded.startswith("another"):  # the process launched back then
            state.identities = {str(victim.pid): "0-boot-of-back-then/42"}
        state.save()
        if recorded.startswith("no"):
            raw = json.loads((tmp_path / "state.json").read_text())
            del raw["identities"]
            (tmp_path / "state.json").write_text(json.dumps(raw))
        r = xdc("cluster", "signal", "us-east", "kill", "--dir", str(tmp_path))
        assert r.returncode == 1, r.stderr  # nothing signalled: like kill(1), a failure
        assert (r.stdout, r.stderr) == ("", "us-east-1 is not running; nothing signalled\n")
        assert victim.poll() is None, "an unrelated process was signalled"
        assert not launcher.alive(victim.pid, launcher.ClusterState.load(tmp_path))
        r = xdc("cluster", "down", "--dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert victim.poll() is None, "an unrelated process was stopped"
    finally:
        victim.kill()
        victim.wait()


# ---- 4. options checked before anything starts; a failed start stops what it started ---------

@pytest.mark.parametrize(("flags", "named"), [
    (["--regions", "0"], "--regions 0: between 1 and 7"),
    (["--lease-ttl", "0"], "--lease-ttl 0: at least 1 s"),
])
def test_up_refuses_bad_options_before_starting_anything(
        tmp_path: Path, flags: list[str], named: str) -> None:
    d = tmp_path / "cluster"
    try:
        r = xdc("cluster", "up", "--insecure", *flags, "--dir", str(d))
    finally:
        if (d / "state.json").exists():  # started something after all
            launcher.down(str(d))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert named in r.stderr, r.stderr
    assert not d.exists()


def test_check_up_options_names_each_flag_and_rule() -> None:
    launcher.check_up_options()  # the defaults
    launcher.check_up_options(regions=7, rtt_ms=30, standbys=3, ttl_s=1, jitter_ms=2)
    with pytest.raises(launcher.BadOption) as bad:
        launcher.check_up_options(regions=8, rtt_ms=-1, standbys=-1, ttl_s=0,
                                  jitter_ms=float("nan"), etcd_members=0)
    for named in ("--regions 8: between 1 and 7", "--rtt-ms -1: a number of milliseconds",
                  "--standbys -1: 0 or more", "--lease-ttl 0: at least 1 s",
                  "--jitter-ms nan", "etcd_members 0"):
        assert named in str(bad.value)


def test_up_interrupted_by_sigterm_stops_everything_it_started(tmp_path: Path) -> None:
    d = tmp_path / "cluster"
    proc = subprocess.Popen([sys.executable, "-m", "xdc.cli", "cluster", "up", "--insecure",
                             "--regions", "2", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def a_node_started() -> bool:
            try:
                state = launcher.ClusterState.load(d)
            except (OSError, ValueError):
                return False  # not yet, or being written
            return any(n.pid for n in state.nodes)

        wait_until(a_node_started, 60, "the first node started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) != 0
        assert processes_naming(d) == [], "processes of the interrupted start still run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if (d / "state.json").exists():
            launcher.down(str(d))


def test_a_sigterm_during_a_spawn_takes_effect_once_the_child_is_recorded() -> None:
    """Between Popen and the record in state.json a SIGTERM that raised at once left an
    unrecorded child running after `down`. The window is a few bytecodes wide: the
    deferral itself is tested, in the main thread, with a real signal."""
    seen: list[str] = []

    def handler(signum: int, _frame: object) -> None:
        seen.append(f"handled {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("recorded")
        assert seen == ["recorded", f"handled {int(signal.SIGTERM)}"]
        assert signal.getsignal(signal.SIGTERM) is handler
        os.kill(os.getpid(), signal.SIGTERM)  # held no longer: handled at once
        assert seen[-1] == f"handled {int(signal.SIGTERM)}" and len(seen) == 3
    finally:
        signal.signal(signal.SIGTERM, old)


# `xdc cluster up` with one seam: its wait for a leader (20 s) cut to the seconds in
# argv[1]. As the wait begins, it prints the processes then running and who each is.
UP_WITH_SHORT_LEADER_WAIT = """
import json, sys
from geo import launcher
from xdc import cli

wait_leader = launcher.wait_leader

async def short_wait(target, timeout_s=20.0, exclude=()):
    running = {p: launcher.proc_identity(p) for p in target.pids() if launcher.alive(p, target)}
    print(json.dumps({"running": running}), flush=True)
    return await wait_leader(target, float(sys.argv[1]), exclude)

launcher.wait_leader = short_wait
sys.exit(cli.main(sys.argv[2:]))
"""


def test_up_again_after_a_data_directory_was_removed_starts_that_member_as_a_lost_disk(
        tmp_path: Path) -> None:
    """`up` on an earlier run's directory starts a new etcd: the records that each member
    joined are gone with the old one. A voter whose data directory was removed meanwhile
    started as a new, plain voter with an empty log (its vote could elect a leader that
    lacks committed records); the launcher records the members first, so it starts as a
    lost disk: fenced, rejoining, and nothing acknowledged is lost. With TLS, all in one
    process: the second `up` makes a new CA, which this process's client must load (it
    kept the first one's, and every handshake failed)."""
    d = tmp_path / "cluster"

    def client(state: launcher.ClusterState) -> StoreClient:
        return StoreClient([x.client for x in state.nodes], timeout_s=20,
                           tls=launcher.client_tls(state), token=state.token())

    async def append(state: launcher.ClusterState, n: int) -> list[int]:
        async with client(state) as c:
            return [(await c.append("kept", new_event("T", b"%d" % i))).first_position
                    for i in range(n)]

    async def read(state: launcher.ClusterState) -> list[bytes]:
        async with client(state) as c:
            return [e.data for e in await c.read("kept", limit=1000)]

    state = launcher.up(str(d), regions=3)
    try:
        acked = asyncio.run(append(state, 30))
        leader, _ = asyncio.run(launcher.wait_leader(state))
        launcher.down(str(d))
        victim = next(n for n in state.nodes if n.voter and n.id != leader.id)
        node_dir = Path(d, "nodes", victim.id)
        shutil.rmtree(node_dir)  # its data, its log, all of it: a rebuilt machine
        state = launcher.up(str(d), regions=3)
        assert "LOST DISK" in (node_dir / "node.log").read_text(), \
            "the member whose node directory was removed started as a new voter"
        asyncio.run(launcher.wait_converged(state))
        assert asyncio.run(read(state)) == [b"%d" % i for i in range(30)]
        assert len(acked) == 30
        # Other voters on that data: refused before anything starts (a new voter would be
        # taken for a lost disk, and with the earlier ones short of the new quorum no
        # leader could ever be elected).
        launcher.down(str(d))
        for regions in (2, 4):
            with pytest.raises(launcher.BadOption, match=r"--regions \d: .* voters are "
                                                         r"ap-south-1, eu-west-1, us-east-1"):
                launcher.up(str(d), regions=regions)
            assert processes_naming(d) == []
        r = xdc("cluster", "up", "--regions", "2", "--dir", str(d))
        assert r.returncode == 2 and "voters are ap-south-1, eu-west-1, us-east-1" in r.stderr
        # Which voters ran there is unknown without its cluster.toml: refused too.
        toml = d / "cluster.toml"
        for broken in (b"", b"cluster = 'x'\n[[member]]\n", b"\xff\xfe"):
            toml.write_bytes(broken)
            with pytest.raises(launcher.BadOption, match="does not say which voters"):
                launcher.check_same_voters(d, 3)
    finally:
        if (d / "state.json").exists():
            launcher.down(str(d))


def test_data_of_a_start_that_never_joined_is_no_earlier_cluster(tmp_path: Path) -> None:
    """Logs no node marked (a first start that failed before its nodes joined) make no
    earlier cluster: its members are not recorded as joined (each would have waited, as
    a lost disk, for the others' answers: none serves before it joined, so for good), and
    `up` with other voters is not refused."""
    from store.log import Log
    d = tmp_path / "cluster"
    for member in ("us-east-1", "eu-west-1"):
        data = d / "nodes" / member / "data"
        data.mkdir(parents=True)
        Log(str(data)).close()  # opened, never marked
        (data.parent / "node.log").write_text("")  # as the failed start left it
    assert launcher.earlier_data(d) == ["eu-west-1", "us-east-1"]
    assert launcher.marked_members(d) == []
    launcher.check_same_voters(d, 3)
    state = launcher.up(str(d), regions=2, tls=False, auth=False)
    try:
        asyncio.run(launcher.wait_leader(state))
        for member in ("us-east-1", "eu-west-1"):
            assert "LOST DISK" not in (d / "nodes" / member / "node.log").read_text()
        assert sorted(launcher.marked_members(d)) == ["eu-west-1", "us-east-1"]
    finally:
        launcher.down(str(d))


def test_up_without_a_leader_in_time_fails_and_stops_everything_it_started(
        tmp_path: Path) -> None:
    """Two regions whose WAN holds every byte for 5 minutes each way: etcd, the proxy and
    both nodes start and serve, but a candidate never hears the other voter's promise (a
    majority of two is both), so no leader opens. `up` waits for one (1 s here), then
    fails saying so, and stops every process it started."""
    d = tmp_path / "cluster"
    try:
        r = subprocess.run([sys.executable, "-c", UP_WITH_SHORT_LEADER_WAIT, "1.0",
                            "cluster", "up", "--insecure", "--regions", "2",
                            "--rtt-ms", "600000", "--dir", str(d)],
                           capture_output=True, text=True, timeout=120)
        # What still runs now that `up` returned (before this test's own cleanup).
        lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        assert lines and "running" in lines[0], (r.stdout, r.stderr)
        running = {int(pid): who for pid, who in lines[0]["running"].items()}
        still = [pid for pid, who in running.items()
                 if launcher.alive(pid) and launcher.proc_identity(pid) == who]
        left = processes_naming(d)
        pids_in_state = launcher.ClusterState.load(d).pids()
    finally:
        if (d / "state.json").exists():
            launcher.down(str(d))  # whatever the failed `up` left behind
    assert len(running) == 4, running  # etcd, the proxy, two nodes: all up when it waited
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "xdc cluster up: no open leader within 1.0s" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert "cluster up in" not in r.stdout
    # Every process it started is gone (a PID running now with another identity is
    # another process's), nothing else names its directory, and its state says so.
    assert still == [], f"processes of the failed start still run: {still}"
    assert left == [], f"processes naming {d} still run: {left}"
    assert pids_in_state == []


# ---- 6. the nodes' telemetry resource ----------------------------------------------------------

def test_node_telemetry_names_its_instance_and_region(cluster: launcher.ClusterState,
                                                      otlp: OtlpReceiver) -> None:
    async def append() -> None:
        async with StoreClient([n.client for n in cluster.nodes],
                               token=cluster.token()) as client:
            await client.append("telemetry.resource", new_event("T"))

    asyncio.run(append())
    regions = {n.id: n.region for n in cluster.nodes}
    otlp.wait(lambda r: {s.resource.get("service.instance.id") for s in r.spans("xdc-node")}
              >= set(regions), what="spans of every node")
    for span in otlp.spans("xdc-node"):
        member = span.resource["service.instance.id"]
        assert span.resource.get("cloud.region") == regions[member], span.resource


# ---- 7. start, stop and signal of one region ----------------------------------------------------

def test_start_of_a_running_node_says_so_and_changes_nothing(
        cluster: launcher.ClusterState) -> None:
    """A second process would fail on the node's ports; its PID must not replace the live
    node's in state.json (status, signal and down would then miss the node)."""
    base = Path(cluster.directory)
    before = (base / "state.json").read_text()
    node = cluster.nodes[0]
    try:
        r = xdc("cluster", "start", node.region, "--dir", str(base))
    finally:
        after = (base / "state.json").read_text()
        (base / "state.json").write_text(before)  # as it was, whatever the start did
    assert (r.returncode, r.stderr) == (0, ""), (r.stdout, r.stderr)
    assert r.stdout == f"{node.id} is already running (pid {node.pid}); nothing started\n"
    assert after == before
    assert launcher.alive(node.pid, cluster)
    table = xdc("cluster", "status", "--dir", str(base))
    assert table.returncode == 0, table.stderr
    row = next(line.split() for line in table.stdout.splitlines() if line.startswith(node.id))
    assert row[-1] == str(node.pid), table.stdout


def test_signal_stop_and_start_of_a_region_say_what_they_did(
        cluster: launcher.ClusterState) -> None:
    """`signal` names each node it signalled; `stop` stops a region's node by PID and,
    run again, says it is not running (exit 0 both times, as `systemctl stop`); the node
    then starts again and the cluster elects a leader."""
    d = cluster.directory
    leader = asyncio.run(launcher.wait_leader(cluster))[0]
    node = next(n for n in cluster.nodes if n.id != leader.id)
    pid = node.pid
    try:
        for kind in ("stop", "cont"):
            r = xdc("cluster", "signal", node.region, kind, "--dir", d)
            assert (r.returncode, r.stderr) == (0, ""), (r.stdout, r.stderr)
            assert r.stdout == f"sent SIG{kind.upper()} to {node.id} (pid {pid})\n"
        r = xdc("cluster", "stop", node.region, "--dir", d)
        assert (r.returncode, r.stderr) == (0, ""), (r.stdout, r.stderr)
        assert r.stdout == f"stopped {node.id} (pid {pid})\n"
        assert not launcher.alive(pid, cluster)
        assert launcher.ClusterState.load(d).node(node.id).pid == 0
        r = xdc("cluster", "stop", node.region, "--dir", d)
        assert (r.returncode, r.stderr) == (0, ""), (r.stdout, r.stderr)
        assert r.stdout == f"{node.id} is not running; nothing stopped\n"
        r = xdc("cluster", "signal", node.region, "kill", "--dir", d)
        assert r.returncode == 1 and "nothing signalled" in r.stderr, (r.stdout, r.stderr)
    finally:
        if launcher.alive(node.pid, cluster):
            os.kill(node.pid, signal.SIGCONT)  # if the test stopped between stop and cont
        else:
            launcher.start_node(cluster, node)  # this process's child: reaped at `down`
    assert launcher.ClusterState.load(d).node(node.id).pid == node.pid != pid
    asyncio.run(launcher.wait_leader(cluster, timeout_s=30))


def test_a_signal_landing_as_etcd_is_spawned_leaves_it_known_to_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM whose handler raises (a drill's, `cluster up`'s), landing right after
    etcd's fork, before Popen's result was stored: the member did not know its process,
    and the etcd outlived the cleanup (test_drill's `starting-etcd` case, under load).
    Held over the spawn, the signal takes effect once the member holds its process."""
    from geo import etcd_server

    class Stop(Exception):
        pass

    def raising(signum: int, _frame: object) -> None:
        raise Stop

    spawned: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def popen_then_signal(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        spawned.append(proc)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode
        return proc

    cluster = etcd_server.EtcdCluster(tmp_path / "etcd", 1)
    cluster._layout()
    member = cluster.members[0]
    monkeypatch.setattr(etcd_server.subprocess, "Popen", popen_then_signal)
    old = signal.signal(signal.SIGTERM, raising)
    try:
        with pytest.raises(Stop):
            member.start()
        assert spawned and member.proc is spawned[0]
        member.stop()
        assert spawned[0].poll() is not None  # stopped, and reaped by stop()
    finally:
        signal.signal(signal.SIGTERM, old)
        for proc in spawned:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_free_ports_are_outside_the_ephemeral_range_and_distinct_across_processes() -> None:
    """A node restarted on its port found it taken by an outgoing connection
    (test_cluster_faults, once): the kernel's port 0 hands out ephemeral ports, which any
    connect() may take meanwhile. free_ports hands out ports below that range, from a
    counter shared by concurrent processes (test workers): 2 x 300 ports, no repeat (the
    kernel's random choice repeats one in most such runs)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    code = ("import sys; from geo.etcd_server import free_ports\n"
            "print(' '.join(str(free_ports(1)[0]) for _ in range(300)))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
             for _ in range(2)]
    got: list[int] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        got += [int(p) for p in out.split()]
    assert len(got) == 600
    assert len(set(got)) == 600, "a port handed out twice"
    from geo.etcd_server import PORT_BLOCK, free_ports
    assert all(p >= 1024 for p in got)
    if ephemeral_low >= 1024 + PORT_BLOCK:  # else no block fits below it (_port_range)
        assert all(p < ephemeral_low for p in got)
    ports = free_ports(4)
    assert len(set(ports)) == 4
