"""Why a voter's data directory must never be restored from a backup (README, "When a
voter's disk is lost"): scripted schedules of the replication simulator in which one is.

A lost disk is detected from an EMPTY, unmarked data directory (geo/node.py): such a voter
rejoins fenced. A restored directory is marked and not empty, so the voter votes and
counts at once with a log that lacks records it acknowledged, and promises it forgot.
The simulator's checker catches what follows (an acknowledged record overwritten, two
leaders in one term); these tests assert that it does, so the README's warning rests on
a reproducible schedule. They are not regressions of the core, which found no schedule
of its own fault menu unsafe (helper-81's review: ~105,000 adversarial schedules).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from geo.replication.log import MemoryLog
from geo.replication.sim import Sim, SimFailure
from tests.test_replication_sim import QUIET

# The simulator's quiet scripted setting, with 3 voters.
QUIET3 = replace(QUIET, voters=3, limits=replace(QUIET.limits, max_batch_entries=8))


def _copy(disk: MemoryLog) -> MemoryLog:
    c = MemoryLog()
    c._entries = list(disk._entries)
    c.commit, c.promised_term = disk.commit, disk.promised_term
    c.promised_to, c.rejoin_term = disk.promised_to, disk.rejoin_term
    return c


def _backup_and_restore() -> tuple[Callable[[Sim], object], Callable[[Sim], object]]:
    saved: dict[str, MemoryLog] = {}

    def backup(m: Sim, node: str) -> None:
        saved[node] = _copy(m.nodes[node].disk)

    def restore(m: Sim, node: str) -> None:
        # The region is rebuilt from last night's backup: same node id, a marked, non-empty
        # data directory whose log and promise are older than what it acknowledged.
        m.crash(node)
        n = m.nodes[node]
        n.disk = _copy(saved[node])
        n.checked_upto = n.disk.commit
        m.restart(node)

    return backup, restore


def test_a_voter_restored_from_an_old_backup_can_lose_an_acknowledged_record() -> None:
    """3 voters. v0 leads; v1 is backed up; v2 is cut off; v0 commits and acknowledges
    "a" with v1's ack; v1's disk is restored from the backup (no "a"); v0 dies; v2 wins
    with v1's promise and overwrites position 2: the acknowledged "a" is gone."""
    backup, restore = _backup_and_restore()
    script: list[tuple[int, Callable[[Sim], object]]] = [
        (5, lambda m: m.campaign("v0")),
        (30, lambda m: backup(m, "v1")),
        (40, lambda m: m.isolate(["v2"])),
        (41, lambda m: m.propose("v0", [b"a"])),
        (80, lambda m: restore(m, "v1")),
        (81, lambda m: (m.crash("v0"), m.heal_links())),
        (82, lambda m: m.campaign("v2")),
    ]
    sim = Sim(0, QUIET3, script=script)
    with pytest.raises(SimFailure, match=r"committed position 2 as .*start:.* but it was "
                                         r"committed as .*b'a'.* before"):
        sim.run()
    assert sim.acked.get(2) == b"a"  # it had been acknowledged to the client


def test_a_voter_whose_promise_rolls_back_can_elect_two_leaders_in_one_term() -> None:
    """A rolled-back promise (backup restore, or fsync that lied about the meta write)
    lets one voter promise the same term twice: with etcd granting the term again (it
    lost its data, the case promised_to exists for), two leaders open term 10 in 3 voters:
    v1 promises 10 to v0; v1's disk rolls back to before that promise; v2 wins term 10
    too (etcd regrant) and v1 promises it again. Election safety is broken."""
    backup, restore = _backup_and_restore()
    script: list[tuple[int, Callable[[Sim], object]]] = [
        (1, lambda m: backup(m, "v1")),
        (2, lambda m: m.isolate(["v2"])),
        (5, lambda m: m.campaign("v0", 10)),
        (30, lambda m: m.propose("v0", [b"a"])),
        (60, lambda m: (m.heal_links(), m.isolate(["v0"]))),
        (61, lambda m: restore(m, "v1")),
        (62, lambda m: m.reset_etcd(0)),
        (63, lambda m: m.campaign("v2", 10)),
    ]
    sim = Sim(0, replace(QUIET3), script=script)
    with pytest.raises(SimFailure, match=r"two leaders opened term 10|committed position"):
        sim.run()
