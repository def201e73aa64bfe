"""Seeded simulated-cluster schedules for the replication state machine (geo.replication.sim).

Every schedule is reproducible from its seed; a failure message carries the seed, the
config, the last steps, and the command that replays it with a full trace.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from geo.replication.core import TERM_TAKEN, Limits, Role, Unsafe
from geo.replication.messages import Append, AppendReply, Message, SteppedDown
from geo.replication.sim import (
    WIPES_AND_RESETS,
    Sim,
    SimConfig,
    SimFailure,
    hunt_config,
    main,
    random_config,
)

SHORT = 2000  # short schedules: 600 time units of faults, 400 healed (+ convergence)
LONG = 100  # long schedules: 4000 time units of faults
CHUNK = 250


def run_seed(seed: int, **overrides: object) -> None:
    cfg = random_config(random.Random(seed), **overrides)
    Sim(seed, cfg).run()


@pytest.mark.parametrize("first", range(0, SHORT, CHUNK))
def test_short_schedules(first: int) -> None:
    for seed in range(first, first + CHUNK):
        run_seed(seed, duration=600, heal=400)


@pytest.mark.parametrize("first", range(100_000, 100_000 + LONG, 50))
def test_long_schedules(first: int) -> None:
    for seed in range(first, first + 50):
        run_seed(seed, duration=4000, heal=1000)


def test_three_and_five_voters_with_standby_all_covered() -> None:
    shapes = set()
    for seed in range(200):
        cfg = random_config(random.Random(seed))
        shapes.add((cfg.voters, cfg.standbys))
    assert shapes == {(3, 0), (3, 1), (5, 0), (5, 1)}


def test_schedules_are_reproducible() -> None:
    def fingerprint(seed: int) -> tuple:
        cfg = random_config(random.Random(seed), duration=600, heal=400)
        sim = Sim(seed, cfg)
        r = sim.run()
        return (r.committed, r.acked, r.terms, r.events, tuple(sim.committed))

    assert fingerprint(7) == fingerprint(7)
    assert fingerprint(7) != fingerprint(8)


def test_schedules_do_real_work() -> None:
    """Guard against a simulator that 'passes' because nothing happens."""
    results = [
        Sim(seed, random_config(random.Random(seed), duration=600, heal=400)).run()
        for seed in range(100)
    ]
    assert sum(r.acked for r in results) > 3000
    assert sum(r.terms > 1 for r in results) > 30  # failovers happen
    assert sum(r.regrants > 0 for r in results) > 5  # etcd lost its data, terms repeated
    assert all(r.committed > 0 for r in results)


# ------------------------------------------------------------------------ scripted scenarios

QUIET = SimConfig(
    voters=5,
    delay=(1, 1),
    disk_delay=(1, 1),
    loss=0.0,
    dup=0.0,
    lease_ttl=100_000,
    duration=400,
    heal=0,
    limits=Limits(max_batch_entries=1, max_inflight=1, check_quorum_ticks=1000,
                  recovery_timeout_ticks=1000),
    auto_elect=False,
    random_faults=False,
    clients=False,
    check_liveness=False,
)


def figure8() -> list[tuple[int, Callable[[Sim], object]]]:
    """Raft paper figure 8 adapted to the Promise/term-start protocol.

    1. v0 leads; x is appended at position 2 and reaches v1 only; v0 crashes.
    2. v4 wins with promises of v2, v3 (v1 cut off), appends its term-start record at 2,
       which reaches nobody; v4 crashes.
    3. v0 restarts and wins with v1, v2: it adopts its own log (x at 2) and ships x to v2
       while its own term-start record (position 3) does not get through to v2/v3. x is
       now on a majority (v0, v1, v2) but is of an older term.
    4. v0 crashes, v1 is cut off; v4 restarts and wins with v2, v3: its last term (2) is
       the highest among them, so it overwrites x. Committing x in step 3 would be a loss.
    """

    def drop(pred: Callable[[Message], bool] | None) -> Callable[[Sim], None]:
        return lambda m: setattr(m, "drop", pred)

    return [
        (5, lambda m: m.campaign("v0")),
        (60, lambda m: m.isolate(["v0", "v1"])),
        (61, lambda m: m.propose("v0", [b"x"])),
        (80, lambda m: m.crash("v0")),
        (81, lambda m: (m.heal_links(), m.isolate(["v1"]))),
        (82, drop(lambda msg: isinstance(msg, Append) and msg.src == "v4"
                  and bool(msg.entries))),
        (83, lambda m: m.campaign("v4")),
        (120, lambda m: m.crash("v4")),
        (121, lambda m: (m.heal_links(), m.restart("v0"), m.isolate(["v4"]))),
        (122, lambda m: setattr(m, "drop", lambda msg: isinstance(msg, Append)
                                and msg.dst in ("v2", "v3")
                                and any(e.position >= 3 for e in msg.entries)
                                # a probe it will reject still goes through
                                and m.nodes[msg.dst].disk.last_position() >= 2)),
        (123, lambda m: m.campaign("v0")),
        (200, lambda m: (m.crash("v0"), m.heal_links(), m.isolate(["v1"]))),
        (201, drop(None)),
        (202, lambda m: m.restart("v4")),
        (203, lambda m: m.campaign("v4")),
    ]


def test_figure8_schedule_is_safe_with_the_current_term_rule() -> None:
    sim = Sim(0, QUIET, script=figure8())
    sim.run()
    # the scenario really happened: v4 ended up leading and x was overwritten
    v4 = sim.nodes["v4"].machine
    assert v4 is not None and v4.role == Role.LEADER and v4.is_open
    assert sim.nodes["v2"].disk.entry(2).payload.startswith(b"start:")


def test_simulator_catches_commit_of_old_term_entries_by_counting() -> None:
    sim = Sim(0, replace(QUIET, unsafe=Unsafe(commit_any_term=True)), script=figure8())
    with pytest.raises(SimFailure, match=r"seed=0: .*(truncate|committed)") as info:
        sim.run()
    assert "last steps:" in str(info.value) and "reproduce:" in str(info.value)


# ------------------------------------------------------------------------ broken variants


def first_failure(seeds: range, **overrides: object) -> tuple[int, str] | None:
    for seed in seeds:
        try:
            run_seed(seed, **overrides)
        except SimFailure as e:
            return seed, str(e)
    return None


def test_random_schedules_catch_a_leader_that_skips_the_promise_step() -> None:
    found = first_failure(range(200), duration=600, heal=400,
                          unsafe=Unsafe(skip_promises=True))
    assert found is not None, "the checker never failed: it cannot be trusted"
    seed, message = found
    assert f"seed={seed}" in message and "--unsafe skip_promises" in message


# Found by `python -m geo.replication.sim --hunt --unsafe commit_any_term --count 5000`
# (--trace shows the schedule: a leader elected and lost before its term-start record spread,
# then an older log re-elected and its old-term tail committed by counting). Random schedules
# line figure 8 up rarely (about 1 in 1600 with the hunting config), so the suite replays
# known catching seeds instead of searching; the scripted figure8() above is the robust
# proof. If the simulator's use of randomness changes, re-hunt and update this list.
COMMIT_ANY_TERM_SEEDS = (545, 2523, 5190, 7062, 7989)


def test_random_schedules_catch_commit_of_old_term_entries_on_known_seeds() -> None:
    caught = []
    for seed in COMMIT_ANY_TERM_SEEDS:
        Sim(seed, hunt_config(seed, Unsafe())).run()  # the correct protocol passes
        try:
            Sim(seed, hunt_config(seed, Unsafe(commit_any_term=True))).run()
        except SimFailure as e:
            caught.append((seed, str(e)))
    assert caught, "no known seed catches commit_any_term any more: re-hunt"


# ------------------------------------------------------------------------ fencing and catch-up


def test_paused_leader_wakes_up_fenced_and_its_writes_never_commit() -> None:
    sent: list[Message] = []

    def spy(msg: Message) -> bool:
        sent.append(msg)
        return False

    cfg = replace(QUIET, voters=3, limits=replace(QUIET.limits, max_batch_entries=8))
    script: list[tuple[int, Callable[[Sim], object]]] = [
        (1, lambda m: setattr(m, "drop", spy)),
        (5, lambda m: m.campaign("v0")),
        (40, lambda m: m.propose("v0", [b"a"])),
        # SIGSTOP, and nothing reaches it while stopped: it cannot learn the new term
        (60, lambda m: (m.pause("v0"), m.isolate(["v0"]))),
        (61, lambda m: m.campaign("v1")),
        (100, lambda m: m.propose("v1", [b"b"])),
        (139, lambda m: m.heal_links()),
        # SIGCONT: its lease check has not run yet, a queued client write is served first
        (140, lambda m: (m.resume("v0"), m.propose("v0", [b"stale"]))),
        (300, lambda m: m.propose("v1", [b"c"])),
    ]
    sim = Sim(0, cfg, script=script)
    sim.run()
    v0 = sim.nodes["v0"].machine
    assert v0 is not None and v0.role == Role.FOLLOWER
    fenced = [m for m in sent if isinstance(m, AppendReply) and m.dst == "v0"
              and m.higher_term]
    assert fenced, "the stale leader was never fenced"
    payloads = [p for _, p in sim.committed]
    assert b"stale" not in payloads
    assert [p for p in payloads if p in (b"a", b"b", b"c")] == [b"a", b"b", b"c"]
    # the stale write was overwritten everywhere, v0 included
    for n in sim.nodes.values():
        assert all(n.disk.entry(i).payload != b"stale"
                   for i in range(1, n.disk.last_position() + 1))


def test_wiped_standby_catches_up_in_bulk_ranges() -> None:
    sizes: list[int] = []
    wiped_at = 700

    def spy(sim: Sim) -> Callable[[Message], bool]:
        def record(msg: Message) -> bool:
            if isinstance(msg, Append) and msg.dst == "s0" and sim.now >= wiped_at:
                sizes.append(len(msg.entries))
            return False
        return record

    cfg = SimConfig(voters=3, standbys=1, duration=1500, heal=500, loss=0.0, dup=0.0,
                    random_faults=False, limits=Limits(max_batch_entries=64, max_inflight=2))
    sim = Sim(3, cfg, script=[(1, lambda m: setattr(m, "drop", spy(m))),
                              (wiped_at, lambda m: m.wipe("s0"))])
    sim.run()  # includes the convergence check: s0 holds every committed record again
    assert sim.nodes["s0"].disk.commit == len(sim.committed) - 1 > 100
    assert max(sizes) >= 50  # ranges, not one record at a time


def test_failure_message_replays_the_same_failure(capsys: pytest.CaptureFixture[str]) -> None:
    found = first_failure(range(200), duration=600, heal=400,
                          unsafe=Unsafe(skip_promises=True))
    assert found is not None
    _, message = found
    command = message.splitlines()[1].split("reproduce: python -m geo.replication.sim ")[1]
    assert main(command.split()) == 1
    replayed = capsys.readouterr().err
    assert replayed.splitlines()[0] == message.splitlines()[0]
    assert len(replayed.splitlines()) > len(message.splitlines())  # --trace: every step


# ------------------------------------------------------------------------ wiped voters


def lost_disk() -> list[tuple[int, Callable[[Sim], object]]]:
    """The hole of a wiped voter (3 voters v0, v1, v2).

    1. v0 leads; v2 is cut off; a, b commit with v1's acks (v0 + v1).
    2. v1 loses its disk and restarts; v0 crashes; v2 is back.
    3. v2 campaigns: v2 + v1 are a majority of promises, and v2's log lacks a and b.
    4. Later v0 is back and campaigns; the wiped v1 catches up.
    """
    return [
        (5, lambda m: m.campaign("v0")),
        (40, lambda m: m.isolate(["v2"])),
        (41, lambda m: m.propose("v0", [b"a"])),
        (42, lambda m: m.propose("v0", [b"b"])),
        (80, lambda m: m.wipe("v1")),
        (81, lambda m: (m.crash("v0"), m.heal_links())),
        (82, lambda m: m.campaign("v2")),
        (200, lambda m: (m.restart("v0"), m.campaign("v0"))),
        (300, lambda m: m.propose("v0", [b"c"])),
    ]


LOST_DISK = replace(QUIET, voters=3, limits=replace(QUIET.limits, max_batch_entries=8,
                                                        recovery_timeout_ticks=5))


def test_a_wiped_voter_that_votes_at_once_loses_committed_records() -> None:
    """Without the rejoin (the wiped voter restarts as an ordinary empty voter), the
    schedule loses a committed record: the checker catches it."""
    sim = Sim(0, replace(LOST_DISK, unsafe=Unsafe(wiped_voter_votes=True)), script=lost_disk())
    with pytest.raises(SimFailure, match=r"committed position 2 as .*start:.* but it was "
                                         r"committed as .*b'a'.* before"):
        sim.run()


def test_a_wiped_voter_rejoins_without_a_vote_and_then_counts_again() -> None:
    sim = Sim(0, LOST_DISK, script=lost_disk())
    sim.run()
    payloads = [p for _, p in sim.committed]
    assert [p for p in payloads if p in (b"a", b"b", b"c")] == [b"a", b"b", b"c"]
    assert sim.term_owner and min(sim.term_owner) < sim.nodes["v1"].disk.promised_term
    # v2's campaign never opened (v1 refused its promise); v0's later one did
    v2_terms = [t for t, owner in sim.term_owner.items() if owner == "v2"]
    assert v2_terms and not any(sim.committed[i][0] in v2_terms
                                for i in range(1, len(sim.committed)))
    v1 = sim.nodes["v1"]
    assert v1.machine is not None and not v1.machine.rejoining and v1.disk.rejoin_term == 0
    assert v1.disk.commit == len(sim.committed) - 1  # it holds everything, c included


def test_random_schedules_wipe_voters_and_lose_nothing() -> None:
    """Wipes among crashes, pauses and partitions (every schedule of the suite draws
    them too): here weighted, so that most schedules wipe a voter, some several."""
    wiped = 0
    for seed in range(150):
        cfg = random_config(random.Random(seed), duration=600, heal=400,
                            fault_kinds=("wipe_voter",) * 3 + ("crash", "partition", "pause"))
        # also checks liveness: every wiped voter is whole again at the end
        wiped += Sim(seed, cfg).run().wipes
    assert wiped > 120


def test_random_schedules_catch_a_wiped_voter_that_votes_at_once() -> None:
    """The same schedules (as many disks lost at once) without the rejoin: some lose a
    committed record (a new leader's log lacks it, so it asks a holder to truncate it)."""
    found = first_failure(range(300), duration=600, heal=400,
                          fault_kinds=("wipe_voter",) * 3 + ("crash", "partition", "pause"),
                          unsafe=Unsafe(wiped_voter_votes=True))
    assert found is not None, "no schedule lost anything without the rejoin"
    seed, message = found
    assert f"seed={seed}" in message
    assert "truncate after" in message or "but it was committed as" in message


# ------------------------------------------------------------------------ etcd loses its data
# Terms are etcd revisions: an etcd that lost its data (or a new one under the old logs,
# `xdc cluster up` on an old directory) grants the same term numbers again, to other
# nodes. Promises bound to one node (core rule 1, Raft's votedFor) keep every term to one
# leader. Without that binding (Unsafe.unbound_promises, the core before the fix) the
# suite's own schedules fail: short seeds 199, 640, 849, 1073, 1487, 1663 and long seeds
# 100010, 100027, 100058, all on the core's check that a leader never gets an Append or
# Promise of its own term from another node.

RESETS = ("etcd_reset",) * 3 + ("crash", "crash_leader", "partition", "pause", "isolate_leader")


def regranted_term() -> list[tuple[int, Callable[[Sim], object]]]:
    """A term granted twice (3 voters).

    1. v0 leads; a commits everywhere. v2 is cut off; v1 wins term T with v0's promise,
       opens, and appends x, which reaches nobody (uncommitted, on v1 only).
    2. v1 crashes; etcd loses its data and grants T again, to v2 (promised less than T).
       v0 promised T, to v1. Bound to the term only, it would promise T to v2 too: v2 would
       adopt v0's log and write its term-start record at x's position in term T. Once v1 is
       back, v2's Append there matches v1's x by (position, term): v1 keeps x while the
       others commit v2's record (log matching broken).
    3. Bound to v1, v0 refuses: v2 gives T up, and later wins a new term that everybody
       accepts, adopting v1's log (x included). v2 then writes y.
    """
    def term_of_v1(m: Sim) -> int:
        return max(t for t, owner in m.term_owner.items() if owner == "v1")

    return [
        (5, lambda m: m.campaign("v0")),
        (40, lambda m: m.propose("v0", [b"a"])),
        (60, lambda m: m.isolate(["v2"])),
        (61, lambda m: m.campaign("v1")),
        (100, lambda m: setattr(m, "drop", lambda msg: isinstance(msg, Append)
                                and msg.src == "v1" and bool(msg.entries))),
        (101, lambda m: m.propose("v1", [b"x"])),
        (120, lambda m: (m.crash("v1"), m.heal_links(), setattr(m, "drop", None),
                         m.reset_etcd(0))),
        (121, lambda m: m.campaign("v2", term_of_v1(m))),
        (200, lambda m: m.restart("v1")),
        (250, lambda m: m.campaign("v2")),
        (300, lambda m: m.propose("v2", [b"y"])),
    ]


REGRANT = replace(QUIET, voters=3, limits=replace(QUIET.limits, max_batch_entries=8,
                                                      recovery_timeout_ticks=5))


def test_a_term_granted_twice_gets_one_leader_and_loses_nothing() -> None:
    sim = Sim(0, REGRANT, script=regranted_term(), trace_len=10**6)
    sim.run()
    assert sim.regrants == 1
    (t,) = [t for t, n in sim.grants if (t, "v1") in sim.grants and n == "v2"]
    assert sim.opened[t] == "v1"  # v2 never opened the term it got again
    assert ("v2 stepped down", SteppedDown(t, TERM_TAKEN)) in [
        (what, detail) for _, what, detail in sim.trace]
    payloads = [p for _, p in sim.committed]
    assert [p for p in payloads if p in (b"a", b"x", b"y")] == [b"a", b"x", b"y"]
    assert not any(p == f"start:{t}:v2".encode() for p in payloads)
    for n in sim.nodes.values():
        assert n.disk.commit == len(sim.committed) - 1


class _Forgetful(dict):
    """Sim.opened that remembers nothing: the election-safety check is off."""

    def setdefault(self, key: object, default: object = None) -> object:
        return default


def test_without_promised_to_a_term_granted_twice_gets_two_leaders() -> None:
    cfg = replace(REGRANT, unsafe=Unsafe(unbound_promises=True))
    with pytest.raises(SimFailure, match=r"two leaders opened term \d+: v1 and v2"):
        Sim(0, cfg, script=regranted_term()).run()
    # and the history check alone catches the broken log matching that follows
    sim = Sim(0, cfg, script=regranted_term())
    sim.opened = _Forgetful()
    with pytest.raises(SimFailure, match=r"v1 committed position (\d+) as \((\d+), b'x'\) "
                                         r"but it was committed as \(\2, b'start:\2:v2'\)"):
        sim.run()


def test_random_schedules_reset_etcd_and_lose_nothing() -> None:
    """Schedules weighted towards etcd losing its data (every schedule of the suite draws
    it too): terms are granted again, and still no term gets two leaders."""
    regranted = 0
    for seed in range(300):
        cfg = random_config(random.Random(seed), duration=600, heal=400, fault_kinds=RESETS)
        regranted += Sim(seed, cfg).run().regrants
    assert regranted > 150


def test_random_schedules_catch_promises_bound_to_the_term_only() -> None:
    found = first_failure(range(300), duration=600, heal=400, fault_kinds=RESETS,
                          unsafe=Unsafe(unbound_promises=True))
    assert found is not None, "no schedule got two leaders in one term without promised_to"
    seed, message = found
    assert f"seed={seed}" in message
    assert any(why in message for why in ("leads term", "two leaders opened", "committed as"))


# The short seeds (default fault mix) on which the core without promised_to fails.
UNBOUND_PROMISES_SEEDS = (199, 640, 849, 1073, 1487, 1663)


def test_suite_schedules_catch_promises_bound_to_the_term_only_on_known_seeds() -> None:
    caught = []
    for seed in UNBOUND_PROMISES_SEEDS:
        run_seed(seed, duration=600, heal=400)  # the correct protocol passes
        try:
            run_seed(seed, duration=600, heal=400, unsafe=Unsafe(unbound_promises=True))
        except SimFailure as e:
            caught.append(seed)
            assert "--unsafe unbound_promises" in str(e)  # replayable from the message
    assert caught, "no known seed catches unbound_promises any more: re-hunt"


# ------------------------------------------------------------------------ both: a lost etcd,
# then a lost voter disk. The wiped voter's fence is max(etcd's revision, the promises of
# voters - quorum + 1 other voters) + 1 (core, "Wiped voters"): etcd's revision alone can be
# below terms granted before it lost its data.


def wiped_after_reset() -> list[tuple[int, Callable[[Sim], object]]]:
    """3 voters: v0 leads term 50 and commits a; etcd loses its data (revision 0); v2 is
    cut off and v1 loses its disk: v1 has v0's answer only (it needs 2 of 2) and stays
    down until v2 answers too; then v0 wins a term above the fence and writes b."""
    return [
        (5, lambda m: m.campaign("v0", 50)),
        (40, lambda m: m.propose("v0", [b"a"])),
        (60, lambda m: m.reset_etcd(0)),
        (61, lambda m: m.isolate(["v2"])),
        (62, lambda m: m.wipe("v1")),
        (150, lambda m: m.heal_links()),
        (250, lambda m: m.campaign("v0", 60)),
        (300, lambda m: m.propose("v0", [b"b"])),
    ]


WIPED_AFTER_RESET = replace(QUIET, voters=3, limits=replace(QUIET.limits, max_batch_entries=8,
                                                                recovery_timeout_ticks=5))


def test_a_voter_wiped_after_etcd_lost_its_data_waits_for_promises_and_is_fenced_above(
) -> None:
    sim = Sim(0, WIPED_AFTER_RESET, script=wiped_after_reset(), trace_len=10**6)
    sim.run()
    notes = [(t, what, detail) for t, what, detail in sim.trace]
    waits = [t for t, what, detail in notes
             if what == "v1 waits for promises, answered" and detail == ["v0"]]
    assert waits and min(waits) == 62 and max(waits) < 150  # down while v2 was cut off
    (fenced,) = [(t, detail) for t, what, detail in notes if what == "v1 fenced at"]
    assert fenced[0] >= 150 and fenced[1] == 51  # above the promises (50), not etcd's 0
    v1 = sim.nodes["v1"]
    assert v1.machine is not None and not v1.machine.rejoining and v1.disk.rejoin_term == 0
    payloads = [p for _, p in sim.committed]
    assert [p for p in payloads if p in (b"a", b"b")] == [b"a", b"b"]
    assert v1.disk.commit == len(sim.committed) - 1
    # The rule before: etcd's revision + 1, at once, below the promised term 50.
    sim = Sim(0, replace(WIPED_AFTER_RESET, unsafe=Unsafe(etcd_only_fence=True)),
              script=wiped_after_reset(), trace_len=10**6)
    sim.run()
    assert [(t, d) for t, what, d in sim.trace if what == "v1 fenced at"] == [(62, 1)]


def test_the_fence_from_etcd_alone_loses_a_committed_record_on_a_known_seed() -> None:
    """Seed 7620 (of 10000 of the mix, the only one): with the fence from etcd's revision
    alone, a leader counts an ack of the wiped voter's previous life; with the rule, fine."""
    run_seed(7620, duration=600, heal=400, fault_kinds=WIPES_AND_RESETS)
    with pytest.raises(SimFailure, match=r"committed position .* but it was committed as"
                       r"(.|\n)*--mix wipes_and_resets --unsafe etcd_only_fence"):
        run_seed(7620, duration=600, heal=400, fault_kinds=WIPES_AND_RESETS,
                 unsafe=Unsafe(etcd_only_fence=True))


def test_random_schedules_wipe_voters_after_etcd_resets_and_lose_nothing() -> None:
    """Wipes while etcd's revision is below terms it granted before: the wiped voter waits
    for the other voters' promises (also checks liveness: every one is whole at the end)."""
    wiped = regranted = 0
    for seed in range(300):
        cfg = random_config(random.Random(seed), duration=600, heal=400,
                            fault_kinds=WIPES_AND_RESETS)
        r = Sim(seed, cfg).run()
        wiped, regranted = wiped + r.wipes, regranted + r.regrants
    assert wiped > 150 and regranted > 100
