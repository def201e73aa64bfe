"""Unit tests of each rule of the pure replication state machine (geo.replication.core).

A tiny synchronous harness delivers messages FIFO (optionally dropping some) and applies
Persist effects to a MemoryLog immediately unless told to hold them, so each test can
stop the world exactly where the rule under test matters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import pytest

from geo.replication.core import (
    REJOIN_FENCE,
    TERM_TAKEN,
    Limits,
    Node,
    Role,
    Unsafe,
    quorum,
    should_campaign,
)
from geo.replication.log import InvariantError, MemoryLog
from geo.replication.messages import (
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
    Persist,
    Promise,
    PromiseReply,
    Refused,
    Rejoined,
    Send,
    SteppedDown,
    Tip,
)
from store.log import PROMISED_TO_UNKNOWN


def payload(term: int, pos: int) -> bytes:
    # Same (term, position) => same payload, so common prefixes are really common.
    return f"t{term}p{pos}".encode()


def disk_with(terms: Iterable[int], promised: int = 0, commit: int = 0,
              promised_to: str = "") -> MemoryLog:
    d = MemoryLog()
    entries = tuple(Entry(i + 1, t, payload(t, i + 1)) for i, t in enumerate(terms))
    d.apply(Persist(0, None, entries, max([promised, *(e.term for e in entries)]),
                    promised_to))
    d.commit = commit
    return d


def terms_of(d: MemoryLog) -> list[int]:
    return [d.term_at(p) for p in range(1, d.last_position() + 1)]


class Cluster:
    def __init__(
        self,
        logs: dict[str, list[int]],
        standbys: Iterable[str] = (),
        *,
        commits: dict[str, int] | None = None,
        limits: Limits | None = None,
        unsafe: Unsafe | None = None,
    ) -> None:
        standbys = set(standbys)
        self.voters = [n for n in logs if n not in standbys]
        self.standbys = [n for n in logs if n in standbys]
        commits = commits or {}
        self.disks = {n: disk_with(t, commit=commits.get(n, 0)) for n, t in logs.items()}
        self.nodes = {
            n: Node(n, self.voters, self.standbys, d, promised_term=d.promised_term,
                    commit=d.commit, limits=limits, unsafe=unsafe)
            for n, d in self.disks.items()
        }
        self.queue: deque[Message] = deque()
        self.effects: dict[str, list[Effect]] = {n: [] for n in logs}
        self.sent: list[Message] = []
        self.hold: set[str] = set()  # nodes whose disk writes stay pending
        self.held: dict[str, list[Persist]] = {n: [] for n in logs}

    def pump(self, n: str) -> None:
        node = self.nodes[n]
        while True:
            effs = node.drain()
            if not effs:
                return
            for e in effs:
                if isinstance(e, Send):
                    self.queue.append(e.msg)
                    self.sent.append(e.msg)
                elif isinstance(e, Persist):
                    self.effects[n].append(e)
                    if n in self.hold:
                        self.held[n].append(e)
                    else:
                        self.disks[n].apply(e)
                        node.on_persisted(e.seq)
                else:
                    self.effects[n].append(e)

    def wipe(self, n: str, fence: int) -> Node:
        """`n` lost its disk and restarts rejoining, fenced at `fence`, as the node shell
        starts it (promise and rejoin term persisted before the machine runs)."""
        d = self.disks[n] = MemoryLog()
        d.promised_term = d.rejoin_term = fence
        node = self.nodes[n] = Node(n, self.voters, self.standbys, d, promised_term=fence,
                                    rejoin_term=fence)
        return node

    def release(self, n: str) -> None:
        self.hold.discard(n)
        for p in self.held[n]:
            self.disks[n].apply(p)
            self.nodes[n].on_persisted(p.seq)
        self.held[n].clear()
        self.pump(n)

    def deliver(self, drop: Callable[[Message], bool] = lambda m: False, limit: int = 100000,
                ) -> int:
        steps = 0
        while self.queue and steps < limit:
            m = self.queue.popleft()
            steps += 1
            if drop(m):
                continue
            self.nodes[m.dst].step(m)
            self.pump(m.dst)
        return steps

    def elect(self, n: str, term: int, drop: Callable[[Message], bool] = lambda m: False,
              ) -> Node:
        node = self.nodes[n]
        node.become_leader(term, b"start")
        self.pump(n)
        self.deliver(drop)
        return node

    def tick(self, n: str, times: int = 1) -> None:
        for _ in range(times):
            self.nodes[n].tick()
            self.pump(n)

    def of(self, n: str, kind: type) -> list:
        return [e for e in self.effects[n] if isinstance(e, kind)]


def step(node: Node, msg: Message) -> list[Effect]:
    node.step(msg)
    return node.drain()


def sends(effects: list[Effect]) -> list[Message]:
    return [e.msg for e in effects if isinstance(e, Send)]


def persists(effects: list[Effect]) -> list[Persist]:
    return [e for e in effects if isinstance(e, Persist)]


def durable(node: Node, *writes: Persist) -> None:
    """The shell's job: apply the writes to the disk, then acknowledge the last one."""
    for w in writes:
        node.log.apply(w)  # type: ignore[attr-defined]
    node.on_persisted(writes[-1].seq)


def follower(terms: list[int], promised: int = 0, commit: int = 0, to: str = "L",
             **kw) -> Node:
    """Follower "f" of voters L, f, x; its promise (if any) was made to ``to``."""
    d = disk_with(terms, promised=promised, commit=commit, promised_to=to if promised else "")
    return Node("f", ["L", "f", "x"], [], d, promised_term=d.promised_term,
                promised_to=d.promised_to, commit=commit, **kw)


# ---------------------------------------------------------------------------- basics


def test_quorum_and_precheck() -> None:
    assert [quorum(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    own = Tip(3, 10)
    assert should_campaign(own, {"b": Tip(3, 10), "c": None})
    assert should_campaign(own, {"b": Tip(2, 50), "c": Tip(3, 9)})
    assert not should_campaign(own, {"b": Tip(3, 11)})
    assert not should_campaign(own, {"b": None, "c": Tip(4, 1)})
    assert should_campaign(Tip(0, 0), {})


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(max_inflight=0)


def test_membership_is_validated() -> None:
    d = MemoryLog()
    with pytest.raises(ValueError):
        Node("a", ["a"], ["a"], d)
    with pytest.raises(ValueError):
        Node("z", ["a"], [], d)
    with pytest.raises(ValueError):
        Node("s", ["a"], ["s"], d).become_leader(1)


# ---------------------------------------------------------------------------- fencing


def test_append_from_lower_term_is_fenced_without_writing() -> None:
    f = follower([1, 1], promised=5)
    effs = step(f, Append("L", "f", 4, 2, 1, (Entry(3, 4, b"x"),), 0))
    assert persists(effs) == []
    (reply,) = sends(effs)
    assert isinstance(reply, AppendReply) and not reply.ok and reply.higher_term == 5


def test_higher_term_is_persisted_atomically_with_the_entries() -> None:
    f = follower([1, 1], promised=1)
    effs = step(f, Append("L", "f", 7, 2, 1, (Entry(3, 7, b"x"),), 0))
    (p,) = persists(effs)
    assert p.promised_term == 7 and [e.position for e in p.entries] == [3]
    assert p.promised_to == "L"  # the leader that raised it holds the term
    assert f.promised_term == 7 and f.promised_to == "L"
    assert any(isinstance(e, LeaderKnown) and e.leader == "L" for e in effs)


def test_promise_is_durable_before_the_reply_and_fences_older_leaders() -> None:
    f = follower([1, 2, 2], promised=2)
    effs = step(f, Promise("N", "f", 9))
    (p,) = persists(effs)
    assert p.promised_term == 9 and p.entries == () and p.truncate_after is None
    assert sends(effs) == []  # nothing before the fsync
    durable(f, p)
    (reply,) = sends(f.drain())
    assert reply == PromiseReply("f", "N", 9, True, Tip(2, 3))
    # the old leader of term 2 is now refused
    effs = step(f, Append("L", "f", 2, 3, 2, (Entry(4, 2, b"late"),), 3))
    assert persists(effs) == [] and f.commit == 0
    (rej,) = sends(effs)
    assert rej.higher_term == 9
    # and so is an older candidate's promise
    (rej,) = sends(step(f, Promise("M", "f", 8)))
    assert isinstance(rej, PromiseReply) and not rej.ok and rej.higher_term == 9


def test_ack_pending_when_a_higher_promise_arrives_is_turned_into_a_fence() -> None:
    f = follower([1], promised=1)
    effs = step(f, Append("L", "f", 1, 1, 1, (Entry(2, 1, b"x"),), 0))
    (p1,) = persists(effs)
    (p2,) = persists(step(f, Promise("N", "f", 3)))
    durable(f, p1, p2)
    replies = sends(f.drain())
    ack = next(m for m in replies if isinstance(m, AppendReply))
    assert not ack.ok and ack.higher_term == 3  # the term-1 leader must not count us
    assert any(isinstance(m, PromiseReply) and m.tip == Tip(1, 2) for m in replies)


def test_promised_term_never_decreases() -> None:
    f = follower([1], promised=4)
    with pytest.raises(InvariantError):
        f._raise_promise(3, "L")


# ---------------------------------------------------------------------------- one node per term
# etcd that lost its data grants revisions (terms) from 1 again: one term can go to two
# candidates. A promise binds the term to one node (Raft's votedFor), so only one leads it.


def test_a_voter_promises_a_term_to_one_node_only_even_after_a_restart() -> None:
    # f promised 30 to L (old etcd); a new etcd grants 30 again, to x.
    f = follower([1, 1], promised=1)
    effs = step(f, Promise("L", "f", 30))
    (p,) = persists(effs)
    assert (p.promised_term, p.promised_to) == (30, "L")
    durable(f, p)
    assert sends(f.drain()) == [PromiseReply("f", "L", 30, True, Tip(1, 2))]
    refused = PromiseReply("f", "x", 30, False, Tip(1, 2), higher_term=30)
    effs = step(f, Promise("x", "f", 30))
    assert persists(effs) == [] and sends(effs) == [refused]  # no state change
    assert (f.promised_term, f.promised_to) == (30, "L")
    # a restart reads the promise back from the disk, whom it was made to included
    d = f.log
    assert isinstance(d, MemoryLog) and (d.promised_term, d.promised_to) == (30, "L")
    f2 = Node("f", ["L", "f", "x"], [], d, promised_term=d.promised_term,
              promised_to=d.promised_to)
    assert f2.promised_to == "L" and f2.status().promised_to == "L"
    effs = step(f2, Promise("x", "f", 30))
    assert persists(effs) == [] and sends(effs) == [refused]
    # L's repeated Promise is still answered
    effs = step(f2, Promise("L", "f", 30))
    assert persists(effs) == []
    assert sends(effs) == [PromiseReply("f", "L", 30, True, Tip(1, 2))]


def test_append_and_fetch_of_the_promised_term_from_another_node_are_refused() -> None:
    f = follower([1, 30, 30], promised=30, to="L")
    effs = step(f, Append("x", "f", 30, 3, 30, (Entry(4, 30, b"x's"),), 4))
    assert persists(effs) == [] and f.commit == 0 and f.leader is None
    assert sends(effs) == [AppendReply("f", "x", 30, False, rejected=3, higher_term=30)]
    effs = step(f, Fetch("x", "f", 30, 1, 1, 100, 1 << 20))
    assert sends(effs) == [FetchReply("f", "x", 30, False, 1, higher_term=30)]
    assert terms_of(f.log) == [1, 30, 30]  # type: ignore[arg-type]
    # L, which holds the term, is served
    effs = step(f, Append("L", "f", 30, 3, 30, (Entry(4, 30, b"L's"),), 0))
    durable(f, *persists(effs))
    assert sends(f.drain()) == [AppendReply("f", "L", 30, True, match=4)]
    (reply,) = sends(step(f, Fetch("L", "f", 30, 1, 1, 100, 1 << 20)))
    assert isinstance(reply, FetchReply) and reply.ok
    assert [e.payload for e in reply.entries][-1] == b"L's"


def test_a_promise_to_nobody_known_binds_to_the_first_node_of_that_term() -> None:
    # e.g. a wiped voter's fence, or a data directory written before promised_to existed
    f = follower([1, 1], promised=7, to="")
    assert f.promised_to == ""
    # a Fetch binds nothing, and is refused: no leader counted a promise made to nobody
    effs = step(f, Fetch("L", "f", 7, 1, 1, 100, 1 << 20))
    assert persists(effs) == [] and f.promised_to == ""
    assert sends(effs) == [FetchReply("f", "L", 7, False, 1, higher_term=7)]
    effs = step(f, Append("x", "f", 7, 2, 1, (), 0))
    (p,) = persists(effs)  # the binding is durable before the ack
    assert (p.promised_term, p.promised_to, p.entries) == (7, "x", ())
    assert sends(effs) == []
    durable(f, p)
    assert sends(f.drain()) == [AppendReply("f", "x", 7, True, match=2)]
    assert f.promised_to == "x"
    (rej,) = sends(step(f, Promise("L", "f", 7)))
    assert isinstance(rej, PromiseReply) and not rej.ok and rej.higher_term == 7
    # a Promise binds it just the same
    g = follower([1, 1], promised=7, to="")
    (p,) = persists(step(g, Promise("L", "f", 7)))
    assert (p.promised_term, p.promised_to) == (7, "L")
    durable(g, p)
    assert sends(g.drain()) == [PromiseReply("f", "L", 7, True, Tip(1, 2))]
    (rej,) = sends(step(g, Append("x", "f", 7, 2, 1, (), 0)))
    assert isinstance(rej, AppendReply) and not rej.ok and rej.higher_term == 7


def test_a_candidate_promises_its_term_to_itself() -> None:
    c = Cluster({"a": [1], "b": [1], "c": [1]})
    a = c.nodes["a"]
    a.become_leader(4)
    (p,) = persists(a.drain())
    assert (p.promised_term, p.promised_to) == (4, "a") and a.promised_to == "a"
    # so it refuses term 4 to anybody else, and cannot take term 4 again
    (rej,) = sends(step(a, Promise("b", "a", 4)))
    assert isinstance(rej, PromiseReply) and not rej.ok and rej.higher_term == 4
    assert a.role == Role.CANDIDATE
    a.step_down("lease lost")
    a.become_leader(4)
    assert a.drain()[-1] == SteppedDown(4, "stale term")


def test_a_candidate_counts_a_majority_only_with_its_own_durable_promise() -> None:
    # b and c promise 5 to a before a's own promise is durable. Counting them would start
    # a term whose promise a can still lose in a crash: etcd (having lost its data) could
    # then grant 5 to a again, and a second term-start record of term 5 would be written.
    c = Cluster({"a": [1, 1], "b": [1, 1], "c": [1, 1]})
    a = c.nodes["a"]
    c.hold.add("a")
    c.elect("a", 5)
    assert c.nodes["b"].promised_to == c.nodes["c"].promised_to == "a"
    assert a.role == Role.CANDIDATE and not any(isinstance(m, Append) for m in c.sent)
    c.release("a")  # durable now: the term starts
    c.deliver()
    assert a.role == Role.LEADER and terms_of(c.disks["b"]) == [1, 1, 5]


def test_a_log_older_than_promised_to_refuses_its_term_to_every_node() -> None:
    # a led term 5 before promised_to existed; a and c hold its uncommitted records 4..5
    # and 4, promised to a, which their logs do not say (PROMISED_TO_UNKNOWN). etcd grants
    # 5 again, to the lagging b: binding 5 to the first asker would let b lead term 5 with
    # c, write other records at 4..5 of term 5, and a would keep its own (same terms).
    voters = ["a", "b", "c"]
    c = Cluster({"a": [1], "b": [1], "c": [1]})
    for n, terms in (("a", [1, 1, 1, 5, 5]), ("c", [1, 1, 1, 5]), ("b", [1])):
        d = c.disks[n] = disk_with(terms, promised=5 if n != "b" else 1,
                                   promised_to=PROMISED_TO_UNKNOWN if n != "b" else "x")
        c.nodes[n] = Node(n, voters, [], d, promised_term=d.promised_term,
                          promised_to=d.promised_to, commit=3 if n != "b" else 0)
    b = c.elect("b", 5)
    assert c.of("b", SteppedDown) == [SteppedDown(5, TERM_TAKEN)] and not b.is_open
    assert c.nodes["a"].promised_to == c.nodes["c"].promised_to == PROMISED_TO_UNKNOWN
    # a later term is promised as usual, and its leader holds a's records
    b = c.elect("b", 6)
    assert b.is_open and terms_of(c.disks["b"]) == [1, 1, 1, 5, 5, 6]


def test_a_candidate_gives_up_a_term_promised_to_another_node() -> None:
    # a leads term 5 with b (c was cut off). etcd loses its data and grants 5 again, to c.
    c = Cluster({"a": [1], "b": [1], "c": [1]})
    a = c.elect("a", 5, drop=lambda m: "c" in (m.src, m.dst))
    assert a.is_open and c.nodes["b"].promised_to == "a"
    cand = c.elect("c", 5)
    # a and b refuse (they promised 5 to a): c counts no refusal and gives the term up
    assert c.of("c", SteppedDown) == [SteppedDown(5, TERM_TAKEN)]
    assert cand.role == Role.FOLLOWER and terms_of(c.disks["c"]) == [1]
    assert a.role == Role.LEADER and a.is_open and c.of("a", SteppedDown) == []
    # the shell campaigns again; the next revision is a term above the promises
    cand = c.elect("c", 6)
    assert cand.is_open and terms_of(c.disks["c"]) == [1, 5, 6]
    assert c.of("a", SteppedDown) == [SteppedDown(5, "higher term")]


def test_a_leader_or_recovering_leader_refused_its_own_term_steps_down() -> None:
    c = Cluster({"a": [1], "b": [1], "c": [1]})
    leader = c.elect("a", 3)
    leader.step(AppendReply("b", "a", 3, False, rejected=2, higher_term=3))
    assert leader.drain() == [SteppedDown(3, TERM_TAKEN)] and leader.role == Role.FOLLOWER
    c = Cluster({"a": [1], "b": [1, 1, 1], "c": [1]})
    a = c.nodes["a"]
    a.become_leader(4)
    c.pump("a")
    c.deliver(drop=lambda m: isinstance(m, Fetch))
    assert a.role == Role.RECOVERING
    a.step(FetchReply("b", "a", 4, False, 1, higher_term=4))
    assert a.drain() == [SteppedDown(4, TERM_TAKEN)] and a.role == Role.FOLLOWER


def test_the_disk_never_moves_a_promise_to_another_node() -> None:
    d = disk_with([1], promised=3, promised_to="a")
    with pytest.raises(InvariantError, match="promised to 'a', then to 'b'"):
        d.apply(Persist(1, None, (), 3, "b"))
    d.apply(Persist(1, None, (), 4, "b"))  # a new term: any node
    e = disk_with([1], promised=3)
    e.apply(Persist(1, None, (), 3, "b"))  # from nobody known: binds
    assert e.promised_to == "b"


def test_promised_to_needs_a_promised_term() -> None:
    with pytest.raises(InvariantError, match="no promised term"):
        Node("a", ["a", "b", "c"], [], MemoryLog(), promised_to="b")


# ---------------------------------------------------------------------------- log matching


def test_prev_mismatch_on_short_log_hints_last_position() -> None:
    f = follower([1, 1, 1])
    (rej,) = sends(step(f, Append("L", "f", 2, 10, 2, (), 0)))
    assert not rej.ok and rej.rejected == 10 and (rej.hint_pos, rej.hint_term) == (3, 1)


def test_prev_mismatch_on_divergent_term_hints_past_the_whole_term() -> None:
    f = follower([1, 1, 2, 2, 2, 2])
    (rej,) = sends(step(f, Append("L", "f", 3, 6, 3, (), 0)))
    assert (rej.hint_pos, rej.hint_term) == (6, 2)
    # the leader's prev term is 1 at position 5: skip the follower's whole term 2
    (rej,) = sends(step(f, Append("L", "f", 3, 5, 1, (), 0)))
    assert (rej.hint_pos, rej.hint_term) == (2, 1)


def test_leader_backs_up_in_one_round_trip_per_divergent_term() -> None:
    # leader a: [1,1,3,3,3,3,3,3]; follower b diverged with a long term-2 suffix
    c = Cluster({"a": [1, 1, 3, 3, 3, 3, 3, 3], "b": [1, 1, 2, 2, 2, 2, 2, 2, 2, 2],
                 "c": [1, 1, 3, 3, 3, 3, 3, 3]})
    c.elect("a", 5)
    rejects = [m for m in c.sent if isinstance(m, AppendReply) and m.src == "b" and not m.ok]
    assert len(rejects) == 1
    assert terms_of(c.disks["b"]) == [1, 1, 3, 3, 3, 3, 3, 3, 5]
    assert terms_of(c.disks["b"]) == terms_of(c.disks["a"])


def test_divergent_uncommitted_suffix_is_truncated() -> None:
    f = follower([1, 1, 2, 2], commit=2)
    effs = step(f, Append("L", "f", 3, 2, 1, (Entry(3, 3, b"n"),), 2))
    (p,) = persists(effs)
    assert p.truncate_after == 2 and [e.position for e in p.entries] == [3]
    assert f.tip() == Tip(3, 3)


def test_never_truncates_at_or_below_commit() -> None:
    f = follower([1, 1, 2, 2], commit=3)
    with pytest.raises(InvariantError, match="truncate"):
        f.step(Append("L", "f", 3, 2, 1, (Entry(3, 3, b"n"),), 2))


def test_duplicate_or_reordered_batch_never_truncates_newer_entries() -> None:
    f = follower([1, 1, 1, 1, 1], promised=1)
    effs = step(f, Append("L", "f", 1, 1, 1, (Entry(2, 1, payload(1, 2)),
                                              Entry(3, 1, payload(1, 3))), 0))
    assert persists(effs) == []  # all already held, nothing to write
    (ack,) = sends(effs)
    assert ack.ok and ack.match == 3
    assert f.tip() == Tip(1, 5)


def test_ack_only_once_durable_and_cumulative() -> None:
    f = follower([], promised=1)
    e1 = step(f, Append("L", "f", 1, 0, 0, (Entry(1, 1, b"a"),), 0))
    e2 = step(f, Append("L", "f", 1, 1, 1, (Entry(2, 1, b"b"),), 0))
    assert sends(e1) == [] and sends(e2) == []
    (p2,) = persists(e2)
    durable(f, *persists(e1), p2)  # one acknowledgement for both writes
    acks = sends(f.drain())
    assert [a.match for a in acks] == [1, 2]


def test_entry_terms_must_not_decrease() -> None:
    f = follower([], promised=3)
    with pytest.raises(InvariantError, match="term decreases"):
        f.step(Append("L", "f", 3, 0, 0, (Entry(1, 3, b"a"), Entry(2, 2, b"b")), 0))


def test_entry_terms_must_not_fall_below_the_log_or_pass_the_promise() -> None:
    """Checked for every entry of every write (in C-level passes): the first entry's term
    against the entry before it, the last against the promised term."""
    f = follower([1, 3], promised=3)
    with pytest.raises(InvariantError, match="term decreases at 3"):
        f.step(Append("L", "f", 3, 2, 3, (Entry(3, 2, b"a"),), 0))
    f = follower([], promised=1)
    with pytest.raises(InvariantError, match="above promised"):
        f.step(Append("L", "f", 1, 0, 0, (Entry(1, 1, b"a"), Entry(2, 2, b"b")), 0))


def test_positions_must_be_gapless() -> None:
    f = follower([1], promised=1)
    with pytest.raises(InvariantError, match="gap"):
        f.step(Append("L", "f", 1, 1, 1, (Entry(2, 1, b"a"), Entry(4, 1, b"b")), 0))


def test_follower_commit_is_bounded_by_the_matched_prefix_and_never_decreases() -> None:
    f = follower([1, 1, 2, 2], promised=3)
    # prev matches at 2 only: positions 3..4 may be a stale suffix, not committable
    f.step(Append("L", "f", 3, 2, 1, (), 4))
    assert f.commit == 2
    f.drain()
    f.step(Append("L", "f", 3, 2, 1, (), 1))  # older message, lower commit
    assert f.commit == 2
    assert not any(isinstance(e, Committed) for e in f.drain())


def test_visible_commit_waits_for_local_durability() -> None:
    f = follower([], promised=1)
    effs = step(f, Append("L", "f", 1, 0, 0, (Entry(1, 1, b"a"), Entry(2, 1, b"b")), 2))
    assert not any(isinstance(e, Committed) for e in effs)
    assert f.commit == 0
    durable(f, *persists(effs))
    assert Committed(2) in f.drain()


def test_commit_never_covers_a_durable_but_replaced_suffix() -> None:
    # Disk holds a stale term-1 suffix; a pending write replaces it. Until that write is
    # durable, the stale entries must not be announced committed.
    f = follower([1, 1, 1, 1], promised=2)
    effs = step(f, Append("L", "f", 2, 2, 1, (Entry(3, 2, b"n"),), 3))
    assert f.commit == 2 and Committed(3) not in effs  # 1..2 are durable and matched
    durable(f, *persists(effs))
    assert Committed(3) in f.drain()


def test_log_view_ahead_of_acknowledgements_is_harmless() -> None:
    d = disk_with([1, 1], promised=2)
    f = Node("f", ["L", "f", "x"], [], d, promised_term=2)
    effs = step(f, Append("L", "f", 2, 1, 1, (Entry(2, 2, b"n"), Entry(3, 2, b"m")), 0))
    (p,) = persists(effs)
    d.apply(p)  # applied, not yet acknowledged
    assert f.tip() == Tip(2, 3)
    assert [e.payload for e in f._read(1, 3, 10, 1 << 20)] == [payload(1, 1), b"n", b"m"]
    f.on_persisted(p.seq)
    assert f.tip() == Tip(2, 3)


# ---------------------------------------------------------------------------- commit rule


def test_leader_commits_only_entries_of_its_own_term() -> None:
    # a holds old-term entries 3..4 that b lacks; after recovery b holds them but the
    # term-start record (position 5) is delayed: old entries must not commit yet.
    c = Cluster({"a": [1, 1, 2, 2], "b": [1, 1], "c": [1]})
    leader = c.elect("a", 5, drop=lambda m: m.dst == "c" or (
        isinstance(m, AppendReply) and m.ok))
    assert leader.role == Role.LEADER and not leader.is_open
    assert terms_of(c.disks["b"]) == [1, 1, 2, 2, 5]
    # b's acks were lost; deliver one for 3..4 only (as if 5 came in a later batch)
    leader.step(AppendReply("b", "a", 5, True, match=4))
    c.pump("a")
    assert leader.commit == 0  # 4 is on a majority (a, b) but of term 2
    leader.step(AppendReply("b", "a", 5, True, match=5))
    c.pump("a")
    assert leader.commit == 5 and leader.is_open
    assert LeaderOpen(5, 5) in c.effects["a"]


def test_broken_variant_commits_old_term_entries_by_counting() -> None:
    c = Cluster({"a": [1, 1, 2, 2], "b": [1, 1], "c": [1]},
                unsafe=Unsafe(commit_any_term=True))
    leader = c.elect("a", 5, drop=lambda m: m.dst == "c" or (
        isinstance(m, AppendReply) and m.ok))
    leader.step(AppendReply("b", "a", 5, True, match=4))
    assert leader._commit == 4  # what the current-term rule forbids


def test_standbys_never_count_for_commit() -> None:
    c = Cluster({"a": [], "b": [], "c": [], "s": []}, standbys=["s"])
    leader = c.elect("a", 2)
    assert leader.is_open
    c.queue.clear()
    res = leader.propose([b"x"])
    assert isinstance(res, Accepted)
    c.pump("a")
    c.deliver(drop=lambda m: m.dst in ("b", "c") or m.src in ("b", "c"))
    assert c.disks["s"].last_position() == res.last  # the standby got it...
    assert leader.commit < res.last  # ...but it does not make a majority
    leader.step(AppendReply("b", "a", 2, True, match=res.last))
    c.pump("a")
    assert leader.commit == res.last
    assert leader.status().peers["s"].voter is False


# ---------------------------------------------------------------------------- election / recovery


def test_leader_adopts_most_up_to_date_promiser_log_by_fetching_it() -> None:
    c = Cluster({"a": [1, 1], "b": [1, 1, 2, 2], "c": [1]})
    leader = c.elect("a", 5)
    assert any(isinstance(m, Fetch) and m.dst == "b" for m in c.sent)
    assert terms_of(c.disks["a"]) == [1, 1, 2, 2, 5]
    assert leader.is_open and leader.term_start == 5
    for n in "abc":
        assert terms_of(c.disks[n]) == [1, 1, 2, 2, 5]


def test_higher_last_term_beats_longer_log() -> None:
    # promisers: a (longer log, last term 2) and c (last term 3): c's log wins
    c = Cluster({"a": [1, 2, 2, 2, 2], "b": [1, 2, 2], "c": [1, 3]})
    c.elect("a", 9, drop=lambda m: "b" in (m.src, m.dst))
    assert terms_of(c.disks["a"]) == [1, 3, 9]
    c.tick("a", Limits().retransmit_ticks)  # the probe to b was lost: retransmitted
    c.deliver()
    assert terms_of(c.disks["b"]) == [1, 3, 9]  # b's uncommitted term-2 suffix is gone


def test_recovery_waits_for_a_majority_of_promises() -> None:
    c = Cluster({"a": [1], "b": [1, 2], "c": [1, 2, 2], "d": [1], "e": [1]})
    leader = c.elect("a", 4, drop=lambda m: m.dst in ("b", "c", "d"))
    assert leader.role == Role.CANDIDATE  # a + e only: 2 of 5
    assert leader.propose([b"x"]) == Refused("not_leader", None)
    c.tick("a", Limits().promise_retry_ticks)
    c.deliver(drop=lambda m: m.dst in ("b", "d"))  # now c answers: a, c, e promised
    assert leader.is_open
    assert terms_of(c.disks["a"]) == [1, 2, 2, 4]  # c had the best log


def test_recovery_fetches_in_bulk_ranges_and_truncates_own_stale_suffix() -> None:
    lim = Limits(max_fetch_entries=3)
    c = Cluster({"a": [1, 2, 2], "b": [1, 3, 3, 3, 3, 3, 3, 3, 3], "c": [1]}, limits=lim)
    c.elect("a", 7)
    fetches = [m for m in c.sent if isinstance(m, Fetch)]
    assert 3 <= len(fetches) <= 5
    writes = c.of("a", Persist)
    assert any(p.truncate_after == 1 for p in writes)  # a's own uncommitted term-2 suffix
    assert terms_of(c.disks["a"]) == [1, 3, 3, 3, 3, 3, 3, 3, 3, 7]


def test_precommitted_records_survive_any_majority_election() -> None:
    # Position 3 is committed (on a, b of 3 voters). Whoever leads next keeps it.
    for new_leader, reachable in (("c", "b"), ("c", "a"), ("b", "c")):
        c = Cluster({"a": [1, 1, 1], "b": [1, 1, 1], "c": [1]})
        c.elect(new_leader, 3, drop=lambda m, r=reachable, n=new_leader: {m.src, m.dst}
                != {n, r})
        assert terms_of(c.disks[new_leader])[:3] == [1, 1, 1]


def test_become_leader_with_stale_term_gives_the_key_back() -> None:
    c = Cluster({"a": [1], "b": [1], "c": [1]})
    c.nodes["a"].step(Promise("b", "a", 6))
    c.pump("a")
    c.nodes["a"].become_leader(5)
    c.pump("a")
    assert c.of("a", SteppedDown) == [SteppedDown(5, "stale term")]
    assert c.nodes["a"].role == Role.FOLLOWER


def test_recovery_timeout_steps_down() -> None:
    lim = Limits(recovery_timeout_ticks=5)
    c = Cluster({"a": [], "b": [], "c": []}, limits=lim)
    c.elect("a", 2, drop=lambda m: True)
    c.tick("a", 6)
    assert c.of("a", SteppedDown) == [SteppedDown(2, "recovery timeout")]


def test_single_voter_cluster_commits_alone() -> None:
    c = Cluster({"a": [1, 1]})
    leader = c.elect("a", 3)
    assert leader.is_open
    res = leader.propose([b"x", b"y"])
    c.pump("a")
    assert isinstance(res, Accepted) and leader.commit == res.last == 5


def test_a_leader_refuses_an_append_of_its_own_term_from_another_node() -> None:
    # Two nodes granted one term (etcd lost its data): the leader promised it to itself.
    c = Cluster({"a": [], "b": [], "c": []})
    leader = c.elect("a", 2)
    effs = step(leader, Append("b", "a", 2, 1, 2, (Entry(2, 2, b"b's"),), 2))
    assert persists(effs) == []
    (rej,) = sends(effs)
    assert isinstance(rej, AppendReply) and not rej.ok and rej.higher_term == 2
    assert leader.role == Role.LEADER and leader.is_open and leader.promised_to == "a"


def test_two_leaders_in_one_term_is_an_invariant_violation() -> None:
    # Without promised_to (the broken variant) the Append gets through to the check.
    c = Cluster({"a": [], "b": [], "c": []}, unsafe=Unsafe(unbound_promises=True))
    c.elect("a", 2)
    with pytest.raises(InvariantError, match="leads term 2"):
        c.nodes["a"].step(Append("b", "a", 2, 0, 0, (), 0))


def test_skip_promises_variant_leads_on_its_own_log() -> None:
    c = Cluster({"a": [1], "b": [1, 2, 2], "c": [1, 2, 2]}, unsafe=Unsafe(skip_promises=True))
    c.elect("a", 4)
    assert not any(isinstance(m, Promise) for m in c.sent)
    assert terms_of(c.disks["b"]) == [1, 4]  # b's records lost: why the Promise step exists


# ---------------------------------------------------------------------------- client writes, leases


def test_proposals_only_on_an_open_leader() -> None:
    c = Cluster({"a": [], "b": [], "c": []})
    assert c.nodes["b"].propose([b"x"]) == Refused("not_leader", None)
    c.hold.update("abc")
    leader = c.elect("a", 2)
    assert leader.role == Role.CANDIDATE  # no promise is durable yet
    assert leader.propose([b"x"]) == Refused("not_leader", None)
    for n in "abc":
        c.release(n)
    c.deliver(drop=lambda m: isinstance(m, AppendReply))
    assert leader.role == Role.LEADER
    assert leader.propose([b"x"]) == Refused("not_open", "a")  # term start not committed
    c.tick("a", Limits().retransmit_ticks)
    c.deliver()
    assert leader.is_open
    assert c.nodes["b"].propose([b"x"]) == Refused("not_leader", "a")
    assert leader.propose([]) == Refused("too_large", "a")
    res = leader.propose([b"x", b"y"])
    assert res == Accepted(2, 3, 2)
    c.pump("a")
    c.deliver()
    assert Committed(3) in c.effects["a"]


def test_committed_effect_only_after_quorum_and_local_durability() -> None:
    c = Cluster({"a": [], "b": [], "c": []})
    leader = c.elect("a", 2)
    c.hold.add("a")
    res = leader.propose([b"x"])
    c.pump("a")
    c.deliver()
    assert leader._commit == res.last  # b and c acked: quorum
    assert leader.commit < res.last  # but not durable on the leader yet: no client answer
    c.release("a")
    assert leader.commit == res.last


def test_step_down_refuses_further_proposals() -> None:
    c = Cluster({"a": [], "b": [], "c": []})
    leader = c.elect("a", 2)
    leader.step_down("lease lost")
    c.pump("a")
    assert c.of("a", SteppedDown) == [SteppedDown(2, "lease lost")]
    assert leader.propose([b"x"]) == Refused("not_leader", None)


def test_paused_old_leader_never_gets_a_quorum_again() -> None:
    c = Cluster({"a": [], "b": [], "c": []})
    old = c.elect("a", 2)
    assert old.is_open
    # a is paused; b wins term 4 with c's promise; a wakes up still believing it leads
    c.elect("b", 4, drop=lambda m: "a" in (m.src, m.dst))
    assert c.nodes["b"].is_open
    res = old.propose([b"stale"])
    assert isinstance(res, Accepted)
    c.pump("a")
    c.deliver()
    assert old.role == Role.FOLLOWER  # fenced by b and c, stepped down
    assert old.commit < res.last
    assert all(e.reason == "higher term" for e in c.of("a", SteppedDown))


def test_leader_steps_down_without_a_voter_majority() -> None:
    lim = Limits(check_quorum_ticks=5)
    c = Cluster({"a": [], "b": [], "c": [], "s": []}, standbys=["s"], limits=lim)
    c.elect("a", 2)
    for _ in range(2 * lim.check_quorum_ticks):  # a window may start with stale replies
        c.tick("a")
        c.deliver(drop=lambda m: m.dst in ("b", "c") or m.src in ("b", "c"))
    assert c.of("a", SteppedDown) == [SteppedDown(2, "lost quorum")]


def test_backpressure_bounds_unpersisted_entries() -> None:
    c = Cluster({"a": [], "b": [], "c": []}, limits=Limits(max_unpersisted_entries=4))
    leader = c.elect("a", 2)
    c.hold.add("a")
    assert isinstance(leader.propose([b"1", b"2", b"3"]), Accepted)
    assert leader.propose([b"4", b"5"]) == Refused("backpressure", "a")
    c.release("a")
    assert isinstance(leader.propose([b"4", b"5"]), Accepted)


# ---------------------------------------------------------------------------- pipelining, catch-up


def test_pipelining_is_bounded_per_follower() -> None:
    lim = Limits(max_batch_entries=2, max_inflight=3)
    c = Cluster({"a": [], "b": [], "c": []}, limits=lim)
    leader = c.elect("a", 2)
    c.queue.clear()
    c.sent.clear()
    leader.propose([b"%d" % i for i in range(20)])
    c.pump("a")
    to_b = [m for m in c.sent if isinstance(m, Append) and m.dst == "b"]
    assert len(to_b) == 3 and all(len(m.entries) == 2 for m in to_b)
    assert leader.status().peers["b"].inflight == 3
    c.deliver()
    assert c.disks["b"].last_position() == 21 and leader.commit == 21


def test_batches_respect_the_byte_limit_but_always_carry_one_entry() -> None:
    lim = Limits(max_batch_entries=100, max_batch_bytes=10, max_inflight=1)
    c = Cluster({"a": [], "b": [], "c": []}, limits=lim)
    leader = c.elect("a", 2)
    c.queue.clear()
    c.sent.clear()
    leader.propose([b"x" * 25, b"y" * 4, b"z" * 4])
    c.pump("a")
    c.deliver()
    sizes = [len(m.entries) for m in c.sent if isinstance(m, Append) and m.dst == "b"
             and m.entries]
    assert sizes[:2] == [1, 2]


def test_reject_resets_next_and_probes() -> None:
    lim = Limits(max_batch_entries=1, max_inflight=4)
    c = Cluster({"a": [], "b": [], "c": []}, limits=lim)
    leader = c.elect("a", 2)
    c.queue.clear()
    leader.propose([b"1", b"2", b"3", b"4"])
    c.pump("a")
    first_to_b = next(m for m in c.queue if m.dst == "b")
    c.deliver(drop=lambda m: m is first_to_b)  # lost: b rejects the next ones
    pr = leader.status().peers["b"]
    assert pr.state == "probe" or pr.match == 5
    c.tick("a", lim.retransmit_ticks + 1)
    c.deliver()
    assert c.disks["b"].last_position() == 5
    assert terms_of(c.disks["b"]) == terms_of(c.disks["a"])


def test_lost_batch_is_retransmitted_after_a_timeout() -> None:
    lim = Limits(retransmit_ticks=3, heartbeat_ticks=100)
    c = Cluster({"a": [], "b": [], "c": []}, limits=lim)
    leader = c.elect("a", 2)
    c.queue.clear()
    leader.propose([b"x"])
    c.pump("a")
    c.deliver(drop=lambda m: m.dst == "b")
    assert c.disks["b"].last_position() == 1
    c.tick("a", 3)
    c.deliver()
    assert c.disks["b"].last_position() == 2


def test_empty_replica_catches_up_in_bulk_and_becomes_in_sync() -> None:
    lim = Limits(max_batch_entries=50, max_inflight=4)
    history = [1] * 400
    c = Cluster({"a": history, "b": history, "s": []}, standbys=["s"], limits=lim)
    leader = c.elect("a", 2)
    to_s = [m for m in c.sent if isinstance(m, Append) and m.dst == "s" and m.entries]
    assert len(to_s) <= 12  # ranges, not one record at a time
    assert terms_of(c.disks["s"]) == terms_of(c.disks["a"])
    st = leader.status().peers["s"]
    assert st.in_sync and st.lag == 0


def test_wiped_standby_is_caught_up_after_reset_peer() -> None:
    c = Cluster({"a": [1, 1], "b": [1, 1], "s": [1, 1]}, standbys=["s"])
    leader = c.elect("a", 2)
    c.disks["s"] = MemoryLog()
    c.nodes["s"] = Node("s", c.voters, c.standbys, c.disks["s"])
    leader.reset_peer("s")
    c.pump("a")
    c.deliver()
    assert terms_of(c.disks["s"]) == [1, 1, 2]


def test_heartbeats_propagate_commit_to_followers() -> None:
    c = Cluster({"a": [], "b": [], "c": []})
    leader = c.elect("a", 2)
    leader.propose([b"x"])
    c.pump("a")
    c.deliver()
    assert c.nodes["b"].commit < 2
    c.tick("a")
    c.deliver()
    assert c.nodes["b"].commit == 2 and c.nodes["c"].commit == 2


def test_restart_from_disk_keeps_promise_and_commit() -> None:
    c = Cluster({"a": [], "b": [], "c": []})
    c.elect("a", 2)
    c.nodes["a"].propose([b"x"])
    c.pump("a")
    c.deliver()
    c.tick("a")
    c.deliver()
    d = c.disks["b"]
    d.commit = c.nodes["b"].commit
    b2 = Node("b", c.voters, [], d, promised_term=d.promised_term, commit=d.commit)
    assert b2.promised_term == 2 and b2.commit == 2 and b2.tip() == Tip(2, 2)
    (rej,) = sends(step(b2, Append("a", "b", 1, 0, 0, (), 0)))
    assert rej.higher_term == 2


def test_leader_notices_a_wiped_replica_by_itself() -> None:
    # No reset_peer: the heartbeat at the known match point is refused, the leader forgets
    # the match and catches the replica up again.
    c = Cluster({"a": [1, 1, 1], "b": [1, 1, 1], "s": [1, 1, 1]}, standbys=["s"])
    leader = c.elect("a", 2)
    assert leader.status().peers["s"].match == 4
    c.disks["s"] = MemoryLog()
    c.nodes["s"] = Node("s", c.voters, c.standbys, c.disks["s"])
    c.tick("a")
    c.deliver()
    assert terms_of(c.disks["s"]) == [1, 1, 1, 2]
    assert leader.status().peers["s"].match == 4


def test_old_reordered_reject_below_match_is_ignored() -> None:
    c = Cluster({"a": [1, 1, 1], "b": [1, 1, 1], "c": [1, 1, 1]})
    leader = c.elect("a", 2)
    leader.step(AppendReply("b", "a", 2, False, rejected=2, hint_pos=1, hint_term=1))
    assert leader.status().peers["b"].match == 4
    assert c.nodes["a"].drain() == []


# ---------------------------------------------------------------------------- wiped voters


def test_rejoin_is_validated() -> None:
    with pytest.raises(ValueError, match="only a voter"):
        Node("s", ["a"], ["s"], MemoryLog(), promised_term=3, rejoin_term=3)
    with pytest.raises(InvariantError, match="rejoin term"):
        Node("a", ["a", "b", "c"], [], MemoryLog(), promised_term=2, rejoin_term=3)


def test_rejoining_voter_promises_nothing_but_keeps_the_fence() -> None:
    c = Cluster({"a": [1, 1], "b": [1, 1], "c": [1, 1]})
    b = c.wipe("b", 5)
    assert b.rejoining and b.rejoin_term == 5 and b.status().rejoining
    effs = step(b, Promise("a", "b", 7))
    (reply,) = sends(effs)
    assert reply == PromiseReply("b", "a", 7, False, Tip(0, 0), rejoining=True)
    (p,) = persists(effs)  # the higher promise is still kept: older leaders stay fenced
    assert p.promised_term == 7 and b.promised_term == 7
    (rej,) = sends(step(b, Promise("c", "b", 6)))
    assert not rej.ok and rej.higher_term == 7


def test_rejoining_voter_fences_every_leader_elected_before_the_wipe() -> None:
    c = Cluster({"a": [1, 1], "b": [1, 1], "c": [1, 1]})
    leader = c.elect("a", 2)
    assert leader.is_open
    c.wipe("b", 5)  # etcd's revision was 4 when b restarted: every old term is below 5
    c.tick("a")
    c.deliver()
    # the shell may take the seat again at once: no other leader was elected
    assert c.of("a", SteppedDown) == [SteppedDown(2, REJOIN_FENCE)]
    assert c.disks["b"].last_position() == 0  # nothing of the old leader was written


def test_no_election_counts_a_rejoining_voter() -> None:
    # The hole: a led and committed 3 with b's ack; b lost its disk; a is down. c + b are
    # a majority, but c lacks position 3: counting b's promise would lose it.
    c = Cluster({"a": [1, 1, 1], "b": [1, 1, 1], "c": [1, 1]}, commits={"a": 3})
    c.wipe("b", 5)
    cand = c.elect("c", 6, drop=lambda m: "a" in (m.src, m.dst))
    assert cand.role == Role.CANDIDATE and not cand.is_open  # c alone is no majority
    assert terms_of(c.disks["c"]) == [1, 1]  # no term-start record on the short log
    c.tick("c", 100)
    c.deliver(drop=lambda m: "a" in (m.src, m.dst))
    assert c.of("c", SteppedDown) == [SteppedDown(6, "recovery timeout")]
    # with a back, a majority without b adopts a's log: position 3 survives
    leader = c.elect("a", 7)
    assert leader.is_open and terms_of(c.disks["c"]) == [1, 1, 1, 7]


def test_rejoining_voter_does_not_lead() -> None:
    c = Cluster({"a": [1], "b": [1], "c": [1]})
    b = c.wipe("b", 5)
    b.become_leader(6)
    assert b.drain() == [SteppedDown(6, "rejoining: not a voter until caught up")]
    assert b.role == Role.FOLLOWER and b.promised_term == 5


def test_leader_counts_a_rejoining_voters_acks_only_once_it_is_whole() -> None:
    c = Cluster({"a": [1, 1], "b": [1, 1], "c": [1, 1]})
    c.wipe("b", 5)
    c_replication = lambda m: (  # noqa: E731
        isinstance(m, (Append, AppendReply)) and "c" in (m.src, m.dst))
    # a + c promise (b refuses); c never gets the term-start record, b catches up in bulk
    # and acks it, flagged: it must not commit (it would with b counted)
    leader = c.elect("a", 6, drop=c_replication)
    assert terms_of(c.disks["b"]) == [1, 1, 6]
    peer = leader.status().peers["b"]
    assert peer.rejoining and peer.match == 3
    assert any(isinstance(m, AppendReply) and m.src == "b" and m.ok and m.rejoining
               for m in c.sent)
    assert leader.commit == 0 and not leader.is_open
    b = c.nodes["b"]
    assert b.rejoining and c.of("b", Rejoined) == []
    # c acks: the term-start record commits; b learns it and is whole again (term 6 >= 5)
    for _ in range(Limits().retransmit_ticks + 2):
        c.tick("a")
        c.deliver()
    assert leader.is_open and leader.commit == 3
    assert b.commit == 3 and not b.rejoining and c.of("b", Rejoined) == [Rejoined(3, 6)]
    assert not leader.status().peers["b"].rejoining
    # now b counts: a + b commit with c cut off
    res = leader.propose([b"x"])
    assert isinstance(res, Accepted)
    c.pump("a")
    c.deliver(drop=lambda m: "c" in (m.src, m.dst))
    assert leader.commit == res.last


def test_rejoining_voter_does_not_keep_a_leader_in_its_seat() -> None:
    lim = Limits(check_quorum_ticks=5)
    c = Cluster({"a": [1], "b": [1], "c": [1]}, limits=lim)
    c.wipe("b", 5)
    c_replication = lambda m: (  # noqa: E731
        isinstance(m, (Append, AppendReply)) and "c" in (m.src, m.dst))
    leader = c.elect("a", 6, drop=c_replication)  # promised by a + c, c then silent
    for _ in range(2 * lim.check_quorum_ticks):  # b answers every tick, c never
        c.tick("a")
        c.deliver(drop=c_replication)
    assert c.of("a", SteppedDown) == [SteppedDown(6, "lost quorum")]
    assert leader.role == Role.FOLLOWER
    # b was answering all along: it holds the term-start record, yet it did not count
    assert c.nodes["b"].rejoining and terms_of(c.disks["b"]) == [1, 6]


def test_rejoin_ends_only_at_a_committed_entry_of_the_fence_term_or_later() -> None:
    # A crash during catch-up: meta still says rejoining, and the log alone decides.
    d = disk_with([1, 1, 4], promised=5, commit=3)
    d.rejoin_term = 5
    n = Node("b", ["a", "b", "c"], [], d, promised_term=5, commit=3, rejoin_term=5)
    assert n.rejoining and n.drain() == []  # term 4 < 5: written by an old leader
    d = disk_with([1, 1, 4, 6], promised=6, commit=4)
    n = Node("b", ["a", "b", "c"], [], d, promised_term=6, commit=4, rejoin_term=5)
    assert not n.rejoining and n.drain() == [Rejoined(4, 6)]
