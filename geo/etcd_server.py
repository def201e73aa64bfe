"""Runs a real etcd on loopback: one member for the local launcher and most tests, or a
3-member cluster for failure tests.

Everything listens on loopback ports picked free at start; data lives under a directory
the caller owns (the launcher's run directory, pytest's tmp_path). Processes are stopped by
PID only: SIGTERM, then
SIGKILL if they do not exit in time, and always waited for, so no test leaves an etcd
behind. Readiness is polled on ``/health``; nothing sleeps a fixed time to synchronise.

    with EtcdCluster(tmp_path) as etcd:           # one member
        check_etcd(etcd.endpoints)
    cluster = EtcdCluster(tmp_path, n=3).start()  # three members
    cluster.members[0].kill(); cluster.members[0].start()
    cluster.stop()

The binary is ``$XDC_ETCD_BIN`` when set, else ``etcd`` on PATH (Debian's etcd-server).

Security (the launcher's default): ``EtcdCluster(..., tls=EtcdTls(ca, cert, key))``
serves clients and peers over https and demands client certificates signed by the CA;
``enable_auth`` then creates the root user, one role per cluster that may read and write
only the cluster's prefix ``/<cluster>/``, a user with that role for the cluster's nodes
and engines, and turns authentication on. Health checks present the certificate.

`bootstrap_auth` is that bootstrap for any etcd, idempotent: the launcher runs it on its
own etcd, and ``xdc etcd bootstrap-auth --config cluster.toml`` on a real one (the
Terraform deployment runs it at boot of its first etcd member, again after every boot).
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import etcd3
import grpc
from etcd3.etcdrpc import auth_pb2
from etcd3.etcdrpc import rpc_pb2 as etcdrpc

from geo.signals_held import signals_held

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
_POLL_S = 0.02
_names = itertools.count()


HEARTBEAT_MS = 30
ELECTION_TIMEOUT_MS = 300


class EtcdError(RuntimeError):
    pass


@dataclass(frozen=True)
class EtcdTls:
    """PEM files: the CA, and the certificate and key presented (a server's, or a
    client's when it reaches etcd; a client of an etcd that asks for none has none)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def channel_credentials(self) -> grpc.ChannelCredentials:
        pair = self.cert is not None and self.key is not None
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(), self.key.read_bytes() if pair else None,  # type: ignore[union-attr]
            self.cert.read_bytes() if pair else None)  # type: ignore[union-attr]


def prefix_end(prefix: bytes) -> bytes:
    """The end of the key range of every key starting with `prefix` (etcd's range_end)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def etcd_binary() -> str:
    """Path of the etcd binary to run; raises EtcdError saying how to get one."""
    override = os.environ.get("XDC_ETCD_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise EtcdError(f"XDC_ETCD_BIN={override} is not an executable file")
        return override
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK)
                                     else None)
    if found is None:
        raise EtcdError("etcd not found: run scripts/sysdeps (Debian etcd-server) or set "
                        "XDC_ETCD_BIN")
    return found


# Ports handed out by free_ports: below the kernel's ephemeral range, so that no outgoing
# connection takes one while its server is down (a node restarted by a test or a drill
# binds its port again), and from a counter shared by every process of this user, so that
# processes allocating at once (test workers) get distinct ones until it wraps.
PORT_BLOCK = 12_000


def _port_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    # A range starting below 1024 + PORT_BLOCK leaves no block below it: the block then
    # overlaps the ephemeral range, and a restarted node may find its port taken again.
    high = max(ephemeral_low, 1024 + PORT_BLOCK)
    return high - PORT_BLOCK, high


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Ports free right now, distinct, outside the ephemeral range (PORT_BLOCK). Another
    program can still bind one first, which start() retries."""
    low, high = _port_range()
    path = os.path.join(tempfile.gettempdir(), f"xdc-ports-{os.getuid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 32, 0).strip()
        nxt = int(raw) if raw.isdigit() and low <= int(raw) < high else low
        ports: list[int] = []
        for _ in range(high - low):
            port, nxt = nxt, low + (nxt + 1 - low) % (high - low)
            if _bindable(port):
                ports.append(port)
                if len(ports) == count:
                    break
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(nxt).encode(), 0)
    finally:
        os.close(fd)  # releases the lock
    if len(ports) < count:
        raise OSError(f"fewer than {count} free ports in {low}..{high - 1}")
    return ports


def _get(endpoint: str, path: str, timeout_s: float, tls: EtcdTls | None,
         limit: int = -1) -> bytes:
    """The body of a GET of one of a member's HTTP endpoints (/health, /metrics)."""
    scheme = "https" if tls is not None else "http"
    with urllib.request.urlopen(f"{scheme}://{endpoint}{path}", timeout=timeout_s,
                                context=tls.ssl_context() if tls else None) as resp:
        return resp.read(limit)


def health_problem(endpoint: str, timeout_s: float = 0.5,
                   tls: EtcdTls | None = None) -> str | None:
    """None when the member at `endpoint` (host:port, an IPv6 host in brackets) reports
    itself healthy on /health, else why not (in words, for error messages)."""
    try:
        body = _get(endpoint, "/health", timeout_s, tls, 4096)
    except urllib.error.HTTPError as exc:
        # etcd answers 503 with a JSON body when it has no leader or an alarm is raised.
        body = exc.read(4096) if exc.fp is not None else b""
        return f"HTTP {exc.code} {body.decode('utf-8', 'replace').strip()}".strip()
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, junk
        return str(exc) or type(exc).__name__
    try:
        healthy = json.loads(body).get("health")
    except (ValueError, AttributeError):
        return f"unexpected /health answer {body[:80]!r}"
    if healthy not in ("true", True):
        return f"unhealthy: {body.decode('utf-8', 'replace').strip()}"
    return None


def health(endpoint: str, timeout_s: float = 0.5, tls: EtcdTls | None = None) -> bool:
    """True when the member at `endpoint` (host:port) reports itself healthy."""
    return health_problem(endpoint, timeout_s, tls) is None


class EtcdMember:
    """One etcd process. Its name, ports and data dir stay fixed across restarts, so a
    restarted member rejoins its cluster with its own data."""

    def __init__(self, name: str, data_dir: Path, client_port: int, peer_port: int,
                 initial_cluster: str, binary: str, extra_args: tuple[str, ...],
                 tls: EtcdTls | None = None) -> None:
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster
        self.binary = binary
        self.extra_args = extra_args
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.log_path = data_dir.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """host:port of the client API, the form the cluster config uses."""
        return f"{HOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            "--initial-cluster-state=new",
            # A unique token keeps members of concurrently running test clusters from
            # ever joining each other, even if a port gets reused.
            f"--initial-cluster-token={self.name.rsplit('-', 1)[0]}",
            *self._tls_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> list[str]:
        t = self.tls
        if t is None:
            return []
        if t.cert is None or t.key is None:
            raise EtcdError("an etcd server needs its certificate and key")
        return [f"--cert-file={t.cert}", f"--key-file={t.key}", f"--trusted-ca-file={t.ca}",
                "--client-cert-auth", f"--peer-cert-file={t.cert}", f"--peer-key-file={t.key}",
                f"--peer-trusted-ca-file={t.ca}", "--peer-client-cert-auth"]

    def start(self) -> EtcdMember:
        """Spawn the process (no wait; see EtcdCluster.wait_healthy)."""
        if self.running:
            raise EtcdError(f"{self.name} is already running (pid {self.pid})")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # ETCD_* variables are read as flags and would clash with ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        # Signals held: a SIGTERM raising inside Popen, or before its result is stored,
        # would leave this etcd running and known to no stop().
        with signals_held(), open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                # Own session: a test's SIGSTOP/SIGKILL and the terminal's ^C reach only
                # what they mean to.
                start_new_session=True,
            )
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; waits. Returns the exit status."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot handle TERM
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL (a crash) and wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the process stays alive but stops answering (a GC pause, a VM freeze)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running:
            raise EtcdError(f"{self.name} is not running")
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def restart(self) -> EtcdMember:
        self.stop()
        return self.start()

    def healthy(self, timeout_s: float = 0.5) -> bool:
        return self.running and health(self.endpoint, timeout_s, self.tls)

    def is_leader(self, timeout_s: float = 0.5) -> bool:
        """Whether this member leads its cluster now (its /metrics gauge
        ``etcd_server_is_leader``); False when it does not answer."""
        try:
            return b"\netcd_server_is_leader 1\n" in _get(self.endpoint, "/metrics",
                                                          timeout_s, self.tls)
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _bind_failed(self) -> bool:
        return "address already in use" in self.log_tail(50)


class EtcdCluster:
    """`n` etcd members on loopback forming one cluster (n=1 for most tests).

    Timing: members on one host are a fraction of a millisecond apart, so heartbeats
    every HEARTBEAT_MS and an election timeout of ELECTION_TIMEOUT_MS (etcd's guidance:
    about 10 heartbeats). A lost etcd leader is replaced after a random wait in
    [timeout, 2 x timeout), twice that when the first vote splits (both followers stand
    at once: seen in the drills), and a store leader whose lease refreshes fail
    meanwhile steps down at TTL - margin after its last refresh (geo/leadership.py).
    The rule: 4 x election timeout plus a few round trips under the lease TTL minus its
    margin. Losses of the etcd leader in `xdc drill etcd-member-loss` that cost the
    store leader its 2 s lease: with a 500 ms timeout, 3 of 9 (refreshes sent to one
    endpoint after another) and 2 of 18 (to every endpoint at once; a split vote
    among them); with 300 ms, none of 12 (writes stalled 84-268 ms)."""

    def __init__(self, base_dir: str | os.PathLike[str], n: int = 1, *,
                 binary: str | None = None, heartbeat_ms: int = HEARTBEAT_MS,
                 election_timeout_ms: int = ELECTION_TIMEOUT_MS,
                 extra_args: tuple[str, ...] = (),
                 tls: EtcdTls | None = None) -> None:
        if n < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.base_dir = Path(base_dir)
        self.n = n
        self.binary = binary or etcd_binary()
        # Pre-vote (off by default before etcd 3.5): a member cut off from the others,
        # back after its election timeouts, would otherwise bump the term and depose a
        # healthy etcd leader, an election during which no store lease is refreshed.
        self.extra_args = (f"--heartbeat-interval={heartbeat_ms}",
                           f"--election-timeout={election_timeout_ms}", "--pre-vote=true",
                           *extra_args)
        # pid + counter: unique across xdist workers and across clusters in one test.
        self.name = f"etcd{os.getpid()}x{next(_names)}"
        self.members: list[EtcdMember] = []
        self.tls = tls

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _layout(self) -> None:
        ports = free_ports(2 * self.n)
        names = [f"{self.name}-{i}" for i in range(self.n)]
        scheme = "https" if self.tls is not None else "http"
        initial = ",".join(f"{name}={scheme}://{HOST}:{ports[2 * i + 1]}"
                           for i, name in enumerate(names))
        self.members = [
            EtcdMember(name, self.base_dir / self.name / name, ports[2 * i], ports[2 * i + 1],
                       initial, self.binary, self.extra_args, self.tls)
            for i, name in enumerate(names)
        ]

    def start(self, timeout_s: float = START_TIMEOUT_S, attempts: int = 3) -> EtcdCluster:
        """Start every member and wait until all report healthy. A port taken between
        picking and binding makes etcd exit at once; then start over on new ports."""
        for attempt in range(attempts):
            if self.members:  # a previous attempt lost a port race
                self.stop()
                self.name = f"etcd{os.getpid()}x{next(_names)}"
            self._layout()
            for m in self.members:
                m.start()
            try:
                self.wait_healthy(timeout_s)
                return self
            except EtcdError:
                if not any(m._bind_failed() for m in self.members) or attempt == attempts - 1:
                    self.stop()
                    raise
        raise AssertionError("unreachable")

    def leader(self) -> EtcdMember | None:
        """The member that leads now, or None (an election, or none answers)."""
        return next((m for m in self.members if m.running and m.is_leader()), None)

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S,
                     members: list[EtcdMember] | None = None) -> None:
        """Poll /health of `members` (default: all that run) until each says healthy."""
        if members is None:
            members = [m for m in self.members if m.running]
        waiting = list(members)
        deadline = time.monotonic() + timeout_s
        while waiting:
            for m in waiting:
                if not m.running:
                    raise EtcdError(f"{m.name} exited with {m.proc.returncode if m.proc else '?'}"
                                    f":\n{m.log_tail()}")
            waiting = [m for m in waiting if not health(m.endpoint, 0.5, self.tls)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in waiting)
                raise EtcdError(f"etcd not healthy after {timeout_s} s:\n{tails}")
            time.sleep(_POLL_S)  # poll interval, not synchronisation

    def stop(self) -> None:
        """Stop every member (SIGTERM, SIGKILL on timeout) and wait for each."""
        errors = []
        for m in self.members:
            try:
                m.stop()
            except Exception as exc:  # stop the others regardless
                errors.append(exc)
        if errors:
            raise errors[0]

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> EtcdCluster:
        """Stop and start every member on the same ports and data; wait until healthy."""
        self.stop()
        for m in self.members:
            m.start()
        self.wait_healthy(timeout_s)
        return self

    def enable_auth(self, cluster: str, user: str, password: str, root_password: str,
                    timeout_s: float = 5.0) -> None:
        """Turns on authentication (`bootstrap_auth`). Needs TLS (passwords never cross
        in plaintext)."""
        if self.tls is None:
            raise EtcdError("etcd authentication needs TLS (EtcdCluster(tls=...))")
        bootstrap_auth(self.endpoints, self.tls, cluster, user, password, root_password,
                       timeout_s)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# etcd's answers (etcdserver/api/v3rpc/rpctypes) that the bootstrap expects and handles.
_NOT_ENABLED = "authentication is not enabled"
_EXISTS = "already exists"
_AUTH_FAILED = "authentication failed"


def bootstrap_auth(endpoints: Sequence[str], tls: EtcdTls, cluster: str, user: str,
                   password: str, root_password: str, timeout_s: float = 5.0) -> list[str]:
    """Makes etcd's authentication what xdc expects, idempotently: user `root`
    (`root_password`) with role `root`; role `cluster` with read and write on
    ``/<cluster>/`` only; `user` (`password`) with that role; authentication on. Run again
    it changes nothing, except a node password etcd no longer accepts (the secret was
    rotated), which it sets. Once authentication is on it acts as root, so a wrong
    `root_password` is an EtcdError and nothing changes. Returns what it did, in order
    (empty: nothing to do)."""
    if not endpoints:
        raise EtcdError("no etcd endpoint given")
    creds = tls.channel_credentials()
    eps = []
    for endpoint in endpoints:
        host, port = endpoint.rsplit(":", 1)
        eps.append(etcd3.Endpoint(host.strip("[]"), int(port), secure=True, creds=creds))
    client = etcd3.MultiEndpointEtcd3Client(endpoints=eps, timeout=timeout_s, failover=True)
    stub = client.authstub
    done: list[str] = []
    metadata: tuple[tuple[str, str], ...] = ()

    def call(what: str, method: object, request: object, *, exists_ok: bool = False) -> bool:
        """True when etcd did it, False when it was already so (`exists_ok`)."""
        try:
            method(request, timeout_s, metadata=metadata)  # type: ignore[operator]
        except grpc.RpcError as exc:
            if exists_ok and _EXISTS in (exc.details() or ""):
                return False
            raise EtcdError(f"etcd auth bootstrap: {what}: {exc.code().name} "
                            f"{exc.details()}") from None
        done.append(what)
        return True

    def token_of(name: str, secret: str) -> str | None:
        """A token for the user; "" when etcd refuses the password, None while
        authentication is off."""
        try:
            return stub.Authenticate(etcdrpc.AuthenticateRequest(
                name=name, password=secret), timeout_s).token
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if _NOT_ENABLED in details:
                return None
            if _AUTH_FAILED in details:
                return ""
            raise EtcdError(f"etcd auth bootstrap: authenticating {name!r}: "
                            f"{exc.code().name} {details}") from None

    prefix = f"/{cluster}/".encode()
    try:
        root_token = token_of("root", root_password)
        if root_token == "":
            raise EtcdError("etcd auth bootstrap: authentication is on and etcd refuses "
                            "the root password given (nothing changed)")
        enabled = root_token is not None
        if enabled:
            metadata = (("token", root_token),)
        elif not call("add user root", stub.UserAdd, etcdrpc.AuthUserAddRequest(
                name="root", password=root_password), exists_ok=True):
            # Left by an earlier run that stopped before enabling: nobody can use it yet.
            call("set the root password", stub.UserChangePassword,
                 etcdrpc.AuthUserChangePasswordRequest(name="root", password=root_password))
        call("add role root", stub.RoleAdd, etcdrpc.AuthRoleAddRequest(name="root"),
             exists_ok=True)
        # Granting a role a user holds already is accepted and changes nothing.
        stub.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"),
                           timeout_s, metadata=metadata)
        call(f"add role {cluster}", stub.RoleAdd, etcdrpc.AuthRoleAddRequest(name=cluster),
             exists_ok=True)
        # The same key replaces the permission: idempotent.
        stub.RoleGrantPermission(etcdrpc.AuthRoleGrantPermissionRequest(
            name=cluster, perm=auth_pb2.Permission(
                permType=auth_pb2.Permission.READWRITE, key=prefix,
                range_end=prefix_end(prefix))), timeout_s, metadata=metadata)
        if not call(f"add user {user}", stub.UserAdd, etcdrpc.AuthUserAddRequest(
                name=user, password=password), exists_ok=True):
            # A password change makes every client of etcd authenticate again (its auth
            # revision moves), so only when etcd does not take the one given.
            if not token_of(user, password):
                call(f"set the password of {user}", stub.UserChangePassword,
                     etcdrpc.AuthUserChangePasswordRequest(name=user, password=password))
        stub.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=user, role=cluster),
                           timeout_s, metadata=metadata)
        if not enabled:
            call("enable authentication", stub.AuthEnable, etcdrpc.AuthEnableRequest())
    except grpc.RpcError as exc:
        raise EtcdError(f"etcd auth bootstrap: {exc.code().name} {exc.details()}") from None
    finally:
        client.close()
    return done
