"""`xdc drill SCENARIO --runs N --seed S`: disaster-recovery drills with measured RTO/RPO
against the local multi-region cluster (geo/launcher.py) under continuous load.

Every run starts a fresh cluster in its own directory: etcd (3 members for
`etcd-member-loss`), the WAN proxy (30 ms RTT between regions by default), one store node
per region, one matching-engine instance per region (`xdc engine run`, etcd lease under
the cluster's name, so there is always a warm standby) and one order gateway per region.
The leader region's engine is started first, so the engine primary sits next to the store
leader, as an operator would place it. Load, seeded by the run's seed (S + i for run i):

* ledger: `producers` tasks appending small events through `store.client.StoreClient`, one
  at a time each, with a per-call deadline (`call_timeout_s`). A call that fails with a
  deadline or UNAVAILABLE is *in doubt*: it is retried with the same event id until it is
  acknowledged, and the answer's `duplicate` flag tells how it resolved (an earlier
  attempt had been committed, or the retry wrote it);
* orders: seeded order commands (engine/workload.py) through the order gateways (one
  `xdc gateway` per region, each judging the matching tier by the engines' status), same
  retry discipline; a refused order moves to the next gateway after the refusal's retry
  hint. Setup and poison inputs go straight to the group's input stream. With tracing
  enabled (OTEL_* variables), each order is sent under a PRODUCER span;
* market data: a subscription to the group's output stream;
* stale writes: after the fault, appends sent straight to the deposed leader's address
  (no leader following) every `STALE_PROBE_S`.

Observed during the run, on a monotonic clock: the store leader key and the engine lease
key in etcd (every `POLL_S`), every engine's EngineControl.Status, the acknowledgements
(time and position) and the subscription's deliveries (time and record term). After the
fault and the recovery, killed processes restart and rejoin, the load stops, the replicas
converge, and the log is read back. `region-loss` deletes the killed region's
directories too (its store node's data with them) and rebuilds it on empty ones: its node
must come back as a lost disk (geo/node.py, "Lost disks"), fenced and rejoining, then
whole, before the load stops.

What a run reports (seconds are from the fault; None: did not happen):

* `lease_expiry_s`: first observation of the leader key vacant or held in another term (a
  crash or pause: the lease TTL; a switchover: the resignation);
* `new_term_s`: first observation of the key with a higher term;
* `rto_s`: the first ledger write acknowledged in the new term (the term comes from the
  record read back from the log). `engine-crash` keeps the store leader: its RTO is the
  matching tier's. With no new term at all (`etcd-member-loss` when the leader survives):
  the longest interval without any acknowledged write from the fault to the recovery;
* `tiers`, in recovery order (the order of geo/tiers.default.toml), measured from outside:
  - ledger: the first ledger write acknowledged after the fault (in the new term if any);
  - matching: the engine primary has been delivered every input up to that write (its
    EngineStatus.delivered_position); engine-crash: a new primary delivered past where
    the old one was;
  - order-entry: the first order a gateway acknowledged after the last order a gateway
    refused or left unanswered (in the new term if any);
  - market-data: the first output batch the subscription delivered for an input at or
    past that order (written in the new term / by the new primary);
  each with `down`: whether some supervisor (a store node's or a gateway's Tiers/Status
  transitions) took the tier out of serving during the phase (shed; tier 0, never shed,
  degraded). `tiers_in_order`: every tier recovered, and every tier that went down no
  earlier than each tier below it; None (unknown) when the status of some supervisor
  could not be read after the run (`supervisors_unread`). A tier that never went down
  never left (a planned switchover takes none down: orders are held by the target like
  ledger writes), so it resumes with the writes in whatever order requests land;
* `acked_lost`: acknowledged events (ledger, orders and acknowledged stale probes) not at
  their acknowledged position in the converged log; `duplicates`: event ids at more than
  one position;
* `stale_writes_rejected`: probe appends sent to the deposed leader's own address after
  the fault that this node itself refused (UNAVAILABLE "does not accept writes" or
  "leadership of term N lost", FAILED_PRECONDITION; recognised by the store's trailing
  metadata `xdc-leader` / `xdc-retry-after-ms`). Connection failures (a dead node) are
  counted apart as `stale_unreachable`, timeouts (a paused or cut-off node) as
  `stale_in_doubt` and checked against the log; `stale_acked_after_new_term` must be 0;
* `in_doubt`: client calls that ended in a timeout or UNAVAILABLE, and how each resolved;
* `region-loss`: `rejoin_s`, from the rebuilt node's restart to its first status saying
  it is whole again (role neither `fencing` nor `rejoining`, no rejoin term);
  `fence_term`, the term F it fenced itself at (its status's `rejoin_term`, or its log's
  `LOST DISK ... fenced at term F`); `rejoin_evidence`, which of the two said it took
  the lost-disk path (none: it came back as a new, plain voter); `rebuild_roles` (the
  roles its status reported, in order), `rebuild_answered_s` (restart to its first
  status answer: mostly a new process's start), `rebuild_write_stall_s` (the longest
  ledger-write stall from the restart to whole: the fence deposes the leader of the
  moment), `term_at_rebuild` (the leader's as the rebuild starts), `term_after_rejoin`;
  `rejoined`: some evidence, whole within the step timeout, F above the term at the
  fault and `term_at_rebuild`;
* `switchover-leader-lost`: besides etcd's handover record (`handed_over`), the drill's
  own reads of the leader key: `leader_key_gone_after_kill_s` (the first read finding it
  gone, from the SIGKILL; negative: before it), `leader_key_held_after_kill_s` (the last
  read finding it held) and `leader_resigned` (leader_key_after_kill: gone within TTL/3
  of the kill is a resignation, held past it is none, None when no read tells): a new
  term that says `handover` although the key was held past TTL/3 fails the run (nobody
  resigned);
* `hashes_agree`: every engine instance (killed ones restarted) reports the same
  input_position, chain_hash and state_hash with no alarm, and the group's outputs are
  exactly-once (engine.workload.check_exactly_once); `logs_identical`: the replicas'
  raw logs hash the same up to the commit position.

Exit status 1 when any run lost or duplicated an acknowledged event, ended with diverged
hashes, had a deposed leader acknowledge a write after the new term, or failed (verdict).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from opentelemetry.trace import SpanKind

from engine import wire
from engine.runner import STORE_CUT_OFF_S, status_or_none
from engine.workload import (
    ExactlyOnceViolation,
    GatewayOrder,
    check_exactly_once,
    exchange_toml,
    gateway_load,
    read_stream,
)
from geo import launcher
from geo.demo import raw_log_hash
from geo.leadership import Leadership, LeadershipError
from geo.signals_held import signals_held
from geo.tier_supervisor import health_name, wait_health
from store.client import AppendError, CaughtUp, StoreClient, channel_options, new_event
from store.errors import MD_LEADER, MD_RETRY_AFTER_MS, MD_SHED_REASON
from xdc import telemetry
from xdc.argtypes import at_least
from xdc.tls import Tls, aio_channel
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc
from xdc.v1 import tiers_pb2, tiers_pb2_grpc

log = logging.getLogger("xdc.drill")

SCENARIOS = ("leader-crash", "leader-pause", "leader-partition", "engine-crash",
             "switchover", "etcd-member-loss", "failback", "switchover-leader-lost",
             "region-loss")
GROUP = "drill"
CLUSTER = "xdc-drill"
TIERS = ("ledger", "matching", "order-entry", "market-data")  # recovery order
POLL_S = 0.02  # etcd key and engine status sampling period
STALE_PROBE_S = 0.05
# An order a gateway refused is retried after the refusal's hint, at most this long: the
# retry cadence bounds how precisely order-entry's recovery is measured.
GATEWAY_RETRY_MAX_S = 0.1
MAX_SAMPLES = 50_000  # per observer: bounded memory however long a run lasts
MAX_IN_DOUBT = 10_000
MAX_REPORTED_REFUSALS = 50
_RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)


@dataclass
class DrillOptions:
    regions: int = 3
    rtt_ms: float = 30.0
    ttl_s: int = 2
    producers: int = 4  # ledger producers, one append in flight each
    order_width: int = 2  # order appends in flight
    before_s: float = 2.0  # load before the fault
    after_acks: int = 200  # ledger acks after recovery before the run winds down
    call_timeout_s: float = 1.0  # per append: past it the write is in doubt
    step_timeout_s: float = 40.0  # bound on every wait for a condition
    quick: bool = False
    keep: bool = False  # keep the run directories (logs) after the drill
    base_dir: str | None = None

    def __post_init__(self) -> None:
        if self.quick:
            self.before_s = min(self.before_s, 1.0)
            self.after_acks = min(self.after_acks, 60)
            # A short run that hangs should fail with its diagnosis, not be killed.
            self.step_timeout_s = min(self.step_timeout_s, 25.0)


# ------------------------------------------------------------------------ recordings

@dataclass(slots=True)
class Ack:
    t: float
    position: int
    id: bytes
    kind: str  # ledger | order | stale


@dataclass(slots=True)
class InDoubt:
    id: bytes
    kind: str
    t: float
    code: str
    resolution: str = "unresolved"  # earlier-attempt | retry | unresolved (-in-log/-absent)


# The roles of a voter back from a lost disk before it is whole (geo/node.py, "Lost
# disks"): waiting for the other voters' promises, then fenced and catching up.
LOST_DISK_ROLES = ("fencing", "rejoining")


@dataclass
class RejoinWatch:
    """What a rebuilt node's statuses said from its restart (monotonic times)."""

    answered_at: float | None = None  # its first answer
    roles: list[str] = field(default_factory=list)  # in the order first seen
    rejoining_seen: bool = False  # some answer said so (a LOST_DISK_ROLES role, a rejoin term)
    fence_term: int = 0  # the rejoin term F it reported
    whole_at: float | None = None  # its first answer saying neither
    term_whole: int | None = None  # its term then


@dataclass(frozen=True)
class LostDiskLog:
    """What a node's log says of a lost disk: the fence term of its `LOST DISK ...
    fenced at term F` line (0: none), and whether it logged `REJOINED`."""

    fence_term: int
    rejoined: bool


_FENCED = re.compile(r"LOST DISK: .*fenced at term (\d+)")


def lost_disk_log(path: Path, limit: int = 8 << 20) -> LostDiskLog:
    """Reads at most `limit` bytes of the node's log (a restarted node's log is new)."""
    try:
        with open(path, "rb") as f:
            text = f.read(limit).decode(errors="replace")
    except OSError:
        return LostDiskLog(0, False)
    m = _FENCED.search(text)
    return LostDiskLog(int(m.group(1)) if m else 0, "REJOINED" in text)


class _Failed(Exception):
    """An attempt of Run._until_acked that failed: its status, what to note if it is not
    retryable, and how long to wait before the next attempt."""

    def __init__(self, code: grpc.StatusCode, message: str, wait_s: float = 0.02,
                 in_doubt: bool | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.wait_s = code, message, wait_s
        # Whether the write may have happened; None: any retryable status says so.
        self.in_doubt = code in _RETRYABLE if in_doubt is None else in_doubt


Attempt = Callable[[int], Awaitable[tuple[int, bool]]]  # n -> (position, duplicate)


@dataclass
class Recorder:
    """Everything the load and the observers saw, on time.monotonic()."""

    acks: list[Ack] = field(default_factory=list)
    in_doubt: list[InDoubt] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    leader_key: deque[tuple[float, int | None, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_SAMPLES))  # (t, term, holder)
    # The same reads with their send time too, (sent, answered, term): a read answered
    # "held" proves the key was there at its send time at the latest (leader_key_after_kill).
    leader_key_reads: deque[tuple[float, float, int | None]] = field(
        default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    engine_key: deque[tuple[float, int | None, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    # (t, instance, role, committed input, input, delivered store position)
    engine_samples: deque[tuple[float, str, str, int, int, int]] = field(
        default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    # Order calls a gateway refused or did not answer: (t, status code name)
    order_refusals: deque[tuple[float, str, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_SAMPLES))  # (t, code, details)
    deliveries: deque[tuple[float, int, int, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_SAMPLES))  # (t, last_input, term, writer)
    stale: dict[str, int] = field(default_factory=lambda: {
        "sent": 0, "rejected": 0, "unreachable": 0, "in_doubt": 0, "acked": 0,
        "acked_after_new_term": 0})
    stale_doubt_ids: list[bytes] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def acks_after(self, t: float, kind: str = "ledger") -> int:
        # Acks are appended in time order (one loop, a monotonic clock): polled every
        # few ms during a drill, this looks at the acks after `t` only.
        i = bisect.bisect_right(self.acks, t, key=attrgetter("t"))
        return sum(1 for a in itertools.islice(self.acks, i, None) if a.kind == kind)

    def note_error(self, what: str) -> None:
        if len(self.errors) < 100:
            self.errors.append(what)


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], timeout_s: float,
                     what: str, interval_s: float = 0.01) -> float:
    """Polls `pred` until true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if not isinstance(got, bool):
            got = await got
        if got:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)


# ------------------------------------------------------------------------ engines

@dataclass
class ChildProc:
    """One `xdc engine run` instance of the drill's group, or one `xdc gateway`: a
    process that prints a JSON ready line with its `listen` address; stopped by PID only."""

    instance: str
    region: str
    run_dir: Path
    command: list[str]
    env: dict[str, str]
    kind: str = "engine"  # engine | gateway
    listen_flag: str = "--control"  # the option of the command naming its address
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""

    def start(self) -> ChildProc:
        d = self.run_dir / f"{self.kind}s" / self.instance
        d.mkdir(parents=True, exist_ok=True)
        out = d / "stdout.log"
        out.write_text("")
        command = list(self.command)
        if self.address:  # a restart keeps its address: gateways probe engines by it
            command[command.index(self.listen_flag) + 1] = self.address
        with open(out, "ab") as stdout, open(d / f"{self.kind}.log", "ab") as stderr:
            self.proc = subprocess.Popen(command, stdout=stdout, stderr=stderr,
                                         env={**os.environ, **self.env},
                                         start_new_session=True)
        self.address = launcher._wait_ready_line(out, self.proc, 60)["listen"]
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 5.0) -> None:
        if not self.alive:
            self.kill()  # reaps
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused process cannot handle TERM
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()


_CHILD_MAIN = ("import logging, sys; logging.basicConfig(level=logging.INFO, format="
                "'%(asctime)s %(name)s %(levelname)s %(message)s'); from xdc.cli import main; "
                "sys.exit(main(sys.argv[1:]))")


def engine_command(state: launcher.ClusterState, instance: str, stores: list[str],
                   ttl_s: int) -> list[str]:
    # `xdc engine run` with its INFO log (role changes, refused appends) in engine.log.
    return [sys.executable, "-c", _CHILD_MAIN, "engine", "run", "--store", ",".join(stores),
            "--group", GROUP, "--instance", instance, "--control", "127.0.0.1:0",
            "--lease", "etcd", "--config", state.config,
            "--lease-ttl", str(ttl_s), "--snapshot-every", "2000",
            *launcher.tls_args(state, "engine"),
            # EngineControl callers authenticate too (its certificate is the engine
            # principal's: the auth file maps it, so it needs no token).
            *(["--auth", state.auth_file] if state.auth_file else [])]


def gateway_command(state: launcher.ClusterState, stores: list[str], engines: list[str],
                    exchange_file: str) -> list[str]:
    # `xdc gateway` with its certificate (the gateway principal, to the store and the
    # engines) and its callers authenticated by the cluster's auth file. It knows the
    # engines' addresses and discovers them too (both give the same instances here: the
    # advertised addresses, over TLS and authenticated, are exercised by every drill).
    return [sys.executable, "-c", _CHILD_MAIN, "gateway", "--store", ",".join(stores),
            "--listen", "127.0.0.1:0", "--exchange", exchange_file,
            "--engines", ",".join(engines), "--discover-engines",
            *launcher.tls_args(state, "gateway"),
            *(["--auth", state.auth_file] if state.auth_file else [])]


# ------------------------------------------------------------------------ the run

@dataclass
class Phase:
    """One fault and what is needed to measure the recovery from it."""

    t0: float
    old_term: int
    old_leader: launcher.NodeProc
    old_engine: str  # engine primary's instance at the fault
    delivered_at_fault: int  # engine primary's delivered store position at the fault
    expect_new_term: bool
    engine_failover: bool = False
    t0_wall: float = 0.0  # time.time() at t0: the tier supervisor reports wall times
    # When every tier was seen back (the end of Run._recovered): what happens after it,
    # e.g. a restarted region's gateway refusing orders while it starts, is not this
    # phase's recovery.
    recovered_at: float = float("inf")


class Run:
    def __init__(self, scenario: str, seed: int, opts: DrillOptions, directory: str) -> None:
        self.scenario = scenario
        self.seed = seed
        self.opts = opts
        self.rng = random.Random(seed)
        self.dir = directory
        self.rec = Recorder()
        self.state: launcher.ClusterState | None = None
        self.engines: dict[str, ChildProc] = {}
        self.gateways: dict[str, ChildProc] = {}  # one per region
        self._gateway_stubs: dict[str, tuple[grpc.aio.Channel, Any]] = {}  # by address
        self.supervisor_statuses: list[Any] = []  # TiersStatus of every node and gateway
        # Nodes and gateways whose TiersStatus could not be read after the run: with any,
        # which tiers went down is not known, nor whether they came back in order.
        self.supervisors_unread = 0
        self.tasks: list[asyncio.Task[Any]] = []
        self.notes: list[str] = []
        self.markers: dict[str, float] = {}  # extra moments for the timeline (monotonic)
        self._orders: Iterator[GatewayOrder | pb.ProposedEvent] = iter(())
        self._stale_target: str = ""
        self._new_term_seen = float("inf")
        self._observer: Leadership | None = None
        self._engine_observer: Leadership | None = None
        self._phase: Phase | None = None
        self.tls: Tls | None = None  # the cluster's admin certificate (launcher)

    # ---- setup ------------------------------------------------------------------

    def start_cluster(self) -> launcher.ClusterState:
        etcd_members = 3 if self.scenario == "etcd-member-loss" else 1
        self.state = launcher.up(self.dir, regions=self.opts.regions, rtt_ms=self.opts.rtt_ms,
                                 ttl_s=self.opts.ttl_s, cluster=CLUSTER, seed=self.seed,
                                 etcd_members=etcd_members)
        self.tls = launcher.client_tls(self.state)
        return self.state

    def _engine(self, region: str, k: int) -> ChildProc:
        assert self.state is not None
        local = [n.client for n in self.state.region_nodes(region)]
        others = [n.client for n in self.state.nodes if n.region != region and n.voter]
        instance = f"{region}-e1"
        return ChildProc(instance, region, Path(self.dir),
                          engine_command(self.state, instance, local + others, self.opts.ttl_s),
                          {"PYTHONHASHSEED": str(self.seed * 10 + k)})

    async def start_engines(self, leader_region: str) -> None:
        """The leader region's instance first (it becomes primary), then the others."""
        assert self.state is not None
        regions = [leader_region] + [r for r in dict.fromkeys(n.region for n in self.state.nodes)
                                     if r != leader_region]
        for k, region in enumerate(regions):
            e = self._engine(region, k)
            # Known before it starts: a run ended meanwhile (SIGTERM) still stops it.
            self.engines[e.instance] = e
            await asyncio.to_thread(e.start)
            if k == 0:
                await wait_until(lambda e=e: self._role_is(e, "primary"),
                                 self.opts.step_timeout_s, f"{e.instance} primary", 0.05)

    async def start_gateways(self) -> None:
        """One order gateway per region: its region's store first, every engine to judge
        the matching tier by (engine/matching_health.py)."""
        assert self.state is not None
        exchange = Path(self.dir, "exchange.toml")
        exchange.write_text(exchange_toml(GROUP))
        engines = [e.address for e in self.engines.values()]
        for region in dict.fromkeys(n.region for n in self.state.nodes):
            local = [n.client for n in self.state.region_nodes(region)]
            others = [n.client for n in self.state.nodes if n.region != region and n.voter]
            g = ChildProc(f"{region}-gw", region, Path(self.dir),
                          gateway_command(self.state, local + others, engines, str(exchange)),
                          {}, kind="gateway", listen_flag="--listen")
            self.gateways[g.instance] = g
            await asyncio.to_thread(g.start)

    def _region_procs(self, region: str) -> list[ChildProc]:
        return [p for p in (*self.engines.values(), *self.gateways.values())
                if p.region == region]

    async def _role_is(self, e: ChildProc, role: str) -> bool:
        s = await status_or_none(e.address, 0.5, self.tls, brief=True)
        return s is not None and s.role == role

    async def engine_primary(self) -> tuple[str, int]:
        """(instance, delivered store position) of the primary."""
        for e in self.engines.values():
            if e.alive:
                s = await status_or_none(e.address, 0.5, self.tls, brief=True)
                if s is not None and s.role == "primary":
                    return s.instance, s.delivered_position
        return "", 0

    # ---- load -------------------------------------------------------------------

    async def _until_acked(self, event_id: bytes, kind: str, attempt: Attempt) -> None:
        """Calls `attempt(n)` (n = attempts so far) with the same event until it is
        acknowledged. A retryable failure is retried after its back-off; the first one
        that may have written (`_Failed.in_doubt`) puts the call in doubt, and the answer
        that ends it says how it resolved. Any other failure is noted and the event given
        up."""
        doubt: InDoubt | None = None
        give_up = float("inf")
        for n in itertools.count():
            try:
                position, duplicate = await attempt(n)
            except _Failed as f:
                if f.code not in _RETRYABLE:
                    self.rec.note_error(f.message)
                    return
                now = time.monotonic()
                if doubt is None and f.in_doubt and len(self.rec.in_doubt) < MAX_IN_DOUBT:
                    doubt = InDoubt(event_id, kind, now, f.code.name)
                    self.rec.in_doubt.append(doubt)
                if self.rec.stop.is_set():
                    # Winding down: keep retrying the same id for a while, so that every
                    # in-doubt write resolves before the log is read back.
                    give_up = min(give_up, now + self.opts.step_timeout_s / 2)
                    if now > give_up:
                        return
                await asyncio.sleep(f.wait_s)  # back off before the retry (not a sync)
                continue
            self.rec.acks.append(Ack(time.monotonic(), position, event_id, kind))
            if doubt is not None:
                doubt.resolution = "earlier-attempt" if duplicate else "retry"
            return

    async def _append_until_acked(self, client: StoreClient, stream: str,
                                  event: pb.ProposedEvent, kind: str) -> None:
        async def attempt(_n: int) -> tuple[int, bool]:
            try:
                r = await client.append(stream, event, timeout_s=self.opts.call_timeout_s)
            except (TimeoutError, AppendError, grpc.aio.AioRpcError) as exc:
                code = exc.code if isinstance(exc, AppendError) else (
                    exc.code() if isinstance(exc, grpc.aio.AioRpcError)
                    else grpc.StatusCode.DEADLINE_EXCEEDED)
                raise _Failed(code, f"{kind} append refused: {exc}") from None
            return r.first_position, r.duplicate
        await self._until_acked(event.id, kind, attempt)

    async def ledger_producer(self, client: StoreClient, k: int) -> None:
        for i in itertools.count():
            if self.rec.stop.is_set():
                return
            event = new_event("DrillWrite", b'{"producer": %d, "n": %d}' % (k, i),
                              content_type="application/json")
            await self._append_until_acked(client, f"drill.ledger.P{k}", event, "ledger")

    async def order_producer(self, client: StoreClient, k: int) -> None:
        """Orders, cancels and replaces through the gateways (setup and poison inputs
        straight to the store: only an admin appends those)."""
        stream = wire.input_stream(GROUP)
        while not self.rec.stop.is_set():
            item = next(self._orders)
            if isinstance(item, GatewayOrder):
                await self._submit_until_acked(item, k)
            else:
                _trace(item)
                await self._append_until_acked(client, stream, item, "order")

    def _gateway(self, address: str) -> tuple[grpc.aio.Channel, Any]:
        """(channel, OrderGateway stub) of the gateway at `address`, kept open."""
        got = self._gateway_stubs.get(address)
        if got is None:
            ch = aio_channel(address, self.tls, options=channel_options(),
                             interceptors=telemetry.client_interceptors())
            got = self._gateway_stubs[address] = (ch, xpb_grpc.OrderGatewayStub(ch))
        return got

    async def _submit_until_acked(self, order: GatewayOrder, k: int) -> None:
        """One gateway call, retried with the same request (the same input event id)
        until a gateway acknowledges it. A refusal (shed by a tier, or no gateway there)
        moves on to the next gateway after the refusal's retry hint (at most
        GATEWAY_RETRY_MAX_S); a timeout is in doubt and resolved by the retry."""
        async def attempt(n: int) -> tuple[int, bool]:
            while not (live := [g.address for g in self.gateways.values() if g.alive]):
                await asyncio.sleep(0.05)  # every gateway restarting (not a sync)
            _, stub = self._gateway(live[(k + n) % len(live)])
            try:
                with _producer_span():
                    r = await getattr(stub, order.method)(
                        order.request, timeout=self.opts.call_timeout_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in _RETRYABLE:
                    self.rec.order_refusals.append(
                        (time.monotonic(), code.name, (exc.details() or "")[:160]))
                md = dict(exc.trailing_metadata() or ())
                hint_s = int(md.get(MD_RETRY_AFTER_MS, "0") or 0) / 1000
                raise _Failed(code, f"order {order.method} refused: {code.name} "
                                    f"{exc.details()}",
                              min(GATEWAY_RETRY_MAX_S, max(0.02, hint_s)),
                              gateway_call_in_doubt(code, md)) from None
            return r.input_position, r.duplicate
        await self._until_acked(order.event_id, "order", attempt)

    async def market_data(self, targets: list[str]) -> None:
        """Follows the output stream; records each delivered batch (resumes by itself)."""
        async with StoreClient(targets, timeout_s=30, tls=self.tls) as client:
            async for item in client.subscribe(from_end=True,
                                               stream_prefix=wire.output_stream(GROUP),
                                               event_types=[wire.OUTPUT_TYPE], batches=True):
                if isinstance(item, CaughtUp) or not isinstance(item, pb.RecordBatch):
                    continue
                now = time.monotonic()
                for e in item.events:
                    self.rec.deliveries.append((now, int(e.metadata.get("last_input", "0")),
                                                e.term, e.metadata.get("writer", "")))

    async def watch_keys(self) -> None:
        """Samples the store leader key and the engine lease key."""
        assert self._observer is not None and self._engine_observer is not None
        while True:
            for obs, out, who in ((self._observer, self.rec.leader_key, "id"),
                                  (self._engine_observer, self.rec.engine_key, "instance")):
                sent = time.monotonic()
                try:
                    async with asyncio.timeout(1.0):
                        cur = await obs.current()
                except (TimeoutError, LeadershipError):
                    continue  # etcd member lost or slow: the next sample tells
                term, holder = (cur[1], cur[0].get(who, "")) if cur else (None, "")
                now = time.monotonic()
                out.append((now, term, holder))
                if out is self.rec.leader_key:
                    self.rec.leader_key_reads.append((sent, now, term))
                if out is self.rec.leader_key and term is not None and self._phase is not None \
                        and term > self._phase.old_term:
                    self._new_term_seen = min(self._new_term_seen, time.monotonic())
            await asyncio.sleep(POLL_S)

    async def watch_engines(self) -> None:
        while True:
            live = [e for e in self.engines.values() if e.alive]
            # Brief: a full status hashes the whole book, a load on what is measured.
            got = await asyncio.gather(*(status_or_none(e.address, 0.3, self.tls, brief=True)
                                         for e in live))
            now = time.monotonic()
            for s in got:
                if s is not None:
                    self.rec.engine_samples.append((now, s.instance, s.role,
                                                    s.committed_input_position,
                                                    s.input_position, s.delivered_position))
            await asyncio.sleep(POLL_S * 2)

    async def stale_prober(self, target: str) -> None:
        """Appends sent straight to the deposed leader, classified by who answered."""
        st = self.rec.stale
        async with aio_channel(target, self.tls, options=channel_options()) as ch:
            stub = pb_grpc.EventStoreStub(ch)
            while not self.rec.stop.is_set():
                event = new_event("StaleProbe", b"")
                st["sent"] += 1
                try:
                    r = await stub.Append(pb.AppendRequest(stream="drill.stale", events=[event]),
                                          timeout=self.opts.call_timeout_s)
                except grpc.aio.AioRpcError as exc:
                    md = {k: v for k, v in (exc.trailing_metadata() or ())}
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        st["in_doubt"] += 1
                        self.rec.stale_doubt_ids.append(event.id)
                    elif exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.FAILED_PRECONDITION) and (
                            MD_LEADER in md or MD_RETRY_AFTER_MS in md):
                        st["rejected"] += 1
                    else:
                        st["unreachable"] += 1
                else:
                    now = time.monotonic()
                    st["acked"] += 1
                    if now > self._new_term_seen:
                        st["acked_after_new_term"] += 1
                    self.rec.acks.append(Ack(now, r.first_position, event.id, "stale"))
                await asyncio.sleep(STALE_PROBE_S)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.append(task)
        return task

    async def phase_start(self, expect_new_term: bool, old_leader: launcher.NodeProc,
                          old_term: int, stale_probe: bool = True) -> Phase:
        inst, delivered = await self.engine_primary()
        t0 = time.monotonic()
        self._phase = Phase(t0, old_term, old_leader, inst, delivered,
                            expect_new_term, t0_wall=time.time())
        self._new_term_seen = float("inf")
        # The last phase's deposed leader may lead again (failback): probing it now
        # would count a real leader's acks as stale ones.
        self._stop_stale_prober()
        if stale_probe:
            self.spawn(self.stale_prober(old_leader.client), "stale-prober")
        return self._phase

    def _stop_stale_prober(self) -> None:
        for t in self.tasks:
            if t.get_name() == "stale-prober":
                t.cancel()

    # ---- scenarios ----------------------------------------------------------------

    async def execute(self) -> dict[str, Any]:
        state = self.state
        assert state is not None
        opts = self.opts
        leader, st = await launcher.wait_leader(state, opts.step_timeout_s)
        await self.start_engines(leader.region)
        await self.start_gateways()
        access = launcher.etcd_access_of(state)
        self._observer = Leadership(state.etcd_endpoints, state.cluster, "drill-observer",
                                    {"id": "drill-observer"}, opts.ttl_s, on_lost=_ignore,
                                    access=access)
        self._engine_observer = Leadership(state.etcd_endpoints, f"{state.cluster}/engines/{GROUP}",
                                           "drill-observer", {"instance": "drill-observer"},
                                           opts.ttl_s, on_lost=_ignore, access=access)
        self._orders = gateway_load(GROUP, self.seed, f"drill{self.seed}", poison_every=97)
        voters = [n.client for n in state.nodes if n.voter]
        # Producers know only the node list, starting at a seeded node.
        self.rng.shuffle(voters)
        client = StoreClient(voters, timeout_s=opts.step_timeout_s, tls=self.tls)
        md_targets = [n.client for n in state.nodes if n.region != leader.region] + [
            leader.client]
        try:
            self.spawn(self.watch_keys(), "watch-keys")
            self.spawn(self.watch_engines(), "watch-engines")
            self.spawn(self.market_data(md_targets), "market-data")
            for k in range(opts.producers):
                self.spawn(self.ledger_producer(client, k), f"ledger-{k}")
            for k in range(opts.order_width):
                self.spawn(self.order_producer(client, k), f"orders-{k}")
            started = time.monotonic()
            await wait_until(lambda: self.rec.acks_after(started) >= 50
                             and self.rec.acks_after(started, "order") >= 20
                             and len(self.rec.deliveries) > 0, opts.step_timeout_s,
                             "load before the fault")
            await wait_until(self._engines_warm, opts.step_timeout_s, "warm engines", 0.05)
            await self._gateways_admit_orders(opts.step_timeout_s)
            log.info("load running: %d acks; the fault strikes next", len(self.rec.acks))
            # The fault strikes at a seeded moment of the load.
            await asyncio.sleep(max(0.0, started + opts.before_s - time.monotonic())
                                + self.rng.uniform(0, 0.5))
            # The leader as of now: the load may have moved leadership since the start
            # (a lost lease), and striking a follower would report a failover that never
            # was (before, the start's leader was struck whoever led by then).
            leader, st = await launcher.wait_leader(state, opts.step_timeout_s)
            result = await getattr(self, "_" + self.scenario.replace("-", "_"))(leader, st.term)
            # Wind down: stop the load (in-doubt writes still resolve), then check.
            log.info("scenario done; winding down the load")
            self.rec.stop.set()
            # The stale prober too: an ack it got after the check's read would be "lost".
            producers = [t for t in self.tasks if t.get_name().startswith(
                ("ledger", "orders", "stale")) and not t.cancelled()]
            async with asyncio.timeout(opts.step_timeout_s):
                await asyncio.gather(*producers, return_exceptions=True)
            for t in producers:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            log.info("load stopped; checking")
            result.update(await self.check(client))
            return result
        finally:
            self.rec.stop.set()
            for t in self.tasks:
                t.cancel()
            # Bounded: a cleanup step that hangs must not hold the drill.
            _, pending = await asyncio.wait(self.tasks, timeout=10) if self.tasks else ((), ())
            if pending:
                log.warning("cleanup: tasks still running 10 s after their cancel: %s",
                            ", ".join(t.get_name() for t in pending))
            for what, closing in [("client", client.close())] + [
                    (f"gateway channel {a}", ch.close())
                    for a, (ch, _) in self._gateway_stubs.items()] + [
                    (f"etcd observer {k}", obs.close()) for k, obs in
                    enumerate((self._observer, self._engine_observer)) if obs is not None]:
                try:
                    async with asyncio.timeout(5):
                        await closing
                except Exception as exc:  # cleanup goes on; the log says
                    log.warning("cleanup: %s not closed: %r", what, exc)

    async def execute_within(self, timeout_s: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            return await self.execute()

    async def _all_tiers_serving(self) -> bool:
        assert self.state is not None
        got = await asyncio.gather(*(_tiers_status(n.client, self.tls)
                                     for n in self.state.nodes))
        return all(st is not None and all(t.state == "serving" for t in st.tiers)
                   for st in got)

    async def _engines_warm(self) -> bool:
        roles = []
        for e in self.engines.values():
            s = await status_or_none(e.address, 0.5, self.tls, brief=True)
            roles.append(s.role if s is not None else "?")
        return roles.count("primary") == 1 and roles.count("warm") == len(roles) - 1

    async def _recovered(self, phase: Phase, timeout_s: float | None = None) -> None:
        """Waits until every tier is back after `phase` and some load went through: ledger
        writes, every gateway admitting orders again and orders acknowledged since the
        last refusal, market data for those orders."""
        log.info("waiting for recovery: %d ledger / %d order acks since the fault so far",
                 self.rec.acks_after(phase.t0), self.rec.acks_after(phase.t0, "order"))
        timeout_s = timeout_s or self.opts.step_timeout_s
        await wait_until(lambda: self.rec.acks_after(phase.t0) >= self.opts.after_acks,
                         timeout_s, "writes after the fault")
        log.info("writes recovered; waiting for order entry")
        await self._gateways_admit_orders(timeout_s)
        await wait_until(lambda: self.rec.acks_after(self._last_refusal(phase), "order") >= 10,
                         timeout_s, "orders acknowledged after the last refusal")
        log.info("order entry recovered; waiting for market data")
        try:
            await wait_until(lambda: self.market_data_back(
                phase, self.order_entry_back(phase, None, time.monotonic())) is not None,
                timeout_s, "market data after the fault")
        except TimeoutError:
            self.rec.note_error(self.diagnosis(phase))
            raise
        phase.recovered_at = time.monotonic()
        log.info("recovered %.3f s after the fault", phase.recovered_at - phase.t0)

    async def _gateways_admit_orders(self, timeout_s: float) -> None:
        """Waits until every running gateway admits orders (its order-entry tier health)."""
        await asyncio.gather(*(
            wait_health(health_pb2_grpc.HealthStub(self._gateway(g.address)[0]),
                        health_name("order-entry"), timeout_s=timeout_s)
            for g in self.gateways.values() if g.alive))

    def _last_refusal(self, phase: Phase, until: float = float("inf")) -> float:
        return max((t for t, _, _ in self.rec.order_refusals if phase.t0 < t <= until),
                   default=phase.t0)

    def order_entry_back(self, phase: Phase, new_term_pos: int | None,
                         until: float) -> Ack | None:
        """The first order acknowledged after the last order a gateway refused (or left
        unanswered) in the phase; in the new term when there is one."""
        after = self._last_refusal(phase, until)
        return next((a for a in self.rec.acks if a.kind == "order" and after < a.t <= until
                     and (new_term_pos is None or a.position >= new_term_pos)), None)

    def market_data_back(self, phase: Phase, order_ack: Ack | None) -> float | None:
        """The first output batch the subscription delivered for an input at or past the
        order that marks order entry's recovery (written in the new term / by the new
        primary), once that order is acknowledged: the order's outputs can reach the
        subscriber a few ms before its acknowledgement reaches the order client (two
        paths from one commit), and market data is not back before order entry is."""
        if order_ack is None:
            return None
        for t, last_input, term, writer in self.rec.deliveries:
            if t <= phase.t0 or t < order_ack.t or last_input < order_ack.position:
                continue
            if phase.expect_new_term and term <= phase.old_term:
                continue
            if phase.engine_failover and writer == phase.old_engine:
                continue
            return t
        return None

    def down_tiers(self, phase: Phase, until: float) -> set[str]:
        """The tiers some supervisor (a store node's or a gateway's) took out of serving
        (shed, or degraded: tier 0 is never shed) during the phase, from the statuses read
        after the run."""
        start = int(phase.t0_wall * 1e9)
        end = start + int((until - phase.t0) * 1e9)
        return {t.tier for st in self.supervisor_statuses for t in st.transitions
                if start <= t.at_unix_ns <= end and t.from_state == "serving"
                and t.to_state != "serving"}

    def diagnosis(self, phase: Phase) -> str:
        """What the observers saw last: for a run that did not recover."""
        last: dict[str, tuple[Any, ...]] = {}
        for sample in self.rec.engine_samples:
            last[sample[1]] = sample[2:]
        deliveries = list(self.rec.deliveries)[-3:]
        return (f"engines (role, committed, input) {last}; old term {phase.old_term}, old "
                f"engine {phase.old_engine}; last deliveries (t-t0, last_input, term, writer) "
                f"{[(round(t - phase.t0, 3), *rest) for t, *rest in deliveries]}")

    async def _kill_region(self, region: str) -> list[launcher.NodeProc]:
        assert self.state is not None
        victims = launcher.signal_node(self.state, region, signal.SIGKILL)
        procs = self._region_procs(region)
        for p in procs:
            p.signal(signal.SIGKILL)
        for v in victims:
            launcher.reap(v.pid)
        for p in procs:
            p.kill()
        return victims

    async def _restart_region(self, victims: list[launcher.NodeProc], region: str) -> None:
        assert self.state is not None
        for v in victims:
            await asyncio.to_thread(launcher.start_node, self.state, v)
        for e in self._region_procs(region):  # engines first: the gateway probes them
            if not e.alive:
                await asyncio.to_thread(e.start)

    async def _leader_crash(self, leader: launcher.NodeProc, term: int) -> dict[str, Any]:
        phase = await self.phase_start(True, leader, term)
        victims = await self._kill_region(leader.region)
        await launcher.wait_leader(self.state, self.opts.step_timeout_s, exclude=(leader.id,))  # type: ignore[arg-type]
        await self._recovered(phase)
        # What answers at the deposed leader's address from now on is a fresh follower:
        # its refusals are no fencing of the old term (they were counted as such).
        self._stop_stale_prober()
        self.markers["restart"] = time.monotonic()
        await self._restart_region(victims, leader.region)
        return {"fault": f"SIGKILL of every process of {leader.region} (node {leader.id}, "
                         f"its engine and its gateway)", "_phases": [phase]}

    async def _region_loss(self, leader: launcher.NodeProc, term: int) -> dict[str, Any]:
        """The leader region burns down: every process of it SIGKILLed, then its store
        node's directory (its data with it) and its engine's and gateway's directories
        gone; measured as `leader-crash`. Then the region is rebuilt on empty directories
        under the load: its node must come back as a lost disk (fenced, rejoining, whole
        again), never as a new voter, whose empty log could help elect a leader lacking
        acknowledged records (geo/node.py, "Lost disks")."""
        assert self.state is not None
        phase = await self.phase_start(True, leader, term)
        victims = await self._kill_region(leader.region)
        # One store node per region (the drill's cluster has no standbys).
        assert [v.id for v in victims] == [leader.id], victims
        burnt = await asyncio.to_thread(self._burn_region, leader, leader.region)
        await launcher.wait_leader(self.state, self.opts.step_timeout_s, exclude=(leader.id,))
        await self._recovered(phase)
        self._stop_stale_prober()  # what answers there from now on is the rebuilt node
        rebuilt = await self._rebuild_region(leader, phase)
        return {"fault": f"SIGKILL of every process of {leader.region} (node {leader.id}, "
                         f"its engine and its gateway), their directories deleted, then "
                         f"the region rebuilt on empty ones", "burnt": burnt, **rebuilt,
                "_phases": [phase]}

    def _burn_region(self, node: launcher.NodeProc, region: str) -> list[str]:
        """Deletes what the region's processes kept on disk: the node's directory (data
        and all: the launcher's restart finds no `nodes/<id>` at all), the engine's and
        the gateway's (logs only: an engine restores from snapshots in the store). The
        logs are kept apart, under `burnt/`, for the run's diagnosis; returns what was
        deleted (relative to the run's directory)."""
        base = Path(self.dir)
        data = Path(node.data_dir)
        dirs = [base / "nodes" / node.id] + [p.run_dir / f"{p.kind}s" / p.instance
                                              for p in self._region_procs(region)]
        assert data.parent == dirs[0], (data, dirs[0])  # the data dies with the directory
        deleted = []
        for d in dirs:
            if not d.exists():
                continue
            kept = base / "burnt" / d.relative_to(base)
            kept.parent.mkdir(parents=True, exist_ok=True)
            d.rename(kept)
            for entry in sorted(kept.iterdir()):
                if entry.is_file() and entry.suffix == ".log":
                    continue
                deleted.append(str(d.relative_to(base) / entry.name))
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        if data.exists() or dirs[0].exists():
            raise RuntimeError(f"{dirs[0]} still there after the region's loss")
        return deleted

    async def _rebuild_region(self, node: launcher.NodeProc, phase: Phase) -> dict[str, Any]:
        """Restarts the burnt region (its node through the launcher, on an empty directory,
        then its engine and gateway) under the load, and watches its node come back: it
        must say it is rejoining after a lost disk (its status, or its log's LOST DISK
        line), and then that it is whole (`rejoin_s`, from the restart)."""
        assert self.state is not None
        # The fence must be above it, or this leader would count the node's acks.
        _, st = await launcher.wait_leader(self.state, self.opts.step_timeout_s)
        watch = RejoinWatch()
        started = self.markers["rebuild"] = time.monotonic()
        poller = self.spawn(self._watch_rejoin(node, watch), "rejoin-watch")
        try:
            await self._restart_region([node], node.region)
            await wait_until(lambda: watch.whole_at is not None or poller.done(),
                             self.opts.step_timeout_s, f"{node.id} whole again after its "
                             "lost disk")
        except TimeoutError as exc:  # reported (rejoined: false), and the run goes on
            self.rec.note_error(str(exc))
        finally:
            poller.cancel()
        if watch.whole_at is None and poller.done() and not poller.cancelled():
            poller.result()  # the watch failed: its error, not a timeout, fails the run
        if watch.whole_at is not None:
            self.markers["whole"] = watch.whole_at
        said = lost_disk_log(Path(self.dir, "nodes", node.id, "node.log"))
        evidence = (["status"] if watch.rejoining_seen else []) + (
            ["log"] if said.fence_term else [])
        fence = watch.fence_term or said.fence_term
        if watch.fence_term and said.fence_term and watch.fence_term != said.fence_term:
            self.notes.append(f"{node.id}: fence term {watch.fence_term} in its status, "
                              f"{said.fence_term} in its log")
        ledger = [a.t for a in self.rec.acks if a.kind == "ledger" and a.t > started]
        return {
            "rebuilt_node": node.id,
            # How the drill knows it went through the lost-disk path: its status said
            # fencing or rejoining, and/or its log said LOST DISK ... fenced at term F.
            "rejoin_evidence": evidence,
            "rebuild_roles": watch.roles,
            "fence_term": fence or None,
            "rebuild_answered_s": _rel(watch.answered_at, started),
            "rejoin_s": _rel(watch.whole_at, started),
            "rejoined_logged": said.rejoined,
            "term_at_rebuild": st.term,
            "term_after_rejoin": watch.term_whole,
            # Writes pause for one election as the fence deposes the leader of the moment.
            "rebuild_write_stall_s": longest_stall(started, ledger, watch.whole_at)
            if watch.whole_at is not None else None,
            "rejoined": bool(evidence) and watch.whole_at is not None
            and fence > max(phase.old_term, st.term),
        }

    async def _watch_rejoin(self, node: launcher.NodeProc, watch: RejoinWatch) -> None:
        """Polls the node's replication status from its restart until it says it is whole
        (answering, in none of LOST_DISK_ROLES, without a rejoin term)."""
        assert self.state is not None
        while watch.whole_at is None:
            try:
                st = await launcher.node_status(self.state, node, 0.5)
            except launcher.Refused as exc:
                self.rec.note_error(f"{node.id} refused its status: {exc}")
                st = None
            now = time.monotonic()
            if st is not None:
                watch.answered_at = watch.answered_at or now
                if st.role not in watch.roles and len(watch.roles) < 10:
                    watch.roles.append(st.role)
                if st.role in LOST_DISK_ROLES or st.rejoin_term:
                    watch.rejoining_seen = True
                    watch.fence_term = watch.fence_term or st.rejoin_term
                else:
                    watch.whole_at, watch.term_whole = now, st.term
                    return
            await asyncio.sleep(POLL_S)

    async def _leader_pause(self, leader: launcher.NodeProc, term: int) -> dict[str, Any]:
        assert self.state is not None
        phase = await self.phase_start(True, leader, term)
        launcher.signal_node(self.state, leader.region, signal.SIGSTOP)
        paused = self._region_procs(leader.region)
        for e in paused:
            e.signal(signal.SIGSTOP)
        try:
            # Held past the lease: until another node leads (so the lease has expired),
            # plus a seeded extra (the fault's duration, not a synchronisation).
            await launcher.wait_leader(self.state, self.opts.step_timeout_s, exclude=(leader.id,))
            await asyncio.sleep(self.rng.uniform(0.2, 0.8))
        finally:
            self.markers["resume"] = time.monotonic()
            launcher.signal_node(self.state, leader.region, signal.SIGCONT)
            for e in paused:
                e.signal(signal.SIGCONT)
        await self._recovered(phase)
        return {"fault": f"SIGSTOP of every process of {leader.region} past its "
                         f"{self.opts.ttl_s}s lease, then SIGCONT",
                "fault_duration_s": round(self.markers["resume"] - phase.t0, 3),
                "_phases": [phase]}

    async def _leader_partition(self, leader: launcher.NodeProc, term: int) -> dict[str, Any]:
        from geo.proxy import AsyncProxyControl

        assert self.state is not None
        proxy = AsyncProxyControl(self.state.proxy_control)
        phase = await self.phase_start(True, leader, term)
        await proxy.partition(region=leader.region, mode="blackhole")
        try:
            await launcher.wait_leader(self.state, self.opts.step_timeout_s, exclude=(leader.id,))
            await wait_until(lambda: self.rec.acks_after(self._new_term_seen) >= 20,
                             self.opts.step_timeout_s, "writes on the majority side")
            # Orders too, before the heal: an engine primary in the cut-off region reads
            # a replica without a leader; after STORE_CUT_OFF_S it gives up its lease
            # and a warm instance on the majority side takes over (engine/runner.py).
            majority_orders = await wait_until(
                lambda: self.rec.acks_after(self._new_term_seen, "order") >= 10,
                STORE_CUT_OFF_S + self.opts.step_timeout_s,
                "orders acknowledged on the majority side during the partition")
        finally:
            self.markers["heal"] = time.monotonic()
            await proxy.heal()
        await self._recovered(phase)
        return {"fault": f"{leader.region} cut off from the other regions (WAN proxy "
                         "blackhole), then healed once orders flowed on the majority side",
                "fault_duration_s": round(self.markers["heal"] - phase.t0, 3),
                # Fault -> the 10th order acknowledged in the new term, while cut off.
                "majority_orders_s": round(majority_orders - phase.t0, 3),
                "engine_moved": phase.old_engine != (await self.engine_primary())[0],
                "_phases": [phase]}

    async def _engine_crash(self, leader: launcher.NodeProc, term: int) -> dict[str, Any]:
        phase = await self.phase_start(False, leader, term, stale_probe=False)
        phase.engine_failover = True
        victim = self.engines[phase.old_engine]
        victim.signal(signal.SIGKILL)
        victim.kill()
        await self._recovered(phase)
        self.markers["restart"] = time.monotonic()
        self.engines[victim.instance] = await asyncio.to_thread(victim.start)
        self.notes.append("store leader not deposed: no stale-leader probe")
        return {"fault": f"SIGKILL of the engine primary {victim.instance}", "_phases": [phase]}

    async def _switchover(self, leader: launcher.NodeProc, term: int) -> dict[str, Any]:
        assert self.state is not None
        target = self.rng.choice([n for n in self.state.nodes if n.voter and n.id != leader.id])
        # The leader is found before the clock starts (finding it is not part of the
        # switchover's cost); it is still the one the run started with, unless the load
        # cost it its lease.
        leader, st = await launcher.wait_leader(self.state, self.opts.step_timeout_s)
        if target.id == leader.id:
            target = next(n for n in self.state.nodes if n.voter and n.id != leader.id)
        term = st.term
        phase = await self.phase_start(True, leader, term)
        resp = await launcher.switchover(self.state, target.id, self.opts.step_timeout_s,
                                         leader=leader)
        self.markers["switchover answered"] = time.monotonic()
        await self._recovered(phase)
        return {"fault": f"planned switchover {leader.id} -> {target.id}",
                "switchover_response": str(resp).strip().replace("\n", "; "),
                "_phases": [phase]}

    async def _switchover_leader_lost(self, leader: launcher.NodeProc,
                                      term: int) -> dict[str, Any]:
        """Maintenance gone wrong: a planned switchover to a target that has not caught
        up yet (its node is paused), and the leader's region dies meanwhile. The target,
        designated, takes over once resumed, but nobody handed it the seat: a failover,
        whose new term must say so (`new_term_began`: "election"; a handover would give
        the gateways a handover's grace and the tiers a planned window)."""
        assert self.state is not None and self._observer is not None
        target = self.rng.choice([n for n in self.state.nodes if n.voter and n.id != leader.id])
        phase = await self.phase_start(True, leader, term)
        paused = launcher.signal_node(self.state, target.id, signal.SIGSTOP)
        switchover = asyncio.ensure_future(launcher.switchover(
            self.state, target.id, self.opts.step_timeout_s, leader=leader))
        outcome = "?"
        victims: list[launcher.NodeProc] | None = None
        kill_at = float("inf")
        handed_over = False
        try:
            observer = self._observer

            async def designated() -> bool:  # or the call ended first: its error says why
                return switchover.done() or await observer.designated() == target.id
            await wait_until(designated, self.opts.step_timeout_s, "the target designated")
            if not switchover.done():
                self.markers["designated"] = kill_at = time.monotonic()
                victims = await self._kill_region(leader.region)
                # The leader may have handed over before it died (the paused target held
                # everything): the record tells, read before the target can consume it.
                handed_over = await observer.handover() == target.id
        finally:
            for n in paused:
                os.kill(n.pid, signal.SIGCONT)
            self.markers["resume"] = time.monotonic()
            try:
                await switchover
                outcome = "answered"
            except grpc.aio.AioRpcError as exc:  # the leader died under the call
                outcome = f"failed: {exc.code().name}: {exc.details()}"
            except Exception as exc:
                outcome = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        if victims is None:  # the call ended (refused, or done) before the fault struck
            raise RuntimeError(f"the switchover ended before the fault: {outcome}")
        new, _ = await launcher.wait_leader(self.state, self.opts.step_timeout_s,
                                            exclude=(leader.id,))
        await self._recovered(phase)
        status = await _tiers_status(new.client, self.tls)
        began = status.term_began if status is not None else None
        # The drill's own reads of the leader key, trusting nothing the cluster says:
        # resigned (a handover deletes the key at once) or left to expire.
        key = leader_key_after_kill(self.rec.leader_key_reads, term, phase.t0, kill_at,
                                    self.opts.ttl_s)
        if key.resigned is None:
            self.notes.append("whether the leader resigned is unknown: no read of its key "
                              f"between {key.held_s} s and {key.gone_s} s after the kill")
        self._stop_stale_prober()
        self.markers["restart"] = time.monotonic()
        await self._restart_region(victims, leader.region)
        return {"fault": f"switchover {leader.id} -> {target.id} (paused), then SIGKILL of "
                         f"every process of {leader.region}",
                "switchover_outcome": outcome, "handed_over": handed_over,
                "new_leader": new.id,
                "new_term_began": began,
                "leader_key_gone_after_kill_s": key.gone_s,
                "leader_key_held_after_kill_s": key.held_s,
                "leader_resigned": key.resigned, "_phases": [phase]}

    async def _etcd_member_loss(self, leader: launcher.NodeProc, term: int) -> dict[str, Any]:
        assert self.state is not None
        etcd = launcher.etcd_of(self.state)
        # Its leader: losing a follower costs etcd nothing, losing the leader costs an
        # election, during which no lease is refreshed (the case the store's lease must
        # outlast: geo/etcd_server.py on timing). An etcd rolling upgrade does it once.
        member = await asyncio.to_thread(etcd.leader)
        if member is None:
            raise RuntimeError("the etcd cluster has no leader to lose")
        k = etcd.members.index(member)
        phase = await self.phase_start(False, leader, term, stale_probe=False)
        member.kill()
        await self._recovered(phase)
        _, st = await launcher.wait_leader(self.state, self.opts.step_timeout_s)
        if st.term != term:  # the loss did cost the leadership: measure it as a failover
            phase.expect_new_term = True
            self.notes.append(f"leadership changed (term {term} -> {st.term})")
        self.markers["etcd member back"] = time.monotonic()
        member.start()
        await asyncio.to_thread(etcd.wait_healthy, 30.0, [member])
        return {"fault": f"SIGKILL of the etcd leader, member {k + 1}/{len(etcd.members)} "
                         f"({member.endpoint})", "_phases": [phase]}

    async def _failback(self, leader: launcher.NodeProc, term: int) -> dict[str, Any]:
        assert self.state is not None
        (first,) = (await self._leader_crash(leader, term))["_phases"]
        # The load goes on: the restarted region has caught up, not "converged".
        await launcher.wait_caught_up(self.state, self.opts.step_timeout_s)
        interim, st = await launcher.wait_leader(self.state, self.opts.step_timeout_s)
        await wait_until(self._engines_warm, self.opts.step_timeout_s, "warm engines", 0.05)
        # The restarted node (and gateway) admits its tiers one by one after its start:
        # the second phase begins once every node serves every tier and every gateway
        # admits orders, or its tier timings would
        # mix the tail of that recovery with the failback's.
        await wait_until(self._all_tiers_serving, self.opts.step_timeout_s,
                         "every tier serving on every node", 0.05)
        await self._gateways_admit_orders(self.opts.step_timeout_s)
        # Back to the original region: store leadership, then the engine primary.
        second = await self.phase_start(True, interim, st.term)
        # Asked of the leader found above, as in `switchover`: finding it again here put
        # a status sweep of every node inside the measured window.
        await launcher.switchover(self.state, leader.id, self.opts.step_timeout_s,
                                  leader=interim)
        await self._recovered(second)
        original = f"{leader.region}-e1"
        engine_back = None
        inst, _ = await self.engine_primary()
        if inst and inst != original:
            async with StoreClient([n.client for n in self.state.nodes], tls=self.tls) as c:
                marked = time.monotonic()
                await c.append(wire.input_stream(GROUP), [wire.control_event(
                    GROUP, wire.SWITCHOVER_TYPE, {"to": original}, f"failback{self.seed}")])
                await wait_until(lambda: self._role_is(self.engines[original], "primary"),
                                 self.opts.step_timeout_s, "engine failback", 0.02)
                engine_back = round(time.monotonic() - marked, 3)
        return {"fault": f"failover from {leader.id} (SIGKILL of its region), restart, then "
                         f"planned failback {interim.id} -> {leader.id}",
                "engine_failback_s": engine_back, "_phases": [first, second]}

    # ---- after the run ----------------------------------------------------------

    async def check(self, client: StoreClient) -> dict[str, Any]:
        assert self.state is not None
        timeout = self.opts.step_timeout_s
        upto = await launcher.wait_converged(self.state, timeout)
        leader, _ = await launcher.wait_leader(self.state, timeout)
        async with StoreClient(leader.client, timeout_s=60, tls=self.tls) as reader:
            records = {e.position: e for e in await read_stream(reader, "$all")}
        hashes = {n.id: await raw_log_hash(n.client, upto, self.tls) for n in self.state.nodes}
        positions: dict[bytes, list[int]] = {}
        for p, e in records.items():
            positions.setdefault(e.id, []).append(p)
        duplicates = sum(1 for ps in positions.values() if len(ps) > 1)
        lost = [a for a in self.rec.acks
                if a.position not in records or records[a.position].id != a.id]
        for d in self.rec.in_doubt:
            if d.resolution == "unresolved":
                d.resolution = "unresolved-in-log" if d.id in positions else "unresolved-absent"
        stale_doubt_in_log = sum(1 for i in self.rec.stale_doubt_ids if i in positions)
        engines = await self._engines_agree(timeout)
        nodes = self.state.nodes
        got = await asyncio.gather(*(_tiers_status(a, self.tls) for a in (
            *(n.client for n in nodes),
            *(g.address for g in self.gateways.values() if g.alive))))
        tiers_status = got[[n.id for n in nodes].index(leader.id)]
        self.supervisor_statuses = [st for st in got if st is not None]
        self.supervisors_unread = len(got) - len(self.supervisor_statuses)
        return {"records": records, "_tiers_status": tiers_status, "upto": upto,
                "duplicates": duplicates,
                "acked_lost": len(lost), "lost_examples": [a.position for a in lost[:5]],
                "logs_identical": len(set(hashes.values())) == 1,
                "stale_in_doubt_in_log": stale_doubt_in_log, **engines}

    async def _engines_agree(self, timeout_s: float) -> dict[str, Any]:
        """Waits until every instance has processed the whole input stream and the primary's
        outputs are committed through it, then compares hashes; checks exactly-once."""
        async with StoreClient([n.client for n in self.state.nodes], timeout_s=30,  # type: ignore[union-attr]
                               tls=self.tls) as c:
            tail = await c.read(wire.input_stream(GROUP), backwards=True, limit=1)
            last = tail[0].position if tail else 0
            got: list[xpb.EngineStatus | None] = []

            async def caught_up() -> bool:
                got[:] = [await status_or_none(e.address, 0.5, self.tls)
                           for e in self.engines.values()]
                return all(s is not None and s.input_position >= last for s in got) and any(
                    s is not None and s.role == "primary" and s.committed_input_position
                    >= last for s in got)
            agreed = True
            try:
                await wait_until(caught_up, timeout_s, "engines at the last input", 0.05)
            except TimeoutError as exc:
                agreed = False
                self.rec.note_error(str(exc))
            views = {s.instance: {"role": s.role, "input_position": s.input_position,
                                  "chain_hash": s.chain_hash[:16], "state_hash": s.state_hash[:16],
                                  "alarm": s.alarm} for s in got if s is not None}
            agreed = agreed and len(views) == len(self.engines) and len(
                {(v["input_position"], v["chain_hash"], v["state_hash"]) for v in views.values()}
            ) == 1 and not any(v["alarm"] for v in views.values())
            exactly_once = ""
            try:
                inputs, outputs = await check_exactly_once(c, GROUP)
            except ExactlyOnceViolation as exc:
                exactly_once = str(exc)
                inputs, outputs = [], []
        return {"hashes_agree": agreed and not exactly_once, "engines": views,
                "exactly_once": exactly_once or "ok", "orders_in_log": len(inputs),
                "output_batches": len(outputs)}


def gateway_call_in_doubt(code: grpc.StatusCode, trailing: Mapping[str, str]) -> bool:
    """Whether a failed gateway call may have appended its order: a tier's shed (its
    reason in the trailing metadata) is refused before anything ran; a timeout, or a
    gateway (or its store) gone mid-call, may have appended it."""
    return code == grpc.StatusCode.DEADLINE_EXCEEDED or (
        code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        and MD_SHED_REASON not in trailing)


def _ignore(reason: str) -> None:
    pass


def _trace(event: pb.ProposedEvent) -> None:
    """With tracing enabled, the order carries its PRODUCER span's `traceparent` (set once,
    before the first attempt: a retry must carry the same content)."""
    if not telemetry.tracing():
        return
    with telemetry.tracer().start_as_current_span(
            f"send {wire.input_stream(GROUP)}", kind=SpanKind.PRODUCER):
        md: dict[str, str] = {}
        telemetry.inject(md)
        event.metadata.update(md)


def _producer_span() -> contextlib.AbstractContextManager[Any]:
    """With tracing enabled, a PRODUCER span around a gateway call: its client span, the
    gateway's and the order's input event (traceparent) follow in its trace."""
    if not telemetry.tracing():
        return contextlib.nullcontext()
    return telemetry.tracer().start_as_current_span(f"send {wire.input_stream(GROUP)}",
                                                    kind=SpanKind.PRODUCER)


# ------------------------------------------------------------------------ measurement

def _first(items: list[float]) -> float | None:
    return min(items) if items else None


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


def measure(run: Run, phase: Phase, records: dict[int, pb.RecordedEvent],
            until: float) -> dict[str, Any]:
    """The timings of one phase from what the run recorded and the log read back."""
    rec, t0 = run.rec, phase.t0
    new_term_pos = min((p for p, e in records.items() if e.term > phase.old_term),
                       default=None) if phase.expect_new_term else None
    window = [a for a in rec.acks if t0 < a.t <= until]

    key = [s for s in rec.leader_key if s[0] > t0]
    expiry = _first([t for t, term, _ in key if term != phase.old_term])
    new_term = _first([t for t, term, _ in key if term is not None and term > phase.old_term])
    ekey = [s for s in rec.engine_key if s[0] > t0]
    e_expiry = _first([t for t, _term, holder in ekey if holder != phase.old_engine])
    e_new = _first([t for t, term, holder in ekey if term is not None
                    and holder not in ("", phase.old_engine)])
    ledger_ack = next((a for a in window if a.kind == "ledger"
                       and (new_term_pos is None or a.position >= new_term_pos)), None)
    ledger = ledger_ack.t if ledger_ack is not None else None
    order_ack = run.order_entry_back(phase, new_term_pos, min(until, phase.recovered_at))
    orders = order_ack.t if order_ack is not None else None
    if phase.engine_failover:
        matching = _first([t for t, inst, role, _c, _i, delivered in rec.engine_samples
                           if t > t0 and inst != phase.old_engine and role == "primary"
                           and delivered >= phase.delivered_at_fault])
    elif ledger_ack is not None:
        # The primary has been delivered every input up to the first write of the new
        # term (or, without a new term, the first write after the fault).
        matching = _first([t for t, _inst, role, _c, _i, delivered in rec.engine_samples
                           if t > t0 and role == "primary"
                           and delivered >= ledger_ack.position])
    else:
        matching = None
    market = run.market_data_back(phase, order_ack)
    down = run.down_tiers(phase, min(until, phase.recovered_at))
    tiers = [{"name": n, "recovered_s": _rel(t, t0), "down": n in down}
             for n, t in zip(TIERS, (ledger, matching, orders, market), strict=True)]
    if phase.expect_new_term or phase.engine_failover:
        rto = _rel(matching if phase.engine_failover else ledger, t0)
    else:  # no failover: the longest write stall between the fault and the recovery
        rto = longest_stall(t0, [a.t for a in window if a.kind == "ledger"],
                            phase.recovered_at)
    before = [a.t for a in rec.acks if a.t <= t0 and a.kind == "ledger"]
    gap = round(ledger - max(before), 3) if ledger is not None and before else None
    return {
        "old_term": phase.old_term,
        "new_term": records[new_term_pos].term if new_term_pos is not None else None,
        "lease_expiry_s": _rel(expiry, t0), "new_term_s": _rel(new_term, t0),
        "rto_s": rto, "write_gap_s": gap,
        "engine_lease_expiry_s": _rel(e_expiry, t0), "engine_new_primary_s": _rel(e_new, t0),
        "tiers": tiers,
        # Unknown (None) when some supervisor's status could not be read: a tier it took
        # down would be missing from `down`, and the check would pass by default.
        "tiers_in_order": tiers_in_order(tiers) if not run.supervisors_unread else None,
        "supervisors_unread": run.supervisors_unread,
    }


@dataclass(frozen=True)
class KeyAfterKill:
    """What the drill's own reads of the leader key say became of a killed leader's key
    (seconds from the kill, rounded): `gone_s`, when the first read that found it gone
    (vacant, or another term) was answered (negative: before the kill); `held_s`, when
    the last read that found it still held was sent; `resigned`: whether it was deleted
    by a resignation rather than left to expire (None: unknown)."""

    gone_s: float | None
    held_s: float | None
    resigned: bool | None


def leader_key_after_kill(reads: Iterable[tuple[float, float, int | None]], old_term: int,
                          since: float, kill_at: float, ttl_s: float) -> KeyAfterKill:
    """Judges `reads` ((sent, answered, term) from `since` on) around a SIGKILL of the
    leader of `old_term` at `kill_at`. A resignation deletes the key at once: before the
    kill, or a few ms after it when etcd applies a deletion sent just before. A killed
    leader's key goes only as its lease expires, at least 2/3 of the TTL after the kill
    (the keep-alive refreshes it every TTL/3). Split at TTL/3: found gone by a read
    answered before then is a resignation; found held by a read sent after then is none;
    no read in between (a stalled poller) leaves it unknown."""
    window = ttl_s / 3
    after = [(sent, answered, term) for sent, answered, term in reads if sent >= since]
    gone = next((answered - kill_at for _, answered, term in after if term != old_term), None)
    held = max((sent - kill_at for sent, _, term in after if term == old_term), default=None)
    resigned = (True if gone is not None and gone < window
                else False if held is not None and held >= window else None)
    return KeyAfterKill(None if gone is None else round(gone, 3),
                        None if held is None else round(held, 3), resigned)


def longest_stall(t0: float, ack_times: list[float], recovered_at: float) -> float | None:
    """The longest interval without an acknowledged write from the fault (`t0`) to the
    first acknowledgement at or past the recovery: stalls while the run winds down (a
    restarted etcd member, processes rejoining) are not this fault's. None: no write was
    acknowledged after the fault."""
    if not ack_times:
        return None
    times = [t0]
    for t in sorted(ack_times):
        times.append(t)
        if t >= recovered_at:
            break
    return round(max((b - a for a, b in itertools.pairwise(times)), default=0.0), 3)


def tiers_in_order(tiers: list[dict[str, Any]]) -> bool:
    """Every tier recovered, and every tier that went down came back no earlier than
    every tier below it (DESIGN §6). A tier no supervisor took out of serving never left:
    it resumes with the writes, in whatever order its first request happens to land (a
    planned switchover takes none down)."""
    times = [t["recovered_s"] for t in tiers]
    if any(t is None for t in times):
        return False
    return all(not tier["down"] or all(lower <= tier["recovered_s"] for lower in times[:i])
               for i, tier in enumerate(tiers))


async def _tiers_status(address: str, tls: Tls | None) -> Any:
    """The node's degradation-tier supervisor status (xdc.v1.Tiers/Status), or None when
    the node does not serve it."""
    try:
        async with aio_channel(address, tls, options=channel_options()) as ch:
            return await tiers_pb2_grpc.TiersStub(ch).Status(tiers_pb2.TiersStatusRequest(),
                                                            timeout=2)
    except grpc.aio.AioRpcError:
        return None


def supervisor_tiers(status: Any, phase: Phase) -> list[dict[str, Any]] | None:
    """Per tier, in recovery order, the first change to serving after the fault that the
    final leader's tier supervisor recorded (None: it did not go down, or no record)."""
    if status is None:
        return None
    start = int(phase.t0_wall * 1e9)
    out = []
    for tier in status.tiers:
        back = [t.at_unix_ns for t in status.transitions if t.tier == tier.name
                and t.to_state == "serving" and t.at_unix_ns >= start]
        out.append({"name": tier.name, "recovered_s":
                    round((min(back) - start) / 1e9, 3) if back else None})
    return out


def _refusal_summary(run: Run, phase: Phase) -> dict[str, Any]:
    """Order calls refused or unanswered: counts by status over the run, and the first
    ones after the fault (time from the fault, status, message)."""
    codes = Counter(code for _, code, _ in run.rec.order_refusals)
    after = [(round(t - phase.t0, 3), code, why) for t, code, why in run.rec.order_refusals
             if t > phase.t0]
    return {"by_code": dict(codes), "after_fault": after[:MAX_REPORTED_REFUSALS]}


def _in_doubt_summary(rec: Recorder) -> dict[str, int]:
    out = {"total": len(rec.in_doubt)}
    for d in rec.in_doubt:
        out[d.resolution] = out.get(d.resolution, 0) + 1
    return out


def _first_trace_id(run: Run, phase: Phase, records: dict[int, pb.RecordedEvent],
                    rto_s: float | None) -> str:
    """The trace id of the first order acknowledged after the failover (its stored
    `traceparent`), or "" when orders carry none (tracing disabled)."""
    if rto_s is None:
        return ""
    start = phase.t0 + rto_s
    a = next((a for a in run.rec.acks if a.kind == "order" and a.t >= start), None)
    if a is None:  # acks are in time order: the first one after `start` is the first
        return ""
    e = records.get(a.position)
    tp = e.metadata.get("traceparent", "") if e is not None else ""
    return tp.split("-")[1] if tp.count("-") == 3 else ""


def _timeline(run: Run, phase: Phase, end: float) -> dict[str, Any]:
    """What the HTML chart draws: ack times (relative, bounded) and markers."""
    t0 = phase.t0
    start = t0 - run.opts.before_s

    def rel(kind: str) -> list[float]:
        ts = [round(a.t - t0, 3) for a in run.rec.acks if a.kind == kind and start <= a.t <= end]
        step = max(1, len(ts) // 4000)  # bounded report size
        return ts[::step]
    markers = {k: round(v - t0, 3) for k, v in run.markers.items() if start <= v <= end}
    vacancy = [(round(t - t0, 3), term) for t, term, _ in run.rec.leader_key
               if start <= t <= end]
    step = max(1, len(vacancy) // 2000)
    return {"from_s": round(start - t0, 3), "to_s": round(end - t0, 3),
            "ledger_acks": rel("ledger"), "order_acks": rel("order"),
            "md_deliveries": [round(t - t0, 3) for t, *_ in run.rec.deliveries
                              if start <= t <= end][:4000],
            "leader_key": vacancy[::step], "markers": markers}


# ------------------------------------------------------------------------ drill

def run_once(scenario: str, seed: int, opts: DrillOptions) -> dict[str, Any]:
    """One run on a fresh cluster; everything it started is stopped before it returns."""
    base = opts.base_dir or tempfile.gettempdir()
    Path(base).mkdir(parents=True, exist_ok=True)
    directory = tempfile.mkdtemp(prefix=f"xdc-drill-{scenario}-{seed}-", dir=base)
    run = Run(scenario, seed, opts, directory)
    out: dict[str, Any] = {"scenario": scenario, "seed": seed, "directory": directory}
    wall = time.time()
    try:
        run.start_cluster()
        raw = asyncio.run(run.execute_within(10 * opts.step_timeout_s))
        end = time.monotonic()
        records = raw.pop("records")
        phases: list[Phase] = raw.pop("_phases")
        main = phases[-1]
        m = measure(run, main, records, end)
        out.update({k: m[k] for k in ("rto_s", "lease_expiry_s", "new_term_s", "write_gap_s",
                                      "engine_lease_expiry_s", "engine_new_primary_s",
                                      "tiers", "tiers_in_order", "supervisors_unread",
                                      "old_term", "new_term")})
        out["tiers_supervisor"] = supervisor_tiers(raw.pop("_tiers_status"), main)
        if len(phases) > 1:
            out["failover"] = measure(run, phases[0], records, phases[-1].t0)
        st = run.rec.stale
        tid = _first_trace_id(run, main, records, m["rto_s"])
        out.update({
            "acked_lost": raw.pop("acked_lost"), "duplicates": raw.pop("duplicates"),
            "hashes_agree": raw.pop("hashes_agree"),
            "stale_writes_rejected": st["rejected"],
            "stale": {**st, "in_doubt_in_log": raw.pop("stale_in_doubt_in_log")},
            "in_doubt": _in_doubt_summary(run.rec),
            # Order calls a gateway refused or left unanswered, by status, and when.
            "order_refusals": _refusal_summary(run, main),
            "acked": {k: sum(1 for a in run.rec.acks if a.kind == k)
                      for k in ("ledger", "order", "stale")},
            "trace_ids": {"first_order_after_failover": tid},
            "timeline": _timeline(run, main, end),
            **raw,
        })
        if not tid:
            run.notes.append("no trace id: orders carry no traceparent (tracing disabled; "
                             "set OTEL_TRACES_EXPORTER/OTEL_EXPORTER_OTLP_ENDPOINT)")
        out["ok"] = verdict(out)
    except Exception as exc:
        log.exception("drill run %s seed %d failed", scenario, seed)
        out.update({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        # Whatever else fails, and through an operator's SIGTERM or Ctrl-C (it takes
        # effect once all is stopped, within seconds): every child is in a session of its
        # own, and one this skips outlives the drill with its ports.
        with signals_held():
            for e in (*run.gateways.values(), *run.engines.values()):
                try:
                    e.stop()
                except Exception:
                    log.exception("drill run %s seed %d: stopping %s", scenario, seed, e)
            with contextlib.suppress(Exception):
                launcher.down(directory)
        if not opts.keep and out.get("ok"):
            shutil.rmtree(directory, ignore_errors=True)
    out["notes"] = run.notes
    out["errors"] = run.rec.errors
    out["wall_s"] = round(time.time() - wall, 1)
    return out


def run_drill(scenario: str, runs: int, seed: int, opts: DrillOptions,
              progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")
    results = []
    for i in range(runs):
        r = run_once(scenario, seed + i, opts)
        results.append(r)
        if progress is not None:
            progress(r)
    return results


def verdict(run: dict[str, Any]) -> bool:
    """A run passes when no acknowledged event was lost or duplicated, the replicas' logs
    are identical, the engines agree, no deposed leader acknowledged a write once the
    new term was seen (fencing), and the tiers did not come back out of order (the
    promise of DESIGN §6; unknown, None, does not fail a run); a switchover whose leader
    died before it handed over must have made the new term an election, by etcd's
    handover record and by the drill's own reads of the leader key; a rebuilt region's
    node must have rejoined as a lost disk and become whole (`rejoined`)."""
    lost_handover = run.get("handed_over") is False
    return (run["acked_lost"] == 0 and run["duplicates"] == 0 and bool(run["hashes_agree"])
            and bool(run["logs_identical"]) and run["stale"]["acked_after_new_term"] == 0
            and run.get("tiers_in_order") is not False
            and not (lost_handover and run.get("new_term_began") == "handover")
            and not term_began_contradicts_key(run)
            and run.get("rejoined") is not False)


def term_began_contradicts_key(run: dict[str, Any]) -> bool:
    """Whether the new term calls itself a handover (`new_term_began`) although the drill
    saw the killed leader's key still held a third of a TTL after the kill: nobody
    resigned, its lease expired. The other way round (key gone at once, yet an election)
    is no contradiction: a leader also resigns without handing over when its lease
    renewal falls behind (a stall just before the kill), and a handover record expires
    unused when the target wins late. Unknown (`leader_resigned` None) contradicts
    nothing."""
    return run.get("leader_resigned") is False and run.get("new_term_began") == "handover"


def failed(results: list[dict[str, Any]]) -> bool:
    return any(not r.get("ok") for r in results)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.2f}s"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


def _yes_no(v: Any) -> str:
    return "-" if v is None else "yes" if v else "no"


# Figures of some scenarios only (region-loss, switchover-leader-lost): (header, key,
# format), a column when some run reports the key.
EXTRA_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("rejoin", "rejoin_s", _fmt), ("fence", "fence_term", _fmt),
    ("rejoined", "rejoined", _fmt), ("key gone", "leader_key_gone_after_kill_s", _fmt),
    ("resigned", "leader_resigned", _yes_no))


def extra_columns(results: list[dict[str, Any]]) -> list[tuple[str, str, Callable[[Any], str]]]:
    return [c for c in EXTRA_COLUMNS if any(c[1] in r for r in results)]


def summary_table(results: list[dict[str, Any]]) -> str:
    extra = extra_columns(results)
    head = ["scenario", "seed", "expiry", "new term", "RTO", *TIERS, "in order", "lost",
            "dup", "stale rej", "in doubt", "hashes", *(h for h, _, _ in extra), "ok"]
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append([r["scenario"], str(r["seed"])] + ["-"] * (len(head) - 4)
                        + ["-", "FAILED: " + r["error"][:60]])
            continue
        tiers = {t["name"]: _fmt(t["recovered_s"]) + ("*" if t["down"] else "")
                 for t in r["tiers"]}
        d = r["in_doubt"]
        doubt = f"{d['total']}" + (f" ({d.get('earlier-attempt', 0)}e/{d.get('retry', 0)}r)"
                                   if d["total"] else "")
        rows.append([r["scenario"], str(r["seed"]), _fmt(r["lease_expiry_s"]),
                     _fmt(r["new_term_s"]), _fmt(r["rto_s"]),
                     *(tiers.get(n, "-") for n in TIERS), _fmt(r["tiers_in_order"]),
                     str(r["acked_lost"]),
                     str(r["duplicates"]), str(r["stale_writes_rejected"]), doubt,
                     _fmt(r["hashes_agree"]), *(f(r.get(k)) for _, k, f in extra),
                     "ok" if r["ok"] else "FAILED"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    rtos = sorted(r["rto_s"] for r in results if r.get("rto_s") is not None)
    if rtos:
        lines.append(f"RTO over {len(rtos)} run(s): min {_fmt(rtos[0])}, "
                     f"median {_fmt(rtos[len(rtos) // 2])}, max {_fmt(rtos[-1])}; "
                     f"in doubt: e = an earlier attempt had committed, r = the retry wrote it; "
                     f"tier* = went down (shed, or degraded)")
    rejoins = sorted(r["rejoin_s"] for r in results if r.get("rejoin_s") is not None)
    if rejoins:
        lines.append(f"rejoin (rebuilt node whole again, from its restart) over "
                     f"{len(rejoins)} run(s): min {_fmt(rejoins[0])}, median "
                     f"{_fmt(rejoins[len(rejoins) // 2])}, max {_fmt(rejoins[-1])}")
    return "\n".join(lines)


def write_json(path: str, scenario: str, seed: int, opts: DrillOptions,
               results: list[dict[str, Any]]) -> None:
    doc = {"drill": scenario, "seed": seed, "options": asdict(opts),
           "ok": not failed(results), "runs": results}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str))


def cmd_drill(args: argparse.Namespace) -> int:
    from geo.drill_report import write_html

    level = (logging.DEBUG if os.environ.get("XDC_LOG") == "debug"
             else logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    opts = DrillOptions(rtt_ms=args.rtt_ms, ttl_s=args.lease_ttl, producers=args.producers,
                        quick=args.quick, keep=args.keep, base_dir=args.dir)

    def progress(r: dict[str, Any]) -> None:
        state = "ok" if r.get("ok") else "FAILED " + r.get("error", "")
        rejoin = (f", rejoin {_fmt(r.get('rejoin_s'))} (fence term {r.get('fence_term')})"
                  if "rejoin_s" in r else "")
        print(f"drill {r['scenario']} seed {r['seed']}: rto {_fmt(r.get('rto_s'))}{rejoin}, "
              f"lost {r.get('acked_lost', '-')}, {state} ({r['wall_s']}s)", flush=True)
    results = run_drill(args.scenario, args.runs, args.seed, opts, progress)
    print(summary_table(results))
    if args.json:
        write_json(args.json, args.scenario, args.seed, opts, results)
        print(f"JSON: {args.json}")
    if args.html:
        write_html(args.html, args.scenario, args.seed, results)
        print(f"HTML: {args.html}")
    return 1 if failed(results) else 0


def _up_option(flag: str, keyword: str, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type for an option every run passes to `launcher.up`: checked by its
    `check_up_options` rule when the command line is parsed, not as each run fails."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:
            launcher.check_up_options(**{keyword: value})
        except launcher.BadOption as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag} ")) from None
        return value
    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drill", help="DR drill against a fresh local multi-region cluster "
                                     "under load: measured RTO, RPO, tiers, hashes")
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--runs", type=at_least(1), default=1, help="1 or more")
    p.add_argument("--seed", type=int, default=1, help="run i uses seed S+i")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--rtt-ms", type=_up_option("--rtt-ms", "rtt_ms", float), default=30.0,
                   help="injected RTT between regions (0 or more)")
    p.add_argument("--lease-ttl", type=_up_option("--lease-ttl", "ttl_s", int), default=2,
                   help=f"etcd lease TTL, seconds (at least {launcher.MIN_LEASE_TTL_S})")
    p.add_argument("--producers", type=at_least(1), default=4,
                   help="ledger producers (1 or more)")
    p.add_argument("--quick", action="store_true", help="shorter load windows")
    p.add_argument("--keep", action="store_true", help="keep every run's directory (logs)")
    p.add_argument("--dir", help="parent of the run directories (default: the temp dir)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    p.set_defaults(func=cmd_drill)
