"""A clustered store node (`xdc node run`): the store, the replicator thread, the peer
transport and the etcd election loop of DESIGN §4, in one process.

Election: while the leader key is held, followers wait for it to change. When it is
vacant, a voter (in manual failover mode only a promoted one) asks the reachable voters
for their log tips and defers to a more up-to-date one (Patroni's pre-check), then
tries the guarded etcd transaction; the term base plus the key's create_revision is its
term (geo/leadership.py). The
replication machine then runs the promise/recovery step and opens for writes once its
term-start record commits. A leader whose lease cannot be renewed in time steps down
before the lease can expire; safety comes from terms and promises, not from the lease.
An etcd that lost its data (or a new one under old logs: `xdc cluster up` on an old
directory) grants revisions, so terms, from 1 again: a candidate whose term is at or
below what the voters promised is refused (SteppedDown 'stale term', 'higher term', or
TERM_TAKEN when a voter promised that very term to another node) and campaigns again.
A candidate that wins a term not above its own promise or the other voters' (as their
pre-check Tip answers tell) gives it back at once and raises the term base to them
(Leadership.raise_term_base: one guarded etcd write while the seat is vacant, however
far the promises are ahead), so the next term is above every promise.

Lost disks: before it serves anything, a member records in etcd that it joined
(`/<cluster>/members/<id>`), then marks its data directory with the cluster's name. A
voter starting on an unmarked, empty directory while etcd says it joined before, and a
leader was ever elected (or another voter promised a term: etcd may have lost its record
of the leader), lost its disk (replaced disk, rebuilt region): it may have promised and
acknowledged things it no longer holds. It starts rejoining (geo/replication/core.py,
"Wiped voters"): it asks the other voters for their promised terms (the pre-check's Tip
RPC) and waits, serving nothing but its status (role "fencing", naming the voters it
waits for: geo/fence_wait.py), until n - quorum + 1 of them answered (n voters); with
the mark it then persists promised_term = rejoin_term = F = max(etcd's revision, their
promises) + 1, then catches up from the leader without voting, campaigning or counting
for commit, and votes again once it holds a committed record of a term >= F. etcd's
revision alone is above every term granted only while etcd keeps its data; the other
voters' promises bound every term in which a leader can have counted an acknowledgement
of the lost disk, whatever etcd did (the argument is in core's docstring). While it
waits, SIGTERM and SIGINT stop it at once (nothing was written). Any other unmarked
member is new (a brand new cluster's first start, or a member added later): it never
promised or acknowledged anything, so it is a plain voter. "A leader was ever elected"
alone would not do (a cluster started one node at a time elects its first leader before
the others start), nor "a peer holds records" (same, one election later). An etcd that
lost its data lost the members' records too: every running node records again, every
MEMBERSHIP_CHECK_S, itself and every member it heard from (each passed this check, so it
joined); a disk lost before that (or while nobody that heard from its node runs) is taken
for a new member.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from geo import fence_wait
from geo import tiers as tiers_mod
from geo.config import ClusterConfig, ConfigError, etcd_access, load_tls
from geo.leadership import Leadership, LeadershipError, member_info
from geo.replication.core import (
    REJOIN_FENCE,
    TERM_TAKEN,
    Node,
    Role,
    fence_answers,
    should_campaign,
)
from geo.replication.messages import (
    Committed,
    Effect,
    LeaderKnown,
    LeaderOpen,
    Promise,
    Rejoined,
    Send,
    SteppedDown,
    Tip,
)
from geo.replicator import PARK_MAX_S, Replicator, term_began, term_start_record, term_stream
from geo.tier_supervisor import Reading, TierSupervisor
from geo.tracing import FailoverClock, ReplicationObserver
from geo.transport import (
    CHANNEL_OPTIONS,
    PeerSender,
    ReplicationService,
    SwitchoverError,
    auth_rules,
)
from store import auth
from store.commit import CommitTracker
from store.errors import StoreError, node_failed
from store.limits import Limits
from store.log import Log
from store.node import StoreNode
from store.server import StoreServer
from store.service import AUTH_RULES
from store.writer import Results
from xdc import telemetry
from xdc.tls import aio_channel
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc

log = logging.getLogger("xdc.node")
T = TypeVar("T")

TICK_S = 0.05
# A reachable, more up-to-date voter is deferred to at most this many times in a row,
# in case it cannot reach etcd itself.
MAX_DEFERRALS = 5
# A voter on an unmarked data directory asks etcd whether it is new or lost its disk for
# at most this long, then gives up with an error: it cannot serve safely without knowing.
LOST_DISK_CHECK_S = 60.0
TIP_TIMEOUT_S = 0.5
# A switchover target must have been heard from this recently (it answers every
# heartbeat, each tick): a dead one's stale acknowledgement is no proof it can lead.
SWITCHOVER_HEARD_S = 1.0
# A switchover's designation older than this fraction of its lease when the target has
# caught up is written again before the leader resigns: what is left of it must outlast
# the resignation and the target's campaign (a long catch-up outlived the first one).
DESIGNATION_RENEW_AFTER = 0.5
# A rejoining node logs its catch-up at most this often.
REJOIN_LOG_EVERY_S = 5.0
# A voter that lost its disk asks the other voters for their promises again after this
# long, doubling up to the second value, and says whom it waits for at least this often.
FENCE_RETRY_S = (0.1, 2.0)
FENCE_LOG_EVERY_S = 10.0
# How often a running node checks that etcd still records the members it knows joined.
MEMBERSHIP_CHECK_S = 5.0


class ClusterNode:
    def __init__(self, config: ClusterConfig, member_id: str, data_dir: str | None = None,
                 *, limits: Limits | None = None, routes: dict[str, str] | None = None,
                 tick_s: float = TICK_S, tiers: tiers_mod.TierSpec | None = None) -> None:
        self.config = config
        self.member = config.member(member_id)
        self.id = member_id
        data = data_dir or (str(self.member.data_dir) if self.member.data_dir else None)
        if data is None:
            raise ValueError(f"member {member_id}: no data directory (config data_dir or --data)")
        self.routes = {m.id: (routes or {}).get(m.id, m.peer) for m in config.members
                       if m.id != member_id}
        self.tick_s = tick_s
        self.store = StoreNode(data, limits, node_id=member_id,
                               client_address=self.member.client)
        # This member's certificate on both ports and to its peers (ConfigError when
        # unusable, before anything binds).
        self.tls = load_tls(config, member_id)
        self.replicator: Replicator | None = None
        self.server: StoreServer | None = None
        self.senders: dict[str, PeerSender] = {}
        self.leadership = Leadership(
            list(config.etcd.endpoints), config.cluster, member_id, member_info(self.member),
            config.lease_ttl_s, on_lost=self._lease_lost,
            default_failover=config.failover, access=etcd_access(config))
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._failed = asyncio.Event()
        self._stopping = False
        # After losing its quorum a node lets the others campaign first: it is likely the
        # one cut off, and still reaching etcd it would take the seat back in vain.
        self._campaign_after = 0.0
        # The highest term the other voters had promised at the last pre-check (or after
        # a rejoining voter's fence deposed us: _retake_seat): a won term not above it (or
        # our own promise) is given back at once (_elections).
        self._peers_promised = 0
        # Until then (monotonic) a planned switchover is under way: see _tier_reading.
        self._planned_until = 0.0
        # The target of the switchover this leader is handing over to, while it does: the
        # step-down's own resignation records the handover too (geo/leadership.py).
        self._handing_over_to: str | None = None
        self._followed_term = 0  # the last term this node followed (or led) an open leader in
        self._began = (0, "")  # (term, how it began) once this node's log has its start record
        # (term, monotonic time) of the first Promise received for the highest term a
        # successor asked this node to promise: see _tier_reading.
        self._asked: tuple[int, float] = (0, 0.0)
        # Replication spans and lag metrics, failover timings (geo/tracing.py).
        self.observer = ReplicationObserver(
            member_id, lambda: self.store.log.last_position if self.store.log else 0,
            lambda: self.store.role.name == "leader")
        self.failover = FailoverClock(member_id)
        # Degradation tiers (DESIGN §6), loaded and checked here so that a bad tier file
        # stops the node before it binds anything (ConfigError).
        self.tiers = tiers or tiers_mod.load(config.tiers_file)
        self.supervisor = TierSupervisor(self.tiers, self._tier_reading, node_id=member_id)
        # Client principals and grants, checked here too for the same reason.
        try:
            self.auth = auth.load(config.auth_file) if config.auth_file else None
        except auth.AuthConfigError as exc:
            raise ConfigError(config.source, [("auth_file", str(exc))]) from None
        # The member token this node presents to its peers (a cluster without TLS).
        self.peer_token = ""
        if config.peer_token_file is not None:
            try:
                self.peer_token = config.peer_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(config.source, [("peer_token_file", str(exc))]) from None
            if not self.peer_token:
                raise ConfigError(config.source, [("peer_token_file",
                                                   f"{config.peer_token_file} is empty")])
        self._heard: dict[str, float] = {}  # peer -> monotonic time of its last message
        # A voter that lost its disk and has not caught up (core's rejoin): set from the
        # log at start, cleared by the machine's Rejoined effect.
        self._rejoining = False
        self._rejoin_logged = 0.0

    # ---- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        voters = [m.id for m in self.config.voters]
        standbys = [m.id for m in self.config.standbys]
        try:
            await self._check_data_dir()
        except BaseException:
            await self.leadership.close()
            raise

        def make(log_: Log, loop: asyncio.AbstractEventLoop) -> Replicator:
            self._rejoining = bool(log_.rejoin_term)
            return Replicator(log_, self.store.limits, loop, node_id=self.id, voters=voters,
                              standbys=standbys, on_effects=self._on_effects,
                              leader_address=self._client_address)

        def add_replication(server: grpc.aio.Server) -> None:
            self.replicator = self.store.writer  # type: ignore[assignment]
            assert isinstance(self.replicator, Replicator)
            rpb_grpc.add_ReplicationServicer_to_server(ReplicationService(
                self.config.cluster, self.id, {m.id for m in self.config.members},
                self._deliver, self._tip, self.status, self.switchover,
                observe=self.observer.observe, secure=self.tls is not None), server)
            self.supervisor.add_services(server)

        self.server = StoreServer(self.store, self.member.client, writer_factory=make,
                                  extra_listen=[self.member.peer],
                                  add_services=add_replication,
                                  interceptors=self.supervisor.interceptors, tls=self.tls,
                                  auth=self.auth,
                                  auth_rules={**auth_rules(self.tls is not None),
                                              **self.supervisor.auth_rules})
        await self.server.start()
        self.store.role.name = self._follower_role()
        for peer, address in self.routes.items():
            sender = PeerSender(self.config.cluster, self.id, peer, address, self.tls,
                                self.peer_token)
            sender.start()
            self.senders[peer] = sender
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._ticker()), loop.create_task(self._elections()),
                       loop.create_task(self._keep_membership())]
        self.observer.start()
        await self.supervisor.start(self.server)

    async def stop(self) -> None:
        self._stopping = True
        await self.supervisor.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.replicator is not None:
            self.replicator.step_down("node stopping")
        with contextlib.suppress(Exception):
            await self.leadership.resign()
        for s in self.senders.values():
            await s.stop()
        if self.server is not None:
            await self.server.stop(grace_s=1.0)
        await self.leadership.close()
        self.observer.stop()
        self.failover.stop()

    @property
    def address(self) -> str:
        return self.member.client

    def _follower_role(self) -> str:
        if not self.member.voter:
            return "standby"
        return "rejoining" if self._rejoining else "follower"

    # ---- lost disks -----------------------------------------------------------------

    async def _check_data_dir(self) -> None:
        """Marks the data directory as this cluster's, and starts a voter whose directory
        lost its former content rejoining (module docstring). Runs before anything is
        served, on a log opened only for this."""
        loop = asyncio.get_running_loop()
        data = self.store.data_dir
        log_ = await loop.run_in_executor(None, lambda: Log(data, node_id=self.id))
        try:
            if log_.cluster and log_.cluster != self.config.cluster:
                raise ConfigError(self.config.source, [(
                    f"member {self.id}: data_dir",
                    f"{data} holds a log of cluster {log_.cluster!r}, not "
                    f"{self.config.cluster!r}: refusing to mix them")])
            owner = log_.node_id
            if (log_.cluster and owner != self.id
                    and any(m.id == owner for m in self.config.members)):
                # A copy of another member's directory (a region rebuilt from a healthy
                # replica's disk): its promises and acknowledgements are that member's,
                # and this member's own are lost: voting with them is the lost-disk
                # hazard, undetected (the directory is neither empty nor unmarked).
                raise ConfigError(self.config.source, [(
                    f"member {self.id}: data_dir",
                    f"{data} holds member {owner!r}'s log, not {self.id!r}'s: start it on "
                    f"an empty directory instead (it rejoins as a lost disk and copies the "
                    f"log from the leader)")])
            if log_.cluster:
                if log_.rejoin_term:
                    log.warning("%s: still rejoining after a lost disk (fenced at term %d, "
                                "commit %d): it does not vote until it holds a committed "
                                "record of term >= %d", self.id, log_.rejoin_term,
                                log_.commit_position, log_.rejoin_term)
                return
            fence = 0
            if self.member.voter:  # a standby never votes: it just catches up
                known = await self._etcd_at_start(self.leadership.membership)
                # (A log with records but no mark is older than marks: it is whole.)
                if known.joined and log_.last_position == 0:
                    # Joined before: if anything was ever promised, the disk was lost.
                    # "Ever led" may be gone with etcd's data; the promises may not.
                    promised = await self._fence_promises()
                    if known.ever_led or promised:
                        fence = max(known.revision, promised) + 1
                if not known.joined:  # before the mark: a marked directory is on record
                    await self._etcd_at_start(self.leadership.join)
            with log_.write() as txn:
                log_.set_meta(txn, cluster=self.config.cluster)
                if fence:
                    # Promised to nobody known: the first Promise or Append of that term
                    # binds it (core rule 1).
                    log_.set_meta(txn, promised_term=fence, promised_to="", rejoin_term=fence)
            if fence:
                log.warning(
                    "%s: LOST DISK: %s holds no log of cluster %r, which this member had "
                    "joined; rejoining: fenced at term %d (above etcd's revision and the "
                    "other voters' promises: no leader that may have counted this node's "
                    "lost acknowledgements can use it), catching up from the leader "
                    "without voting; it votes again once it holds a committed record of "
                    "term >= %d", self.id, data, self.config.cluster, fence, fence)
            else:
                log.info("%s: joined cluster %r (%s)", self.id, self.config.cluster, data)
        finally:
            log_.close()

    async def _fence_promises(self) -> int:
        """The highest term promised by n - quorum + 1 of the other voters (n voters: both
        others of 3, 3 of the 4 others of 5), asked with the Tip RPC until that many
        answered, the answers of every round counted (promises only grow). Why that many: core's
        docstring, "Wiped voters". Waits as long as it takes, saying whom it waits for:
        with fewer of them reachable nothing can commit anyway. Meanwhile the client port
        answers Status with that (role "fencing") and refuses everything else
        (geo/fence_wait.py): nothing is voted, acknowledged or served. SIGTERM and SIGINT
        stop the process meanwhile (_stop_on_signals): nothing was written yet."""
        others = [m.id for m in self.config.voters if m.id != self.id]
        wait = fence_wait.FenceWait(self.id, self.member.region, others,
                                    min(len(others), fence_answers(len(self.config.voters))))
        loop = asyncio.get_running_loop()
        delay, logged, said = FENCE_RETRY_S[0], -math.inf, None
        log.warning("%s: LOST DISK? the data directory is empty and unmarked, and this "
                    "member joined before: asking the other voters for their promised "
                    "terms (%d of %s needed) before it can be fenced", self.id, wait.needed,
                    ", ".join(others))
        with self._stop_on_signals():
            async with self._serving_fence_wait(wait):
                while True:
                    for peer, r in (await self._peer_tips()).items():
                        # A node answering for another (a wrong route) is not counted, nor
                        # a promise below the answerer's own last term: a node too old to
                        # report its promise answers 0.
                        if r is None or r.node_id != peer or r.promised_term < r.last_term:
                            continue
                        wait.answered[peer] = max(wait.answered.get(peer, 0), r.promised_term)
                    if wait.done:
                        promised = max(wait.answered.values(), default=0)
                        log.info("%s: promised terms of the other voters: %s (highest %d)",
                                 self.id, wait.answered, promised)
                        return promised
                    now = loop.time()
                    if (sorted(wait.answered), wait.missing) != said \
                            or now - logged >= FENCE_LOG_EVERY_S:
                        said, logged = (sorted(wait.answered), wait.missing), now
                        log.warning("%s: LOST DISK: waiting for the promised terms of %d more "
                                    "of the other voters before it can be fenced; answered: "
                                    "%s; waiting for: %s (unreachable or not serving)",
                                    self.id, wait.needed - len(wait.answered),
                                    ", ".join(sorted(wait.answered)) or "none",
                                    ", ".join(wait.missing))
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, FENCE_RETRY_S[1])

    def _serving_fence_wait(self, wait: fence_wait.FenceWait
                            ) -> contextlib.AbstractAsyncContextManager[None]:
        """The client port while `wait` lasts (geo/fence_wait.py), with this node's TLS
        and, with an auth file, the same rules as its server's."""
        secure = self.tls is not None
        guard = (auth.Guard(self.auth, {**AUTH_RULES, **auth_rules(secure),
                                        **self.supervisor.auth_rules})
                 if self.auth is not None else None)
        return fence_wait.serving(wait, address=self.member.client, cluster=self.config.cluster,
                                  members={m.id for m in self.config.members}, tls=self.tls,
                                  limits=self.store.limits, guard=guard)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """During a start-up wait: SIGTERM and SIGINT end the process at once (SystemExit,
        status 0), nothing having been served. `xdc node run` (run_until_signalled) takes
        them only once start() returned; its handler still runs too (the previous Python
        handler is called, and asyncio's wake-up fd is untouched). Only in the main thread,
        and only for a signal that has a Python handler (SIG_DFL ends the process anyway)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        got: list[int] = []
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous = {sig: h for sig, h in previous.items() if callable(h)}

        waiting = [True]

        def cancel() -> None:  # on the loop, like the end of the wait: no race with it
            if waiting[0] and task is not None:
                task.cancel()

        def on_signal(signum: int, frame: Any) -> None:
            got.append(signum)
            loop.call_soon_threadsafe(cancel)
            previous[signal.Signals(signum)](signum, frame)

        for sig in previous:
            signal.signal(sig, on_signal)
        try:
            yield
        except asyncio.CancelledError:
            if not got:
                raise
        finally:
            # A cancel still queued must not land on the caller's next await (start()'s
            # clean-up awaits, which then ended in CancelledError, not SystemExit(0)).
            waiting[0] = False
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if got:  # also when it came as the wait ended: its cancel would land later
            log.warning("%s: stopped by signal %d while waiting to be fenced: nothing "
                        "was written or served", self.id, got[0])
            raise SystemExit(0)

    async def _keep_membership(self) -> None:
        """Records again in etcd (`members/<id>`) that this node, and every member it
        heard from, joined, when etcd lost that (its data): a later start of one of them on
        an empty directory is then known for a lost disk, not taken for a new member."""
        while not self._stopping:
            infos = {m.id: member_info(m) for m in self.config.members
                     if m.id == self.id or m.id in self._heard}
            with contextlib.suppress(LeadershipError):
                recorded = await self.leadership.record_members(infos)
                if recorded:
                    # A standby's first start is one (only voters record when they join).
                    log.info("%s: etcd had no record that %s joined (a standby's first "
                             "start, or etcd lost its data, or a new etcd runs under the "
                             "old logs): recorded", self.id, ", ".join(recorded))
            await asyncio.sleep(MEMBERSHIP_CHECK_S)

    async def _etcd_at_start(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, retried while etcd does not answer, for at most LOST_DISK_CHECK_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOST_DISK_CHECK_S
        while True:
            try:
                return await call()
            except LeadershipError as exc:
                if loop.time() > deadline:
                    raise ConfigError(self.config.source, [("etcd.endpoints", (
                        f"unreachable for {LOST_DISK_CHECK_S:g}s ({exc}): member {self.id} "
                        "starts on an unmarked data directory and cannot tell a new member "
                        "from one that lost its disk without etcd"))]) from None
                log.warning("%s: unmarked data directory: waiting for etcd to tell a new "
                            "member from a lost disk: %s", self.id, exc)
                await asyncio.sleep(0.5)

    # ---- inputs to the machine ----------------------------------------------------

    async def _ticker(self) -> None:
        assert self.replicator is not None
        while True:
            await asyncio.sleep(self.tick_s)
            self.replicator.tick()

    def _deliver(self, msgs: list[Any]) -> None:
        # Who spoke to us lately: the leader's quorum for the tier supervisor. One
        # delivery is one PeerBatch, whose messages all come from its sender
        # (ReplicationService.Stream drops any other).
        if msgs:
            now = time.monotonic()
            self._heard[msgs[0].src] = now
            for m in msgs:
                if type(m) is Promise and m.term > self._asked[0]:
                    self._asked = (m.term, now)
        assert self.replicator is not None
        self.replicator.deliver(msgs)

    def _park(self, planned: bool) -> None:
        """Holds appends for up to PARK_MAX_S: this node is about to lead (it won the key,
        or a switchover designated it). A planned switchover's window is also read by
        the tiers as planned, not as a failover (_tier_reading)."""
        assert self.replicator is not None
        until = time.monotonic() + PARK_MAX_S
        self.replicator.park_until = until
        if planned:
            self._planned_until = until

    def _unpark(self) -> None:
        if self.replicator is not None:
            self.replicator.park_until = 0.0

    async def _tier_reading(self) -> Reading:
        """What the tier supervisor observes (geo/tiers.py): an open leader, a voter
        majority, the writer queue and the commit lag."""
        assert self.replicator is not None and self.store.writer is not None
        st = await self.replicator.query(Node.status)
        limits = self.replicator.core.limits
        now = time.monotonic()
        # Peers answer a leader every tick; twice the check-quorum window of silence
        # means gone (the machine itself steps down after one window).
        window_s = 2 * limits.check_quorum_ticks * self.tick_s
        voters = {m.id for m in self.config.voters}
        if st.role == Role.FOLLOWER:
            recent = st.ticks_since_leader <= 2 * limits.check_quorum_ticks
            if st.leader is not None and st.leader != self.id:
                self._followed_term = st.term
                leader_ok = recent
            else:
                # A successor is recovering its term (it asked for our promise) while the
                # leader we followed spoke recently: a handover, not (yet) a failover, for
                # PARK_MAX_S from its request at most (README, "Degradation tiers"). The
                # bound matters: 'recent' alone kept the tiers admitted for up to a second
                # after the old leader's last message, and a node whose own term never
                # opened (nobody asked it for that promise) admitted them again when it
                # gave the term up, while cut off.
                asked_term, asked_at = self._asked
                leader_ok = (recent and st.term == asked_term > self._followed_term > 0
                             and now - asked_at < PARK_MAX_S)
            # A follower cannot count the others; it knows it lacks a majority only when
            # it just stepped down for that reason (it then waits before campaigning).
            quorum = leader_ok or now >= self._campaign_after
        else:
            leader_ok = st.role == Role.LEADER and st.open
            if leader_ok:
                self._followed_term = st.term
            heard = sum(1 for p in voters - {self.id} if now - self._heard.get(p, -1e9)
                        <= window_s)
            quorum = heard + 1 >= self.config.quorum
        # A planned handover is not a failover: for its short window (the target holds
        # the appends, the old leader redirects to it) the tiers stay admitted, so a
        # switchover sheds nothing. Past PARK_MAX_S it counts as one.
        planned = now < self._planned_until
        return Reading(failover=not (leader_ok or planned), quorum=quorum or planned,
                       pending_events=self.store.writer.pending_events,
                       max_pending_events=self.store.limits.max_pending_events,
                       commit_lag=max(0, st.last_position - st.commit),
                       term=st.term, commit_position=st.commit,
                       term_began=self._term_began(st.term))

    def _term_began(self, term: int) -> str:
        """How `term` began (geo.replicator.term_began) by its start record in this node's
        log; "" until the record is here. One read per observation until then."""
        if self._began[0] != term:
            log_ = self.store.log
            found = (log_.read_stream(term_stream(term).encode(), 1, 1, log_.last_position)
                     if log_ is not None and term > 0 else [])
            if not found:
                return ""
            self._began = (term, term_began(found[0]))
        return self._began[1]

    def _lease_lost(self, reason: str) -> None:
        """Called by Leadership (any thread) before the lease can expire."""
        loop = self.store_loop
        loop.call_soon_threadsafe(self._step_down_now, f"lease: {reason}")

    def _past_lease(self, commit: CommitTracker) -> None:
        """A leader whose lease may have expired (its deadline passed: the loop ran late,
        the process was paused) answers no append any more: a newer term may exist, and
        an acknowledgement now would come from a deposed leader (DESIGN §4, fencing).
        What it holds is committed (a quorum has it, and a newer leader recovers it), but
        its clients are told the outcome is unknown: a retry with the same ids finds it.
        The step-down that the keep-alive thread asked for may still be queued."""
        commit.fail_waiters(StoreError(
            grpc.StatusCode.UNAVAILABLE,
            f"leadership of term {self.store.role.term} lapsed (its lease deadline passed) "
            "before the append was answered: its outcome is unknown, retry with the same "
            "event ids", retry_after_ms=200))
        self._step_down_now("lease: deadline passed")

    def _step_down_now(self, reason: str) -> None:
        if self.replicator is not None and not self._stopping:
            self.replicator.step_down(reason)

    @property
    def store_loop(self) -> asyncio.AbstractEventLoop:
        assert self.replicator is not None
        return self.replicator.loop

    # ---- elections ----------------------------------------------------------------

    async def _elections(self) -> None:
        deferrals = 0
        # Set when this node, designated, saw the seat vacated: it campaigns at once,
        # without reading the seat again (the campaign's guard checks the designation).
        handover = False
        while not self._stopping:
            try:
                if self.leadership.is_leader:
                    await asyncio.sleep(self.tick_s)
                    continue
                if handover:
                    current, designation = None, self.id
                else:
                    current, designation = await self.leadership.seat()
                handover = False
                if current is not None:
                    info, term = current
                    self.failover.leader_seen(term, won=False)
                    self.store.role.leader = info.get("client", "")
                    if self._rejoining:
                        await self._log_rejoin_progress()
                    target = (designation == self.id and self.member.voter
                              and not self._rejoining)
                    # A switchover to this node is under way: hold the appends the old
                    # leader sends over, and have the campaign's lease ready.
                    if target:
                        self._park(planned=True)
                        with contextlib.suppress(LeadershipError):  # campaign grants then
                            await self.leadership.prepare_campaign()
                    else:
                        self._unpark()
                    await self.leadership.wait_change(term, timeout_s=self.config.lease_ttl_s)
                    handover = target and self.leadership.vacancy_seen
                    continue
                self.failover.vacant()
                designated = self.member.voter and designation == self.id
                if (not self.member.voter or self._rejoining
                        or time.monotonic() < self._campaign_after
                        or not await self._may_campaign(designation)):
                    await self.leadership.wait_change(None, timeout_s=self.tick_s * 4)
                    continue
                # A designated target skips the pre-check (round trips to every voter):
                # the old leader handed over only once it held everything appended.
                if not designated and not await self._precheck() \
                        and deferrals < MAX_DEFERRALS:
                    deferrals += 1
                    await asyncio.sleep(self.tick_s * 2)
                    continue
                deferrals = 0
                term = await self.leadership.campaign(designated)
                if term is None:
                    continue
                floor = max(self.store.log.promised_term if self.store.log else 0,
                            self._peers_promised)
                if term <= floor:
                    # etcd counts revisions, so terms, from 1 again: it lost its data, or
                    # a new one runs under the old logs. The voters would refuse this term
                    # (core rule 1): give the key back and raise the term base to every
                    # promise known, so that the next campaign's term is above them.
                    log.warning("%s: won term %d but terms up to %d were promised before: "
                                "etcd lost its data, or a new etcd runs under the old logs; "
                                "raising the term base to %d", self.id, term, floor, floor)
                    await self.leadership.resign(term)
                    await self.leadership.raise_term_base(floor)
                    continue
                self.failover.leader_seen(term, won=True)
                log.info("%s: won the leader key, term %d", self.id, term)
                self.store.role.name = "candidate"
                self.store.role.term = term
                # A handover only if the old leader resigned handing the seat to this
                # node: designated alone, it may have died while this node caught up.
                planned = self.leadership.handed_over
                if designated and not planned:
                    log.warning("%s: designated, but the leader of the switchover did not "
                                "hand over (lost before this node caught up): a failover",
                                self.id)
                self._park(planned=planned)
                assert self.replicator is not None
                self.replicator.become_leader(term, term_start_record(
                    term, self.id, time.time_ns(), planned=planned))
            except (LeadershipError, grpc.aio.AioRpcError, OSError) as exc:
                log.warning("%s: election loop: %s", self.id, exc)
                await asyncio.sleep(self.tick_s * 4)

    async def _may_campaign(self, designated: str | None) -> bool:
        if designated is not None:
            return designated == self.id
        if await self.leadership.failover_mode() == "manual":
            promoted = await self.leadership.promoted()
            if promoted is not None:
                return promoted == self.id
            # A cluster that never had a leader elects its first one on its own, and the
            # last leader takes its seat back after losing only its lease (an etcd stall,
            # a paused process): no leader was replaced, so no operator is needed. A dead
            # one cannot: replacing it is the operator's promotion.
            last = await self.leadership.last_leader()  # one read for both rules
            return last is None or last.get("id") == self.id
        return True

    async def _precheck(self) -> bool:
        """Patroni-style: defer to a reachable voter with a more up-to-date log (not to
        a rejoining one: it does not campaign)."""
        assert self.replicator is not None
        own = Tip(self.store.log.last_term if self.store.log else 0,
                  self.store.log.last_position if self.store.log else 0)
        tips = await self._peer_tips()
        self._peers_promised = _highest_promise(tips)
        peers = {p: Tip(r.last_term, r.last_position) if r is not None and not r.rejoining
                 else None for p, r in tips.items()}
        return should_campaign(own, peers)

    async def _peer_tips(self) -> dict[str, rpb.TipResponse | None]:
        """What every other voter holds (None: unreachable), asked in parallel."""
        tips: dict[str, rpb.TipResponse | None] = {}

        async def ask(peer: str, address: str) -> None:
            try:
                async with aio_channel(address, self.tls, options=CHANNEL_OPTIONS,
                                       interceptors=telemetry.client_interceptors(),
                                       server_name=peer) as ch:
                    tips[peer] = await rpb_grpc.ReplicationStub(ch).Tip(
                        rpb.TipRequest(cluster=self.config.cluster, src=self.id),
                        timeout=TIP_TIMEOUT_S, metadata=auth.bearer(self.peer_token))
            except grpc.aio.AioRpcError:
                tips[peer] = None

        voters = {m.id for m in self.config.voters}
        await asyncio.gather(*(ask(p, a) for p, a in self.routes.items() if p in voters))
        return tips

    def _tip(self) -> rpb.TipResponse:
        log_ = self.store.log
        assert log_ is not None
        return rpb.TipResponse(node_id=self.id, last_term=log_.last_term,
                               last_position=log_.last_position,
                               promised_term=log_.promised_term,
                               commit_position=self.store.commit.position if self.store.commit
                               else 0, role=self.store.role.name, rejoining=self._rejoining)

    # ---- effects from the machine (loop thread) -------------------------------------

    def _client_address(self, node_id: str | None) -> str:
        if node_id is None:
            # The machine knows no leader (e.g. cut off from it): the one etcd names.
            seen = self.store.role.leader
            return seen if seen != self.member.client else ""
        with contextlib.suppress(KeyError):
            return self.config.member(node_id).client
        return ""

    def _on_effects(self, effects: list[Effect],
                    answers: list[tuple[asyncio.Future[Results], Results]]) -> None:
        commit = self.store.commit
        assert commit is not None
        if log.isEnabledFor(logging.DEBUG):
            for e in effects:
                if not isinstance(e, Send) or type(e.msg).__name__ != "Append" or e.msg.entries:
                    log.debug("%s: %s", self.id, e)
        for e in effects:
            if isinstance(e, Send):
                trace_context = self.observer.on_send(e.msg)
                sender = self.senders.get(e.msg.dst)
                if sender is not None:
                    sender.send(e.msg, trace_context)
            elif isinstance(e, Committed):
                if self.store.role.name == "leader" and not self.leadership.is_leader:
                    self._past_lease(commit)
                commit.advance(e.upto)
            elif isinstance(e, LeaderOpen):
                log.info("%s: leader of term %d, open at %d", self.id, e.term, e.start_position)
                self.store.role.name = "leader"
                self.store.role.term = e.term
                self.store.role.leader = self.member.client
                self.failover.opened(e.term)
                self._set_writes_health(True)
            elif isinstance(e, SteppedDown):
                log.warning("%s: stepped down from term %d: %s", self.id, e.term, e.reason)
                if e.reason == TERM_TAKEN:
                    # No wait before campaigning again: a won term not above the voters'
                    # promises raises the term base past them (_elections).
                    log.warning("%s: term %d was granted before, to another node: etcd "
                                "lost its data, or a new etcd runs under the old logs "
                                "(`xdc cluster up` on an old directory); or a voter's log "
                                "predates promised_to (once, after an upgrade); campaigning "
                                "again", self.id, e.term)
                self._unpark()
                self.store.role.name = self._follower_role()
                self._set_writes_health(False)
                self.observer.reset(f"stepped down: {e.reason}")
                if not self._stopping:
                    self.failover.lost(e.reason)
                if "quorum" in e.reason or "recovery" in e.reason:
                    self._campaign_after = time.monotonic() + 2 * self.config.lease_ttl_s
                commit.fail_waiters(StoreError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"leadership of term {e.term} lost ({e.reason}) before the append "
                    "committed: its outcome is unknown, retry with the same event ids",
                    retry_after_ms=200))
                self._background(self._retake_seat(e.term) if e.reason == REJOIN_FENCE
                                 and not self._stopping else
                                 self._resign_quietly(e.term, self._handing_over_to))
            elif isinstance(e, LeaderKnown):
                self.store.role.term = e.term
                self.store.role.leader = self._client_address(e.leader)
            elif isinstance(e, Rejoined):
                log.warning("%s: REJOINED: holds the committed log up to %d (term %d): a "
                            "voter again (votes, counts for commit, may lead)", self.id,
                            e.position, e.term)
                self._rejoining = False
                if self.store.role.name == "rejoining":
                    self.store.role.name = self._follower_role()
        for fut, results in answers:
            if not fut.done():
                fut.set_result(results)
        if self.replicator is not None and self.replicator.fatal is not None \
                and not self._failed.is_set():
            # A disk or invariant failure: the writer is gone, so this node can neither
            # lead nor follow. Appends waiting for commit are answered, and the process
            # exits (xdc node run) to restart from its durable state.
            log.error("%s: replicator failed: %r", self.id, self.replicator.fatal)
            self.store.commit.fail_waiters(node_failed(self.replicator.fatal, self.id))
            self._failed.set()
            self._set_writes_health(False)
            self._background(self._resign_quietly())

    def _set_writes_health(self, serving: bool) -> None:
        """`xdc.v1.EventStore.writes`: SERVING on the open leader only (load balancers
        and probes send writes by it)."""
        if self.server is not None:
            self._background(self.server.health.set(
                "xdc.v1.EventStore.writes", health_pb2.HealthCheckResponse.SERVING if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING))

    @property
    def failure(self) -> BaseException | None:
        return self.replicator.fatal if self.replicator is not None else None

    async def wait_failed(self) -> None:
        await self._failed.wait()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _resign_quietly(self, term: int | None = None,
                              handover_to: str | None = None) -> None:
        """Gives up the lease of ``term`` (None: whatever is held), never a newer term's:
        a step-down from an older term may be handled after the node won another.
        ``handover_to``: as Leadership.resign."""
        with contextlib.suppress(Exception):
            await self.leadership.resign(term, handover_to)

    async def _retake_seat(self, term: int) -> None:
        """A voter back from a lost disk fenced our term (its promise is above every term
        granted before it came back). No other leader was elected: designate ourselves
        (a switchover to self), then resign, so that we campaign again at once, in manual
        failover mode too, and lead in a new term it accepts. A designated campaign skips
        the pre-check: the voters' promises (the fence among them) are read here instead,
        so that a won term not above the fence is given back and the term base raised past
        it at once (_elections), not one refused campaign per two revisions (after etcd
        lost its data the fence can be far above etcd's revision)."""
        with contextlib.suppress(Exception):
            self._peers_promised = max(self._peers_promised,
                                       _highest_promise(await self._peer_tips()))
        with contextlib.suppress(Exception):
            await self.leadership.designate(self.id, designation_ttl_s(self.config.lease_ttl_s))
        # Handed over to itself: no leader was lost, so its next term is a handover (the
        # tiers' planned window), not a failover.
        await self._resign_quietly(term, handover_to=self.id)

    # ---- status -------------------------------------------------------------------

    async def status(self) -> rpb.NodeStatus:
        assert self.replicator is not None
        st = await self.replicator.query(Node.status)
        role = str(st.role)
        if role == "follower":
            role = "rejoining" if st.rejoining else self._follower_role()
        return rpb.NodeStatus(
            node_id=self.id, region=self.member.region, role=role, open=st.open,
            term=st.term, promised_term=st.promised_term, commit_position=st.commit,
            last_position=st.last_position, durable_position=st.durable_position,
            leader=st.leader or "", voter=self.member.voter, rejoin_term=st.rejoin_term,
            leader_commit=st.leader_commit,
            peers=[rpb.PeerProgress(node_id=p, voter=ps.voter, match=ps.match, lag=ps.lag,
                                    in_sync=ps.in_sync, rejoining=ps.rejoining,
                                    connected=self.senders[p].connected
                                    if p in self.senders else False)
                   for p, ps in sorted(st.peers.items())])

    async def _log_rejoin_progress(self) -> None:
        now = time.monotonic()
        if now - self._rejoin_logged < REJOIN_LOG_EVERY_S or self.replicator is None:
            return
        self._rejoin_logged = now
        st = await self.replicator.query(Node.status)
        if st.rejoining:
            log.warning("%s: rejoining: holds %d of the leader's committed %d (fenced at "
                        "term %d; not voting yet)", self.id, st.commit,
                        st.leader_commit, st.rejoin_term)

    async def switchover(self, target: str, timeout_s: float) -> rpb.SwitchoverResponse:
        """Planned handover to `target`: designate it in etcd (so nobody else campaigns),
        stop taking writes (they are redirected to the target), wait until everything this
        leader appended is committed and held by the target, then step down and resign.
        The target, designated, campaigns at once and has the whole log. The designation
        has a lease of its own (designation_ttl_s): a catch-up that took more than
        DESIGNATION_RENEW_AFTER of it writes it again before the resignation, so that it
        stands while the seat is vacant. A failed or cancelled switchover clears it, once
        its write has ended (_undo_designation)."""
        assert self.replicator is not None and self.store.commit is not None
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        standby = next((m for m in self.config.members if m.id == target and not m.voter), None)
        if standby is not None:  # it cannot campaign: the seat would stay vacant
            raise SwitchoverError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"switchover to {target} refused: it is a standby "
                                  "(non-voter) and cannot lead")
        if self.store.role.name != "leader" or target == self.id:
            raise SwitchoverError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"{self.id} is not the open leader, or is the target "
                                  f"(leader: {self.store.role.leader or 'unknown'})")
        # The designation is written while the target catches up (both take round
        # trips); it must stand at the resignation below, not before the wait.
        ttl_s = designation_ttl_s(self.config.lease_ttl_s)
        designated_at = time.monotonic()  # its lease ends no earlier than this + ttl_s
        designation = asyncio.ensure_future(self.leadership.designate(target, ttl_s))
        self.replicator.redirect_to = target
        try:
            while True:
                st = await self.replicator.query(Node.status)
                peer = st.peers.get(target)
                # Heard from lately too: a dead target's last acknowledgement still
                # matches when nothing was written since, and it would never campaign.
                silent = time.monotonic() - self._heard.get(target, -math.inf)
                if st.commit == st.last_position and peer is not None \
                        and peer.match == st.last_position and silent < SWITCHOVER_HEARD_S:
                    break
                if loop.time() > deadline:
                    raise SwitchoverError(
                        grpc.StatusCode.DEADLINE_EXCEEDED if silent < SWITCHOVER_HEARD_S
                        else grpc.StatusCode.UNAVAILABLE,
                        f"{target} did not catch up within {timeout_s}s (match "
                        f"{peer.match if peer else 0}, last {st.last_position}"
                        + (f"; not heard from for {silent:.1f} s" if silent >= SWITCHOVER_HEARD_S
                           else "") + f"): {self.id} keeps leading")
                await asyncio.sleep(0.002)
            caught_up = time.perf_counter()
            try:
                # Shielded: cancelled, its etcd call would go on in a thread and could
                # land after the clean-up below deleted the designation.
                await asyncio.shield(designation)
                if time.monotonic() - designated_at > DESIGNATION_RENEW_AFTER * ttl_s:
                    # The catch-up took much of the designation's lease (the target was
                    # cut off, or far behind): it could expire before the target
                    # campaigns, and every voter would then campaign for the seat this
                    # leader vacates. Written again with a fresh lease; a quick
                    # switchover (the common case) makes no extra round trip.
                    log.info("%s: switchover to %s: the target caught up %.1f s after its "
                             "designation (lease %d s): designating it again", self.id,
                             target, time.monotonic() - designated_at, ttl_s)
                    designation = asyncio.ensure_future(
                        self.leadership.designate(target, ttl_s))
                    await asyncio.shield(designation)
            except LeadershipError as exc:
                raise SwitchoverError(grpc.StatusCode.UNAVAILABLE,
                                      f"{target} could not be designated in etcd ({exc}): "
                                      f"{self.id} keeps leading") from exc
            designated = time.perf_counter()
            handover = st.last_position
            self._planned_until = time.monotonic() + PARK_MAX_S
            self._handing_over_to = target
            try:
                self.replicator.step_down(f"switchover to {target}")
                await self.leadership.resign(handover_to=target)
            finally:
                self._handing_over_to = None
            log.info("%s: switchover to %s: caught up at %d after %.0f ms, designated "
                     "%.0f ms later, resigned in %.0f ms", self.id, target, handover,
                     (caught_up - t0) * 1e3, (designated - caught_up) * 1e3,
                     (time.perf_counter() - designated) * 1e3)
            while True:
                current = await self.leadership.current()
                if current is not None and current[0].get("id") == target:
                    break
                if loop.time() > deadline:
                    raise SwitchoverError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          f"{target} did not take the leader key in time: "
                                          f"{self.id} takes the seat back")
                await self.leadership.wait_change(current[1] if current else None,
                                                  timeout_s=max(0.01, deadline - loop.time()))
        except BaseException as exc:
            # A vacant seat the target did not take is this node's again: it won the key
            # last (_may_campaign), in manual failover mode too.
            if await self._undo_designation(designation, target) \
                    and not isinstance(exc, asyncio.CancelledError):
                raise asyncio.CancelledError() from exc
            raise
        finally:
            self.replicator.redirect_to = None
        return rpb.SwitchoverResponse(new_leader=target, new_term=current[1],
                                      took_us=int((time.perf_counter() - t0) * 1e6),
                                      handover_position=handover)

    async def _undo_designation(self, designation: asyncio.Future[None], target: str) -> bool:
        """Clears a failed switchover's designation once its write has ended. Neither etcd
        call is cancelled with the switchover, nor waited for less because it was
        cancelled (again) meanwhile: each goes on in a thread, and a designation written
        after the clearing would outlive the failed switchover for its whole lease. Both
        are bounded by the etcd client's timeout. A clearing that fails is logged, not
        raised: the switchover's own error is what its caller must learn (the designation
        then ends with its lease). Returns whether the caller was cancelled meanwhile."""
        interrupted = await _outlast(designation)
        clearing = asyncio.ensure_future(self.leadership.clear_designation())
        interrupted = await _outlast(clearing) or interrupted
        if not clearing.cancelled() and clearing.exception() is not None:
            log.warning("%s: switchover to %s failed and its designation could not be "
                        "cleared (it ends with its lease, %d s at most): %s", self.id,
                        target, designation_ttl_s(self.config.lease_ttl_s),
                        clearing.exception())
        return interrupted


async def _outlast(fut: asyncio.Future[Any]) -> bool:
    """Waits until `fut` is done, however often the caller is cancelled meanwhile, and
    never cancels it; its outcome is left in it (an exception counts as retrieved).
    Returns whether the caller was cancelled meanwhile."""
    interrupted = False
    while not fut.done():
        try:
            await asyncio.wait((fut,))
        except asyncio.CancelledError:
            interrupted = True
    if not fut.cancelled():
        fut.exception()
    return interrupted


def designation_ttl_s(lease_ttl_s: int) -> int:
    """The lease of a switchover's designation: twice the leader lease's TTL (at least
    2 s), time for the old leader to resign and the target to campaign."""
    return max(2, 2 * lease_ttl_s)


def _highest_promise(tips: dict[str, rpb.TipResponse | None]) -> int:
    """The highest term the voters that answered a Tip had promised (0: none answered)."""
    return max((r.promised_term for r in tips.values() if r is not None), default=0)
