"""The replication protocol of DESIGN §4 as a pure, deterministic state machine.

Modelled on etcd-io/raft: no I/O, no clock, no randomness, no threads. The shell (gRPC
streams + LMDB + etcd) feeds inputs and executes the effects the machine queues, then feeds
back the results. Terms come from OUTSIDE (the ``create_revision`` of the etcd leader key):
the machine never invents one. A ``Node`` is not thread-safe: drive it from one task.

Construction (at start and after every restart; a crash throws the old instance away)
---------------------------------------------------------------------------------------
``Node(node_id, voters, standbys, log, promised_term=P, promised_to=N, commit=C,
limits=Limits(...))``

* ``voters`` / ``standbys``: the static membership from the cluster config (every node
  must be given the same sets). Quorum = majority of voters; standbys never count.
* ``log``: a :class:`~geo.replication.log.LogView` over the node's durable log (LMDB
  ``log`` database). Read-only: every write happens through a ``Persist`` effect. The view
  must reflect every write already acknowledged with ``on_persisted``; it may also reflect
  later writes (applied, not yet acknowledged), never a write out of order. The machine
  keeps in memory only the entries of writes it has not seen acknowledged yet.
* ``P`` = ``meta.promised_term``; ``N`` = ``meta.promised_to``: the node P was promised to
  ("" when promised to nobody yet, e.g. a wiped voter's fence; for a data directory written
  before the key existed, a value no node id matches: store/log.py PROMISED_TO_UNKNOWN);
  ``C`` = ``meta.commit`` (0 for a new node). ``commit`` may lag (persist it lazily, from
  ``Committed`` effects only), never lead.
* ``rejoin_term`` = ``meta.rejoin_term``: 0, or F for a voter that lost its disk and has
  not caught up yet (see "Wiped voters" below).

Inputs (each may queue effects; call :meth:`Node.drain` after each, or after a batch)
-----------------------------------------------------------------------------------------
* ``step(msg)``: a peer message arrived (``msg.dst`` is this node). Any message may be
  lost, duplicated, delayed or reordered by the transport.
* ``on_persisted(seq)``: the ``Persist`` with this ``seq`` is durable, and with it every
  lower seq (acknowledgements are cumulative). Seqs start at 1 for each ``Node`` instance.
* ``tick()``: one unit of monotonic time passed (e.g. every 50 ms). Every timeout in
  :class:`Limits` counts ticks.
* ``become_leader(term, start_payload)``: the shell won the etcd key (a transaction
  guarded by ``create_revision == 0``, attached to its lease); ``term`` is that
  create_revision. Starts the Promise/recovery step; ``start_payload`` becomes the payload
  of the term-start record. If ``term`` is not above our promise, ``SteppedDown`` is
  emitted at once (the key is stale: give it back).
* ``step_down(reason)``: the lease could not be renewed in time (stop before it can expire,
  measured on a monotonic clock) or the node is stopping. Proposals are refused from now on.
* ``propose(payloads) -> Accepted(first, last, term) | Refused(reason, leader)``: client
  writes, only on an open leader. Batch them (group commit): one call, one ``Persist``.
* ``reset_peer(peer)``: (leader) the peer came back with an empty log (new or wiped
  standby). Optional: the leader also notices when its heartbeat is refused.

Queries: ``tip()`` (last term and position: what the pre-check RPC answers), ``status()``
(role, terms, commit, per-peer match/lag/in_sync: for ``xdc cluster status``), ``role``,
``term``, ``promised_term``, ``commit`` (visible commit), ``is_open``, ``leader``,
``ticks_since_leader`` (the election timer). Pure pre-check helper: :func:`should_campaign`.

Effects (``drain()`` returns them in the order they must be executed)
-----------------------------------------------------------------------
* ``Send(msg)``: deliver to ``msg.dst``, best effort. May go out before earlier ``Persist``
  effects are durable: whatever depends on durability (acks, promise replies) is only
  emitted after the matching ``on_persisted``.
* ``Persist(seq, truncate_after, entries, promised_term, promised_to)``: ONE atomic write
  transaction ending in fsync, applied strictly in seq order: delete positions >
  truncate_after (if not None; never at or below the commit position), append ``entries``
  (gapless), store ``promised_term`` and ``promised_to`` in meta. ``entries`` may be empty
  (a promise alone must still be durable). Consecutive writes may share one transaction;
  acknowledge the last seq. A crash may lose unacknowledged writes (a suffix of them),
  never an acknowledged one.
* ``Committed(upto)``: positions <= upto are committed by a quorum of voters AND durable
  here. Leader: answer the clients whose proposals end at or below ``upto``. Every node:
  reads and subscriptions may expose positions <= upto. Never decreases.
* ``LeaderOpen(term, start_position)``: the term-start record is committed: accept writes.
* ``SteppedDown(term, reason)``: no longer leading ``term`` (``reason`` is free text, or
  :data:`REJOIN_FENCE`, or :data:`TERM_TAKEN`): fail every unanswered
  proposal with an 'unknown outcome' status (it may still commit under the next leader, or
  be overwritten: clients retry with the same event ids), resign the etcd key / revoke the
  lease if still held, redirect writes.
* ``LeaderKnown(term, leader)``: a follower learned who leads: redirect writes there.
* ``Rejoined(position, term)``: a rejoining voter is whole again (see "Wiped voters"):
  persist ``rejoin_term = 0`` (at once: a restart must not find it rejoining again),
  count it as a voter again.

Protocol (the reason for each rule is next to its code)
---------------------------------------------------------
1. Fencing: every node persists ``promised_term`` atomically with its log writes and
   rejects Append, Promise and Fetch from lower terms; a Promise or Append of a higher term
   raises the promise (a leader that sees one steps down). A paused old leader therefore
   never gathers a quorum again: a majority has promised the newer term.
   A promise is made to ONE node (Raft's votedFor): ``promised_to``, persisted atomically
   with ``promised_term``, is the sender of the Promise or Append that raised it (a
   candidate promises itself), or "" when promised to nobody yet (a wiped voter's fence),
   in which case the first Promise or Append of that term binds it. A log that promised
   its term before ``promised_to`` existed does not know to whom: the shell passes a value
   no node id matches, and that term is refused to every node (binding it to the first
   asker could give it a second leader). A Promise,
   Append or Fetch of the promised term from any other node is rejected like a lower term
   (``higher_term`` = that same term: the sender steps down with :data:`TERM_TAKEN`).
   Terms are unique only while etcd keeps its data: an etcd that lost it (or a new, empty
   one started under the old logs, as ``xdc cluster up`` does on an old directory) grants
   revisions from 1 again, so one term number can go to two candidates. Were a promise
   bound to the term alone, both could gather a majority and write different entries under
   the same (position, term), which breaks log matching (a follower holding one leader's
   entry accepts the other's Append whose prev names it): acknowledged records would be
   lost or logs diverge. Bound to a node, any two majorities of one term share a voter that
   promised one of them only, so at most one leader per term ever opens.
2. Election: after ``become_leader(T)`` the node promises T to itself and sends
   ``Promise(T)`` to the other voters; each replies once its promise (to this candidate)
   is durable, with its log tip. With a majority (itself included), the leader adopts the
   most up-to-date promiser log (highest last term, then position), fetching the missing
   suffix from that peer in bulk ranges and truncating its own divergent uncommitted
   suffix, then appends the term-start record in T and opens once that record is
   committed. Any two majorities intersect, so every committed record is in the adopted
   log. A refusal is never counted; one saying that T was promised to another node
   (``higher_term == T``, rule 1), to the candidate, the recovering or the open leader
   alike, makes it give T up (``SteppedDown`` with :data:`TERM_TAKEN`): the term was
   granted twice and that voter may be in the other holder's majority. The shell resigns
   the key and campaigns again, for a new revision.
3. Replication: batches bounded in entries and bytes, at most ``max_inflight`` per peer,
   each carrying prev (position, term) and the leader's commit position. A follower checks
   the prev, keeps entries it already holds, truncates a divergent uncommitted suffix,
   persists, then acks the durable matching position. A reject carries a hint so the leader
   backs up over a whole divergent term in one round trip. Lost batches are retransmitted
   after ``retransmit_ticks``; idle peers get heartbeats (commit carriers).
4. Commit: the highest position held by a majority of voters whose entry is of the current
   term (Raft's rule, see ``_leader_maybe_commit``). Followers learn it from the leader.
5. Liveness guards: a leader steps down without replies from a voter majority for
   ``check_quorum_ticks`` ('lost quorum'), or when the promise/fetch step makes no progress
   for ``recovery_timeout_ticks``; the shell then resigns the key so another node can try.

Wiped voters (``rejoin_term``)
--------------------------------
A voter whose disk is lost (disk replaced, region rebuilt) restarts empty and forgot (a) the
records it acknowledged, which may be committed with its ack counted and so now sit on a
minority, and (b) its promise, so a deposed leader could count it again. Voting at once
breaks the quorum-intersection argument of rule 2 (Raft has the same problem: disk loss is a
membership change). The shell detects it at start (an empty, unmarked data directory of a
member etcd says joined before, in a cluster that has had a leader, or in which another
voter promised a term: etcd may have lost its record of the leader) and constructs it with
``rejoin_term=F`` and ``promised_term=F``, both persisted first, where F is above every term
that a leader counting an acknowledgement of its previous life can have. Until it is whole:

* it promises nothing as a voter (a ``PromiseReply`` with ``ok=False, rejoining=True``), and
  ``become_leader`` gives the key back: no election counts it;
* every reply it sends carries ``rejoining``, and a leader counts neither its match for
  commit nor its replies for check-quorum: it is a standby that the quorum size still
  includes (as if down), so commit and elections need a majority of the OTHER voters;
* its promise F fences every leader that may have counted its previous life (they step
  down on its reply, with ``SteppedDown(reason=REJOIN_FENCE)``: the shell campaigns again
  at once), so every leader it follows has term >= F and never counts an ack of its
  previous life.

The fence rule. With n voters and q = n // 2 + 1 (the quorum), the shell takes
F = max(etcd's current revision, the ``promised_term`` answered by at least n - q + 1 OTHER
voters) + 1, asked after the restart (the pre-check's Tip RPC); it waits, serving nothing,
until that many have answered (answers may come in different rounds). etcd's revision alone
(the rule before) is above every term granted only while etcd keeps its data: after it lost
it (rule 1), the revision may be below terms granted before, and a leader of a term >= F
could have counted an ack of the previous life (the simulator loses a committed record that
way: seed 7620, see geo/replication/sim.py). Why the peers' promises are enough, whatever
etcd did: a leader of term T that counted an ack of the previous life had a promise
majority for T first (it ships nothing before), formed before the wipe; at least q - 1 of
those q promisers are OTHER voters. Any n - q + 1 of the n - 1 other voters meet every
(q - 1)-subset of them ((n - q + 1) + (q - 1) > n - 1), so one answerer promised T before
the wipe. Promises only grow, so its answer, given after the restart, is >= T: F > T. An
answerer that is itself rejoining answers its own fence, which by the same rule is above
every term it promised before its own wipe, so the argument holds for it too; a voter still
waiting for its fence serves nothing, so it never answers. An answer that is not
self-consistent (a promise below the answerer's own last log term: a node too old to
report its promise) is not counted. Waiting costs no availability: while fewer than
n - q + 1 other voters are reachable, fewer than q non-rejoining voters are, and nothing
could commit anyway. etcd's revision is still taken so that F stays above every term
granted so far while etcd keeps its data (every leader elected before the restart is
fenced, as before).

It is whole again, and emits :class:`Rejoined`, once its visible commit position P (committed
and durable here) holds an entry of term >= F. That is enough: P's entry was written by a
leader L of term >= F, elected after the wipe; by log matching our 1..P equals L's log, which
holds L's term-start record at or before P and, before it, the log L adopted from a promise
majority of voters none of which was rejoining. Every record the wiped voter was ever
counted for was committed by a leader of term < F; its commit majority and L's promise
majority intersect in a voter other than the wiped one (which did not promise), and that
voter still held the record (an ack is sent only once durable; a voter rejoined earlier
holds everything below its own such point), so L adopted it, below its term start, below P.
A plain "leader's commit position after the wipe" would not do: a new leader's commit can
still be below records committed by its predecessor (it learns them lazily), and an old
leader (if it were not fenced) could still count a delayed ack of the previous life after
that point. The rejoin survives restarts: ``rejoin_term`` stays in meta until it is whole.

Not handled here: membership changes and log compaction/snapshots; and telling a lost disk
from a new member needs etcd's record that the member joined (the shell re-records it while
running, for itself and every member it heard from, after etcd lost its data): a voter whose
disk is lost while etcd has no such record (both lost at once, e.g. a new etcd started under
old logs with one data directory gone) starts as a new, empty voter.
"""

from __future__ import annotations

import itertools
import operator
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from geo.replication.log import InvariantError, LogView, check, within_bytes
from geo.replication.messages import (
    ENTRY_POSITION,
    ENTRY_TERM,
    Accepted,
    Append,
    AppendReply,
    Committed,
    Effect,
    Entry,
    Fetch,
    FetchReply,
    LeaderKnown,
    LeaderOpen,
    Message,
    NodeId,
    Persist,
    Promise,
    PromiseReply,
    ProposeResult,
    Refused,
    Rejoined,
    Send,
    SteppedDown,
    Tip,
    entries_of,
)

__all__ = [
    "REJOIN_FENCE",
    "TERM_TAKEN",
    "InvariantError",
    "Limits",
    "Node",
    "NodeStatus",
    "PeerStatus",
    "Role",
    "Unsafe",
    "quorum",
    "should_campaign",
]


@dataclass(slots=True, frozen=True)
class Limits:
    """Every bound the machine enforces. Timeouts count ``tick()`` calls."""

    # Entries per Append (max_batch_bytes still caps it). 256 held 3-region ingest at
    # ~38k ev/s; 2048 gave ~59k (4096 no more; 8 in flight less: the leader is the
    # bottleneck, and more messages cost it more than they save).
    max_batch_entries: int = 2048
    max_batch_bytes: int = 1 << 20
    max_inflight: int = 4  # batches in flight per peer (flow control)
    max_fetch_entries: int = 4096  # recovery fetches are bulk ranges
    max_fetch_bytes: int = 8 << 20
    max_propose_entries: int = 4096
    max_unpersisted_entries: int = 65536  # leader backpressure on the local disk
    heartbeat_ticks: int = 1
    retransmit_ticks: int = 4  # no ack for that long: probe again from the match position
    promise_retry_ticks: int = 3
    fetch_retry_ticks: int = 3
    check_quorum_ticks: int = 10  # leader steps down without a voter majority for that long
    recovery_timeout_ticks: int = 40  # from become_leader until open

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1")


@dataclass(slots=True, frozen=True)
class Unsafe:
    """Deliberately broken variants, for tests proving the simulator can catch bugs."""

    commit_any_term: bool = False  # drop Raft's current-term commit rule
    skip_promises: bool = False  # lead on the local log without the Promise/recovery step
    # (shell, simulator) a wiped voter restarts as an ordinary empty voter with promise 0
    wiped_voter_votes: bool = False
    # (shell, simulator) a wiped voter's fence is etcd's revision + 1 alone, not also above
    # the promises of n - q + 1 other voters ("Wiped voters"): unsafe once etcd lost its data
    etcd_only_fence: bool = False
    # a promise binds a term, not a node (no promised_to check): a term granted twice
    # (etcd lost its data) can get two leaders
    unbound_promises: bool = False


class Role(StrEnum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"  # won the etcd key, collecting promises
    RECOVERING = "recovering"  # fetching the most up-to-date log from a promiser
    LEADER = "leader"  # term-start record appended (open once it is committed)


class PeerState(StrEnum):
    PROBE = "probe"  # one message at a time until the match point is known
    REPLICATE = "replicate"  # pipelining up to max_inflight batches


# SteppedDown reason when a voter back from a lost disk fenced our term: nobody else was
# elected, so the shell may take the seat again at once (in a new term the voter accepts),
# even in manual failover mode.
REJOIN_FENCE = "fenced by a rejoining voter"

# SteppedDown reason when a voter had promised our term to another node: the term source
# granted it twice (etcd lost its data, or a new etcd runs under the old logs). The term
# is unusable; the shell resigns the key and campaigns again for a new revision (no wait:
# nobody else is known to lead, and each campaign moves the revision up).
TERM_TAKEN = ("term already promised to another node (granted twice: etcd lost its data?) "
              "or to one a log older than promised_to did not record")


def quorum(voters: int) -> int:
    return voters // 2 + 1


def fence_answers(voters: int) -> int:
    """How many of the other voters a voter that lost its disk must hear the promises of
    before it is fenced ("Wiped voters"): n - quorum + 1, which meet every promise
    majority's other members."""
    return voters - quorum(voters) + 1


def should_campaign(own: Tip, peers: Mapping[NodeId, Tip | None]) -> bool:
    """Patroni-style pre-check, before trying to take the etcd key.

    ``peers`` maps the other *voters* to the tip they answered, or None if unreachable.
    Defer (False) when a reachable voter has a strictly more up-to-date log: it would lose
    less uncommitted data. Ties campaign (etcd decides). Safety never depends on this check
    (the Promise step does that); the shell should still bound how often it defers, in case
    the better peer cannot reach etcd.
    """
    best = own.key()
    return all(t is None or t.key() <= best for t in peers.values())


@dataclass(slots=True)
class Progress:
    """The leader's view of one peer."""

    match: int = 0  # highest position known durable on the peer and equal to ours
    next: int = 1  # next position to send
    state: PeerState = PeerState.PROBE
    probe_sent: bool = False
    inflight: deque[int] = field(default_factory=deque)  # last position of each batch sent
    last_progress_tick: int = 0
    sent_tick: int = -1  # last tick anything was sent (heartbeats only fill silences)
    active: bool = False  # replied during the current check-quorum window
    in_sync: bool = False  # has matched our last position at least once this term
    rejoining: bool = False  # its last reply said so: neither its match nor its reply counts


@dataclass(slots=True, frozen=True)
class PeerStatus:
    voter: bool
    match: int
    next: int
    state: str
    inflight: int
    in_sync: bool
    lag: int
    rejoining: bool


@dataclass(slots=True, frozen=True)
class NodeStatus:
    node_id: NodeId
    role: Role
    term: int
    promised_term: int
    promised_to: NodeId  # "" when not known
    leader: NodeId | None
    open: bool
    commit: int
    last_position: int
    last_term: int
    durable_position: int
    ticks_since_leader: int
    peers: dict[NodeId, PeerStatus]
    rejoining: bool
    rejoin_term: int  # F while rejoining, else 0
    leader_commit: int  # highest commit position a leader told us (catch-up target)


# A reply that may only be sent once everything written before it is durable.
# ("promise", dst, term, 0) or ("append", dst, term, match)
_Deferred = tuple[str, NodeId, int, int]


class Node:
    """One replica's protocol state. See the module docstring for the interface."""

    def __init__(
        self,
        node_id: NodeId,
        voters: Iterable[NodeId],
        standbys: Iterable[NodeId],
        log: LogView,
        *,
        promised_term: int = 0,
        promised_to: NodeId = "",
        commit: int = 0,
        rejoin_term: int = 0,
        limits: Limits | None = None,
        unsafe: Unsafe | None = None,
    ) -> None:
        self.id = node_id
        self.voters = frozenset(voters)
        self.standbys = frozenset(standbys)
        if not self.voters:
            raise ValueError("a cluster needs at least one voter")
        if self.voters & self.standbys:
            raise ValueError("a member cannot be both voter and standby")
        if node_id not in self.voters | self.standbys:
            raise ValueError(f"{node_id!r} is not a member")
        self.limits = limits or Limits()
        self.unsafe = unsafe or Unsafe()
        self.quorum = quorum(len(self.voters))
        self._peers = tuple(sorted((self.voters | self.standbys) - {node_id}))
        self._voter_peers = tuple(p for p in self._peers if p in self.voters)
        self.log = log

        if promised_to and not promised_term:
            raise InvariantError(f"promised to {promised_to!r} with no promised term")
        self._promised = promised_term
        self._promised_to = promised_to  # who _promised is promised to ("": not known yet)
        # the (promised_term, promised_to) issued in the last Persist
        self._promised_written = (promised_term, promised_to)
        self._commit = commit  # known committed (may be above what is durable here)
        self._visible = commit  # what Committed effects announced: committed AND durable here
        last = log.last_position()
        if commit > last:
            raise InvariantError(f"commit {commit} above the log's last position {last}")
        if rejoin_term and node_id not in self.voters:
            raise ValueError("only a voter rejoins (a wiped standby just catches up)")
        if rejoin_term > promised_term:
            raise InvariantError(f"rejoin term {rejoin_term} above promised {promised_term}")
        self._rejoin = rejoin_term
        self._leader_commit = commit

        # Writes issued but not acknowledged: an overlay over ``log`` starting at _u_offset
        # (0 = no overlay) holding the final content of every position >= _u_offset.
        self._u_offset = 0
        self._u_entries: list[Entry] = []
        self._pending: deque[tuple[int, int, int]] = deque()  # (seq, first touched, last after)
        self._next_seq = 1
        self._durable_last = last
        self._waiting: deque[tuple[int, _Deferred]] = deque()

        self._effects: list[Effect] = []
        self._now = 0  # ticks since construction

        self.role = Role.FOLLOWER
        self.leader: NodeId | None = None
        self._heard_tick = 0
        # leader state (meaningful when role != FOLLOWER)
        self._term = 0
        self._started_tick = 0
        self._start_payload = b""
        self._promises: dict[NodeId, Tip] = {}
        self._promise_sent_tick = 0
        self._fetch_from: NodeId | None = None
        self._fetch_target = Tip(0, 0)
        self._fetch_prev = 0
        self._fetch_sent_tick = 0
        self._term_start = 0
        self.is_open = False
        self._progress: dict[NodeId, Progress] = {}
        self._quorum_window_start = 0
        self._check_rejoined()  # a restart after catching up, before meta said so

    # ------------------------------------------------------------------ queries

    @property
    def promised_term(self) -> int:
        return self._promised

    @property
    def promised_to(self) -> NodeId:
        """The node ``promised_term`` is promised to ("" when not known yet)."""
        return self._promised_to

    @property
    def term(self) -> int:
        """The term this node leads, or the highest term it has promised."""
        return self._term if self.role != Role.FOLLOWER else self._promised

    @property
    def commit(self) -> int:
        """Visible commit position: committed by a quorum and durable on this node."""
        return self._visible

    @property
    def rejoining(self) -> bool:
        """A wiped voter that is not whole yet (module docstring): it neither votes nor
        counts for commit."""
        return self._rejoin != 0

    @property
    def rejoin_term(self) -> int:
        return self._rejoin

    @property
    def ticks_since_leader(self) -> int:
        """Ticks since a leader was last heard from (or since we stopped leading): the
        shell's election timer."""
        return self._now - self._heard_tick

    @property
    def term_start(self) -> int:
        return self._term_start if self.role == Role.LEADER else 0

    def tip(self) -> Tip:
        last = self._last()
        return Tip(self._term_at(last), last)

    def status(self) -> NodeStatus:
        last = self._last()
        peers = {
            p: PeerStatus(
                voter=p in self.voters,
                match=pr.match,
                next=pr.next,
                state=str(pr.state),
                inflight=len(pr.inflight),
                in_sync=pr.in_sync,
                lag=max(0, last - pr.match),
                rejoining=pr.rejoining,
            )
            for p, pr in self._progress.items()
        }
        return NodeStatus(
            node_id=self.id,
            role=self.role,
            term=self.term,
            promised_term=self._promised,
            promised_to=self._promised_to,
            leader=self.leader,
            open=self.is_open,
            commit=self._visible,
            last_position=last,
            last_term=self._term_at(last),
            durable_position=self._stable_last(),
            ticks_since_leader=self.ticks_since_leader,
            peers=peers,
            rejoining=self.rejoining,
            rejoin_term=self._rejoin,
            leader_commit=max(self._leader_commit, self._commit),
        )

    def drain(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    # ------------------------------------------------------------------ inputs

    def step(self, msg: Message) -> None:
        if msg.dst != self.id:
            raise InvariantError(f"message for {msg.dst} delivered to {self.id}")
        if msg.src == self.id:
            return
        match msg:
            case Append():
                self._on_append(msg)
            case AppendReply():
                self._on_append_reply(msg)
            case Promise():
                self._on_promise(msg)
            case PromiseReply():
                self._on_promise_reply(msg)
            case Fetch():
                self._on_fetch(msg)
            case FetchReply():
                self._on_fetch_reply(msg)
            case _:
                raise TypeError(f"unknown message {msg!r}")

    def on_persisted(self, seq: int) -> None:
        if seq >= self._next_seq:
            raise InvariantError(f"ack of write {seq} never issued")
        popped: tuple[int, int, int] | None = None
        while self._pending and self._pending[0][0] <= seq:
            popped = self._pending.popleft()
        if popped is None:
            return  # duplicate acknowledgement
        self._durable_last = popped[2]
        # The overlay must still cover every position a pending write touches.
        touched = [first for _, first, _ in self._pending if first]
        if not touched:
            self._u_offset, self._u_entries = 0, []
        else:
            new_offset = min(touched)
            if new_offset > self._u_offset:
                del self._u_entries[: new_offset - self._u_offset]
                self._u_offset = new_offset
        while self._waiting and self._waiting[0][0] <= seq:
            self._release(self._waiting.popleft()[1])
        if self.role == Role.LEADER:
            self._leader_maybe_commit()
        self._publish_commit()

    def tick(self) -> None:
        self._now += 1
        if self.role == Role.FOLLOWER:
            return
        lim = self.limits
        if (
            self.role in (Role.CANDIDATE, Role.RECOVERING)
            and self._now - self._started_tick > lim.recovery_timeout_ticks
        ):
            # No promise majority, or the best promiser stopped answering: let someone else
            # try (the shell resigns the key on SteppedDown). Once the term-start record is
            # appended, only check-quorum applies: catching lagging followers up may
            # legitimately take long.
            self._step_down("recovery timeout")
            return
        if self.role == Role.CANDIDATE:
            if self._now - self._promise_sent_tick >= lim.promise_retry_ticks:
                self._send_promises()
        elif self.role == Role.RECOVERING:
            if self._now - self._fetch_sent_tick >= lim.fetch_retry_ticks:
                self._send_fetch()
        else:
            self._leader_tick()

    def become_leader(self, term: int, start_payload: bytes = b"") -> None:
        if self.id not in self.voters:
            raise ValueError("a standby cannot lead")
        if self._rejoin:
            # The shell should not campaign while rejoining; if it won anyway, give the key
            # back: leading on a log that may lack committed records would lose them.
            self._emit(SteppedDown(term, "rejoining: not a voter until caught up"))
            return
        if term <= self._promised:
            # We already promised this term or a later one to another leader: the key we
            # won is stale (another election happened since); give it back.
            self._emit(SteppedDown(term, "stale term"))
            return
        if self.role != Role.FOLLOWER:
            self._step_down("new term")
        self._raise_promise(term, self.id)
        self._persist_promise()
        self.role = Role.CANDIDATE
        self._term = term
        self.leader = self.id
        self._started_tick = self._now
        self._start_payload = start_payload
        self._promises = {}
        self.is_open = False
        self._progress = {}
        if self.unsafe.skip_promises:
            self._start_term()
            return
        # Our own promise counts only once durable, like anybody else's.
        self._after_durable(("promise", self.id, term, 0))
        self._send_promises()

    def step_down(self, reason: str = "lease lost") -> None:
        if self.role != Role.FOLLOWER:
            self._step_down(reason)

    def propose(self, payloads: Sequence[bytes]) -> ProposeResult:
        if self.role != Role.LEADER:
            return Refused("not_leader", None if self.leader == self.id else self.leader)
        if not self.is_open:
            return Refused("not_open", self.id)
        n = len(payloads)
        if n == 0 or n > self.limits.max_propose_entries:
            return Refused("too_large", self.id)
        unpersisted = self._last() - self._stable_last()
        if unpersisted + n > self.limits.max_unpersisted_entries:
            return Refused("backpressure", self.id)
        first = self._last() + 1
        entries = entries_of(first, itertools.repeat(self._term, n), payloads)
        self._write(None, entries)
        for p in self._peers:
            self._send_append(p)
        return Accepted(first, first + n - 1, self._term)

    def reset_peer(self, peer: NodeId) -> None:
        if self.role == Role.LEADER and peer in self._progress:
            self._progress[peer] = Progress(next=1, last_progress_tick=self._now)
            self._send_append(peer)

    # ------------------------------------------------------------------ log access

    def _last(self) -> int:
        if self._u_offset:
            return self._u_offset - 1 + len(self._u_entries)
        return self.log.last_position()

    def _stable_last(self) -> int:
        """Highest position durable here that no pending write will change."""
        if self._u_offset:
            return min(self._durable_last, self._u_offset - 1)
        return self._durable_last

    def _term_at(self, pos: int) -> int:
        if pos == 0:
            return 0
        if self._u_offset and pos >= self._u_offset:
            return self._u_entries[pos - self._u_offset].term
        return self.log.term_at(pos)

    def _read(self, lo: int, hi: int, max_entries: int, max_bytes: int) -> list[Entry]:
        hi = min(hi, lo + max_entries - 1)
        if hi < lo:
            return []
        out: list[Entry] = []
        if not self._u_offset or lo < self._u_offset:
            stable_hi = hi if not self._u_offset else min(hi, self._u_offset - 1)
            out.extend(self.log.entries(lo, stable_hi, max_bytes))
            if len(out) < stable_hi - lo + 1:
                return out  # byte limit hit
            lo = stable_hi + 1
        if lo <= hi:
            chunk = self._u_entries[lo - self._u_offset : hi - self._u_offset + 1]
            return within_bytes(out + chunk if out else chunk, max_bytes)
        return out

    def _find_le(self, pos: int, term: int) -> int:
        """Largest position <= pos whose term is <= ``term`` (terms never decrease along the
        log, so this is a binary search with O(log n) term lookups)."""
        pos = min(pos, self._last())
        if self._term_at(pos) <= term:
            return pos
        lo, hi = 0, pos - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._term_at(mid) <= term:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _write(self, truncate_after: int | None, entries: Sequence[Entry]) -> int:
        """Issue one Persist; update the overlay. All log mutations go through here."""
        last = self._last()
        if truncate_after is not None:
            if not self._commit <= truncate_after <= last:
                raise InvariantError(
                    f"{self.id}: truncate after {truncate_after} with commit {self._commit}, "
                    f"last {last}"
                )
            base = truncate_after
        else:
            base = last
        prev_term = self._term_at(base)
        if entries:
            # The checks in C-level passes (this runs for every record on every node);
            # the loop below only finds which record broke them.
            terms = list(map(ENTRY_TERM, entries))
            if not (all(map(operator.eq, map(ENTRY_POSITION, entries), itertools.count(base + 1)))
                    and prev_term <= terms[0] and terms[-1] <= self._promised
                    and all(map(operator.le, terms, itertools.islice(terms, 1, None)))):
                self._broken_write(base, prev_term, entries)
        seq = self._next_seq
        self._next_seq += 1
        first = base + 1 if (truncate_after is not None or entries) else 0
        if first:
            if not self._u_offset or first < self._u_offset:
                self._u_offset = first
                self._u_entries = list(entries)
            else:
                del self._u_entries[first - self._u_offset :]
                self._u_entries.extend(entries)
        self._pending.append((seq, first, base + len(entries)))
        self._promised_written = (self._promised, self._promised_to)
        self._emit(Persist(seq, truncate_after, tuple(entries), self._promised,
                           self._promised_to))
        return seq

    def _broken_write(self, base: int, prev_term: int, entries: Sequence[Entry]) -> None:
        for i, e in enumerate(entries):
            if e.position != base + 1 + i:
                raise InvariantError(f"{self.id}: gap writing position {e.position}")
            if e.term < prev_term:
                raise InvariantError(f"{self.id}: term decreases at {e.position}")
            if e.term > self._promised:
                raise InvariantError(f"{self.id}: entry term above promised term")
            prev_term = e.term
        raise AssertionError("_write's checks and _broken_write disagree")

    def _persist_promise(self) -> None:
        if self._promised_written != (self._promised, self._promised_to):
            self._write(None, ())

    def _append_matching(self, prev_pos: int, entries: Sequence[Entry]) -> None:
        """Raft's append rule, once prev matched: keep entries we already hold (a duplicate
        or reordered batch must not cut off what a later batch added), truncate at the first
        conflict, append the rest."""
        last = self._last()
        i = 0
        n = len(entries)
        while i < n and entries[i].position <= last and (
            self._term_at(entries[i].position) == entries[i].term
        ):
            i += 1
        if i < n:
            pos = entries[i].position
            self._write(pos - 1 if pos <= last else None, entries[i:])
        else:
            self._persist_promise()

    # ------------------------------------------------------------------ terms, commit

    def _raise_promise(self, term: int, to: NodeId) -> None:
        check(term > self._promised, "promised_term must only increase")
        check(bool(to), "a promise is raised by its holder's message")
        if self.role != Role.FOLLOWER:
            self._step_down("higher term")
        self._promised = term
        self._promised_to = to
        self.leader = None

    def _holds(self, term: int, src: NodeId) -> bool:
        """True if our promise is ``term``, made to ``src``."""
        return term == self._promised and (
            self._promised_to == src or self.unsafe.unbound_promises)

    def _fenced_reason(self, higher_term: int, rejoining: bool) -> str | None:
        """(Leader side) why a reply to our term fences us, or None if it does not."""
        if higher_term > self._term:
            # A peer promised a later leader: we can never commit again in this term.
            return REJOIN_FENCE if rejoining else "higher term"
        if higher_term == self._term:
            # The peer promised our very term to another node (rule 1): two candidates
            # got the same term, and this peer may be in the other's majority.
            return TERM_TAKEN
        return None

    def _set_commit(self, pos: int) -> None:
        if pos <= self._commit:
            return
        if pos > self._last():
            raise InvariantError(f"{self.id}: commit {pos} beyond last {self._last()}")
        self._commit = pos

    def _publish_commit(self) -> None:
        visible = min(self._commit, self._stable_last())
        if visible > self._visible:
            self._visible = visible
            self._emit(Committed(visible))
            self._check_rejoined()
        if (
            self.role == Role.LEADER
            and not self.is_open
            and self._visible >= self._term_start
        ):
            check(self._term_at(self._term_start) == self._term, "term-start record lost")
            self.is_open = True
            self._emit(LeaderOpen(self._term, self._term_start))

    def _check_rejoined(self) -> None:
        """Whole again once the visible commit holds an entry of a term >= the fence: see
        the module docstring for why that point is enough."""
        v = self._visible
        if self._rejoin and v and self._term_at(v) >= self._rejoin:
            self._rejoin = 0
            self._emit(Rejoined(v, self._term_at(v)))

    def _step_down(self, reason: str) -> None:
        self._emit(SteppedDown(self._term, reason))
        self.role = Role.FOLLOWER
        self.is_open = False
        self.leader = None
        self._progress = {}
        self._promises = {}
        self._fetch_from = None
        self._heard_tick = self._now

    def _emit(self, effect: Effect) -> None:
        self._effects.append(effect)

    def _send(self, msg: Message) -> None:
        self._effects.append(Send(msg))

    # ------------------------------------------------------------------ durability-gated replies

    def _after_durable(self, d: _Deferred) -> None:
        if not self._pending:
            self._release(d)
            return
        seq = self._next_seq - 1
        if self._waiting:
            # Coalesce acks to the same leader waiting on the same write: only the highest
            # match matters, and heartbeats during a slow fsync must not grow this queue.
            # (Never move an ack to a later write: a steady load would starve it.)
            wseq, (kind, dst, term, match) = self._waiting[-1]
            if wseq == seq and kind == "append" == d[0] and dst == d[1] and term == d[2]:
                self._waiting[-1] = (seq, (kind, dst, term, max(match, d[3])))
                return
        self._waiting.append((seq, d))

    def _release(self, d: _Deferred) -> None:
        kind, dst, term, match = d
        if kind == "promise":
            if dst == self.id:
                if self.role == Role.CANDIDATE and self._term == term:
                    self._promises[self.id] = self.tip()
                    self._check_promises()
                return
            if not self._holds(term, dst):
                self._send(PromiseReply(self.id, dst, term, False, self.tip(), self._promised))
            else:
                # Everything issued before this reply is durable, and nothing of a lower
                # term can be written from now on: the tip is final for this term's leader.
                self._send(PromiseReply(self.id, dst, term, True, self.tip()))
        else:
            if not self._holds(term, dst):
                # We promised a later leader meanwhile: the old one must not count us.
                self._send(AppendReply(self.id, dst, term, False, higher_term=self._promised,
                                       rejoining=self.rejoining))
            else:
                self._send(AppendReply(self.id, dst, term, True, match=match,
                                       rejoining=self.rejoining))

    # ------------------------------------------------------------------ follower side

    def _fence(self, term: int, src: NodeId) -> bool:
        """True if a Promise or Append of ``term`` from ``src`` must be rejected: a lower
        term, or our term promised to another node (rule 1). Raises the promise (to
        ``src``) if higher; binds a promise not yet bound to anyone to ``src``. Either is
        persisted before any reply that depends on it (the caller's write or
        _persist_promise, then _after_durable)."""
        if term < self._promised:
            return True
        if term > self._promised:
            self._raise_promise(term, src)
            return False
        if not self._promised_to:
            self._promised_to = src  # Raft: votedFor was null
            return False
        return not self._holds(term, src)

    def _on_append(self, m: Append) -> None:
        if self._fence(m.term, m.src):
            self._send(
                AppendReply(self.id, m.src, m.term, False, rejected=m.prev_pos,
                            higher_term=self._promised, rejoining=self.rejoining)
            )
            return
        if self.role != Role.FOLLOWER:
            raise InvariantError(f"{self.id} leads term {m.term} but {m.src} sent an Append")
        self._heard_tick = self._now
        if self.leader != m.src:
            self.leader = m.src
            self._emit(LeaderKnown(m.term, m.src))
        self._leader_commit = max(self._leader_commit, m.commit)
        last = self._last()
        if m.prev_pos > last or self._term_at(m.prev_pos) != m.prev_term:
            self._persist_promise()
            hint = self._find_le(min(m.prev_pos, last), m.prev_term)
            self._send(
                AppendReply(self.id, m.src, m.term, False, rejected=m.prev_pos,
                            hint_pos=hint, hint_term=self._term_at(hint),
                            rejoining=self.rejoining)
            )
            return
        self._append_matching(m.prev_pos, m.entries)
        last_new = m.prev_pos + len(m.entries)
        # Only the prefix this message proved equal to the leader's log may be marked
        # committed: beyond last_new we may still hold a stale suffix.
        self._set_commit(min(m.commit, last_new))
        self._publish_commit()
        self._after_durable(("append", m.src, m.term, last_new))

    def _on_promise(self, m: Promise) -> None:
        if self._fence(m.term, m.src):
            self._send(PromiseReply(self.id, m.src, m.term, False, self.tip(), self._promised))
            return
        if self.role != Role.FOLLOWER:
            raise InvariantError(f"{self.id} leads term {m.term} but {m.src} sent a Promise")
        self._persist_promise()
        if self._rejoin:
            # Our log may lack records committed with the ack of our previous life: an
            # election counting us could adopt a log without them (module docstring).
            self._send(PromiseReply(self.id, m.src, m.term, False, self.tip(),
                                    rejoining=True))
            return
        self._after_durable(("promise", m.src, m.term, 0))

    def _on_fetch(self, m: Fetch) -> None:
        if m.term < self._promised or (
                m.term == self._promised and not self._holds(m.term, m.src)):
            # A later term, or our term not promised to this leader (to another node, or
            # to nobody known: a wiped voter's fence, whose log is not the one it counted):
            # our log is not what it adopted. A Fetch binds nothing (only a Promise or an
            # Append does): the leader steps down and campaigns again.
            self._send(FetchReply(self.id, m.src, m.term, False, m.prev_pos,
                                  higher_term=self._promised))
            return
        if m.term > self._promised:
            return  # we never promised that leader, so our log is not what it adopted
        last = self._last()
        if m.prev_pos > last or self._term_at(m.prev_pos) != m.prev_term:
            hint = self._find_le(min(m.prev_pos, last), m.prev_term)
            self._send(FetchReply(self.id, m.src, m.term, False, m.prev_pos,
                                  hint_pos=hint, hint_term=self._term_at(hint)))
            return
        max_entries = min(m.max_entries, self.limits.max_fetch_entries)
        max_bytes = min(m.max_bytes, self.limits.max_fetch_bytes)
        entries = self._read(m.prev_pos + 1, last, max_entries, max_bytes)
        self._send(FetchReply(self.id, m.src, m.term, True, m.prev_pos, tuple(entries)))

    # ------------------------------------------------------------------ election / recovery

    def _send_promises(self) -> None:
        self._promise_sent_tick = self._now
        for v in self._voter_peers:
            if v not in self._promises:
                self._send(Promise(self.id, v, self._term))

    def _on_promise_reply(self, m: PromiseReply) -> None:
        if self.role == Role.FOLLOWER or m.term != self._term:
            return
        reason = self._fenced_reason(m.higher_term, m.rejoining)
        if reason is not None:
            self._step_down(reason)
            return
        if self.role != Role.CANDIDATE or not m.ok or m.src not in self.voters:
            return
        self._promises[m.src] = m.tip
        self._check_promises()

    def _check_promises(self) -> None:
        # Our own promise must be among them, durable: without it a majority of others
        # could count for a term whose promise we may lose in a crash, and etcd could
        # grant it to us again in another incarnation (a second term-start record).
        if len(self._promises) < self.quorum or self.id not in self._promises:
            return
        # Every committed record is on a majority of voters and so on at least one promiser;
        # the promiser whose last entry has the highest term (then position) holds them all.
        # Ties prefer ourselves (nothing to fetch).
        own = self._promises.get(self.id)
        best_id, best = max(
            self._promises.items(), key=lambda kv: (kv[1].key(), kv[0] == self.id)
        )
        if own is not None and own.key() >= best.key():
            self._start_term()
            return
        self.role = Role.RECOVERING
        self._fetch_from = best_id
        self._fetch_target = best
        self._fetch_prev = min(self._last(), best.position)
        self._send_fetch()

    def _send_fetch(self) -> None:
        assert self._fetch_from is not None
        self._fetch_sent_tick = self._now
        self._send(
            Fetch(self.id, self._fetch_from, self._term, self._fetch_prev,
                  self._term_at(self._fetch_prev), self.limits.max_fetch_entries,
                  self.limits.max_fetch_bytes)
        )

    def _on_fetch_reply(self, m: FetchReply) -> None:
        if self.role == Role.FOLLOWER or m.term != self._term:
            return
        reason = self._fenced_reason(m.higher_term, False)
        if reason is not None:
            self._step_down(reason)
            return
        if self.role != Role.RECOVERING or m.src != self._fetch_from:
            return
        if m.prev_pos != self._fetch_prev:
            return  # stale or duplicated reply
        if not m.ok:
            probe = self._find_le(m.hint_pos, m.hint_term)
            self._fetch_prev = min(probe, m.prev_pos - 1)
            check(self._fetch_prev >= 0, "fetch backed up below position 0")
            self._send_fetch()
            return
        self._append_matching(m.prev_pos, m.entries)
        got = m.prev_pos + len(m.entries)
        target = self._fetch_target
        if got >= target.position:
            # The adopted log ends exactly at the target; anything of ours beyond it is an
            # uncommitted stale suffix (its terms are not above the target's, or we would
            # have been the best promiser).
            if self._last() > target.position:
                self._write(target.position, ())
            if self.tip() != target:
                raise InvariantError(f"{self.id}: recovered {self.tip()} != {target}")
            self._start_term()
            return
        check(bool(m.entries), "fetch reply made no progress")
        self._started_tick = self._now  # progress: the recovery timeout restarts
        self._fetch_prev = got
        self._send_fetch()

    def _start_term(self) -> None:
        # Our own promise of the term is the one our majority shares with any other
        # majority of that term (rule 1): it must still be ours.
        check(self._holds(self._term, self.id),
              f"{self.id} leads term {self._term}, promised {self._promised} to "
              f"{self._promised_to!r}")
        self.role = Role.LEADER
        self._fetch_from = None
        pos = self._last() + 1
        self._write(None, [Entry(pos, self._term, self._start_payload)])
        self._term_start = pos
        self._quorum_window_start = self._now
        # Probe everyone at the term start: a peer holding the adopted log matches at once.
        self._progress = {
            p: Progress(next=pos, last_progress_tick=self._now) for p in self._peers
        }
        for p in self._peers:
            self._send_append(p)
        self._leader_maybe_commit()
        self._publish_commit()

    # ------------------------------------------------------------------ leader side

    def _append_msg(self, peer: NodeId, prev: int, entries: Sequence[Entry]) -> Append:
        self._progress[peer].sent_tick = self._now
        return Append(self.id, peer, self._term, prev, self._term_at(prev), tuple(entries),
                      self._commit)

    def _send_append(self, peer: NodeId) -> None:
        pr = self._progress[peer]
        last = self._last()
        lim = self.limits
        if pr.state == PeerState.PROBE:
            if pr.probe_sent:
                return
            entries = self._read(pr.next, last, lim.max_batch_entries, lim.max_batch_bytes)
            self._send(self._append_msg(peer, pr.next - 1, entries))
            pr.probe_sent = True
            pr.last_progress_tick = self._now
            return
        if not pr.inflight and pr.next <= last:
            pr.last_progress_tick = self._now  # the retransmit timer starts now
        while len(pr.inflight) < lim.max_inflight and pr.next <= last:
            entries = self._read(pr.next, last, lim.max_batch_entries, lim.max_batch_bytes)
            self._send(self._append_msg(peer, pr.next - 1, entries))
            pr.next = entries[-1].position + 1
            pr.inflight.append(entries[-1].position)

    def _on_append_reply(self, m: AppendReply) -> None:
        if self.role == Role.FOLLOWER or m.term != self._term:
            return
        reason = self._fenced_reason(m.higher_term, m.rejoining)
        if reason is not None:
            self._step_down(reason)
            return
        if self.role != Role.LEADER:
            return
        pr = self._progress.get(m.src)
        if pr is None:
            return
        pr.active = True
        # Every reply carries the flag, and match only rises with a reply, so a match is
        # never counted while the last word of its peer was "rejoining".
        pr.rejoining = m.rejoining
        if m.ok:
            if m.match > self._last():
                raise InvariantError(f"{m.src} acked {m.match} beyond our log")
            if m.match > pr.match:
                pr.match = m.match
                pr.last_progress_tick = self._now
            pr.next = max(pr.next, pr.match + 1)
            while pr.inflight and pr.inflight[0] <= pr.match:
                pr.inflight.popleft()
            if pr.state == PeerState.PROBE and m.match >= pr.next - 1:
                # The reply confirms the probe point (a heartbeat reply usually does not).
                pr.state = PeerState.REPLICATE
                pr.probe_sent = False
            if pr.match >= self._last():
                pr.in_sync = True
            if m.src in self.voters:
                self._leader_maybe_commit()
                self._publish_commit()
            self._send_append(m.src)
            return
        if m.rejected < pr.match:
            return  # stale: we since learned it matches further
        if m.rejected == pr.match:
            # A heartbeat at the known match point was refused: the peer lost what it had
            # acknowledged (wiped standby, or a stale ack from its previous life arrived
            # after reset_peer). Forgetting the match is never unsafe, it only delays
            # commit; if this was merely an old reordered reject, it costs one probe.
            pr.match = 0
            pr.in_sync = False
        elif pr.state == PeerState.PROBE and m.rejected != pr.next - 1:
            return  # answer to an older probe
        probe = self._find_le(m.hint_pos, m.hint_term)
        pr.next = max(min(m.rejected, probe + 1), pr.match + 1)
        pr.state = PeerState.PROBE
        pr.probe_sent = False
        pr.inflight.clear()
        pr.last_progress_tick = self._now
        self._send_append(m.src)

    def _leader_maybe_commit(self) -> None:
        matches = sorted(
            (self._stable_last() if v == self.id else self._counted_match(v)
             for v in self.voters),
            reverse=True,
        )
        candidate = matches[self.quorum - 1]
        if candidate <= self._commit:
            return
        # Raft's current-term rule: counting replicas proves an entry of an OLDER term is
        # on a majority now, but a later leader whose last entry has a higher term than it
        # (elected by another majority, e.g. from a log that diverged in between) can still
        # overwrite it (Raft paper figure 8). An entry of OUR term on a majority cannot be
        # overwritten: every later leader adopts a log from a majority that intersects ours,
        # and the most up-to-date promiser log then ends in our term or later, so it holds
        # the entry. Committing it commits every earlier position with it.
        if self.unsafe.commit_any_term or self._term_at(candidate) == self._term:
            self._set_commit(candidate)

    def _counted_match(self, voter: NodeId) -> int:
        pr = self._progress[voter]
        return 0 if pr.rejoining else pr.match

    def _leader_tick(self) -> None:
        lim = self.limits
        if self._now - self._quorum_window_start >= lim.check_quorum_ticks:
            # A rejoining voter cannot help commit: keeping the seat with it would leave
            # the cluster stuck behind a leader that can never commit.
            active = 1 + sum(
                1 for v in self._voter_peers
                if self._progress[v].active and not self._progress[v].rejoining
            )
            for pr in self._progress.values():
                pr.active = False
            self._quorum_window_start = self._now
            if self.id in self.voters and active < self.quorum:
                self._step_down("lost quorum")
                return
        for p, pr in self._progress.items():
            waiting = pr.inflight or (pr.state == PeerState.PROBE and pr.probe_sent)
            if waiting and self._now - pr.last_progress_tick >= lim.retransmit_ticks:
                # Lost batch or reply. A probe is resent as is (backing up further would
                # throw away what the hints taught us); a pipeline restarts after the
                # known match point, since everything in flight after a loss is rejected.
                if pr.state == PeerState.REPLICATE:
                    pr.state = PeerState.PROBE
                    pr.next = pr.match + 1
                    pr.inflight.clear()
                pr.probe_sent = False
                self._send_append(p)
            elif self._now - pr.sent_tick >= lim.heartbeat_ticks:
                # prev = the known match point always matches, so a heartbeat never causes a
                # reject, and it lets the follower advance its commit up to that point.
                self._send(self._append_msg(p, pr.match, ()))
