"""The local multi-region cluster (`xdc cluster up/status/down/switchover/promote`).

Everything lives under one directory (default `./run/cluster`): etcd's data, one data
directory and log per node, the cluster TOML, the WAN proxy's link file, and
`state.json` with every process's PID and address, so that later commands (status,
down, drills) find them. Processes are stopped by PID, never by name, and only while
the PID is still the process the launcher started: state.json also records each one's
identity (`proc_identity`: boot and start time), since after a crash or a reboot its PID
may belong to an unrelated process (`ClusterState.owns`). `up` refuses a directory whose
cluster still runs (`DirectoryInUse`) and checks its options before starting anything
(`check_up_options`).

Clients authenticate (store/auth.py): `up` writes `auth/auth.toml` with the principals
of engine.wire.exchange_principals (admin, gateway, engine, trader) and each one's token in
`auth/<name>.token` (mode 0600), and the nodes enforce it. With TLS each principal is also
the holder of the certificate of its name (LOCAL_CERTS), so the operations here act as
admin by certificate; without TLS they send the admin token.

Regions talk to each other only through the fault-injecting proxy (geo/proxy.py): for
every ordered pair of regions (a, b) there is a link that a's node uses to reach b's
peer port (`xdc node run --route b=<link>`), with half the configured RTT of one-way
delay. Clients reach every node directly.

TLS is on by default (`--insecure` turns it off): `up` makes a development CA and
certificates under `tls/` (xdc/certs.py: one per member, plus `engine`, `gateway` and
`admin`), every node serves and dials with its own, and this module's operations speak
as `admin` (`client_tls`). The cluster TOML's `[tls]` names the admin certificate as
the host's, so any tool given the TOML acts as the operator. etcd then runs with TLS
(client certificates demanded) and authentication: user `root` (password in
`etcd-root.password`) and user `<cluster>-node` (`etcd-node.password`, named by the
TOML's `[etcd]`), whose role may touch only `/<cluster>/`; nodes, engines and these
operations use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from engine.wire import exchange_principals
from geo.config import ClusterConfig, ConfigError, Member, etcd_access, load, load_tls
from geo.etcd_server import EtcdCluster, EtcdTls, free_ports, health
from geo.fence_wait import ROLE as FENCING
from geo.leadership import (
    EtcdAccess,
    Leadership,
    LeadershipError,
    Pending,
    SeatView,
    member_info,
)
from geo.proxy import AsyncProxyControl, ProxyControl, ProxyControlError
from geo.replication.core import fence_answers
from geo.signals_held import signals_held
from store import auth
from store.client import channel_options
from store.log import stored_cluster
from xdc import certs
from xdc.tls import Identity, Tls, aio_channel
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc

log = logging.getLogger("xdc.launcher")

# Children started by this process, so that a stopped one is reaped (no zombie left).
_children: dict[int, subprocess.Popen[bytes]] = {}
# The etcd this process started, per cluster directory (for restarts in drills and tests).
_etcd: dict[str, EtcdCluster] = {}

REGION_NAMES = ["us-east", "eu-west", "ap-south", "us-west", "sa-east", "eu-north", "ap-east"]
DEFAULT_DIR = "run/cluster"
READY_TIMEOUT_S = 30.0
# `up` on an earlier run's data records its members in the new etcd before any node
# starts: failed calls are retried for this long, waiting this long between tries
# (doubling from the first value to the second).
RECORD_MEMBERS_S = 30.0
RECORD_RETRY_S = (0.1, 2.0)
# The shortest lease `up` accepts: the cluster TOML's floor (geo/config.py refuses a
# lease_ttl_s below 1 s). The launcher's etcd grants it as asked: etcd's minimum TTL is
# 1.5 election timeouts, here 1.5 x etcd_server.ELECTION_TIMEOUT_MS (0.45 s), not the
# ~1.5 s of etcd's default timing behind config.ETCD_DEFAULT_MIN_TTL_S.
MIN_LEASE_TTL_S = 1


@dataclass
class NodeProc:
    id: str
    region: str
    client: str
    peer: str
    voter: bool
    data_dir: str
    pid: int = 0
    routes: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterState:
    directory: str
    cluster: str
    config: str
    etcd_endpoints: list[str]
    etcd_pids: list[int]
    nodes: list[NodeProc]
    proxy_pid: int = 0
    proxy_control: str = ""
    links: dict[str, str] = field(default_factory=dict)
    rtt_ms: float = 0.0
    tls_dir: str = ""  # the certificates (xdc certs init); "": plaintext
    auth_dir: str = ""  # auth.toml and <principal>.token; empty: no auth
    # str(pid) -> proc_identity(pid) when the launcher started it. Missing in state files
    # written before identities were recorded: see `owns`.
    identities: dict[str, str] = field(default_factory=dict)

    def save(self) -> None:
        Path(self.directory, "state.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ClusterState:
        path = Path(directory, "state.json")
        if not path.exists():
            raise FileNotFoundError(f"no cluster at {directory} (no state.json): run "
                                    "`xdc cluster up` first")
        raw = json.loads(path.read_text())
        raw["nodes"] = [NodeProc(**n) for n in raw["nodes"]]
        return cls(**raw)

    def node(self, key: str) -> NodeProc:
        return find_node(self.nodes, key)

    def reach(self) -> Reach:
        """How this module's operations reach the cluster: as its admin."""
        return Reach(self.cluster, tuple(self.nodes), tuple(self.etcd_endpoints), self.config,
                     client_tls(self), self.token())

    def region_nodes(self, region: str) -> list[NodeProc]:
        return [n for n in self.nodes if n.region == region]

    def select(self, key: str) -> list[NodeProc]:
        """Every node of region `key`, or the node with id `key`."""
        return self.region_nodes(key) or [self.node(key)]

    def token(self, principal: str = "admin") -> str:
        """A local principal's token ("" when the cluster runs without auth)."""
        if not self.auth_dir:
            return ""
        return Path(self.auth_dir, f"{principal}.token").read_text().strip()

    @property
    def auth_file(self) -> str:
        return str(Path(self.auth_dir, "auth.toml")) if self.auth_dir else ""

    def pids(self) -> list[int]:
        """Every PID this state names: nodes, the proxy, etcd."""
        return [p for p in (*(n.pid for n in self.nodes), self.proxy_pid, *self.etcd_pids)
                if p > 0]

    def running(self) -> list[int]:
        """The PIDs of `pids` still running as the launcher started them (none: the
        cluster is stopped)."""
        return [p for p in self.pids() if alive(p, self)]

    def record(self, pid: int) -> None:
        """Remembers who the process just started as `pid` is (and forgets the processes
        this state no longer names), so that a later PID reuse is not mistaken for it."""
        self.identities[str(pid)] = proc_identity(pid)
        named = {str(p) for p in self.pids()}
        self.identities = {k: v for k, v in self.identities.items() if k in named}

    def owns(self, pid: int, stat: list[str] | None = None) -> bool:
        """Whether process `pid` is still the one the launcher started for this cluster.
        A PID without a recorded identity (a state file of an older launcher) cannot be
        told for sure: then the process must name the cluster's directory on its command
        line, as every node (its TOML), proxy (its links file) and etcd (its data dir)
        started here does; an unrelated process that took the PID over does not. `stat`:
        its `_stat`, when the caller read it already."""
        recorded = self.identities.get(str(pid))
        if recorded is not None:
            return recorded != "" and proc_identity(pid, stat) == recorded
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        directory = os.fsencode(self.directory.rstrip("/") + "/")
        return any(arg.startswith(directory) or b"=" + directory in arg for arg in cmdline)


@dataclass(frozen=True)
class Reach:
    """How an operator reaches a cluster: its members' addresses, etcd, and the admin's
    TLS material and token. A local cluster (ClusterState.reach) and any deployment's
    TOML (`reach_config`) both give one, so status, switchover and promote are one code
    path for both. `nodes` are the local NodeProcs (with PIDs) or the TOML's Members."""
    cluster: str
    nodes: tuple[NodeProc | Member, ...]
    etcd_endpoints: tuple[str, ...]
    config: str  # the cluster TOML: [etcd] TLS, user, password_file; failover
    tls: Tls | None = None
    token: str = ""

    def node(self, key: str) -> NodeProc | Member:
        return find_node(self.nodes, key)


N = TypeVar("N", NodeProc, Member, NodeProc | Member)


def find_node(nodes: Sequence[N], key: str) -> N:
    """The node with id `key`, else region `key`'s first (voters come first); KeyError
    naming the known regions and nodes."""
    for n in nodes:
        if n.id == key:
            return n
    for n in nodes:
        if n.region == key:
            return n
    regions = sorted({n.region for n in nodes})
    raise KeyError(f"no node or region {key!r} (regions: {', '.join(regions)}; "
                   f"nodes: {', '.join(n.id for n in nodes)})")


def reach_config(config: ClusterConfig, tls: Tls | None, token: str = "") -> Reach:
    """How the operator holding `tls` (else the TOML's [tls] certificate) and `token`
    reaches the cluster of `config` (a deployment's TOML)."""
    if tls is None and config.tls is not None:
        tls = load_tls(config)
    return Reach(config.cluster, config.members, config.etcd.endpoints, config.source, tls,
                 token)


Target = ClusterState | Reach


def reach(target: Target) -> Reach:
    return target if isinstance(target, Reach) else target.reach()


# The order-entry client's certificate, besides certs.init's usual ones.
TRADER_CERT = ("client", "trader")
# The holders (role, name) of the certificates the principals of the auth file are.
LOCAL_CERTS = (("engine", "engine"), ("gateway", "gateway"), ("admin", "admin"), TRADER_CERT)


def write_local_auth(directory: Path, cluster: str = "") -> None:
    """A fresh token per principal of the local exchange, and the auth file of them. With
    `cluster` (TLS on), each principal is also whoever holds its certificate
    (LOCAL_CERTS), so tools with the admin certificate need no token."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Without TLS the members authenticate to each other with a token too (`peer`).
    roles = ("admin", "gateway", "engine", "trader") + (() if cluster else ("peer",))
    tokens = {role: auth.new_token() for role in roles}
    for role, token in tokens.items():
        fd = os.open(directory / f"{role}.token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    identities = {name: Identity(cluster, role, name).uri for role, name in LOCAL_CERTS
                  } if cluster else {}
    (directory / "auth.toml").write_text(auth.render(exchange_principals(tokens, identities)))


def client_tls(state: ClusterState, name: str = "admin") -> Tls | None:
    """The TLS material of certificate `name` of the cluster (`admin`: operator tools,
    `engine`, `gateway`), None when the cluster runs in plaintext."""
    if not state.tls_dir:
        return None
    # Keyed by the files' identities too: `up` again in the same directory makes a new
    # CA, and a process that had loaded the old one (a test, a drill) failed every
    # handshake.
    d = Path(state.tls_dir)
    files = tuple((s.st_ino, s.st_mtime_ns) for s in (
        (d / f).stat() for f in ("ca.pem", f"{name}.pem", f"{name}-key.pem")))
    return _load_tls(state.tls_dir, name, files)


@functools.lru_cache(maxsize=16)
def _load_tls(directory: str, name: str, _files: tuple[tuple[int, int], ...]) -> Tls:
    d = Path(directory)
    return Tls.load(d / "ca.pem", d / f"{name}.pem", d / f"{name}-key.pem")


def tls_args(state: ClusterState, name: str) -> list[str]:
    """`--tls-*` options of an `xdc` command run with certificate `name` (none in
    plaintext)."""
    if not state.tls_dir:
        return []
    d = Path(state.tls_dir)
    return ["--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / f"{name}.pem"),
            "--tls-key", str(d / f"{name}-key.pem")]


def etcd_user(cluster: str) -> str:
    return f"{cluster}-node"


def _toml(state: ClusterState, regions: list[str], failover: str, ttl_s: int) -> str:
    lines = [f'cluster = "{state.cluster}"', f'failover = "{failover}"',
             f"lease_ttl_s = {ttl_s}"]
    if state.auth_dir:
        lines.append(f'auth_file = "{state.auth_file}"')
        if not state.tls_dir:
            lines.append(f'peer_token_file = "{state.auth_dir}/peer.token"')
    lines += ["", "[etcd]",
              "endpoints = [" + ", ".join(f'"{e}"' for e in state.etcd_endpoints) + "]"]
    if state.tls_dir:
        lines += [f'ca = "{state.tls_dir}/ca.pem"', f'cert = "{state.tls_dir}/admin.pem"',
                  f'key = "{state.tls_dir}/admin-key.pem"',
                  f'user = "{etcd_user(state.cluster)}"',
                  f'password_file = "{state.directory}/etcd-node.password"']
    for r in regions:
        lines += ["", "[[region]]", f'name = "{r}"']
    for n in state.nodes:
        lines += ["", "[[member]]", f'id = "{n.id}"', f'region = "{n.region}"',
                  f'client = "{n.client}"', f'peer = "{n.peer}"',
                  f"voter = {'true' if n.voter else 'false'}", f'data_dir = "{n.data_dir}"']
        if state.tls_dir:
            lines += [f'cert = "{state.tls_dir}/{n.id}.pem"',
                      f'key = "{state.tls_dir}/{n.id}-key.pem"']
    if state.tls_dir:
        lines += ["", "[tls]", f'ca = "{state.tls_dir}/ca.pem"',
                  f'cert = "{state.tls_dir}/admin.pem"', f'key = "{state.tls_dir}/admin-key.pem"']
    return "\n".join(lines) + "\n"


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on; [] when there is no such process. The
    command name before it may hold spaces and parentheses: split after the last ')'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 1:].split()


@functools.lru_cache(maxsize=1)
def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def proc_identity(pid: int, stat: list[str] | None = None) -> str:
    """Who process `pid` is beyond its number: this boot's id and the process's start
    time (/proc/PID/stat field 22, clock ticks since boot). A PID reused by another
    process, or the same PID after a reboot, gives another; "" when none runs. `stat`:
    its `_stat`, when the caller read it already."""
    fields = _stat(pid) if stat is None else stat
    if len(fields) < 20:
        return ""
    return f"{_boot_id()}/{fields[19]}"


def alive(pid: int, state: ClusterState | None = None) -> bool:
    """Whether process `pid` of `state`'s cluster runs: a zombie (dead, not yet reaped)
    does not, nor a process that merely holds the PID now (`ClusterState.owns`). Without
    `state`, whether any process runs as `pid` (tests watching their own children)."""
    if pid <= 0:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False  # exited, and now reaped: its PID may already be another's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not one the launcher started
    # A zombie child still answers kill(0); it is not alive for our purposes.
    stat = _stat(pid)
    if not stat or stat[0] == "Z":
        return False
    return state is None or state.owns(pid, stat)


def _wait_ready_line(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    """Waits for the JSON `ready` line a child prints on stdout (redirected to `path`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if msg.get("event") == "ready":
                        return msg
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before ready; "
                               f"see {path.parent}")
        time.sleep(0.02)
    raise RuntimeError(f"{proc.args!r} not ready within {timeout_s}s; see {path.parent}")


def node_command(state: ClusterState, n: NodeProc) -> list[str]:
    cmd = [sys.executable, "-m", "xdc.cli", "node", "run", "--config", state.config,
           "--member", n.id]
    for peer, address in sorted(n.routes.items()):
        cmd += ["--route", f"{peer}={address}"]
    return cmd


class AlreadyRunning(RuntimeError):
    """`start_node` of a node whose recorded process still runs: nothing was started (a
    second process would only fail on the node's ports) and nothing recorded."""

    def __init__(self, n: NodeProc) -> None:
        super().__init__(f"{n.id} is already running (pid {n.pid})")
        self.node = n


def start_node(state: ClusterState, n: NodeProc) -> None:
    """Starts (or restarts) one node process; returns once it serves. AlreadyRunning,
    with nothing started or recorded, while its recorded process still runs."""
    _wait_ready_line(*_spawn_node(state, n), READY_TIMEOUT_S)


def _spawn_node(state: ClusterState, n: NodeProc) -> tuple[Path, subprocess.Popen[bytes]]:
    """`start_node` without the wait: the file the node's ready line goes to, and the
    process."""
    if alive(n.pid, state):
        raise AlreadyRunning(n)
    node_dir = Path(state.directory, "nodes", n.id)
    node_dir.mkdir(parents=True, exist_ok=True)
    out = node_dir / "stdout.log"
    out.write_text("")
    with signals_held(), open(out, "ab") as stdout, \
            open(node_dir / "node.log", "ab") as stderr:
        proc = subprocess.Popen(node_command(state, n), stdout=stdout, stderr=stderr,
                                start_new_session=True)
        _children[proc.pid] = proc
        n.pid = proc.pid
        state.record(proc.pid)
        state.save()  # before it is ready: `down` must find it if this start is interrupted
    return out, proc


class BadOption(ValueError):
    """An option of `up` that cannot be (named as the `xdc cluster up` flag)."""


class DirectoryInUse(RuntimeError):
    """`up` on the directory of a cluster that still runs (or whose state.json cannot be
    read): refused before anything starts, and that cluster is left alone."""


def check_up_options(regions: int = 3, rtt_ms: float = 0.0, standbys: int = 0,
                     ttl_s: int = 2, jitter_ms: float = 0.0,
                     etcd_members: int = 1) -> None:
    """Raises BadOption naming every option of `up` that cannot be, by its flag and rule,
    before anything starts (a bad one used to fail late: no leader, nodes refusing the
    TOML, processes left behind)."""
    problems = []
    if not 1 <= regions <= len(REGION_NAMES):
        problems.append(f"--regions {regions}: between 1 and {len(REGION_NAMES)} (one node "
                        f"per region, named {', '.join(REGION_NAMES)})")
    if standbys < 0:
        problems.append(f"--standbys {standbys}: 0 or more")
    if ttl_s < MIN_LEASE_TTL_S:
        problems.append(f"--lease-ttl {ttl_s}: at least {MIN_LEASE_TTL_S} s (the cluster "
                        "TOML's lease_ttl_s floor)")
    for flag, value in (("--rtt-ms", rtt_ms), ("--jitter-ms", jitter_ms)):
        if not (math.isfinite(value) and value >= 0):
            problems.append(f"{flag} {value:g}: a number of milliseconds, 0 or more")
    if etcd_members < 1:
        problems.append(f"etcd_members {etcd_members}: 1 or more")
    if problems:
        raise BadOption("; ".join(problems))


def up(directory: str = DEFAULT_DIR, regions: int = 3, rtt_ms: float = 0.0,
       failover: str = "automatic", standbys: int = 0, ttl_s: int = 2,
       cluster: str = "xdc-local", jitter_ms: float = 0.0, seed: int = 1,
       attempts: int = 3, etcd_members: int = 1, tls: bool = True,
       auth: bool = True) -> ClusterState:
    """Starts the cluster. Ports are picked free, then bound by the children a moment
    later; another process can take one in between, so a start that fails that way is
    retried from scratch. `etcd_members` > 1 runs a multi-member etcd (drills lose one).
    `auth`: clients authenticate with the tokens under `auth/` (module docstring).
    BadOption and DirectoryInUse come before anything starts (and stop nothing: the
    directory may hold a running cluster); any other failure stops what was started.
    A retry starts from an empty directory only when this call created it: the data of
    an earlier run there (`earlier_data`) is kept."""
    check_up_options(regions=regions, rtt_ms=rtt_ms, standbys=standbys, ttl_s=ttl_s,
                     jitter_ms=jitter_ms, etcd_members=etcd_members)
    check_same_voters(directory, regions)
    created = not Path(directory).exists()
    for attempt in range(attempts):
        try:
            return _up(directory, regions, rtt_ms, failover, standbys, ttl_s, cluster,
                       jitter_ms, seed, etcd_members, tls, auth)
        except DirectoryInUse:
            raise  # another cluster's processes: `down` would stop them
        except BaseException as exc:
            # Whatever failed, stop what was started: nothing may outlive a failed start.
            with contextlib.suppress(Exception):
                down(directory)
            retry = isinstance(exc, RuntimeError) and "before ready" in str(exc)
            if not retry or attempt == attempts - 1:
                raise
            if created:
                shutil.rmtree(directory, ignore_errors=True)
    raise AssertionError("unreachable")


def _up(directory: str, regions: int, rtt_ms: float, failover: str, standbys: int,
        ttl_s: int, cluster: str, jitter_ms: float, seed: int,
        etcd_members: int = 1, tls: bool = True, with_auth: bool = True) -> ClusterState:
    base = Path(directory).resolve()
    running = running_pids(base)
    if running:
        raise DirectoryInUse(f"a cluster is already running in {base} (pids "
                             f"{', '.join(map(str, running))}): stop it first with "
                             f"`xdc cluster down --dir {base}`, or use another --dir")
    base.mkdir(parents=True, exist_ok=True)
    names = REGION_NAMES[:regions]
    members = [(mid, r, True) for mid, r in zip(voter_ids(regions), names, strict=True)]
    members += [(f"{names[i % len(names)]}-dr{i + 1}", names[i % len(names)], False)
                for i in range(standbys)]
    tls_dir = base / "tls"
    etcd_tls = None
    if tls:
        certs.init(tls_dir, cluster, [m[0] for m in members],
                   others=(*certs.DEFAULT_OTHERS, TRADER_CERT))
        etcd_tls = EtcdTls(tls_dir / "ca.pem", tls_dir / "etcd.pem", tls_dir / "etcd-key.pem")
    etcd = EtcdCluster(base / "etcd", etcd_members, tls=etcd_tls)
    _etcd[str(base)] = etcd  # before it starts: `down` stops it if this start is interrupted
    etcd.start()
    if tls:
        node_password, root_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        certs.write_private(base / "etcd-node.password", node_password.encode() + b"\n")
        certs.write_private(base / "etcd-root.password", root_password.encode() + b"\n")
        try:
            etcd.enable_auth(cluster, etcd_user(cluster), node_password, root_password)
        except BaseException:
            etcd.stop()  # not yet in state.json: `down` would not find it
            raise
    ports = free_ports(2 * len(members))
    nodes = [NodeProc(mid, region, f"127.0.0.1:{ports[2 * i]}", f"127.0.0.1:{ports[2 * i + 1]}",
                      voter, str(base / "nodes" / mid / "data"))
             for i, (mid, region, voter) in enumerate(members)]
    state = ClusterState(str(base), cluster, str(base / "cluster.toml"), etcd.endpoints,
                         [m.pid for m in etcd.members if m.pid], nodes, rtt_ms=rtt_ms)
    for pid in state.etcd_pids:
        state.record(pid)
    if tls:
        state.tls_dir = str(tls_dir)
    if with_auth:
        state.auth_dir = str(base / "auth")
        write_local_auth(base / "auth", cluster if tls else "")
    state.save()
    Path(state.config).write_text(_toml(state, names, failover, ttl_s))
    # One proxy link per ordered pair of nodes in different regions.
    link_specs = []
    for a in nodes:
        for b in nodes:
            if a.region != b.region:
                link_specs.append({"name": f"{a.id}->{b.id}", "listen": "127.0.0.1:0",
                                   "target": b.peer, "delay_ms": rtt_ms / 2,
                                   "jitter_ms": jitter_ms, "src_region": a.region,
                                   "dst_region": b.region})
    if link_specs:
        links_file = base / "links.json"
        links_file.write_text(json.dumps({"seed": seed, "links": link_specs}, indent=2))
        proxy_dir = base / "proxy"
        proxy_dir.mkdir(exist_ok=True)
        out = proxy_dir / "stdout.log"
        out.write_text("")
        with signals_held(), open(out, "ab") as stdout, \
                open(proxy_dir / "proxy.log", "ab") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "geo.proxy", "--config",
                                     str(links_file), "--control", "127.0.0.1:0"],
                                    stdout=stdout, stderr=stderr, start_new_session=True)
            _children[proc.pid] = proc
            state.proxy_pid = proc.pid
            state.record(proc.pid)
            state.save()  # before it is ready: `down` must find it if this start is interrupted
        ready = _wait_ready_line(out, proc, READY_TIMEOUT_S)
        state.proxy_control = ready["control"]
        state.links = ready["links"]
        for a in nodes:
            a.routes = {b.id: state.links[f"{a.id}->{b.id}"] for b in nodes
                        if b.region != a.region}
            a.routes.update({b.id: b.peer for b in nodes
                             if b.region == a.region and b.id != a.id})
    state.save()
    marked = set(marked_members(base))
    if marked:
        asyncio.run(_record_earlier_members(state, marked))
    # Every node at once, then a wait for each: one after the other, each start (a Python
    # process that imports gRPC) added ~0.7 s to the cluster's.
    for out, proc in [_spawn_node(state, n) for n in nodes]:
        _wait_ready_line(out, proc, READY_TIMEOUT_S)
    return state


async def _record_earlier_members(state: ClusterState, marked: set[str],
                                  deadline_s: float = RECORD_MEMBERS_S) -> list[str]:
    """Records in the new etcd that the members of the earlier run joined, before any
    starts: the cluster ran in this directory under an etcd whose data is gone (a new one
    runs), and its records that each member joined went with it. Without them a voter
    whose data (or whole node directory) was removed meanwhile would start as a new,
    plain voter with an empty log, whose vote could elect a leader lacking committed
    records; with them it starts as a lost disk, fenced and rejoining (geo/node.py, "Lost
    disks"). The voters are the earlier run's (check_same_voters); a standby recorded
    never votes. `marked`: the members whose logs say they joined. Every voter is
    recorded only when at least n - quorum + 1 voters' logs say so: a recorded voter with
    an empty log waits for that many answers, and the logs are what answer (with fewer,
    a majority lost its data or never joined, which no fence can make safe; recorded,
    they would wait for each other for good). Else only the marked ones.

    etcd has just started: a call that fails (a timeout, a connection not yet made) is
    retried, with backoff, for up to `deadline_s`; then LeadershipError, and `up` starts
    no node (nothing is left unrecorded and running)."""
    voters = [n for n in state.nodes if n.voter]
    everyone = sum(n.id in marked for n in voters) >= fence_answers(len(voters))
    infos = {n.id: member_info(n) for n in state.nodes if everyone or n.id in marked}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    delay = RECORD_RETRY_S[0]
    lead = _leadership(state, "xdc-launcher")
    try:
        while True:
            try:
                return await lead.record_members(infos)
            except LeadershipError as exc:
                if loop.time() + delay > deadline:
                    raise LeadershipError(
                        f"could not record in etcd ({', '.join(state.etcd_endpoints)}) that "
                        f"the earlier run's members joined within {deadline_s:g} s ({exc}): "
                        "no node was started (a voter whose data is gone would have "
                        "started as a new voter)") from exc
                log.warning("recording the earlier run's members (%s) in etcd failed, "
                            "retrying in %.1f s: %s", ", ".join(infos), delay, exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, RECORD_RETRY_S[1])
    finally:
        await lead.close()


def voter_ids(regions: int) -> list[str]:
    """The voters `up` makes: one per region, named after it."""
    return [f"{r}-1" for r in REGION_NAMES[:regions]]


def marked_members(directory: str | os.PathLike[str]) -> list[str]:
    """The members whose log under `directory` is marked as a cluster's (the node joined
    before it served anything: geo/node.py): the earlier run's members that started. A
    start that failed before joining leaves none."""
    return [m for m in earlier_data(directory)
            if stored_cluster(str(Path(directory, "nodes", m, "data")))]


def check_same_voters(directory: str | os.PathLike[str], regions: int) -> None:
    """BadOption when `directory` holds an earlier run's data whose voters are not the
    ones `--regions` makes, or are unknown (its cluster.toml unreadable, or not naming a
    member whose log is there): a voter new to the data would be taken for a lost disk
    and, with the earlier voters short of the new quorum, no leader could ever be elected;
    voters taken away could leave committed records on a minority. Changing the voters
    is a membership change, which `up` does not make. A running cluster's directory is
    left to `up` (DirectoryInUse)."""
    try:
        if running_pids(directory):
            return
    except DirectoryInUse:
        return
    marked = marked_members(directory)
    if not marked:
        return
    toml = Path(directory, "cluster.toml")
    try:
        members = tomllib.loads(toml.read_text())["member"]
        voters = sorted(m["id"] for m in members if m.get("voter", True))
        named = {m["id"] for m in members}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError,
            AttributeError):
        voters, named = [], set()
    if not voters or not set(marked) <= named:
        raise BadOption(
            f"--regions {regions}: {directory} holds the logs of {', '.join(marked)}, but "
            f"{toml} does not say which voters ran there (missing, unreadable or not "
            f"naming them); restore it, or remove the directory to start a new cluster")
    wanted = sorted(voter_ids(regions))
    if voters != wanted:
        raise BadOption(
            f"--regions {regions}: {directory} holds the data of a cluster whose voters are "
            f"{', '.join(voters)} ({len(voters)} regions); `up` there with --regions "
            f"{len(voters)}, or remove the directory to start a new cluster")


def earlier_data(directory: str | os.PathLike[str]) -> list[str]:
    """The members whose data directory under `directory` holds something: `up` there
    continues from an earlier run's logs (not its etcd: a new one starts, its revisions,
    the terms, from 1)."""
    nodes = Path(directory, "nodes")
    if not nodes.is_dir():
        return []
    return sorted(d.parent.name for d in nodes.glob("*/data")
                  if d.is_dir() and any(d.iterdir()))


def running_pids(directory: str | os.PathLike[str]) -> list[int]:
    """The processes of the cluster in `directory` that still run (none without a
    state.json). DirectoryInUse when its state.json cannot be read: what runs there is
    then unknown."""
    if not Path(directory, "state.json").exists():
        return []
    try:
        state = ClusterState.load(directory)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DirectoryInUse(f"{Path(directory, 'state.json')} cannot be read ({exc!r}): "
                             "if no cluster runs there, remove it") from exc
    return state.running()


def signal_node(state: ClusterState, key: str, sig: int) -> list[NodeProc]:
    """Sends a signal to every node of a region (or to one node), by PID: only to those
    still running as the launcher started them."""
    targets = state.select(key)
    for n in targets:
        if alive(n.pid, state):
            os.kill(n.pid, sig)
    return targets


def stop_node(state: ClusterState, key: str) -> list[tuple[NodeProc, int]]:
    """Stops every node of region `key` (or node `key`) that still runs as the launcher
    started it (TERM, then KILL after 10 s), and records it as stopped (pid 0). Returns
    each node of `key` with the PID it stopped, 0 when it was not running."""
    done = []
    for n in state.select(key):
        pid = n.pid if alive(n.pid, state) else 0
        if pid:
            _stop_pid(pid, state)
            n.pid = 0
        done.append((n, pid))
    if any(pid for _, pid in done):
        state.identities = {k: v for k, v in state.identities.items()
                            if int(k) in state.pids()}
        state.save()
    return done


def _stop_pid(pid: int, state: ClusterState, timeout_s: float = 10.0) -> None:
    """Stops process `pid` of `state`'s cluster (TERM, then KILL); a PID that is no
    longer the launcher's process is left alone."""
    _stop_pids([pid], state, timeout_s)


def _stop_pids(pids: Sequence[int], state: ClusterState, timeout_s: float = 10.0) -> None:
    """`_stop_pid` of several processes at once: TERM to each, then one wait for all
    (KILL to those still running after `timeout_s`). A node's clean stop waits up to a
    second for the streams in flight to it: one node after the other, `down` took a
    second per node."""
    mine = [pid for pid in pids if alive(pid, state)]
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(alive(pid, state) for pid in mine) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in mine:
        if alive(pid, state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while alive(pid, state):
                time.sleep(0.01)
        reap(pid)


def reap(pid: int) -> None:
    """Waits for a child this process started and killed (e.g. with SIGKILL)."""
    child = _children.pop(pid, None)
    if child is not None:
        child.wait()


def etcd_of(state: ClusterState) -> EtcdCluster:
    """The etcd this process started for the cluster (kill, pause, restart it)."""
    etcd = _etcd.get(state.directory)
    if etcd is None:
        raise RuntimeError("etcd was started by another process; use its PIDs in state.json")
    return etcd


def down(directory: str = DEFAULT_DIR) -> ClusterState:
    etcd = _etcd.pop(str(Path(directory).resolve()), None)
    try:
        state = ClusterState.load(directory)
        _stop_pids([n.pid for n in state.nodes], state)
        _stop_pid(state.proxy_pid, state)
    finally:
        # After the nodes (a leader revokes its lease as it stops), and also when there is
        # no state.json yet: a start interrupted that early has only etcd running.
        if etcd is not None:
            etcd.stop()
    for pid in state.etcd_pids:
        _stop_pid(pid, state)
    for n in state.nodes:
        n.pid = 0
    state.proxy_pid = 0
    state.etcd_pids = []
    state.identities = {}
    state.save()
    return state


# ---- operations on a running cluster (async: they talk gRPC and etcd) -------------------
# Each takes a local ClusterState or a Reach (a deployment's TOML, `xdc cluster ... --config`).

# Errors of a status call that mean the node was not reached (down, partitioned, slow).
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The operator's credentials refused: asking again will not help.
AUTH_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class Refused(RuntimeError):
    """A node answered the operator's status call with an error, most often its
    credentials refused (AUTH_REFUSALS). Not "unreachable": it is reported with the
    node's code and details."""

    def __init__(self, node_id: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{node_id} refused the call: {code.name}: {details}")
        self.node_id = node_id
        self.code = code
        self.details = details


# A node's answer to `statuses`: its status, its refusal, or None (unreachable).
Answer = rpb.NodeStatus | Refused | None


async def node_status(target: Target, n: NodeProc | Member,
                      timeout_s: float = 1.0) -> rpb.NodeStatus | None:
    """The node's replication status, or None when it does not answer (UNREACHABLE).
    Refused when it answers with another error (e.g. the operator's token refused)."""
    r = reach(target)
    try:
        async with aio_channel(n.client, r.tls, options=channel_options()) as ch:
            return await rpb_grpc.ReplicationStub(ch).Status(
                rpb.StatusRequest(), timeout=timeout_s, metadata=auth.bearer(r.token))
    except grpc.aio.AioRpcError as exc:
        if exc.code() in UNREACHABLE:
            return None
        raise Refused(n.id, exc.code(), exc.details() or "") from None


async def statuses(target: Target) -> dict[str, Answer]:
    r = reach(target)

    async def answer(n: NodeProc | Member) -> Answer:
        try:
            return await node_status(r, n)
        except Refused as refused:
            return refused

    got = await asyncio.gather(*(answer(n) for n in r.nodes))
    return {n.id: s for n, s in zip(r.nodes, got, strict=True)}


def answered(sts: dict[str, Answer]) -> dict[str, rpb.NodeStatus | None]:
    """The statuses, None for a node that did not give one; raises the first refusal of
    the operator's credentials (waiting for a leader or for replicas cannot get past
    it: better said at once than as a timeout)."""
    for st in sts.values():
        if isinstance(st, Refused) and st.code in AUTH_REFUSALS:
            raise st
    return {k: s if isinstance(s, rpb.NodeStatus) else None for k, s in sts.items()}


async def wait_leader(target: Target, timeout_s: float = 20.0,
                      exclude: tuple[str, ...] = ()) -> tuple[Any, rpb.NodeStatus]:
    """The open leader (a NodeProc of a local cluster, else the TOML's Member), once
    there is one (not among `exclude`). Refused at once if a node refuses the operator."""
    r = reach(target)
    deadline = time.monotonic() + timeout_s
    while True:
        for node_id, st in answered(await statuses(r)).items():
            if st is not None and st.role == "leader" and st.open and node_id not in exclude:
                return r.node(node_id), st
        if time.monotonic() > deadline:
            raise TimeoutError(f"no open leader within {timeout_s}s")
        await asyncio.sleep(0.02)


async def wait_converged(state: ClusterState, timeout_s: float = 30.0) -> int:
    """Waits until every node answers with the same commit and last position; returns
    that position (a replica that holds uncommitted records has not converged)."""
    deadline = time.monotonic() + timeout_s
    while True:
        sts = answered(await statuses(state))
        positions = {(s.commit_position, s.last_position) for s in sts.values() if s}
        if all(sts.values()) and len(positions) == 1:
            upto, last = positions.pop()
            if upto == last:
                return upto
        if time.monotonic() > deadline:
            seen = {k: (s.commit_position, s.last_position) if s else None
                    for k, s in sts.items()}
            raise TimeoutError(f"replicas did not converge: {seen}")
        await asyncio.sleep(0.05)


async def wait_caught_up(state: ClusterState, timeout_s: float = 30.0) -> int:
    """Waits until every node holds what the leader had committed when the wait began;
    returns that position. Unlike `wait_converged` it holds under continuous load."""
    deadline = time.monotonic() + timeout_s
    _, st = await wait_leader(state, timeout_s)
    target = st.commit_position
    while True:
        sts = answered(await statuses(state))
        if all(s is not None and s.commit_position >= target for s in sts.values()):
            return target
        if time.monotonic() > deadline:
            seen = {k: s.commit_position if s else None for k, s in sts.items()}
            raise TimeoutError(f"replicas did not reach commit position {target}: {seen}")
        await asyncio.sleep(0.05)


def etcd_access_of(target: Target) -> EtcdAccess:
    """How this cluster's tools reach its etcd (the TOML's [etcd]: TLS and the user)."""
    return etcd_access(load(target.config))


def _leadership(target: Target, node_id: str = "xdc-cli") -> Leadership:
    """An operator's view of the leader seat (it never campaigns): its `ttl_s` is the
    cluster's lease TTL, as the TOML says."""
    config = load(target.config)
    return Leadership(list(target.etcd_endpoints), target.cluster, node_id, {"id": node_id},
                      config.lease_ttl_s, access=etcd_access(config),
                      default_failover=config.failover, on_lost=lambda reason: None)


def _voter(r: Reach, key: str, action: str) -> NodeProc | Member:
    """The voter `key` names; refused (ValueError) for a standby, which cannot lead."""
    n = r.node(key)
    if not n.voter:
        voters = ", ".join(f"{v.id} ({v.region})" for v in r.nodes if v.voter)
        raise ValueError(f"{action} to {n.id} refused: it is a standby (non-voter) and "
                         f"cannot lead; voters: {voters}")
    return n


@dataclass(frozen=True)
class Handover:
    """What `hand_over` did: the leader's answer, or (`already`) nothing, since `to`
    already was the open leader; `response` then holds its term and commit position."""
    response: rpb.SwitchoverResponse
    already: bool = False

    @property
    def message(self) -> str:
        r = self.response
        if self.already:
            return f"{r.new_leader} already leads term {r.new_term}; nothing handed over"
        return (f"switchover to {r.new_leader}: term {r.new_term}, writes paused "
                f"{r.took_us / 1000:.1f} ms, handed over at position {r.handover_position}")


async def switchover(target: Target, to: str, timeout_s: float = 10.0,
                     token: str | None = None,
                     leader: NodeProc | None = None) -> rpb.SwitchoverResponse:
    """Planned switchover to voter `to` (region or node id), as `token`'s principal
    (default: the admin of `target`), asked of `leader` (default: the one found now).
    When `to` already is the open leader (a retry of a switchover that succeeded) there
    is nothing to hand over: the answer is its term, no pause, and its commit position
    now as the handover position (`hand_over` tells the two apart)."""
    return (await hand_over(target, to, timeout_s, token, leader)).response


async def hand_over(target: Target, to: str, timeout_s: float = 10.0,
                    token: str | None = None,
                    leader: NodeProc | None = None) -> Handover:
    """`switchover`, saying whether `to` already led (`Handover.already`)."""
    r = reach(target)
    n = _voter(r, to, "switchover")
    st: rpb.NodeStatus | None = None
    if leader is None:
        leader, st = await wait_leader(r, timeout_s)
    elif leader.id == n.id:
        st = await node_status(r, leader, timeout_s)
    if leader.id == n.id and st is not None and st.role == "leader" and st.open:
        return Handover(rpb.SwitchoverResponse(new_leader=n.id, new_term=st.term, took_us=0,
                                               handover_position=st.commit_position),
                        already=True)
    async with aio_channel(leader.client, r.tls, options=channel_options()) as ch:
        return Handover(await rpb_grpc.ReplicationStub(ch).Switchover(
            rpb.SwitchoverRequest(target=n.id, timeout_ms=int(timeout_s * 1000)),
            timeout=timeout_s + 1, metadata=auth.bearer(r.token if token is None else token)))


# How long `promote` waits, once its promotion is written, for the target to take the
# seat and open for writes (`xdc cluster promote --timeout`).
PROMOTE_TIMEOUT_S = 10.0
# The lease of a promotion (Leadership.promote): unused, it expires after this long, and
# in manual mode no other voter campaigns meanwhile.
PROMOTION_TTL_S = 60


class PromotionRefused(RuntimeError):
    """`promote` wrote nothing: its target cannot take the seat now (it does not answer,
    is not a voter, is rejoining) or, without --force, lacks committed records. The
    message names the node, the positions and the voters that could."""


class PromotionNotSeated(RuntimeError):
    """The promotion was written, but its target did not take the seat and open for
    writes within the timeout: the message says what holds the seat now, what the target
    answers, and how long the promotion stays armed."""


@dataclass(frozen=True)
class Promotion:
    """What `promote` did: `node` took the vacant seat for `term` after this call
    promoted it (`promoted`, `took_s` after the promotion was written), or it already
    led `term` and nothing was written. str() is the node id."""
    node: str
    term: int | None = None
    promoted: bool = False
    took_s: float = field(default=0.0, compare=False)

    def __str__(self) -> str:
        return self.node

    @property
    def message(self) -> str:
        if not self.promoted:
            return f"{self.node} already leads term {self.term}"
        return (f"promoted {self.node}: leader of term {self.term}, open for writes "
                f"{self.took_s:.1f} s after the promotion")


def _holder(info: dict[str, str]) -> str:
    return info.get("id") or info.get("raw") or "?"


def _describe(st: rpb.NodeStatus) -> str:
    return (f"{st.role}{' (open)' if st.open else ''}, term {st.term}, commit "
            f"{st.commit_position}, last {st.last_position}")


def _candidates(sts: dict[str, rpb.NodeStatus | None], exclude: str) -> str:
    """The other voters that answer and could lead, most up-to-date first."""
    able = sorted(((k, s) for k, s in sts.items() if s is not None and k != exclude
                   and s.voter and s.role not in ("rejoining", FENCING)),
                  key=lambda kv: (-kv[1].last_position, kv[0]))
    return ", ".join(f"{k} (last {s.last_position}, commit {s.commit_position})"
                     for k, s in able) or "none answers"


async def check_candidate(target: Target, n: NodeProc | Member,
                          force: bool = False) -> rpb.NodeStatus:
    """Asks every member for its status (with the operator's credentials) and refuses
    (PromotionRefused) a target that cannot take the seat: one that does not answer, is
    not a voter by its own account, or is rejoining after a lost disk. None of these
    campaigns, and while a promotion names it no other voter may (manual mode): the seat
    would stay vacant for the promotion's whole lease. Unless `force`, it also refuses a
    target whose log ends below the highest commit position any member knows of (its
    own, or what a leader last told it): such a target takes the seat, but fetches the
    committed records it lacks from the other voters in its promise round before it opens
    for writes; nothing committed is lost, writes just wait longer, and an up-to-date
    voter is usually what the operator meant. Returns the target's status."""
    r = reach(target)
    raw = await statuses(r)
    sts = answered(raw)  # raises a refusal of the operator's credentials
    mine = raw.get(n.id)
    if isinstance(mine, Refused):
        raise PromotionRefused(f"promote {n.id} refused: it answered its status call with "
                               f"an error: {mine.code.name}: {mine.details}")
    st = sts.get(n.id)
    if st is None:
        raise PromotionRefused(
            f"promote {n.id} refused: it does not answer (its status call at {n.client}): "
            f"a promoted node that cannot campaign leaves the leader seat vacant for the "
            f"promotion's whole lease ({PROMOTION_TTL_S} s), since no other voter may "
            f"campaign meanwhile. Start it and promote it once it answers, or promote a "
            f"voter that answers: {_candidates(sts, n.id)}")
    if not st.voter:
        raise PromotionRefused(
            f"promote {n.id} refused: it answers as a non-voter ({st.role}) and cannot "
            f"lead; voters that answer: {_candidates(sts, n.id)}")
    if st.role == FENCING:
        raise PromotionRefused(
            f"promote {n.id} refused: it lost its disk and waits for the promised terms "
            f"of {', '.join(st.fence_waiting_for)} before it can be fenced: it neither "
            f"campaigns nor votes (--force does not change that). Bring those voters "
            f"back, or promote a voter that is whole: {_candidates(sts, n.id)}")
    if st.role == "rejoining":
        raise PromotionRefused(
            f"promote {n.id} refused: it is rejoining after a lost disk (fenced at term "
            f"{st.rejoin_term}; commit {st.commit_position} of the {st.leader_commit} a "
            f"leader last told it): it neither campaigns nor votes until a leader elected "
            f"since its return commits a record to it, so the seat would stay vacant "
            f"(--force does not change that). Promote a voter that is whole: "
            f"{_candidates(sts, n.id)}")
    known = {k: max(s.commit_position, s.leader_commit) for k, s in sts.items()
             if s is not None}
    best = max(known.values(), default=0)
    if st.last_position < best and not force:
        seen = sorted(k for k, v in known.items() if v == best)
        raise PromotionRefused(
            f"promote {n.id} refused: it is behind: its log ends at position "
            f"{st.last_position} (commit {st.commit_position}) while position {best} is "
            f"known committed ({', '.join(seen)}). It would have to fetch the "
            f"{best - st.last_position} records it lacks from the other voters before "
            f"opening for writes (nothing committed is lost, writes wait longer). Promote "
            f"an up-to-date voter: {_candidates(sts, n.id)}; or pass --force to promote "
            f"{n.id} anyway")
    return st


async def _status_or_none(r: Reach, n: NodeProc | Member) -> rpb.NodeStatus | None:
    try:
        return await node_status(r, n)
    except Refused:
        return None


async def promote(target: Target, to: str, *, force: bool = False,
                  timeout_s: float = PROMOTE_TIMEOUT_S,
                  token: str | None = None) -> Promotion:
    """Manual failover: authorise one voter to take the vacant leader seat, as `token`'s
    principal (default: the admin of `target`), then wait up to `timeout_s` for it to take
    the seat and open for writes. Refused (RuntimeError) when failover is automatic: the
    voters elect a leader themselves; and when another node keeps the seat (a promotion
    left armed would elect its target when that leader dies, with no operator deciding).
    A leader that just died holds the seat until its lease expires: the promotion waits
    that long (one lease TTL) for the seat to free. Once the seat is vacant the target
    is asked first (`check_candidate`: PromotionRefused, nothing written, when it does not
    answer, is rejoining or, unless `force`, lacks committed records). PromotionNotSeated
    when it is promoted but not seated and open by `timeout_s` (the promotion then stays
    armed until its lease ends). A promotion of the node that already leads (a retry)
    changes nothing and is no error."""
    r = reach(target)
    if token is not None:
        r = dataclasses.replace(r, token=token)
    n = _voter(r, to, "promote")
    lead = _leadership(r)
    # Plus etcd's lessor, which deletes an expired lease's keys on a 500 ms tick.
    wait_s = lead.ttl_s + 1.0
    try:
        mode = await lead.failover_mode()
        if mode != "manual":
            raise RuntimeError(
                f"failover is {mode}: the voters elect a new leader by themselves, so "
                f"there is nothing to promote (for a planned move use `xdc cluster "
                f"switchover --to {to}`; to decide failovers by hand first run "
                f"`xdc cluster failover manual`)")
        loop = asyncio.get_running_loop()
        end = loop.time() + wait_s
        while True:
            seated = await lead.current()
            if seated is None:
                await check_candidate(r, n, force)
                seated = await lead.promote(n.id, PROMOTION_TTL_S)
                if seated is None:
                    return await _until_seated(r, lead, n, timeout_s)
            info, term = seated
            holder = _holder(info)
            if holder == n.id:
                return Promotion(n.id, term)
            remaining = end - loop.time()
            if remaining <= 0:
                raise RuntimeError(
                    f"promote {n.id} refused: {holder} holds the leader seat (term {term}) "
                    f"and kept it for {wait_s:g} s, one lease TTL: it is alive; a promotion "
                    f"only fills a vacant seat (to move a live leader use `xdc cluster "
                    f"switchover --to {to}`)")
            await lead.wait_change(term, remaining)
    finally:
        await lead.close()


async def _until_seated(r: Reach, lead: Leadership, n: NodeProc | Member,
                        timeout_s: float) -> Promotion:
    """After `n`'s promotion is written: its Promotion once it holds the seat and answers
    as the open leader of that term; PromotionNotSeated after `timeout_s`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + timeout_s
    while True:
        seated = await lead.current()
        if seated is not None:
            info, term = seated
            holder = _holder(info)
            if holder != n.id:
                raise PromotionNotSeated(
                    f"promoted {n.id}, but {holder} took the leader seat instead (term "
                    f"{term}): see `xdc cluster status`")
            st = await _status_or_none(r, n)
            if st is not None and st.role == "leader" and st.open and st.term == term:
                return Promotion(n.id, term, promoted=True, took_s=loop.time() - start)
        remaining = end - loop.time()
        if remaining <= 0:
            break
        if seated is None:
            await lead.wait_change(None, min(remaining, 0.5))
        else:
            await asyncio.sleep(min(remaining, 0.05))  # poll: its promise round, term start
    st = await _status_or_none(r, n)
    now = f"it answers as {_describe(st)}" if st is not None else "it does not answer now"
    if seated is not None:
        raise PromotionNotSeated(
            f"promoted {n.id}: it holds the leader seat (term {seated[1]}) but is not open "
            f"for writes after {timeout_s:g} s ({now}): its promise round needs a majority "
            f"of the voters; see `xdc cluster status`")
    view = await lead.seat_view()
    if view.promoted is not None and view.promoted.node == n.id:
        armed = (f"the promotion stays armed for {view.promoted.expires_in_s} s more (no "
                 f"other voter campaigns meanwhile; {n.id} takes the seat if it campaigns "
                 f"by then; `xdc cluster status` shows it); promoting another voter "
                 f"replaces it")
    else:
        armed = "the promotion is no longer pending (used or expired): promote again"
    raise PromotionNotSeated(
        f"promoted {n.id}, but the leader seat is still vacant after {timeout_s:g} s: "
        f"{n.id} has not taken it ({now}); {armed}")


async def seat_view(target: Target) -> SeatView | str:
    """The leader seat, failover mode and pending promotion or designation as etcd holds
    them, or why they could not be read (etcd down, the TOML's password file missing)."""
    try:
        lead = _leadership(reach(target))
    except (ConfigError, OSError, ValueError) as exc:
        return str(exc)
    try:
        return await lead.seat_view()
    except LeadershipError as exc:
        return str(exc)
    finally:
        await lead.close()


async def cluster_status(target: Target) -> tuple[dict[str, Answer], SeatView | str,
                                                  dict[str, str] | str | None]:
    """`statuses`, `seat_view` and `wan_view`, asked at once (`xdc cluster status`)."""
    sts, seat, wan = await asyncio.gather(statuses(target), seat_view(target),
                                          wan_view(target))
    return sts, seat, wan


# ---- the WAN proxy of a local cluster: partitions (`xdc cluster partition/heal`) --------

class ProxyUnavailable(RuntimeError):
    """The local cluster's WAN proxy does not run or does not answer."""


def _proxy(state: ClusterState) -> ProxyControl:
    if not state.proxy_control:
        raise ProxyUnavailable("this cluster has no WAN proxy (a single region: no link "
                               "between regions to cut)")
    if not alive(state.proxy_pid, state):
        raise ProxyUnavailable(f"the WAN proxy is not running (pid {state.proxy_pid}): "
                               f"`xdc cluster up --dir {state.directory}` starts the cluster")
    return ProxyControl(state.proxy_control, timeout=2.0)


async def wan_view(target: Target) -> dict[str, str] | str | None:
    """The partitioned links of a local cluster's WAN proxy ({link: mode}, empty when
    none is), or why they could not be read; None for a deployment's TOML or a cluster
    without a proxy."""
    if not isinstance(target, ClusterState) or not target.proxy_control:
        return None
    try:
        _proxy(target)
        links = await AsyncProxyControl(target.proxy_control, timeout=2.0).status()
    except (ProxyUnavailable, ProxyControlError, OSError, TimeoutError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return {name: link["partition"] for name, link in links.items() if link.get("partition")}


def _links_of(state: ClusterState, key: str) -> list[str]:
    """The WAN links with a node of region `key` (or node `key`) at either end."""
    ids = {n.id for n in state.select(key)}
    return [name for name in state.links
            if ids & set(name.split("->"))]


def partition(state: ClusterState, key: str, mode: str = "blackhole") -> list[str]:
    """Cuts region `key` (or node `key`) off from the other regions: the proxy stops
    forwarding on every WAN link to and from it (`mode`: geo/proxy.py). Returns the links."""
    links = _links_of(state, key)
    if not links:
        raise ValueError(f"{key} has no WAN link to cut (a single-region cluster)")
    try:
        return _proxy(state).partition(mode=mode, links=links)
    except (ProxyControlError, OSError) as exc:
        raise ProxyUnavailable(f"the WAN proxy at {state.proxy_control}: {exc}") from exc


def heal(state: ClusterState, key: str | None = None,
         reset: bool = False) -> tuple[list[str], list[str]]:
    """Ends the partitions of region `key`'s (or node `key`'s) links, of every link
    without `key`. Returns (the links healed, those of them that were partitioned)."""
    control = _proxy(state)
    links = _links_of(state, key) if key is not None else list(state.links)
    try:
        before = control.status()
        healed = control.heal(reset=reset, links=links) if links else []
    except (ProxyControlError, OSError) as exc:
        raise ProxyUnavailable(f"the WAN proxy at {state.proxy_control}: {exc}") from exc
    return healed, [name for name in healed if before.get(name, {}).get("partition")]


def wan_line(state: ClusterState, wan: dict[str, str] | str | None) -> str:
    """The WAN proxy's line of `xdc cluster status`: its control address and RTT, and
    which regions are cut off (every link to and from them partitioned) or which other
    links are."""
    head = f"wan proxy: control {state.proxy_control}, rtt {state.rtt_ms:g} ms"
    if wan is None:
        return head
    if isinstance(wan, str):
        return f"{head}; partitions not read ({wan})"
    if not wan:
        return f"{head}; no partition"
    region = {n.id: n.region for n in state.nodes}
    parts, covered = [], set()
    for r in dict.fromkeys(n.region for n in state.nodes):
        touching = [name for name in state.links
                    if r in {region.get(end) for end in name.split("->")}]
        if touching and all(name in wan for name in touching):
            modes = "/".join(sorted({wan[name] for name in touching}))
            parts.append(f"{r} cut off ({modes})")
            covered.update(touching)
    parts += [f"{name} ({mode})" for name, mode in sorted(wan.items()) if name not in covered]
    return f"{head}; partitioned: {', '.join(parts)} (`xdc cluster heal` ends it)"


def seat_lines(seat: SeatView | str | None) -> list[str]:
    """The seat's lines of `xdc cluster status` (none when `seat` is None)."""
    if seat is None:
        return []
    if isinstance(seat, str):
        return [f"leader seat: not read ({seat})"]
    held = (f"held by {_holder(seat.leader[0])} (term {seat.leader[1]})"
            if seat.leader is not None else "vacant")
    lines = [f"leader seat: {held}; failover {seat.failover}"]
    p = seat.promoted
    if p is not None:
        lines.append(f"promotion pending: {p.node} (expires in {p.expires_in_s} s unless it "
                     f"takes the seat first" + ("; no other voter campaigns meanwhile)"
                                                if seat.failover == "manual" else ")"))
    d = seat.designated
    if d is not None:
        lines.append(f"switchover pending: {d.node} designated (expires in "
                     f"{d.expires_in_s} s unless it takes the seat first; no other voter "
                     f"campaigns meanwhile)")
    return lines


def seat_json(seat: SeatView | str) -> dict[str, Any]:
    """The `_seat` entry of `xdc cluster status --json`."""
    if isinstance(seat, str):
        return {"error": seat}

    def pending(p: Pending | None) -> dict[str, Any] | None:
        return None if p is None else {"node": p.node, "expires_in_s": p.expires_in_s}
    return {"leader": _holder(seat.leader[0]) if seat.leader else None,
            "term": seat.leader[1] if seat.leader else None, "failover": seat.failover,
            "promoted": pending(seat.promoted), "designated": pending(seat.designated)}


async def set_failover(target: Target, mode: str) -> None:
    lead = _leadership(target)
    try:
        await lead.set_failover_mode(mode)
    finally:
        await lead.close()


def fencing_role(st: rpb.NodeStatus) -> str:
    """The role column of a voter waiting for its fence: whom it waits for."""
    more = st.fence_needed - len(st.fence_answered)
    return (f"{FENCING}: lost disk, waiting for the promised terms of {more} more of "
            f"{', '.join(st.fence_waiting_for)} (answered: "
            f"{', '.join(st.fence_answered) or 'none'})")


def format_status(target: Target, sts: dict[str, Answer],
                  seat: SeatView | str | None = None,
                  wan: dict[str, str] | str | None = None) -> str:
    """The status table; with `seat` (`seat_view`), the leader seat's lines too; with
    `wan` (`wan_view`), the partitions of a local cluster's WAN proxy."""
    r = reach(target)
    local = isinstance(target, ClusterState)  # only then PIDs, the proxy, its files
    leader = next((s for s in sts.values()
                   if isinstance(s, rpb.NodeStatus) and s.role == "leader"), None)
    lag = {p.node_id: p for p in leader.peers} if leader is not None else {}
    rows = [("node", "region", "client", "role", "term", "commit", "last", "lag", "in sync",
             "pid")]
    refusals = []
    for n in r.nodes:
        st = sts.get(n.id)
        pid = str(n.pid) if isinstance(n, NodeProc) else "-"
        if isinstance(st, Refused):
            refusals.append(str(st))
            rows.append((n.id, n.region, n.client, f"refused ({st.code.name})", "-", "-", "-",
                         "-", "-", pid))
            continue
        if st is None:
            gone = (isinstance(n, NodeProc) and isinstance(target, ClusterState)
                    and not alive(n.pid, target))
            suffix = " (down)" if gone else ""
            rows.append((n.id, n.region, n.client, "unreachable" + suffix, "-", "-", "-", "-",
                         "-", pid))
            continue
        if st.role == FENCING:  # a voter that lost its disk, up, waiting for its peers
            rows.append((n.id, n.region, n.client, fencing_role(st), "-", "-", "-", "-", "-",
                         pid))
            continue
        p = lag.get(n.id)
        role = st.role + (" (open)" if st.open else "")
        if st.role == "rejoining":  # a voter that lost its disk: its catch-up progress
            role += f" {st.commit_position}/{st.leader_commit}"
        rows.append((n.id, n.region, n.client, role, str(st.term),
                     str(st.commit_position), str(st.last_position),
                     str(p.lag) if p else ("0" if st.role == "leader" else "?"),
                     (("yes" if p.in_sync else "no") + (", not counted" if p.rejoining else ""))
                     if p else "-", pid))
    if not local:
        rows = [row[:-1] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines += refusals
    try:
        etcd_tls = etcd_access_of(r).tls
    except ConfigError as exc:  # e.g. the TOML's password file is not on this host
        lines.append(f"etcd: not checked ({exc})")
    else:
        healthy = [e for e in r.etcd_endpoints if health(e, tls=etcd_tls)]
        lines.append(f"etcd: {len(healthy)}/{len(r.etcd_endpoints)} healthy "
                     f"({', '.join(r.etcd_endpoints)})")
    lines += seat_lines(seat)
    if not local:
        lines.append(f"tls: {'on' if r.tls else 'off (plaintext)'}; admin token: "
                     f"{'given' if r.token else 'none'}")
        return "\n".join(lines)
    if target.proxy_control and not alive(target.proxy_pid, target):
        lines.append(f"wan proxy: not running (pid {target.proxy_pid})")
    elif target.proxy_control:
        lines.append(wan_line(target, wan))
    lines.append(f"tls: on, etcd with authentication (certificates in {target.tls_dir})"
                 if target.tls_dir else "tls: off (plaintext)")
    lines.append(f"client auth: on (principals in {target.auth_file}, tokens beside it)"
                 if target.auth_dir else "client auth: off (every call allowed)")
    return "\n".join(lines)
