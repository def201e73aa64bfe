"""etcd leadership for the store nodes (DESIGN §4: leases, terms, fencing).

One `Leadership` object per node. It talks to etcd through the blocking `etcd3` client
(the python3-etcd3 fork); every etcd call runs in this object's own thread pool, so the
asyncio API below never blocks the event loop, and every call carries a timeout, so an
unreachable etcd gives a `LeadershipError` instead of a hang.

Keys, all under ``/<cluster>/``::

    leader       JSON of `info`, attached to the leader's lease, plus "term_base" when
                 the base is not 0. The term is term_base + the key's create_revision:
                 unique and increasing across all elections.
    term_base    an integer added to create_revisions to make terms (absent: 0). Raised
                 only while the seat is vacant (`raise_term_base`), by a candidate that
                 won a term the voters had promised already: etcd lost its data and counts
                 revisions from 1 again. One write, however far the promises are ahead.
    last_leader  JSON of the last winner's `info` (no lease): "has this cluster ever had
                 a leader" survives the leader key. Written in the winning transaction.
    designated   node id of a planned switchover target, attached to its own lease.
    handover     node id the last leader handed over to, on a lease of its own (twice
                 the TTL): written with the deletion of the leader key when a switchover's
                 leader resigns, read and deleted by the next winning campaign. It tells
                 a handover from a failover during a switchover (the designation is
                 written before the target catches up, so a leader that died then leaves
                 one too).
    promoted     node id an operator promoted (`xdc cluster promote`) while the seat
                 was vacant, attached to its own lease (it expires unused).
    failover     "manual" or "automatic": a runtime override of the config's mode.
    members/<id> JSON of `info` (no lease): the member has joined (geo/node.py, lost disks).

API (all coroutines run their etcd calls in threads; `LeadershipError` on etcd failure)::

    lead = Leadership(endpoints, cluster, node_id, info, ttl_s, on_lost=cb,
                      clock=time.monotonic, timeout_s=1.0, safety_margin_s=None,
                      default_failover="manual", access=EtcdAccess(tls, user, password))
    term = await lead.campaign()        # int (the term) if this node won, else None
    await lead.prepare_campaign()       # grant the next campaign's lease ahead of time
    lead.is_leader                      # bool, also checks the deadline on `clock`
    lead.term                           # the term while leader, else None
    lead.deadline()                     # monotonic time the leader must stop by, or None
    lead.last_refresh_sent()            # send time of the last successful refresh/grant
    lead.watching                       # number of wait_change watches in place
    await lead.resign()                 # revoke the lease: the key vanishes at once
    await lead.resign(handover_to=id)   # the same, recording a switchover's handover
    lead.handed_over                    # the last won campaign followed a handover to us
    await lead.current()                # (info, term) of the leader now, or None
    await lead.wait_change(known_term, timeout_s)   # True on change, False on timeout
    lead.vacancy_seen                   # the last wait_change ended on a vacant seat
    await lead.designate(node_id, ttl_s) / clear_designation() / designated()
    await lead.promote(node_id, ttl_s) / clear_promotion() / promoted()  # seat vacant only
    await lead.set_failover_mode(mode) / failover_mode()
    await lead.seat_view()              # SeatView: holder, mode, pending promotion and
                                        # designation with their leases' seconds left
    await lead.ever_led()               # True once any node has won the key
    await lead.last_leader()            # the info of the node that won it last, or None
    await lead.membership()             # Membership: joined before, ever led, revision
    await lead.raise_term_base(floor)   # the next term is above `floor` (seat vacant)
    await lead.join()                   # record that this node joined (members/<id>)
    await lead.record_members(infos)    # record members/<id> of each missing one
    await lead.close()                  # stop threads and clients (does not revoke)
    lead._pause_keepalive() / _resume_keepalive()   # tests: freeze as SIGSTOP would

Security: `access` carries the TLS files (https, a client certificate) and the etcd user
and password of a cluster whose etcd runs with authentication (geo/etcd_server.py). The
password is exchanged for a token on first use; a token etcd no longer accepts (it
expires after --auth-token-ttl of disuse, or with an etcd restart) is replaced and the
call retried once, so an idle client never fails for it.

Campaign: a lease of `ttl_s` is granted, then one transaction guarded by
``create_revision(leader) == 0`` puts the key attached to the lease, writes `last_leader`,
consumes any pending promotion and designation (deletes them: each authorises one
election) and reads the key back; the term is the base plus the key's create_revision.
The guard also holds the term base the candidate knows (the value written with the key): a
base raised meanwhile fails it, and the campaign tries again with the new one. A lost race
revokes the unused lease and returns None. A failed or cancelled campaign revokes its
lease too, so an unknown outcome never leaves a leader nobody knows about.
`prepare_campaign()` grants that lease ahead of time (a switchover's target does, as soon
as it reads its designation): the campaign then is the transaction alone. A prepared
lease older than SPARE_MAX_AGE_FRACTION x TTL is revoked and a fresh one granted; the
term's deadline counts from the prepared lease's send time, as for any grant.

Keep-alive: a dedicated thread per term refreshes the lease every ttl/3 on `clock`, each
refresh sent to every etcd endpoint at once (the first answer counts), so that a dead,
partitioned or leaderless member does not use up the deadline. The
lease's server-side expiry is at least (send time of the last successful refresh) + TTL,
so the leader's deadline is that send time + ttl - safety margin. When no refresh has
succeeded by the deadline (etcd paused, partitioned, restarting, or a refresh reports
the lease gone) `on_lost(reason)` is called exactly once, from the keep-alive thread,
`is_leader` is already False by then, and the thread keeps trying to revoke the dead
lease for a while (so the seat frees as soon as etcd answers again). `is_leader` also
compares the deadline with `clock()` itself, so it turns False on time even if the
keep-alive thread is starved. `resign()` is voluntary and does not call `on_lost`.

wait_change(known_term, timeout_s): returns True as soon as the leader key no longer
matches `known_term` (None = vacant): deleted, or created again with another term; or
when one of the control keys (designated, promoted, failover) changes, so a follower
that may not campaign re-evaluates. It returns at once when the state already differs.
It watches the prefix from the revision it read (no missed event), and also re-reads
every `poll_s` in case the watch stream broke (the fork's watcher can die silently when
etcd restarts). False on timeout; etcd errors during the wait just end in a timeout.
`vacancy_seen` then says whether what it saw last was a vacant seat (a delete of the
key, or a read finding none): an election loop may campaign at once instead of reading
the seat again (the campaign's guarded transaction decides anyway).

Switchover and manual failover (policy lives in the node; these are the primitives):
  - Planned switchover: the operator `designate(target, ttl_s)`s, then the leader
    resigns. While a designation exists, nodes other than the target must not campaign
    (`designated()`); the target campaigns and its winning transaction consumes the
    designation. If the target never manages, the designation expires with its lease and
    normal elections resume. The leader resigns with `resign(handover_to=target)` once
    the target holds everything: only then is the target's term a handover
    (`handed_over`); a leader lost during the catch-up makes it a failover.
  - Manual failover: `failover_mode()` is the `failover` key when set, else
    `default_failover` (pass the config's `failover`). In manual mode a node campaigns
    only when `promoted()` names it (or, for a cluster's very first election, when
    `ever_led()` is False, or when `last_leader()` is its own: a leader that lost only its
    lease takes its seat back). The winning transaction consumes the promotion, so a
    second loss of leadership again waits for an operator.
The caller checks these rules before `campaign()`; the campaign transaction also
refuses while a designation names another node (a designation written between the
caller's check and its campaign must not lose the race). A promotion written in that
window can still lose one race: it costs availability for a moment, never safety
(terms and promises fence the log).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import etcd3
import grpc
from etcd3 import events as etcd_events
from etcd3 import watch as etcd_watch
from etcd3.etcdrpc import rpc_pb2 as etcdrpc

from geo.etcd_server import EtcdTls

__all__ = ["FAILOVER_MODES", "EtcdAccess", "Leadership", "LeadershipError", "Pending",
           "SeatView"]

log = logging.getLogger("xdc.leadership")

T = TypeVar("T")

FAILOVER_MODES = ("manual", "automatic")

# The safety margin: the leader gives up at (send time of its last successful refresh)
# + TTL - margin, measured on its own monotonic clock. Why send time + TTL is the
# earliest the lease can expire: etcd restarts the TTL when its leader *processes* the
# keep-alive (or the grant), which is after we sent it; a TTL below etcd's minimum is
# raised, never lowered; an etcd leader change or restart extends every lease by a full
# TTL; and etcd's lessor notices expiry only on its next periodic check (every 500 ms),
# so the key is deleted at or after the expiry. All of these only lengthen the lease.
# What can shorten it, as seen on our clock, and what the margin pays for:
#   - clock rate drift between this host's monotonic clock and the etcd leader's:
#     NTP slews at most 500 ppm; we budget 1 % of the TTL, twenty times that;
#   - our reaction time: on_lost runs on the keep-alive thread, and the node must still
#     hop to its event loop and stop acknowledging; scheduler delays and GC stalls of
#     this process between the check and the act: 100 ms.
# The lease is a liveness signal only; safety comes from terms and promises (DESIGN §4),
# so the margin bounds how long a stale leader *believes* it leads, nothing more.
REACTION_S = 0.1
# A lease granted ahead for a campaign (prepare_campaign) is used only this young (as a
# fraction of the TTL): its deadline counts from its grant, so an older one would leave
# the new term little time before its first refresh.
SPARE_MAX_AGE_FRACTION = 0.25
DRIFT_FRACTION = 0.01

# How often the keep-alive retries a refresh that failed fast (connection refused while
# etcd restarts); a slow failure is bounded by the RPC timeout instead.
RETRY_S = 0.05
# How long after an involuntary loss the keep-alive thread keeps trying to revoke the
# dead lease (in TTLs): etcd extends leases by a TTL when it restarts.
REVOKE_AFTER_LOSS_TTLS = 3

# Fast reconnects after an etcd restart: gRPC's default backoff starts at 1 s and grows
# to 120 s, which would outlast any lease.
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]

# python3-etcd3 0.13.0 still calls `six.itervalues` when a watch stream ends (etcd
# restarted, client closed) but no longer imports six: the watcher thread dies with a
# NameError and its callbacks never hear of the error. Give it the one function it uses.
if not hasattr(etcd_watch, "six"):
    etcd_watch.six = types.SimpleNamespace(  # type: ignore[attr-defined]
        itervalues=lambda d: iter(d.values()))

_ETCD_ERRORS = (etcd3.Etcd3Exception, grpc.RpcError, ValueError)


class LeadershipError(RuntimeError):
    """etcd could not be reached or answered an error; the operation's outcome is known
    to have failed unless the message says otherwise."""


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd: `tls` (None: plaintext), and `user` with `password` when etcd
    runs with authentication (needs TLS: a password never crosses in plaintext)."""

    tls: EtcdTls | None = None
    user: str = ""
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.user and self.tls is None:
            raise ValueError("etcd user and password need TLS to etcd")


class _Token(grpc.AuthMetadataPlugin):
    """The etcd auth token on every call of a client (the watcher's too): obtained with
    the password on first use, replaced when etcd refuses it."""

    def __init__(self, access: EtcdAccess, endpoint: Any, timeout_s: float) -> None:
        self.access = access
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.value = ""
        self._lock = threading.Lock()

    def __call__(self, context: Any, callback: Any) -> None:
        callback((("token", self.value),) if self.value else (), None)

    def refresh(self) -> None:
        # A stub without call credentials: authenticating needs no token.
        stub = etcd3.etcdrpc.AuthStub(self.endpoint.channel)
        with self._lock:
            resp = stub.Authenticate(etcdrpc.AuthenticateRequest(
                name=self.access.user, password=self.access.password), timeout=self.timeout_s)
            self.value = resp.token

    def ensure(self) -> None:
        if not self.value:
            self.refresh()


def _stale_token(exc: BaseException) -> bool:
    text = _describe(exc)
    return "invalid auth token" in text or "user name is empty" in text


def _split(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


class _Etcd:
    """One blocking etcd3 client per endpoint; calls go to the current endpoint and move
    to the next one after a connection failure (the caller retries). The fork marks an
    endpoint failed for `time_retry` seconds after an error and then refuses to use it;
    time_retry=0 turns that off, rotation is done here."""

    def __init__(self, endpoints: list[str], timeout_s: float,
                 access: EtcdAccess | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        access = access or EtcdAccess()
        self.endpoints = list(endpoints)
        self.clients = []
        self.tokens: list[_Token | None] = []
        creds = access.tls.channel_credentials() if access.tls is not None else None
        for ep in self.endpoints:
            host, port = _split(ep)
            endpoint = etcd3.Endpoint(host, port, secure=creds is not None, creds=creds,
                                      time_retry=0, opts=_GRPC_OPTIONS)  # type: ignore[arg-type]
            client = etcd3.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=timeout_s)
            token = _Token(access, endpoint, timeout_s) if access.user else None
            if token is not None:
                # Authenticated lazily (an unreachable etcd must not fail construction)
                # and renewed; the fork would authenticate once, at construction.
                client.call_credentials = grpc.metadata_call_credentials(token)
                client.metadata = None
            self.clients.append(client)
            self.tokens.append(token)
        self._index = 0
        self._lock = threading.Lock()

    def call(self, what: str, fn: Callable[[Any], T]) -> T:
        with self._lock:
            i = self._index
        try:
            return self.call_at(i, what, fn)
        except LeadershipError:
            if len(self.clients) > 1:
                with self._lock:
                    if self._index == i:
                        self._index = (i + 1) % len(self.clients)
            raise

    def call_at(self, i: int, what: str, fn: Callable[[Any], T]) -> T:
        """``fn`` on endpoint ``i``'s client, whatever the current endpoint."""
        token = self.tokens[i]
        try:
            if token is None:
                return fn(self.clients[i])
            token.ensure()
            try:
                return fn(self.clients[i])
            except grpc.RpcError as exc:
                if not _stale_token(exc):
                    raise
                token.refresh()
                return fn(self.clients[i])
        except _ETCD_ERRORS as exc:
            raise LeadershipError(f"etcd {self.endpoints[i]}: {what}: {_describe(exc)}") from exc

    def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else ""
        return f"{getattr(code, 'name', code)} {details}".strip()
    return str(exc) or type(exc).__name__


@dataclass(eq=False)
class _Term:
    """One won election: its lease and keep-alive state (guarded by Leadership._lock)."""

    term: int
    lease_id: int
    ttl_s: float  # min(requested, granted): conservative
    last_ok_send: float
    deadline: float
    lost: bool = False
    resigned: bool = False
    revoked: bool = False
    reason: str = ""
    refreshes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    running: threading.Event = field(default_factory=threading.Event)  # clear = frozen
    thread: threading.Thread | None = None
    # The leader key's create_revision (the term less the term base): what a guard on
    # the key compares.
    create_revision: int = 0

    @property
    def active(self) -> bool:
        return not (self.lost or self.resigned)


@dataclass(frozen=True)
class _Snapshot:
    term: int | None
    info: bytes | None
    controls: dict[str, int]  # control key -> mod_revision
    revision: int


@dataclass(frozen=True)
class Pending:
    """A control key an operator (or a switchover) wrote and no election consumed yet:
    the node it names and the seconds its lease has left (etcd's TTL, rounded down)."""

    node: str
    expires_in_s: int


@dataclass(frozen=True)
class SeatView:
    """The leader seat as an operator sees it (`seat_view()`): who holds it, the failover
    mode in force, and any pending promotion or switchover designation."""

    leader: tuple[dict[str, str], int] | None  # (info, term), None when vacant
    failover: str
    promoted: Pending | None
    designated: Pending | None


@dataclass(slots=True, frozen=True)
class Membership:
    joined: bool  # this node recorded itself under members/ before
    ever_led: bool  # some node has won the leader key
    # etcd's revision after both reads plus the term base: every term granted so far is
    # at most this (a term is the base plus a create_revision), every later one above it.
    revision: int


class Leadership:
    """Leader election on ``/<cluster>/leader`` (see the module docstring)."""

    def __init__(self, endpoints: list[str], cluster: str, node_id: str, info: dict[str, str],
                 ttl_s: int, *, on_lost: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, timeout_s: float = 1.0,
                 safety_margin_s: float | None = None, default_failover: str = "manual",
                 poll_s: float = 0.5, access: EtcdAccess | None = None) -> None:
        if ttl_s < 1 or int(ttl_s) != ttl_s:
            raise ValueError(f"ttl_s must be a whole number of seconds >= 1, not {ttl_s!r}")
        if default_failover not in FAILOVER_MODES:
            raise ValueError(f"failover mode must be one of {FAILOVER_MODES}")
        self.cluster = cluster
        self.node_id = node_id
        self.info = dict(info)
        self.ttl_s = int(ttl_s)
        self.on_lost = on_lost
        self.clock = clock
        self.timeout_s = timeout_s
        self.safety_margin_s = (REACTION_S + DRIFT_FRACTION * self.ttl_s
                                if safety_margin_s is None else safety_margin_s)
        if not 0 <= self.safety_margin_s < self.ttl_s:
            raise ValueError("safety margin must be in [0, ttl_s)")
        self.default_failover = default_failover
        self.poll_s = poll_s
        self.prefix = f"/{cluster}/"
        self.leader_key = self.prefix + "leader"
        self.last_key = self.prefix + "last_leader"
        self.designated_key = self.prefix + "designated"
        self.handover_key = self.prefix + "handover"
        self.base_key = self.prefix + "term_base"
        self.promoted_key = self.prefix + "promoted"
        self.failover_key = self.prefix + "failover"
        self.member_key = self.prefix + "members/" + node_id
        self._controls = (self.designated_key, self.promoted_key, self.failover_key)
        self._value = json.dumps(self.info, sort_keys=True)
        self._etcd = _Etcd(endpoints, timeout_s, access)
        # Separate connections: a failing call on one never tears down the keep-alive
        # or a watch on another (the fork drops a client's watcher on any error).
        self._ka_etcd = _Etcd(endpoints, timeout_s, access)
        self._watch_etcd = _Etcd(endpoints, timeout_s, access)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix=f"xdc-etcd-{node_id}")
        self._lock = threading.Lock()
        # One resignation at a time: two at once (a step-down's and a switchover's) let
        # the plain one revoke the lease, so delete the key, under the other's handover
        # transaction, whose guard then failed: the handover went unrecorded.
        self._resigning = threading.Lock()
        self._term: _Term | None = None
        # (lease, send time of its grant): granted ahead for the next campaign.
        self._spare: tuple[Any, float] | None = None
        self._closed = threading.Event()
        self.watching = 0  # active wait_change watches (diagnostics and tests)
        self.vacancy_seen = False
        # The last won campaign found the handover key naming this node.
        self.handed_over = False
        # The term base as last read (campaigns guard on it; a wrong one costs a retry).
        self._base = 0

    # ---- state --------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        t = self._term
        return t is not None and t.active and self.clock() < t.deadline

    @property
    def term(self) -> int | None:
        t = self._term
        return t.term if t is not None and self.is_leader else None

    def deadline(self) -> float | None:
        """Monotonic time (on `clock`) by which this leader stops unless a refresh
        succeeds; None when not leading."""
        t = self._term
        return t.deadline if t is not None and t.active else None

    def last_refresh_sent(self) -> float | None:
        """Send time of the last successful refresh (or of the grant) of the current or
        last term; None before any win."""
        t = self._term
        return t.last_ok_send if t is not None else None

    # ---- plumbing -----------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed.is_set():
            raise LeadershipError("leadership is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    # ---- campaign -----------------------------------------------------------------

    async def campaign(self, designated: bool = False) -> int | None:
        """Try once to take the leader key. Returns the term if this node won (the
        keep-alive then runs), None if another node holds the key. `designated`: this
        node read itself named as a switchover's target, so the transaction that
        expects that designation goes first (one etcd round trip saved)."""
        loop = asyncio.get_running_loop()
        if self._closed.is_set():
            raise LeadershipError("leadership is closed")
        fut = loop.run_in_executor(self._pool, self._campaign_sync, designated)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The transaction may still win after our caller gave up: resign then.
            def undo(f: asyncio.Future[int | None]) -> None:
                if not f.cancelled() and f.exception() is None and f.result() is not None:
                    with contextlib.suppress(RuntimeError):
                        self._pool.submit(self._resign_quietly)
            fut.add_done_callback(undo)
            raise

    def _campaign_sync(self, designated: bool = False) -> int | None:
        with self._lock:
            t = self._term
            if t is not None and t.active and self.clock() < t.deadline:
                return t.term
        tx = self._etcd.clients[0].transactions
        lease, sent = self._take_spare() or self._grant()
        seen = [tx.get(self.leader_key), tx.get(self.designated_key), tx.get(self.base_key)]
        try:
            for _ in range(3):  # the term base was raised meanwhile: again, with it
                base = self._base
                value = self._leader_value(base)
                success = [tx.put(self.leader_key, value, lease.id),
                           tx.put(self.last_key, value),
                           tx.delete(self.promoted_key),
                           tx.delete(self.designated_key),
                           tx.get(self.handover_key),
                           tx.delete(self.handover_key),
                           tx.get(self.leader_key)]
                # The designation is part of the guard, not only of the caller's check:
                # when a leader designates and resigns, every other candidate wakes at
                # that moment and one that read "no designation" just before would
                # otherwise win. Two guards, the one this node expects first
                # (`designated`: one etcd round trip when it holds); the other only when
                # the first failed on the designation alone. Both hold the base whose
                # sum with the key's create_revision is the term.
                same_base = self._base_guard(tx, base)
                undesignated = [tx.create(self.leader_key) == 0,
                                tx.version(self.designated_key) == 0, same_base]
                as_designated = [tx.create(self.leader_key) == 0,
                                 tx.value(self.designated_key) == self.node_id, same_base]
                guards = ([as_designated, undesignated] if designated
                          else [undesignated, as_designated])
                for compare in guards:
                    ok, responses = self._etcd.call(
                        "campaign", lambda c, compare=compare, success=success:
                        c.transaction(compare=compare, success=success, failure=seen))
                    if ok or responses[0]:
                        break  # won, or the seat is taken
                    self._base = _base_of(responses[2])
                    holder = responses[1][0][0] if responses[1] else None
                    if self._base != base or holder not in (None, self.node_id.encode()):
                        break  # another base, or another node is designated
                if ok or responses[0] or self._base == base:
                    break
        except LeadershipError:
            self._revoke_quietly(lease.id)  # the outcome is unknown: undo it
            raise
        if not ok:
            self._revoke_quietly(lease.id)
            return None
        kvs = responses[-1]
        if not kvs or kvs[0][1].lease_id != lease.id:  # cannot happen inside one txn
            self._revoke_quietly(lease.id)
            raise LeadershipError("campaign: leader key not held after a winning transaction")
        term = base + int(kvs[0][1].create_revision)
        handover = responses[-3]
        self.handed_over = bool(handover) and handover[0][0] == self.node_id.encode()
        ttl = float(min(self.ttl_s, lease.ttl or self.ttl_s))
        deadline = sent + ttl - self.safety_margin_s
        if self.clock() >= deadline:
            self._revoke_quietly(lease.id)
            raise LeadershipError(f"campaign took longer than the lease allows (term {term} "
                                  "given up at once)")
        t = _Term(term, lease.id, ttl, sent, deadline)
        t.create_revision = int(kvs[0][1].create_revision)
        t.running.set()
        t.thread = threading.Thread(target=self._keepalive, args=(t,), daemon=True,
                                    name=f"xdc-keepalive-{self.node_id}-{term}")
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._term = t
        if closed:
            self._revoke_quietly(lease.id)
            raise LeadershipError("leadership is closed")
        t.thread.start()
        log.info("%s: leader of term %d (lease %x, ttl %s s)", self.node_id, term, lease.id, ttl)
        return term

    def _leader_value(self, base: int) -> str:
        """The leader key's value for a campaign under term base `base`."""
        if not base:
            return self._value
        return json.dumps({**self.info, "term_base": str(base)}, sort_keys=True)

    def _base_guard(self, tx: Any, base: int) -> Any:
        """The compare that holds while the term base is `base` (0: no key)."""
        return tx.value(self.base_key) == str(base) if base else tx.version(self.base_key) == 0

    def _grant(self) -> tuple[Any, float]:
        sent = self.clock()  # the lease's TTL starts no earlier than this
        return self._etcd.call("grant lease", lambda c: c.lease(self.ttl_s)), sent

    def _take_spare(self) -> tuple[Any, float] | None:
        """The prepared lease if it is still young, else None (an old one is revoked)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and self.clock() - spare[1] > SPARE_MAX_AGE_FRACTION * self.ttl_s:
            self._revoke_quietly(spare[0].id)
            return None
        return spare

    async def prepare_campaign(self) -> None:
        """Grant the next campaign's lease now (module docstring); a no-op while a young
        one is ready."""
        def run() -> None:
            spare = self._take_spare() or self._grant()
            with self._lock:
                old, self._spare = self._spare, spare
            if old is not None:
                self._revoke_quietly(old[0].id)
        await self._run(run)

    # ---- keep-alive ---------------------------------------------------------------

    def _refresh_at(self, i: int, lease_id: int, timeout_s: float) -> int:
        def call(c: Any) -> int:
            # The fork takes the deadline from the client: these clients serve refreshes
            # only (one still hung from an earlier round can overlap the next one's; both
            # values stay within (0, ttl/3], so that race is harmless).
            c.timeout = timeout_s
            responses = list(c.refresh_lease(lease_id))
            if not responses:
                raise LeadershipError("empty keep-alive response")
            return int(responses[0].TTL)
        return self._ka_etcd.call_at(i, "refresh lease", call)

    def _refresh(self, rpc: concurrent.futures.Executor, lease_id: int, timeout_s: float,
                 until: float) -> int | None:
        """One refresh sent to every endpoint at once: the TTL left from the first that
        answers, None if none did by ``until`` (on ``clock``); LeadershipError naming each
        endpoint's failure when all failed.

        Hedged, not one endpoint after another: when the etcd leader is lost, the member
        a refresh reaches first may be the dead one, or one waiting for the election
        (and a first call on an authenticated endpoint must get a token, through raft,
        too). Tried in turn, the deadline could pass before the member that would answer
        was asked, and the store failed over for the loss of one etcd member."""
        pending = {rpc.submit(self._refresh_at, i, lease_id, timeout_s)
                   for i in range(len(self._ka_etcd.clients))}
        errors: list[str] = []
        while pending:
            done, pending = concurrent.futures.wait(
                pending, timeout=max(0.0, until - self.clock()),
                return_when=concurrent.futures.FIRST_COMPLETED)
            if not done:
                return None
            for fut in done:
                try:
                    return fut.result()
                except LeadershipError as exc:
                    errors.append(str(exc))
        raise LeadershipError("; ".join(errors))

    def _keepalive(self, t: _Term) -> None:
        interval = t.ttl_s / 3
        next_send = t.last_ok_send + interval
        # Two refreshes per endpoint: one hung past its round may overlap the next.
        rpc = concurrent.futures.ThreadPoolExecutor(
            max_workers=2 * len(self._ka_etcd.clients),
            thread_name_prefix=f"xdc-refresh-{self.node_id}")
        try:
            while True:
                t.running.wait()  # test hook: a frozen process does nothing at all
                if t.stop.is_set() or self._closed.is_set():
                    return
                now = self.clock()
                if now >= t.deadline:
                    self._lose(t, f"no lease refresh succeeded for {now - t.last_ok_send:.2f} s "
                                  f"(limit {t.deadline - t.last_ok_send:.2f} s of a "
                                  f"{t.ttl_s:g} s TTL)")
                    break
                if now < next_send:
                    t.stop.wait(min(next_send, t.deadline) - now)
                    continue
                send = self.clock()
                try:
                    ttl_left = self._refresh(rpc, t.lease_id,
                                             max(0.01, min(interval, t.deadline - send)),
                                             t.deadline)
                except LeadershipError as exc:
                    log.warning("%s: term %d: %s", self.node_id, t.term, exc)
                    next_send = self.clock() + RETRY_S
                    continue
                if ttl_left is None:
                    log.debug("%s: term %d: refresh sent %.3f s ago still pending at the "
                              "deadline", self.node_id, t.term, self.clock() - send)
                    continue  # the deadline passed: the loop reports it
                if t.stop.is_set():
                    return
                if ttl_left <= 0:
                    self._lose(t, "etcd says the lease is gone (expired or revoked)")
                    break
                log.debug("%s: term %d: refreshed in %.3f s, ttl %d", self.node_id, t.term,
                          self.clock() - send, ttl_left)
                with self._lock:
                    t.last_ok_send = send
                    t.deadline = send + min(t.ttl_s, ttl_left) - self.safety_margin_s
                    t.refreshes += 1
                next_send = send + interval
            # Involuntary loss: free the seat as soon as etcd answers again.
            until = self.clock() + REVOKE_AFTER_LOSS_TTLS * t.ttl_s
            while not t.revoked and not self._closed.is_set() and self.clock() < until:
                try:
                    self._revoke(t.lease_id)
                    t.revoked = True
                except LeadershipError:
                    self._closed.wait(interval)
        finally:
            rpc.shutdown(wait=False)

    def _lose(self, t: _Term, reason: str) -> None:
        with self._lock:
            if not t.active:
                return
            t.lost = True
            t.reason = reason
        log.warning("%s: lost leadership of term %d: %s", self.node_id, t.term, reason)
        try:
            self.on_lost(reason)
        except Exception:
            log.exception("%s: on_lost callback failed", self.node_id)

    # Test hooks: freeze the keep-alive as a SIGSTOPped process would (no refresh, no
    # on_lost), and let it run again (it then notices the deadline passed).
    def _pause_keepalive(self) -> None:
        t = self._term
        if t is not None:
            t.running.clear()

    def _resume_keepalive(self) -> None:
        t = self._term
        if t is not None:
            t.running.set()

    # ---- resign -------------------------------------------------------------------

    def _revoke(self, lease_id: int) -> None:
        def call(c: Any) -> None:
            try:
                c.revoke_lease(lease_id)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # already expired: fine
                    raise
        self._etcd.call("revoke lease", call)

    def _revoke_quietly(self, lease_id: int) -> None:
        try:
            self._revoke(lease_id)
        except LeadershipError as exc:
            log.warning("%s: %s (the lease expires on its own)", self.node_id, exc)

    async def resign(self, term: int | None = None, handover_to: str | None = None) -> None:
        """Give up leadership: stop the keep-alive and revoke the lease, so the key
        disappears at once. Idempotent; a no-op when not leading, or, with ``term``,
        when the term held is another (a step-down from an older term, handled late,
        must not give up a newer one). ``handover_to``: a switchover's target, which
        holds everything this leader appended; the key is deleted together with the
        handover key's write (one transaction, guarded by this term), so the target's
        campaign knows it was handed the seat. Raises LeadershipError when etcd cannot
        be reached (the lease then expires on its own within the TTL); leadership is
        given up locally either way."""
        await self._run(self._resign_sync, term, handover_to)

    def _resign_sync(self, term: int | None = None, handover_to: str | None = None) -> None:
        with self._resigning:
            self._resign_once(term, handover_to)

    def _resign_once(self, term: int | None, handover_to: str | None) -> None:
        with self._lock:
            t = self._term
            if t is None or t.revoked or (term is not None and t.term != term):
                return
            if t.active:
                t.resigned = True
            t.stop.set()
            t.running.set()
        held = t.create_revision
        lease: int | None = None

        def hand_over(c: Any) -> None:
            tx = c.transactions
            ok, _ = c.transaction(compare=[tx.create(self.leader_key) == held],
                                  success=[tx.put(self.handover_key, handover_to, lease),
                                           tx.delete(self.leader_key)], failure=[])
            if not ok:  # the key is gone already (expired): the target's term is a failover
                log.warning("%s: handover to %s not recorded: the leader key of term %d "
                            "was no longer held", self.node_id, handover_to, t.term)
        try:
            if handover_to is not None:
                # A lease of its own, as long as a designation's: a target that did not
                # take the seat by then is not handed it (a much later win of it is no
                # handover). Without one (etcd refused the grant), the next winning
                # campaign consumes it all the same.
                with contextlib.suppress(LeadershipError):
                    lease = self._etcd.call("grant handover lease", lambda c: c.lease(
                        max(2, int(2 * self.ttl_s)))).id
                self._etcd.call("hand over", hand_over)
        finally:  # the lease goes either way: this node leads no more
            self._revoke(t.lease_id)
        t.revoked = True

    def _resign_quietly(self) -> None:
        with contextlib.suppress(LeadershipError):
            self._resign_sync()

    # ---- observing ----------------------------------------------------------------

    async def current(self) -> tuple[dict[str, str], int] | None:
        """(info, term) of the node holding the leader key now, or None if vacant."""
        value, meta = await self._run(
            self._etcd.call, "read leader", lambda c: c.get(self.leader_key))
        if meta is None:
            return None
        info = _info(value)
        return info, _term(info, meta.create_revision)

    async def seat(self) -> tuple[tuple[dict[str, str], int] | None, str | None]:
        """`current()` and `designated()` in one etcd round trip: what an election loop
        reads each time the seat may have changed."""
        def read(c: Any) -> tuple[tuple[dict[str, str], int] | None, str | None]:
            tx = c.transactions
            _, (leader, designated, base) = c.transaction(
                compare=[], success=[tx.get(self.leader_key), tx.get(self.designated_key),
                                     tx.get(self.base_key)],
                failure=[])
            self._base = _base_of(base)
            cur = _held(leader[0]) if leader else None
            return cur, designated[0][0].decode() if designated else None
        return await self._run(self._etcd.call, "read leader and designation", read)

    def _snapshot(self) -> _Snapshot:
        resp = self._etcd.call("read cluster keys", lambda c: c.get_prefix_response(self.prefix))
        term = info = None
        controls: dict[str, int] = {}
        for kv in resp.kvs:
            key = kv.key.decode(errors="replace")
            if key == self.leader_key:
                term, info = _term(_info(kv.value), kv.create_revision), kv.value
            elif key == self.base_key:
                self._base = _base_of([(kv.value, kv)])
            elif key in self._controls:
                controls[key] = int(kv.mod_revision)
        return _Snapshot(term, info, controls, int(resp.header.revision))

    async def wait_change(self, known_term: int | None, timeout_s: float) -> bool:
        """Wait until the leader key no longer holds `known_term` (None: vacant) or a
        control key changes. True on change, False after `timeout_s`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        self.vacancy_seen = False
        base = await self._run(self._snapshot)
        if base.term != known_term:
            self.vacancy_seen = base.term is None
            return True
        wake = asyncio.Event()
        state = {"changed": False, "broken": False, "vacated": False}

        def on_loop(changed: bool, broken: bool, vacated: bool) -> None:
            if changed:
                state["vacated"] = vacated
            state["changed"] |= changed
            state["broken"] |= broken
            wake.set()

        def callback(resp: Any) -> None:  # on the fork's watcher thread
            if isinstance(resp, BaseException):
                changed, broken, vacated = False, True, False
            else:
                (changed, vacated), broken = self._relevant(resp, known_term), False
            if changed or broken:
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                    loop.call_soon_threadsafe(on_loop, changed, broken, vacated)

        watch_id = None
        try:
            watch_id = await self._run(self._watch_etcd.call, "watch", lambda c:
                                       c.add_watch_prefix_callback(
                                           self.prefix, callback,
                                           start_revision=base.revision + 1))
            self.watching += 1
        except LeadershipError as exc:
            log.debug("%s: watch failed, polling: %s", self.node_id, exc)
        try:
            while True:
                remaining = end - loop.time()
                if remaining <= 0:
                    return False
                step = self.poll_s if watch_id is not None and not state["broken"] else 0.1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, step)):
                        await wake.wait()
                wake.clear()
                if state["changed"]:
                    self.vacancy_seen = state["vacated"]
                    return True
                try:
                    snap = await self._run(self._snapshot)
                except LeadershipError:
                    continue
                if snap.term != known_term or snap.controls != base.controls:
                    self.vacancy_seen = snap.term is None
                    return True
        finally:
            if watch_id is not None:
                self.watching -= 1
                with contextlib.suppress(RuntimeError, LeadershipError):
                    self._pool.submit(self._cancel_watch, watch_id)

    def _cancel_watch(self, watch_id: int) -> None:
        with contextlib.suppress(LeadershipError):
            self._watch_etcd.call("cancel watch", lambda c: c.cancel_watch(watch_id))

    def _relevant(self, resp: Any, known_term: int | None) -> tuple[bool, bool]:
        """(whether the watch response changes what `known_term` says, whether its last
        event on the leader key deleted it: the seat is vacant now)."""
        changed = vacated = False
        for ev in getattr(resp, "events", ()):
            key = ev.key.decode(errors="replace")
            if key == self.leader_key:
                vacated = isinstance(ev, etcd_events.DeleteEvent)
                changed |= (known_term is not None if vacated
                            else _term(_info(ev.value), ev.create_revision) != known_term)
            elif key in self._controls:
                changed = True
        return changed, vacated

    # ---- switchover and manual failover --------------------------------------------

    def _get_str(self, key: str) -> str | None:
        value, meta = self._etcd.call(f"read {key}", lambda c: c.get(key))
        return None if meta is None else value.decode()

    def _put(self, key: str, value: str, lease: int | None = None) -> None:
        self._etcd.call(f"write {key}", lambda c: c.put(key, value, lease))

    def _delete(self, key: str) -> None:
        self._etcd.call(f"delete {key}", lambda c: c.delete(key))

    async def designate(self, node_id: str, ttl_s: int) -> None:
        """Name the target of a planned switchover for `ttl_s` seconds (its own lease):
        until then, or until the target wins, other nodes must not campaign."""
        def run() -> None:
            lease = self._etcd.call("grant designation lease",
                                    lambda c: c.lease(max(1, int(ttl_s))))
            self._put(self.designated_key, node_id, lease.id)
        await self._run(run)

    async def clear_designation(self) -> None:
        await self._run(self._delete, self.designated_key)

    async def designated(self) -> str | None:
        """The designated switchover target, or None."""
        return await self._run(self._get_str, self.designated_key)

    async def handover(self) -> str | None:
        """The node a resigned leader handed the seat to, until a campaign wins (or its
        lease ends), or None."""
        return await self._run(self._get_str, self.handover_key)

    async def promote(self, node_id: str,
                      ttl_s: int = 60) -> tuple[dict[str, str], int] | None:
        """Authorise `node_id` to campaign in manual failover mode (`xdc cluster
        promote`), only while the leader seat is vacant. Returns None when the promotion
        is written, else (info, term) of the node holding the seat, and nothing is
        written. Consumed by the next winning campaign, whoever wins; else it expires
        with its own lease after `ttl_s`.

        Why guarded: a promotion written while a leader holds the seat would stay armed
        and elect `node_id` when that leader dies, with no operator there to decide: in
        manual mode only an operator replaces a lost leader. Why a lease: the same holds
        for a promotion whose target is down; an operator's decision should not fire
        long after it was made (a minute covers a node that is restarting)."""
        def run() -> tuple[dict[str, str], int] | None:
            lease = self._etcd.call("grant promotion lease",
                                    lambda c: c.lease(max(1, int(ttl_s))))
            tx = self._etcd.clients[0].transactions
            try:
                ok, responses = self._etcd.call("promote", lambda c: c.transaction(
                    compare=[tx.create(self.leader_key) == 0],
                    success=[tx.put(self.promoted_key, node_id, lease.id)],
                    failure=[tx.get(self.leader_key)]))
            except LeadershipError:
                # The outcome is unknown: revoking the lease deletes a promotion that
                # may have been written, so a failed call never leaves one armed.
                self._revoke_quietly(lease.id)
                raise
            if ok:
                return None
            self._revoke_quietly(lease.id)
            kvs = responses[0]
            if not kvs:  # cannot happen: the guard failed on this very key
                raise LeadershipError("promote: the leader key vanished inside a transaction")
            return _held(kvs[0])
        return await self._run(run)

    async def clear_promotion(self) -> None:
        await self._run(self._delete, self.promoted_key)

    async def promoted(self) -> str | None:
        """The promoted node id not yet consumed by an election, or None."""
        return await self._run(self._get_str, self.promoted_key)

    async def seat_view(self) -> SeatView:
        """The seat, the failover mode, the pending promotion and designation, read in
        one etcd transaction, then the time left on each pending key's lease (`xdc
        cluster status`). A key whose lease etcd reports expired is not pending."""
        def read(c: Any) -> SeatView:
            tx = c.transactions
            keys = (self.leader_key, self.failover_key, self.promoted_key, self.designated_key)
            _, got = c.transaction(compare=[], success=[tx.get(k) for k in keys], failure=[])
            leader, failover, promoted, designated = (kvs[0] if kvs else None for kvs in got)

            def pending(kv: Any) -> Pending | None:
                if kv is None:
                    return None
                ttl = int(c.get_lease_info(kv[1].lease_id).TTL) if kv[1].lease_id else -1
                return Pending(kv[0].decode(errors="replace"), ttl) if ttl >= 0 else None
            mode = failover[0].decode(errors="replace") if failover else ""
            return SeatView(
                leader=_held(leader) if leader else None,
                failover=mode if mode in FAILOVER_MODES else self.default_failover,
                promoted=pending(promoted), designated=pending(designated))
        return await self._run(self._etcd.call, "read the leader seat", read)

    async def set_failover_mode(self, mode: str) -> None:
        """Set the cluster's failover mode at runtime ("manual" or "automatic")."""
        if mode not in FAILOVER_MODES:
            raise ValueError(f"failover mode must be one of {FAILOVER_MODES}, not {mode!r}")
        await self._run(self._put, self.failover_key, mode)

    async def failover_mode(self) -> str:
        """The `failover` key if set (and valid), else `default_failover`."""
        mode = await self._run(self._get_str, self.failover_key)
        return mode if mode in FAILOVER_MODES else self.default_failover

    async def ever_led(self) -> bool:
        """True once any node has won the leader key of this cluster."""
        return await self._run(self._get_str, self.last_key) is not None

    async def last_leader(self) -> dict[str, str] | None:
        """The `info` of the node that won the leader key last, kept after its lease is
        gone; None when no node ever won it (`ever_led` is False)."""
        raw = await self._run(self._get_str, self.last_key)
        return None if raw is None else _info(raw.encode())

    # ---- membership (lost disks) -----------------------------------------------------

    async def membership(self) -> Membership:
        """Whether this node joined before and whether any node ever led, then etcd's
        current revision (see Membership)."""
        def read(c: Any) -> Membership:
            member = c.get_response(self.member_key)
            last = c.get_response(self.last_key)
            base = c.get_response(self.base_key)  # the last: its revision is the newest
            self._base = _base_of([(kv.value, kv) for kv in base.kvs])
            return Membership(member.count > 0, last.count > 0,
                              self._base + int(base.header.revision))
        return await self._run(self._etcd.call, "read membership", read)

    async def raise_term_base(self, floor: int) -> int | None:
        """Makes every later term above `floor` with one guarded write, while the seat is
        vacant: the term base becomes `floor` (terms are the base plus a create_revision,
        which is at least 1). Returns the base in force, or None when a leader holds the
        seat (nothing written). Why: terms come from etcd's revisions, and an etcd that
        lost its data counts them from 1 again, under voters that promised far higher
        terms (DESIGN §4); moving the revision itself up took one write per term of the
        gap, minutes over a WAN for a gap of thousands. The base never goes down (a lower
        `floor` leaves it), so terms stay increasing within one etcd's life."""
        return await self._run(self._raise_term_base_sync, floor)

    def _raise_term_base_sync(self, floor: int) -> int | None:
        tx = self._etcd.clients[0].transactions
        for _ in range(3):  # the base moved under us: again, from what it is now
            base = self._base
            if floor <= base:
                return base
            ok, responses = self._etcd.call("raise the term base", lambda c, base=base: (
                c.transaction(
                    compare=[tx.create(self.leader_key) == 0, self._base_guard(tx, base)],
                    success=[tx.put(self.base_key, str(floor))],
                    failure=[tx.get(self.leader_key), tx.get(self.base_key)])))
            if ok:
                self._base = floor
                log.warning("%s: term base raised %d -> %d: every later term is above %d",
                            self.node_id, base, floor, floor)
                return floor
            self._base = _base_of(responses[1])
            if responses[0]:
                return None
        raise LeadershipError("raise the term base: it kept changing under this node")

    async def join(self) -> None:
        """Records that this node joined the cluster, before it serves anything: a later
        start on an empty data directory then knows the disk was lost."""
        await self._run(self._put, self.member_key, self._value)

    async def record_members(self, infos: dict[str, dict[str, str]]) -> list[str]:
        """Records `members/<id>` (JSON of the member's info) for each member of `infos`
        whose key is missing, each in a transaction guarded by its absence (a present key
        is neither rewritten nor its revision moved); returns the ids recorded. An etcd
        that lost its data lost these records, which tell a lost disk from a new member
        at start: running nodes record them again (geo/node.py), every few seconds, so
        the keys present are read in one call and only a missing one costs a write."""
        def run() -> list[str]:
            tx = self._etcd.clients[0].transactions
            prefix = self.prefix + "members/"
            present = self._etcd.call("read members", lambda c: {
                kv.key.decode(errors="replace") for kv in c.get_prefix_response(
                    prefix, keys_only=True).kvs})
            recorded = []
            for member_id, info in infos.items():
                key = prefix + member_id
                if key in present:
                    continue
                value = json.dumps(info, sort_keys=True)
                ok, _ = self._etcd.call("record member", lambda c, key=key, value=value:
                                        c.transaction(compare=[tx.create(key) == 0],
                                                      success=[tx.put(key, value)],
                                                      failure=[]))
                if ok:
                    recorded.append(member_id)
            return recorded
        return await self._run(run)

    # ---- life cycle ---------------------------------------------------------------

    async def close(self) -> None:
        """Stop the keep-alive and all clients. Does not revoke: call resign() first
        for a graceful stop. Leadership ends locally (is_leader turns False)."""
        if self._closed.is_set():
            return
        with self._lock:
            self._closed.set()
            t = self._term
            if t is not None:
                if t.active:
                    t.resigned = True
                t.stop.set()
                t.running.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._close_clients)

    def _close_clients(self) -> None:
        for etcd in (self._etcd, self._ka_etcd, self._watch_etcd):
            etcd.close()


def member_info(m: Any) -> dict[str, str]:
    """A cluster member's `info` as its node publishes it (the leader key, members/<id>):
    of anything with the config Member's id, client, peer and region."""
    return {"id": m.id, "client": m.client, "peer": m.peer, "region": m.region}


def _term(info: dict[str, str], create_revision: int) -> int:
    """The term of a leader key holding `info`: its term base plus its create_revision."""
    try:
        base = int(info.get("term_base", 0))
    except (TypeError, ValueError):
        base = 0  # not written by a campaign: the key's revision alone, as before bases
    return base + int(create_revision)


def _held(kv: Any) -> tuple[dict[str, str], int]:
    """(info, term) of a leader key read as (value, metadata)."""
    info = _info(kv[0])
    return info, _term(info, kv[1].create_revision)


def _base_of(kvs: Any) -> int:
    """The term base from a read of its key (absent: 0)."""
    if not kvs:
        return 0
    try:
        return int(kvs[0][0])
    except ValueError as exc:
        raise LeadershipError(f"term_base holds {kvs[0][0]!r}, not an integer") from exc


def _info(value: bytes) -> dict[str, str]:
    try:
        info = json.loads(value)
    except ValueError:
        return {"raw": value.decode(errors="replace")}
    return info if isinstance(info, dict) else {"raw": str(info)}
