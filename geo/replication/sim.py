"""A deterministic, seeded simulation of a replicated cluster driving :class:`core.Node`.

One ``random.Random(seed)`` decides everything, so a seed replays the same schedule exactly:

* network: per-message delay (so reordering), loss, duplication, symmetric and asymmetric
  partitions (multiset of blocked directed links, overlapping faults compose);
* disks: one :class:`MemoryLog` per node, writes complete in order after a delay; a crash
  loses every write not yet applied (a write may also be applied but its acknowledgement
  lost, so the log is ahead of what the machine was told);
* processes: crashes (in-memory state lost, restarted later from the disk), pauses (SIGSTOP:
  events and client requests queue up and are served on resume, before the node's timers
  run: an old leader acts on its stale belief first), wiped standbys (empty disk), wiped
  voters (empty disk; they restart rejoining, as the node shell does: fenced at
  max(etcd's revision, the promises of ``voters - quorum + 1`` other voters) + 1, staying
  down while fewer of them are reachable: core's docstring, "Wiped voters"; at most
  ``voters - quorum`` of them rejoining at once: losing the disks of a majority loses data
  in any protocol);
* an etcd-like oracle: a leader key with a lease on the sim clock, granting strictly
  increasing (not dense) terms to one candidate at a time; nodes may lose etcd access;
  etcd may lose its data (``etcd_reset``: the key and leases are gone and the revision
  rewinds, as when a new empty etcd starts under the old nodes' logs, e.g. ``xdc cluster
  up`` on an old directory), so later campaigns are granted terms that were granted
  before, to other nodes: the nodes' promises (``promised_to``) must keep such a term from
  getting two leaders;
* a shell per node doing what the real one will: lease keepalive and step-down before
  expiry, election timer, Patroni pre-check, campaign, client proposals;
* scripts: timed actions (``Sim(seed, cfg, script=[(t, fn), ...])`` with ``campaign``,
  ``crash``, ``restart``, ``pause``, ``resume``, ``wipe``, ``isolate``, ``heal_links``,
  ``reset_etcd``, ``propose`` and a ``drop`` message filter) for exact scenarios such as
  figure 8.

Checks (raised as :class:`SimFailure` with the seed, the config and the last trace lines),
at every step: every position any node announced committed (``Committed`` effect, the moment
a leader answers its client) is recorded once with its (term, payload) in a global history;
every later announcement by any node must match it, and no disk write may truncate a node
below what it announced (so no acknowledged record is ever lost or changed, and all nodes
agree on every position <= their commit); the machine's own invariants hold; a leader opens
only once its term-start record is in the committed history, and at most one node ever
opens a given term (election safety); one grant per term while etcd keeps its data. At the
end: every node's committed prefix equals the history, at most one leader per term; then,
after everything healed, the cluster must converge: one open leader, every node committed up
to its last position, and every wiped voter whole again (liveness).

Reproduce a failure with the command its message prints, e.g.
``python -m geo.replication.sim --seed N --duration D --heal H [--hunt] [--unsafe NAME] --trace``
(``--hunt`` replays with the figure-8 hunting config, see ``hunt_config``).
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

from geo.replication.core import (
    Limits,
    Node,
    Role,
    Unsafe,
    fence_answers,
    quorum,
    should_campaign,
)
from geo.replication.log import MemoryLog
from geo.replication.messages import (
    Append,
    AppendReply,
    Committed,
    FetchReply,
    LeaderOpen,
    Message,
    Persist,
    Rejoined,
    Send,
    SteppedDown,
    Tip,
)

# event kinds (ints: the heap compares them only on ties of time and counter, never)
_DELIVER, _TICK, _DISK, _DISK_ACK, _FAULT, _END_FAULT, _CLIENT, _SCRIPT = range(8)


class SimFailure(AssertionError):
    pass


def fmt(obj: object) -> str:
    """Compact one-line rendering of messages for step traces."""
    if isinstance(obj, Append):
        ents = f" +{obj.entries[0].position}..{obj.entries[-1].position}" if obj.entries else ""
        return (f"Append {obj.src}->{obj.dst} T{obj.term} prev=({obj.prev_pos},{obj.prev_term})"
                f"{ents} commit={obj.commit}")
    if isinstance(obj, AppendReply):
        how = (f"ok match={obj.match}" if obj.ok else
               f"reject prev={obj.rejected} hint=({obj.hint_pos},{obj.hint_term})")
        higher = f" HIGHER={obj.higher_term}" if obj.higher_term else ""
        return f"AppendReply {obj.src}->{obj.dst} T{obj.term} {how}{higher}"
    if isinstance(obj, FetchReply):
        ents = f" +{obj.entries[0].position}..{obj.entries[-1].position}" if obj.entries else ""
        return (f"FetchReply {obj.src}->{obj.dst} T{obj.term} ok={obj.ok} prev={obj.prev_pos}"
                f"{ents} hint=({obj.hint_pos},{obj.hint_term}) higher={obj.higher_term}")
    return "" if obj is None else str(obj)


FAULT_KINDS = ("crash", "crash_leader", "pause", "pause_leader", "partition", "asym", "etcd",
               "isolate_leader", "wipe_standby", "wipe_voter", "etcd_reset")
# The double fault "etcd lost its data, and a voter its disk", weighted: the mix on which
# the fence from etcd's revision alone (Unsafe.etcd_only_fence) loses a committed record,
# e.g. seed 7620 of 3 voters, duration 600, heal 400.
WIPES_AND_RESETS = (("etcd_reset", "wipe_voter") * 2
                    + ("crash", "crash_leader", "partition", "pause", "isolate_leader"))
MIXES = {"wipes_and_resets": WIPES_AND_RESETS}  # --mix
# A wiped voter waiting for the other voters' promises asks again after this many ticks.
FENCE_RETRY_TICKS = 3


@dataclass(slots=True, frozen=True)
class SimConfig:
    voters: int = 3
    standbys: int = 0
    duration: int = 1500  # sim time units with faults
    heal: int = 1200  # then everything healed; the cluster must converge
    tick_every: int = 10
    delay: tuple[int, int] = (1, 20)
    loss: float = 0.05
    dup: float = 0.03
    disk_delay: tuple[int, int] = (1, 8)
    fault_gap: tuple[int, int] = (30, 250)
    fault_len: tuple[int, int] = (20, 400)
    lease_ttl: int = 100
    election_ticks: tuple[int, int] = (12, 30)
    client_every: int = 25  # a client batch (group commit) of 1..client_batch payloads
    client_batch: int = 5
    limits: Limits = field(default_factory=Limits)
    unsafe: Unsafe = field(default_factory=Unsafe)
    check_liveness: bool = True
    precheck: bool = True  # Patroni-style deferral (off: any voter may win, like a race)
    auto_elect: bool = True  # shells campaign on their election timer (off: scripts only)
    random_faults: bool = True
    fault_kinds: tuple[str, ...] = FAULT_KINDS  # drawn uniformly: repeat a kind to weight it
    clients: bool = True
    # etcd_reset rewinds the revision by 1..etcd_rewind (a new empty etcd starts at 0; the
    # bound keeps the climb back above the nodes' promises within the convergence cap).
    etcd_rewind: int = 20
    converge_cap: int = 20000  # extra time allowed to converge after the heal phase


def random_config(rng: random.Random, **overrides: object) -> SimConfig:
    """A varied small-cluster config: 3 or 5 voters, sometimes a standby, small batches so
    that pipelining, partial acks and backing up happen often. Timeouts are derived from the
    round trip, as an operator would set them."""
    tick = 10
    delay = rng.choice(((1, 5), (1, 20), (5, 40)))
    disk = (1, 8)
    rtt_ticks = -(-(2 * delay[1] + disk[1]) // tick)
    limits = Limits(
        max_batch_entries=rng.choice((1, 2, 3, 8)),
        max_batch_bytes=rng.choice((8, 64, 1 << 20)),
        max_inflight=rng.choice((1, 2, 4)),
        max_fetch_entries=rng.choice((1, 3, 16)),
        max_fetch_bytes=rng.choice((16, 1 << 20)),
        max_propose_entries=8,
        max_unpersisted_entries=rng.choice((4, 64)),
        heartbeat_ticks=rng.choice((1, 2, 3)),  # stays below a round trip + 1
        retransmit_ticks=rtt_ticks + rng.randint(1, 3),
        promise_retry_ticks=rtt_ticks + 1,
        fetch_retry_ticks=rtt_ticks + 1,
        check_quorum_ticks=2 * rtt_ticks + rng.randint(2, 6),
        recovery_timeout_ticks=4 * rtt_ticks + rng.randint(2, 10),
    )
    cfg = SimConfig(
        voters=rng.choice((3, 3, 5)),
        standbys=rng.choice((0, 0, 1)),
        tick_every=tick,
        loss=rng.choice((0.0, 0.02, 0.1, 0.2)),
        dup=rng.choice((0.0, 0.05)),
        delay=delay,
        disk_delay=disk,
        lease_ttl=max(100, 3 * rtt_ticks * tick),
        election_ticks=(2 * rtt_ticks + 4, 4 * rtt_ticks + 8),
        limits=limits,
    )
    return replace(cfg, **overrides)  # type: ignore[arg-type]


@dataclass(slots=True)
class _SimNode:
    id: str
    voter: bool
    disk: MemoryLog
    machine: Node | None = None
    incarnation: int = 0
    paused: bool = False
    deferred: list[tuple[int, object, object]] = field(default_factory=list)
    disk_free_at: int = 0
    lease_term: int = 0
    lease_renewed_at: int = 0
    election_ticks: int = 20
    deferrals: int = 0
    checked_upto: int = 0  # committed positions already compared with the global history
    wiped_upto: int = 0  # the highest committed position when its disk was last lost
    # A wiped voter not yet fenced: the promised terms the other voters answered so far
    # (voter -> term); None otherwise. It stays down until enough answered (Sim._fence).
    fence_answers: dict[str, int] | None = None
    proposed: dict[int, bytes] = field(default_factory=dict)  # pos -> payload, current term


@dataclass(slots=True)
class _Oracle:
    """etcd's leader key: create_revision is the term; one lease at a time."""

    ttl: int
    holder: str | None = None
    term: int = 0
    expires: int = 0
    revision: int = 0
    unreachable: Counter[str] = field(default_factory=Counter)
    resets: int = 0

    def live(self, now: int) -> bool:
        return self.holder is not None and self.expires > now

    def campaign(self, node: str, now: int, rng: random.Random, term: int = 0) -> int:
        if self.live(now):
            return 0
        if term:  # (scripts) other keys' writes took the revision just below ``term``
            if term <= self.revision:
                raise ValueError(f"term {term} is not above etcd's revision {self.revision}")
            self.revision = term
        else:
            self.revision += rng.randint(1, 3)  # other keys' writes bump the revision too
        self.holder, self.term, self.expires = node, self.revision, now + self.ttl
        return self.term

    def keepalive(self, node: str, term: int, now: int) -> bool:
        if self.holder == node and self.term == term and self.expires > now:
            self.expires = now + self.ttl
            return True
        return False

    def resign(self, node: str, term: int) -> None:
        if self.holder == node and self.term == term:
            self.holder = None

    def reset(self, revision: int) -> None:
        """etcd lost its data: the key and every lease are gone, and the revision (so the
        next term) restarts lower, at ``revision``: terms granted before are granted
        again."""
        self.holder, self.term, self.expires = None, 0, 0
        self.revision = revision
        self.resets += 1


@dataclass(slots=True)
class SimResult:
    seed: int
    committed: int  # highest position ever committed
    acked: int  # client records acknowledged
    terms: int  # leadership grants
    events: int
    wipes: int  # disks lost (standbys and voters)
    regrants: int = 0  # terms granted again after etcd lost its data


class Sim:
    def __init__(
        self,
        seed: int,
        cfg: SimConfig | None = None,
        trace_len: int = 60,
        script: Sequence[tuple[int, Callable[[Sim], None]]] = (),
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self._random = self.rng.random
        self.cfg = cfg if cfg is not None else random_config(self.rng)
        c = self.cfg
        self.ids = [f"v{i}" for i in range(c.voters)] + [f"s{i}" for i in range(c.standbys)]
        self.voters = self.ids[: c.voters]
        self.standbys = self.ids[c.voters :]
        self.nodes = {i: _SimNode(i, i in self.voters, MemoryLog()) for i in self.ids}
        self.oracle = _Oracle(c.lease_ttl)
        self.blocked: Counter[tuple[str, str]] = Counter()
        self.loss = c.loss
        self.dup = c.dup
        self.now = 0
        self._queue: list[tuple[int, int, int, object, object]] = []
        self._counter = 0
        self.trace: deque[tuple[int, str, object]] = deque(maxlen=trace_len)
        self.committed: list[tuple[int, bytes]] = [(0, b"")]  # index = position
        self.acked: dict[int, bytes] = {}
        self.term_owner: dict[int, str] = {}  # term -> the node it was last granted to
        self.grants: set[tuple[int, str]] = set()  # every (term, node) granted
        self.regrants = 0
        self.opened: dict[int, str] = {}  # term -> the node that opened it
        self.events = 0
        self.wipes = 0
        self._payload_counter = 0
        self.healed = False
        for n in self.nodes.values():
            self._start(n)
            n.election_ticks = self.rng.randint(1, 6)  # bootstrap: no one to wait for
            self._push(self.rng.randint(1, c.tick_every), _TICK, n.id, None)
        if c.random_faults:
            self._push(self.rng.randint(*c.fault_gap), _FAULT, None, None)
        if c.clients:
            self._push(c.client_every, _CLIENT, None, None)
        self._scripted = bool(script)
        for at, action in script:
            self._push(at, _SCRIPT, action, None)
        self.drop: Callable[[Message], bool] | None = None  # scripted message filter

    # ------------------------------------------------------------------ plumbing

    def _between(self, bounds: tuple[int, int]) -> int:
        # random.randint is several times slower, and this runs for every message
        lo, hi = bounds
        return lo + int(self._random() * (hi - lo + 1))

    def _push(self, at: int, kind: int, a: object, b: object) -> None:
        self._counter += 1
        heapq.heappush(self._queue, (at, self._counter, kind, a, b))

    def _note(self, what: str, detail: object = None) -> None:
        self.trace.append((self.now, what, detail))

    def fail(self, why: str) -> SimFailure:
        lines = [f"t={t} {w} {fmt(d)}" for t, w, d in self.trace]
        return SimFailure(
            f"seed={self.seed}: {why}\n  reproduce: {self._repro()}\n  config: {self.cfg}\n"
            "  last steps:\n    " + "\n    ".join(lines)
        )

    def _repro(self) -> str:
        if self._scripted:
            return "scripted scenario: rerun its test (the trace below is complete up to 60 steps)"
        c = self.cfg
        unsafe = [f.name for f in fields(Unsafe) if getattr(c.unsafe, f.name)]
        for hunt, mix in ((False, None), (True, None), (False, "wipes_and_resets")):
            argv = (["--seed", str(self.seed), "--duration", str(c.duration), "--heal",
                     str(c.heal)] + (["--hunt"] if hunt else [])
                    + (["--mix", mix] if mix else [])
                    + [x for k in unsafe for x in ("--unsafe", k)])
            if cli_config(_parser().parse_args(argv), self.seed) == c:
                return "python -m geo.replication.sim " + " ".join(argv) + " --trace"
        return "custom config: build it from the config line below, then Sim(seed, cfg).run()"

    def _boot(self, n: _SimNode) -> None:
        """Starts a node (a restart), unless it is a wiped voter that cannot be fenced yet:
        then it tries again later, as the shell's start-up does."""
        if n.fence_answers is not None and not self._fence(n):
            self._push(self.now + FENCE_RETRY_TICKS * self.cfg.tick_every, _END_FAULT,
                       "restart", n.id)
            return
        self._start(n)

    def _fence(self, n: _SimNode) -> bool:
        """The shell's start-up on a lost disk (core's docstring, "Wiped voters"): ask the
        reachable other voters for their promised term (the Tip RPC: a round trip, so both
        directions must be open; a paused or down node does not answer, nor a wiped one not
        yet fenced: it is down); once ``voters - quorum + 1`` of them answered (in any
        round: promises only grow), persist promise and rejoin term F = max(etcd's revision,
        their promises) + 1 and return True. The shell reads etcd first: it waits for it
        too. ``Unsafe.etcd_only_fence``: F = etcd's revision + 1 at once (the rule before,
        unsafe once etcd lost its data)."""
        answers = n.fence_answers
        assert answers is not None
        if self.oracle.unreachable[n.id]:
            return False
        for v in self.voters:
            p = self.nodes[v]
            if (v != n.id and p.machine is not None and not p.paused
                    and not self.blocked[(n.id, v)] and not self.blocked[(v, n.id)]):
                answers[v] = max(answers.get(v, 0), p.disk.promised_term)
        if self.cfg.unsafe.etcd_only_fence:
            fence = self.oracle.revision + 1
        elif len(answers) < fence_answers(len(self.voters)):
            self._note(f"{n.id} waits for promises, answered", sorted(answers))
            return False
        else:
            fence = max(self.oracle.revision, *answers.values()) + 1
        n.disk.promised_term = n.disk.rejoin_term = fence  # promised_to: "" (nobody)
        n.fence_answers = None
        self._note(f"{n.id} fenced at", fence)
        return True

    def _start(self, n: _SimNode) -> None:
        n.incarnation += 1
        n.machine = Node(
            n.id, self.voters, self.standbys, n.disk,
            promised_term=n.disk.promised_term, promised_to=n.disk.promised_to,
            commit=n.disk.commit, rejoin_term=n.disk.rejoin_term, limits=self.cfg.limits,
            unsafe=self.cfg.unsafe,
        )
        n.paused = False
        n.deferred.clear()
        n.disk_free_at = self.now
        n.election_ticks = self.rng.randint(*self.cfg.election_ticks)
        n.proposed = {}
        n.deferrals = 0

    # ------------------------------------------------------------------ main loop

    def run(self) -> SimResult:
        try:
            self._run()
        except SimFailure:
            raise
        except Exception as e:  # invariant violations and plain bugs alike
            raise self.fail(f"{type(e).__name__}: {e}") from e
        return SimResult(self.seed, len(self.committed) - 1, len(self.acked),
                         len(self.grants), self.events, self.wipes, self.regrants)

    def _run(self) -> None:
        # After the heal phase, keep going until the cluster has converged (liveness), up to
        # a generous cap so that a stuck cluster fails instead of hanging.
        end = self.cfg.duration + self.cfg.heal
        cap = end + (self.cfg.converge_cap if self.cfg.check_liveness else 0)
        q = self._queue
        while q:
            at, _, kind, a, b = heapq.heappop(q)
            if at > end and (at > cap or (kind == _TICK and self._converged())):
                break
            if not self.healed and at >= self.cfg.duration:
                self.now = self.cfg.duration
                self._heal()
            self.now = at
            self.events += 1
            self._dispatch(kind, a, b)
        self._final_checks()

    def _converged(self) -> bool:
        top = len(self.committed) - 1
        leaders = [n.machine for n in self.nodes.values()
                   if n.machine is not None and n.machine.is_open]
        return (
            len(leaders) == 1
            and leaders[0].commit == leaders[0].tip().position
            and all(n.disk.commit >= leaders[0].commit >= top for n in self.nodes.values())
            and not any(n.machine is None or n.machine.rejoining for n in self.nodes.values())
        )

    def _dispatch(self, kind: int, a: object, b: object) -> None:
        if kind == _DELIVER:
            msg: Message = a  # type: ignore[assignment]
            n = self.nodes[msg.dst]
            if n.machine is None:
                return
            if n.paused:
                n.deferred.append((kind, a, b))
                return
            self.trace.append((self.now, "deliver", msg))  # formatted only on failure
            n.machine.step(msg)
            self._effects(n)
        elif kind == _TICK:
            n = self.nodes[a]  # type: ignore[index]
            self._push(self.now + self.cfg.tick_every, _TICK, n.id, None)
            if n.machine is not None and not n.paused:
                self._shell_tick(n)
        elif kind in (_DISK, _DISK_ACK):
            n = self.nodes[a]  # type: ignore[index]
            inc, p = b  # type: ignore[misc]
            if n.machine is None or inc != n.incarnation:
                return  # crashed before the write completed: the write is lost
            if n.paused:
                n.deferred.append((kind, a, b))
                return
            if kind == _DISK:
                self._apply_write(n, p)
                if self._random() < 0.8:
                    n.machine.on_persisted(p.seq)
                    self._effects(n)
                else:  # durable, but the machine hears of it later (or never, on a crash)
                    self._push(self.now + self._between((0, 5)), _DISK_ACK, n.id, (inc, p))
            else:
                n.machine.on_persisted(p.seq)
                self._effects(n)
        elif kind == _FAULT:
            if not self.healed:
                self._fault()
                self._push(self.now + self.rng.randint(*self.cfg.fault_gap), _FAULT, None, None)
        elif kind == _END_FAULT:
            self._end_fault(a, b)
        elif kind == _SCRIPT:
            a(self)  # type: ignore[operator]
        elif kind == _CLIENT:
            if self.now < self.cfg.duration + self.cfg.heal // 2:
                self._push(self.now + self.cfg.client_every, _CLIENT, None, None)
                self._client()

    # ------------------------------------------------------------------ node shell

    def _effects(self, n: _SimNode) -> None:
        assert n.machine is not None
        for eff in n.machine.drain():
            if isinstance(eff, Send):
                self._send(eff.msg)
            elif isinstance(eff, Persist):
                t = max(self.now, n.disk_free_at) + self._between(self.cfg.disk_delay)
                n.disk_free_at = t
                self._push(t, _DISK, n.id, (n.incarnation, eff))
            elif isinstance(eff, Committed):
                self._on_committed(n, eff.upto)
            elif isinstance(eff, LeaderOpen):
                self._note(f"{n.id} open", eff)
                got = self.committed[eff.start_position] if eff.start_position < len(
                    self.committed) else None
                if got is None or got[0] != eff.term or (eff.term, n.id) not in self.grants:
                    raise self.fail(f"{n.id} opened term {eff.term} at {eff.start_position} "
                                    f"but the committed history has {got}")
                other = self.opened.setdefault(eff.term, n.id)
                if other != n.id:
                    raise self.fail(f"two leaders opened term {eff.term}: {other} and {n.id}")
            elif isinstance(eff, Rejoined):
                self._note(f"{n.id} rejoined", eff)
                n.disk.rejoin_term = 0  # meta (the real shell persists it lazily)
            elif isinstance(eff, SteppedDown):
                self._note(f"{n.id} stepped down", eff)
                self.oracle.resign(n.id, eff.term)
                n.proposed = {}

    def _apply_write(self, n: _SimNode, p: Persist) -> None:
        if p.truncate_after is not None and p.truncate_after < n.checked_upto:
            raise self.fail(f"{n.id} truncates after {p.truncate_after} below its "
                            f"commit {n.checked_upto}")
        n.disk.apply(p)

    def _on_committed(self, n: _SimNode, upto: int) -> None:
        disk = n.disk
        if upto <= disk.commit:
            raise self.fail(f"{n.id} announced commit {upto} after {disk.commit}: it decreased")
        if upto > disk.last_position():
            raise self.fail(f"{n.id} announced commit {upto} beyond its durable log "
                            f"{disk.last_position()}")
        hist = self.committed
        for pos in range(n.checked_upto + 1, upto + 1):
            e = disk.entry(pos)
            if pos < len(hist):
                if hist[pos] != (e.term, e.payload):
                    raise self.fail(f"{n.id} committed position {pos} as {(e.term, e.payload)}"
                                    f" but it was committed as {hist[pos]} before")
            else:
                hist.append((e.term, e.payload))
            proposed = n.proposed.get(pos)
            if proposed is not None:
                # Answered to the client now, as the shell answers: by position, for what
                # this node proposed in its current leadership (a step-down forgets it,
                # as the shell's CommitTracker.fail_waiters does), without looking at
                # what is there. The check below finds an ack of another record.
                self.acked[pos] = proposed
        n.checked_upto = max(n.checked_upto, upto)
        disk.commit = upto  # meta.commit (a real shell may persist it lazily: it only lags)

    def _send(self, msg: Message) -> None:
        if self.blocked[(msg.src, msg.dst)] or self._random() < self.loss:
            return
        if self.drop is not None and self.drop(msg):
            self._note("dropped", msg)
            return
        self._push(self.now + self._between(self.cfg.delay), _DELIVER, msg, None)
        if self.dup and self._random() < self.dup:
            self._push(self.now + self._between(self.cfg.delay), _DELIVER, msg, None)

    def _shell_tick(self, n: _SimNode) -> None:
        m = n.machine
        assert m is not None
        etcd_ok = not self.oracle.unreachable[n.id]
        if m.role != Role.FOLLOWER:
            if etcd_ok and self.oracle.keepalive(n.id, n.lease_term, self.now):
                n.lease_renewed_at = self.now
            # Stop before etcd can expire the lease (it counts from the last renewal).
            if self.now - n.lease_renewed_at >= self.cfg.lease_ttl - 2 * self.cfg.tick_every:
                self._note(f"{n.id} lease lost")
                m.step_down("lease lost")
        elif (
            n.voter
            and not m.rejoining
            and self.cfg.auto_elect
            and etcd_ok
            and m.ticks_since_leader >= n.election_ticks
            and not self.oracle.live(self.now)
        ):
            peers: dict[str, Tip | None] = {}
            for v in self.voters:
                if v == n.id:
                    continue
                p = self.nodes[v]
                # A rejoining voter does not campaign: deferring to it would be in vain.
                reachable = (p.machine is not None and not p.paused and not p.machine.rejoining
                             and not self.blocked[(n.id, v)] and not self.blocked[(v, n.id)])
                peers[v] = p.machine.tip() if reachable and p.machine else None
            if not self.cfg.precheck or should_campaign(m.tip(), peers) or n.deferrals >= 2:
                self._campaign(n)
            else:
                n.deferrals += 1
        m.tick()
        self._effects(n)

    def _campaign(self, n: _SimNode, term: int = 0) -> None:
        assert n.machine is not None
        term = self.oracle.campaign(n.id, self.now, self.rng, term)
        if not term:
            return
        if term in self.term_owner:
            if not self.oracle.resets:
                raise self.fail(f"term {term} granted twice")
            self.regrants += 1
        self.term_owner[term] = n.id
        self.grants.add((term, n.id))
        n.lease_term, n.lease_renewed_at, n.deferrals = term, self.now, 0
        n.proposed = {}
        self._note(f"{n.id} won term", term)
        # The start record names its leader, as the shell's does: two leaders of one term
        # (etcd lost its data) write different records.
        n.machine.become_leader(term, f"start:{term}:{n.id}".encode())

    def _client(self) -> None:
        # Clients write to whoever they last saw open, paused or not: requests sent to a
        # paused (SIGSTOPped) leader wait in its socket buffer and are served on SIGCONT,
        # before it notices its lease is gone. Fencing must make them harmless.
        open_nodes = [n for n in self.nodes.values()
                      if n.machine is not None and n.machine.is_open]
        if not open_nodes:
            return
        n = self.rng.choice(open_nodes)
        payloads = []
        for _ in range(self.rng.randint(1, self.cfg.client_batch)):
            self._payload_counter += 1
            payloads.append(f"c{self._payload_counter}".encode())
        if n.paused:
            n.deferred.append((_SCRIPT, lambda sim, i=n.id, p=payloads: sim.propose(i, p), None))
        else:
            self.propose(n.id, payloads)

    # ------------------------------------------------------------------ script actions

    def propose(self, node: str, payloads: list[bytes]) -> None:
        n = self.nodes[node]
        if n.machine is None:
            return
        res = n.machine.propose(payloads)
        self._note(f"{n.id} propose", res)
        if hasattr(res, "first"):
            for i, p in enumerate(payloads):
                n.proposed[res.first + i] = p  # type: ignore[attr-defined]
        self._effects(n)

    def campaign(self, node: str, term: int = 0) -> None:
        """Make ``node`` win the next term now, as if the current lease had just expired:
        exactly ``term`` if given (above etcd's revision: after ``reset_etcd``, an old one)."""
        self.oracle.holder = None
        self._campaign(self.nodes[node], term)
        self._effects(self.nodes[node])

    def crash(self, node: str) -> None:
        n = self.nodes[node]
        if n.machine is not None:
            self._note(f"{node} CRASH")
            n.machine = None
            n.incarnation += 1  # writes not yet applied are lost

    def restart(self, node: str) -> None:
        n = self.nodes[node]
        if n.machine is None:
            self._note(f"{node} RESTART")
            self._boot(n)

    def pause(self, node: str) -> None:
        n = self.nodes[node]
        if n.machine is not None and not n.paused:
            self._note(f"{node} PAUSE")
            n.paused = True

    def resume(self, node: str) -> None:
        n = self.nodes[node]
        if n.machine is not None and n.paused:
            self._resume(n)

    def wipe(self, node: str, tell_leader: bool = True, restart: bool = True) -> None:
        """Replace a node's disk by an empty one (new machine, or lost disk); it restarts
        now (or at ``restart(node)``). A standby just catches up; the leader is told (as
        the shell does when a peer reconnects with an empty log) unless ``tell_leader`` is
        False, then it must notice by itself (its heartbeat at the match is refused). A
        voter restarts rejoining, as the node shell starts it: fenced first (``_fence``:
        above every term a leader that counted an ack of its previous life can have), it
        stays down until then. ``Unsafe.wiped_voter_votes`` restarts it as a plain empty
        voter instead: the hole the rejoin closes."""
        n = self.nodes[node]
        self.crash(node)
        self._note(f"{node} WIPED")
        self.wipes += 1
        n.disk = MemoryLog()
        n.checked_upto = 0
        n.wiped_upto = len(self.committed) - 1
        n.fence_answers = ({} if n.voter and not self.cfg.unsafe.wiped_voter_votes
                           else None)
        if not restart:
            return
        self.restart(node)
        if n.voter or not tell_leader:
            return
        for other in self.nodes.values():
            if other.machine is not None and other.machine.role == Role.LEADER:
                other.machine.reset_peer(node)
                self._effects(other)

    def rejoining(self) -> list[str]:
        """Voters that lost their disk and are not whole again (running or not): their
        disk says they are rejoining, or (``Unsafe.wiped_voter_votes``, nothing says so)
        they do not hold what was committed when they lost it."""
        return [v for v in self.voters if self.nodes[v].disk.rejoin_term
                or self.nodes[v].fence_answers is not None
                or self.nodes[v].disk.commit < self.nodes[v].wiped_upto]

    def isolate(self, group: Sequence[str]) -> None:
        """Cut every link between ``group`` and the other nodes, both ways."""
        links = [(x, y) for x in group for y in self.ids if y not in group]
        for x, y in links:
            self.blocked[(x, y)] += 1
            self.blocked[(y, x)] += 1
        self._note("ISOLATE", group)

    def heal_links(self) -> None:
        self.blocked.clear()
        self._note("LINKS HEALED")

    def reset_etcd(self, revision: int = 0) -> None:
        """etcd loses its data (or a new empty one starts under the nodes' logs): the
        leader key and leases are gone and the next terms start above ``revision``."""
        self._note("ETCD RESET", f"revision {self.oracle.revision} -> {revision}")
        self.oracle.reset(revision)

    # ------------------------------------------------------------------ faults

    def _fault(self) -> None:
        rng = self.rng
        kind = rng.choice(self.cfg.fault_kinds)
        length = rng.randint(*self.cfg.fault_len)
        ids = self.ids
        target = rng.choice(ids)
        if kind in ("crash_leader", "pause_leader", "isolate_leader"):
            leaders = [n.id for n in self.nodes.values()
                       if n.machine is not None and n.machine.role != Role.FOLLOWER]
            if not leaders:
                return
            target = rng.choice(leaders)
        if kind == "wipe_standby":
            if self.standbys:
                self.wipe(rng.choice(self.standbys), tell_leader=rng.random() < 0.5)
        elif kind == "wipe_voter":
            # Lose at most as many voters' disks as the cluster survives: beyond that the
            # committed records may be gone from every disk (and the survivors are no
            # majority: nothing can commit until an operator steps in). Also while etcd's
            # revision is below terms it granted before it lost its data: the fence takes
            # the other voters' promises too (``_fence``; from etcd's revision alone,
            # Unsafe.etcd_only_fence, seed 7620 of 3 voters, duration 600, heal 400 and
            # fault_kinds WIPES_AND_RESETS loses a committed record).
            victim = rng.choice(self.voters)
            if victim not in self.rejoining() and (
                    len(self.rejoining()) < len(self.voters) - quorum(len(self.voters))):
                self.wipe(victim, restart=False)
                self._push(self.now + length, _END_FAULT, "restart", victim)
        elif kind in ("crash", "crash_leader"):
            n = self.nodes[target]
            if n.machine is None:
                return
            self._note(f"{target} CRASH")
            n.machine = None
            n.incarnation += 1
            self._push(self.now + length, _END_FAULT, "restart", target)
        elif kind in ("pause", "pause_leader"):
            n = self.nodes[target]
            if n.machine is None or n.paused:
                return
            self._note(f"{target} PAUSE")
            n.paused = True
            self._push(self.now + length, _END_FAULT, "resume", (target, n.incarnation))
        elif kind == "etcd_reset":
            rev = self.oracle.revision
            self.reset_etcd(rng.randint(max(0, rev - self.cfg.etcd_rewind), max(0, rev - 1)))
        elif kind == "etcd":
            self._note(f"{target} loses etcd")
            self.oracle.unreachable[target] += 1
            self._push(self.now + length, _END_FAULT, "etcd", target)
        else:
            if kind == "asym":  # some directed links only
                pairs = [(x, y) for x in ids for y in ids if x != y]
                links = rng.sample(pairs, rng.randint(1, len(pairs) // 2))
            else:
                group = ([target] if kind == "isolate_leader"
                         else rng.sample(ids, rng.randint(1, len(ids) - 1)))
                rest = [i for i in ids if i not in group]
                links = [(x, y) for x in group for y in rest]
                links += [(y, x) for x, y in links]
            self._note(f"PARTITION {kind}", links)
            for link in links:
                self.blocked[link] += 1
            self._push(self.now + length, _END_FAULT, "links", tuple(links))

    def _end_fault(self, what: object, arg: object) -> None:
        if what == "restart":
            n = self.nodes[arg]  # type: ignore[index]
            if n.machine is None:
                self._note(f"{n.id} RESTART")
                self._boot(n)
        elif what == "resume":
            target, inc = arg  # type: ignore[misc]
            n = self.nodes[target]
            if n.machine is not None and n.paused and n.incarnation == inc:
                self._resume(n)
        elif what == "links":
            for link in arg:  # type: ignore[attr-defined]
                if self.blocked[link] > 0:
                    self.blocked[link] -= 1
        elif what == "etcd":
            if self.oracle.unreachable[arg] > 0:  # type: ignore[index]
                self.oracle.unreachable[arg] -= 1  # type: ignore[index]

    def _resume(self, n: _SimNode) -> None:
        # SIGCONT: the queued input is processed before the node's timers run, so an old
        # leader acts on its stale belief first; safety must come from fencing.
        self._note(f"{n.id} RESUME")
        n.paused = False
        pending, n.deferred = n.deferred, []
        for kind, a, b in pending:
            self._dispatch(kind, a, b)

    def _heal(self) -> None:
        self.healed = True
        self._note("HEAL")
        self.blocked.clear()
        self.oracle.unreachable.clear()
        self.loss = self.dup = 0.0
        for n in self.nodes.values():
            if n.machine is None:
                self._boot(n)
            elif n.paused:
                self._resume(n)

    # ------------------------------------------------------------------ final checks

    def _final_checks(self) -> None:
        hist = self.committed
        for n in self.nodes.values():
            disk = n.disk
            for pos in range(1, disk.commit + 1):
                e = disk.entry(pos)
                if hist[pos] != (e.term, e.payload):
                    raise self.fail(f"{n.id} holds {(e.term, e.payload)} at committed {pos}, "
                                    f"history says {hist[pos]}")
        for pos, payload in self.acked.items():
            if hist[pos][1] != payload:
                raise self.fail(f"acknowledged record at {pos} changed")
        leaders = [n for n in self.nodes.values()
                   if n.machine is not None and n.machine.role == Role.LEADER]
        terms = [n.machine.term for n in leaders if n.machine is not None]
        if len(set(terms)) != len(terms):
            raise self.fail(f"two leaders in one term: {terms}")
        if not self.cfg.check_liveness:
            return
        open_leaders = [n for n in leaders if n.machine is not None and n.machine.is_open]
        if not open_leaders:
            raise self.fail("liveness: no open leader after healing")
        if not self._converged():
            commits = {n.id: n.disk.commit for n in self.nodes.values()}
            raise self.fail(f"liveness: not converged by t={self.now}: commits {commits}, "
                            f"highest ever committed {len(hist) - 1}")


# Random schedules that most often line up Raft's figure 8 (5 voters, one entry per batch, no
# pre-check, frequent faults): used to hunt seeds that catch the commit_any_term variant.
# No voter wipes there: each forces an extra election by fencing the leader, and with them
# 8000 hunting seeds caught nothing (without them about 1 in 1600 does). No etcd resets
# either (they came later: the known seeds of the tests were hunted without them).
HUNT = dict(duration=2000, heal=400, precheck=False, voters=5, fault_gap=(20, 100),
            fault_len=(20, 200), delay=(1, 10),
            fault_kinds=tuple(k for k in FAULT_KINDS if k not in ("wipe_voter", "etcd_reset")))


def hunt_config(seed: int, unsafe: Unsafe) -> SimConfig:
    cfg = random_config(random.Random(seed), unsafe=unsafe, **HUNT)
    return replace(cfg, limits=replace(cfg.limits, max_batch_entries=1, max_inflight=1))


def run_many(seeds: range, **overrides: object) -> list[SimResult]:
    out = []
    for seed in seeds:
        rng = random.Random(seed)
        cfg = random_config(rng, **overrides)
        out.append(Sim(seed, cfg).run())
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--unsafe", action="append", default=[],
                    choices=[f.name for f in fields(Unsafe)])
    ap.add_argument("--trace", action="store_true", help="print the whole trace on failure")
    ap.add_argument("--hunt", action="store_true",
                    help="use the figure-8 hunting config and report every failing seed")
    ap.add_argument("--duration", type=int, help="override the faulty phase length")
    ap.add_argument("--heal", type=int, help="override the healed phase length")
    ap.add_argument("--mix", choices=sorted(MIXES),
                    help="draw faults from this weighted mix instead of every kind")
    return ap


def cli_config(args: argparse.Namespace, seed: int) -> SimConfig:
    unsafe = Unsafe(**{k: True for k in args.unsafe})
    cfg = hunt_config(seed, unsafe) if args.hunt else random_config(random.Random(seed),
                                                                     unsafe=unsafe)
    if args.mix is not None:
        cfg = replace(cfg, fault_kinds=MIXES[args.mix])
    if args.duration is not None:
        cfg = replace(cfg, duration=args.duration)
    if args.heal is not None:
        cfg = replace(cfg, heal=args.heal)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    failures = 0
    for seed in range(args.seed, args.seed + args.count):
        sim = Sim(seed, cli_config(args, seed), trace_len=10**7 if args.trace else 60)
        try:
            r = sim.run()
        except SimFailure as e:
            failures += 1
            print(e if args.trace or not args.hunt else str(e).splitlines()[0],
                  file=sys.stderr)
            if not args.hunt:
                return 1
            continue
        print(f"seed {seed}: ok, committed {r.committed}, acked {r.acked}, "
              f"terms {r.terms}, wipes {r.wipes}, events {r.events}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
