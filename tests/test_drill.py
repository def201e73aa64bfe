"""DR drills with real processes (etcd, store nodes, WAN proxy, engine instances): one
short run each of `leader-crash`, `engine-crash`, `switchover`, `switchover-leader-lost`,
`etcd-member-loss` and `region-loss` through the `xdc drill` command line, checking the
JSON report's shape and the invariants (no acknowledged event lost or duplicated, engines
agree, exactly-once outputs), that an RTO was measured (no time bound is asserted, but
for a store leader that kept its lease), that the tiers the failure took down came back
in tier order (a planned switchover takes none down) and that the HTML report holds an
inline SVG chart. The other scenarios are exercised by `xdc drill SCENARIO --quick`
(README, "DR drills"), not here: each costs a fresh cluster, and the suite must stay fast
on two cores."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geo.drill import TIERS
from geo.launcher import alive

RUN_KEYS = {"scenario", "seed", "rto_s", "acked_lost", "duplicates", "hashes_agree",
            "stale_writes_rejected", "tiers", "lease_expiry_s", "new_term_s", "in_doubt",
            "stale", "engines", "trace_ids", "timeline", "tiers_supervisor"}
# A quick run takes 10-30 s; its own steps are bounded (DrillOptions.step_timeout_s).
DRILL_BUDGET_S = 130


def _drill(tmp_path: Path, scenario: str, seed: int) -> tuple[dict, str]:  # type: ignore[type-arg]
    out_json, out_html = tmp_path / "drill.json", tmp_path / "drill.html"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xdc.cli", "drill", scenario, "--runs", "1", "--seed", str(seed),
         "--quick", "--verbose", "--json", str(out_json), "--html", str(out_html), "--dir",
         str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=DRILL_BUDGET_S)
    except subprocess.TimeoutExpired:
        # SIGINT, not SIGKILL: the drill then stops every process of its cluster, and
        # its log says which step it was waiting for.
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"drill {scenario} still running after {DRILL_BUDGET_S}s:\n"
                    + stdout[-3000:] + stderr[-6000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert scenario in stdout and "RTO" in stdout  # the summary table
    return json.loads(out_json.read_text()), out_html.read_text()


def _check(doc: dict, html: str, scenario: str, seed: int) -> dict:  # type: ignore[type-arg]
    assert doc["ok"] is True and len(doc["runs"]) == 1
    run = doc["runs"][0]
    assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
    assert run["scenario"] == scenario and run["seed"] == seed
    assert run["acked_lost"] == 0 and run["duplicates"] == 0
    assert run["hashes_agree"] is True and run["exactly_once"] == "ok"
    assert run["logs_identical"] is True
    assert run["rto_s"] is not None and run["rto_s"] > 0
    assert [t["name"] for t in run["tiers"]] == list(TIERS)
    assert all(t["recovered_s"] is not None and t["recovered_s"] > 0 for t in run["tiers"])
    assert run["acked"]["ledger"] > 0 and run["acked"]["order"] > 0
    assert run["in_doubt"]["total"] == sum(v for k, v in run["in_doubt"].items()
                                           if k != "total")
    assert not any(k.startswith("unresolved-absent") for k in run["in_doubt"])
    engines = run["engines"]
    assert len(engines) == 3 and len({(e["chain_hash"], e["state_hash"], e["input_position"])
                                      for e in engines.values()}) == 1
    assert "<svg" in html and "</svg>" in html and "http" not in html.split("<svg", 1)[0]
    # Run directories of successful runs are removed, every process stopped.
    assert not Path(run["directory"]).exists()
    return run


@pytest.mark.timeout(DRILL_BUDGET_S + 45)
def test_leader_crash_drill(tmp_path: Path) -> None:
    doc, html = _drill(tmp_path, "leader-crash", 7)
    run = _check(doc, html, "leader-crash", 7)
    assert run["new_term"] > run["old_term"]
    assert run["lease_expiry_s"] is not None and run["new_term_s"] is not None
    assert run["stale"]["acked_after_new_term"] == 0
    # The deposed leader was SIGKILLed: nothing at its address could refuse as a
    # fenced leader. (Before, the probes kept going to the restarted process, a fresh
    # follower, and its refusals were counted as fencing.)
    assert run["stale_writes_rejected"] == 0 and run["stale"]["unreachable"] > 0
    # A crash takes every tier down (the ledger degraded, the others shed); they come
    # back one after the other.
    assert all(t["down"] for t in run["tiers"]), run["tiers"]
    assert run["tiers_in_order"] is True, run["tiers"]


@pytest.mark.timeout(DRILL_BUDGET_S + 45)
def test_engine_crash_drill(tmp_path: Path) -> None:
    doc, html = _drill(tmp_path, "engine-crash", 3)
    run = _check(doc, html, "engine-crash", 3)
    assert run["new_term"] is None  # the store leader stayed
    assert run["engine_new_primary_s"] is not None and run["engine_new_primary_s"] > 0
    # The ledger never stopped; the gateways shed orders until a new primary was current.
    down = {t["name"] for t in run["tiers"] if t["down"]}
    assert "ledger" not in down and {"matching", "order-entry"} <= down, run["tiers"]
    assert run["tiers_in_order"] is True, run["tiers"]
    assert run["order_refusals"]["by_code"].get("UNAVAILABLE", 0) > 0


@pytest.mark.timeout(DRILL_BUDGET_S + 45)
def test_switchover_drill_takes_no_tier_down(tmp_path: Path) -> None:
    """A planned switchover is no failover: the target holds the writes and orders it
    receives until its term opens, and no supervisor (store node or gateway) sheds."""
    doc, html = _drill(tmp_path, "switchover", 11)
    run = _check(doc, html, "switchover", 11)
    assert run["new_term"] > run["old_term"]
    assert not any(t["down"] for t in run["tiers"]), run["tiers"]
    assert run["tiers_in_order"] is True
    assert not run["order_refusals"]["after_fault"], run["order_refusals"]


@pytest.mark.timeout(DRILL_BUDGET_S + 45)
def test_a_leader_lost_during_a_switchover_drill_is_a_failover(tmp_path: Path) -> None:
    """The switchover's target is paused, so it never catches up; the leader's region
    dies once the target is designated. The target (or another voter) takes over, and the
    new term is an election: nobody handed the seat over (before, the designation alone
    made it a "handover", and this run failed)."""
    doc, html = _drill(tmp_path, "switchover-leader-lost", 5)
    run = _check(doc, html, "switchover-leader-lost", 5)
    assert run["new_term"] > run["old_term"]
    assert run["switchover_outcome"] != "?", run
    # Almost always nothing was handed over (the target lagged under the load); a leader
    # that did hand over before it died made a true handover, which the term then says.
    assert run["new_term_began"] == ("handover" if run["handed_over"] else "election"), run
    # The drill's own reads of the leader key say the same (a resignation, or an expiry).
    assert run["leader_key_gone_after_kill_s"] is not None, run
    assert run["leader_resigned"] in (None, run["handed_over"]), run
    assert run["tiers_in_order"] is True, run["tiers"]


@pytest.mark.timeout(DRILL_BUDGET_S + 45)
def test_region_loss_drill_rebuilds_the_region_as_a_lost_disk(tmp_path: Path) -> None:
    """The leader region burns down (SIGKILL of its processes, its directories deleted):
    a failover as `leader-crash`, then the region is rebuilt on empty directories. Its
    node comes back fenced above every term it could have acknowledged in, rejoins and is
    whole again; its log, rebuilt, is identical to the others' and nothing acknowledged
    was lost."""
    doc, html = _drill(tmp_path, "region-loss", 23)
    run = _check(doc, html, "region-loss", 23)
    assert run["new_term"] > run["old_term"]
    assert all(t["down"] for t in run["tiers"]) and run["tiers_in_order"] is True, run["tiers"]
    node = run["rebuilt_node"]
    assert f"nodes/{node}/data" in run["burnt"], run["burnt"]
    # Through the lost-disk path: said by its log at least (its status may be whole by
    # the first poll), fenced above the term at the fault and the rebuild's leader's.
    assert run["rejoined"] is True and "log" in run["rejoin_evidence"], run
    assert run["fence_term"] > run["term_at_rebuild"] >= run["new_term"] > run["old_term"]
    assert run["rejoin_s"] is not None and run["rejoin_s"] >= run["rebuild_answered_s"] > 0
    assert run["term_after_rejoin"] > run["fence_term"]  # the fenced leader's new term
    assert "<th>rejoin</th>" in html and "<th>fence</th>" in html


@pytest.mark.timeout(DRILL_BUDGET_S + 45)
def test_etcd_member_loss_drill(tmp_path: Path) -> None:
    """SIGKILL of the etcd leader of a 3-member etcd cluster (an etcd rolling upgrade
    does it once per member). The store leader's lease must outlast etcd's election
    (geo/etcd_server.py on timing): when it does, writes never stall for a lease TTL; when
    it does not, the run is measured as a failover, and nothing acknowledged is lost
    either way."""
    doc, html = _drill(tmp_path, "etcd-member-loss", 5)
    run = _check(doc, html, "etcd-member-loss", 5)
    if run["new_term"] is None:  # the leader kept its lease: the longest write stall
        assert run["rto_s"] < 2.0, run  # the drill's lease TTL
    else:
        assert run["new_term"] > run["old_term"]
    assert run["tiers_in_order"] is True, run["tiers"]


@pytest.mark.parametrize(("flags", "named"), [
    (["--runs", "0"], "argument --runs: 0: at least 1"),
    (["--runs", "-2"], "argument --runs: -2: at least 1"),
    (["--lease-ttl", "0"], "argument --lease-ttl: 0: at least 1 s"),
    (["--rtt-ms", "-1"], "argument --rtt-ms: -1: a number of milliseconds, 0 or more"),
    (["--rtt-ms", "nan"], "argument --rtt-ms: nan: a number of milliseconds, 0 or more"),
    (["--producers", "0"], "argument --producers: 0: at least 1"),
])
def test_options_that_cannot_be_exit_2_before_any_run(tmp_path: Path, flags: list[str],
                                                      named: str) -> None:
    """Refused as the command line is parsed (the flag and its range named), not as an
    empty table (`--runs 0`, exit 0) or a FAILED run with a traceback (`--lease-ttl 0`)."""
    runs = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "xdc.cli", "drill", "leader-crash", "--quick",
                        *flags, "--dir", str(runs)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == "" and f"xdc drill: error: {named}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not runs.exists()


def test_tiers_in_order_judges_tiers_that_went_down_against_every_tier_below() -> None:
    from geo.drill import tiers_in_order

    def tiers(*spec: tuple[float | None, bool]) -> list[dict]:  # type: ignore[type-arg]
        return [{"name": n, "recovered_s": t, "down": s}
                for n, (t, s) in zip(TIERS, spec, strict=True)]
    assert tiers_in_order(tiers((2.0, True), (2.1, True), (2.5, True), (2.6, True)))
    assert not tiers_in_order(tiers((2.0, True), (2.1, True), (2.05, True), (2.6, True)))
    # A tier that never went down may resume before a lower one: it never left.
    assert tiers_in_order(tiers((0.2, False), (0.3, False), (0.19, False), (0.3, False)))
    # A tier that went down must not beat any lower tier, down or not.
    assert not tiers_in_order(tiers((0.02, False), (1.8, True), (1.7, True), (2.0, True)))
    assert not tiers_in_order(tiers((1.0, True), (None, True), (2.0, True), (2.1, True)))


def test_measure_of_a_phase_without_failover(tmp_path: Path) -> None:
    """The write stall of a fault with no new term ends at the recovery (a stall while the
    run winds down is not the fault's), the write gap runs from the last *ledger* ack
    before the fault, and tier order is unknown (None), not passed, when a supervisor's
    status could not be read: a tier it took down would be missing (before, all three
    read the run's other records: the stall to the run's end, any ack, a vacuous pass)."""
    from geo.drill import Ack, DrillOptions, Phase, Run, measure

    run = Run("etcd-member-loss", 1, DrillOptions(), str(tmp_path))
    t0 = 100.0
    phase = Phase(t0, old_term=5, old_leader=None, old_engine="r1-e1",  # type: ignore[arg-type]
                  delivered_at_fault=0, expect_new_term=False, recovered_at=t0 + 3.0)
    acks = [(99.0, "ledger"), (99.9, "order"), (100.4, "ledger"), (101.9, "ledger"),
            (102.5, "order"), (103.2, "ledger"), (108.0, "ledger")]  # 103.2 -> 108: wind-down
    run.rec.acks = [Ack(t, p, bytes([p]), k) for p, (t, k) in enumerate(acks, 1)]
    m = measure(run, phase, {}, until=t0 + 10)
    assert m["rto_s"] == 1.5  # 100.4 -> 101.9, not 103.2 -> 108.0
    assert m["write_gap_s"] == 1.4  # 99.0 (ledger) -> 100.4, not 99.9 (an order)
    assert m["tiers_in_order"] is False  # no order went through after the fault: not back
    run.supervisors_unread = 1
    assert measure(run, phase, {}, until=t0 + 10)["tiers_in_order"] is None


def test_verdict_fails_a_run_on_each_broken_invariant() -> None:
    """The run's pass/fail (and so `xdc drill`'s exit status) breaks on each invariant
    alone: a lost ack, a duplicate, diverged replicas' logs (before, a run whose logs
    differed passed), diverged engines, a deposed leader's late ack, tiers back out of
    order (before, only the 'in order' column said so); an unknown order passes."""
    from geo.drill import failed, verdict

    good = {"acked_lost": 0, "duplicates": 0, "hashes_agree": True, "logs_identical": True,
            "stale": {"acked_after_new_term": 0}}
    assert verdict(good) and not failed([{**good, "ok": verdict(good)}])
    assert verdict({**good, "tiers_in_order": None}) and verdict({**good, "tiers_in_order": True})
    # A leader that handed over before it died made a handover indeed.
    assert verdict({**good, "handed_over": True, "new_term_began": "handover"})
    assert verdict({**good, "handed_over": False, "new_term_began": "election"})
    # The drill's reads of the leader key agree with the new term's account, or cannot tell.
    assert verdict({**good, "leader_resigned": True, "new_term_began": "handover"})
    assert verdict({**good, "leader_resigned": False, "new_term_began": "election"})
    assert verdict({**good, "leader_resigned": None, "new_term_began": "handover"})
    # Gone at once, yet an election: a leader whose lease renewal fell behind resigns
    # without handing over (no contradiction).
    assert verdict({**good, "leader_resigned": True, "new_term_began": "election"})
    assert verdict({**good, "rejoined": True})
    for broken in ({"acked_lost": 1}, {"duplicates": 2}, {"hashes_agree": False},
                   {"logs_identical": False}, {"stale": {"acked_after_new_term": 1}},
                   {"tiers_in_order": False},
                   {"handed_over": False, "new_term_began": "handover"},
                   # A handover whose leader's key expired: nobody resigned.
                   {"leader_resigned": False, "new_term_began": "handover"},
                   # A rebuilt node that came back as a new plain voter (or never whole).
                   {"rejoined": False}):
        run = {**good, **broken}
        assert not verdict(run), broken
        assert failed([{**good, "ok": True}, {**run, "ok": verdict(run)}])


def test_the_leader_key_after_a_kill_tells_a_resignation_from_an_expiry() -> None:
    """The drill's own reads of the leader key around the SIGKILL of the leader of term 7
    (TTL 2 s: split at 0.667 s): deleted before the kill, or by a deletion etcd applied
    just after it, is a resignation; still held by a read sent past TTL/3 is none (the
    lease expired); no read in between says nothing. Reads from before `since` (an
    earlier phase) are not looked at."""
    from geo.drill import leader_key_after_kill

    def reads(*spec: tuple[float, int | None]) -> list[tuple[float, float, int | None]]:
        return [(100.0 + t, 100.0 + t + 0.005, term) for t, term in spec]

    def judge(r: list[tuple[float, float, int | None]]) -> tuple[float | None,
                                                                float | None, bool | None]:
        k = leader_key_after_kill(r, 7, since=99.0, kill_at=100.0, ttl_s=2)
        return k.gone_s, k.held_s, k.resigned
    assert judge(reads((-0.5, 7), (-0.1, None), (0.3, None), (1.5, 8))) == (-0.095, -0.5, True)
    assert judge(reads((-0.5, 7), (0.02, 7), (0.05, None))) == (0.055, 0.02, True)
    assert judge(reads((-0.5, 7), (0.4, 7), (0.9, 7), (1.6, None), (1.7, 8))) == (
        1.605, 0.9, False)
    assert judge(reads((-0.5, 7), (0.5, 7), (1.6, None))) == (1.605, 0.5, None)
    assert judge(reads((-0.5, 7), (0.5, 7))) == (None, 0.5, None)
    assert judge(reads((-1.5, 6), (-1.2, None))) == (None, None, None)  # before `since`


def test_a_lost_disk_is_read_from_the_node_log(tmp_path: Path) -> None:
    """The rebuilt node's log line that says it took the lost-disk path, and its fence
    term (a node that started as a new voter logs neither)."""
    from geo.drill import LostDiskLog, lost_disk_log

    log = tmp_path / "node.log"
    assert lost_disk_log(log) == LostDiskLog(0, False)  # no log at all
    log.write_text("2026-12-07 10:06:34,263 xdc.node r-1: joined cluster 'c' (/d)\n")
    assert lost_disk_log(log) == LostDiskLog(0, False)
    log.write_text("... xdc.node r-1: LOST DISK: /d holds no log of cluster 'c', which this "
                   "member had joined; rejoining: fenced at term 11 (above etcd's ...\n"
                   "... xdc.node r-1: REJOINED: holds the committed log up to 769 (term 13)\n")
    assert lost_disk_log(log) == LostDiskLog(11, True)


def test_the_read_back_of_all_pages_by_position(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The drill's check reads `$all` back in pages (engine.workload.read_stream). Paged
    by the last record's stream revision, as before, a log longer than a page was read
    again from near its start, for ever (a review found it: a full drill's RPO check
    would hang past 50,000 records)."""
    from engine import workload
    from store.client import new_event
    from tests.support.store import run, running_store

    async def body() -> None:
        async with running_store(tmp_path / "s") as (_, client):
            for i in range(12):
                await client.append(f"s{i % 3}", new_event("T", b"%d" % i))
            monkeypatch.setattr(workload, "READ_PAGE", 4)
            events = await asyncio.wait_for(workload.read_stream(client, "$all"), 10)
            assert [e.position for e in events] == list(range(1, 13))
            one = await workload.read_stream(client, "s1")
            assert [e.revision for e in one] == [1, 2, 3, 4]
    run(body)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b"(gone)"


def _children(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (from /proc: every process's stat; a
    zombie, exited and not reaped yet, is not one)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry.name))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("children", [1, 11], ids=["starting-etcd", "under-load"])
def test_sigterm_stops_the_drill_and_every_process_of_its_cluster(
        tmp_path: Path, children: int) -> None:
    """An operator's `kill PID` of a running drill, while its cluster starts (etcd only)
    or once everything runs (etcd, proxy, 3 nodes, 3 engines, 3 gateways): it exits with
    128+15 and leaves no process of its cluster running (they are in sessions of their
    own: a signal to the drill alone reaches none of them)."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xdc.cli", "drill", "leader-crash", "--runs", "1", "--seed",
         "5", "--quick", "--dir", str(runs)], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    started: set[int] = set()
    try:
        # Under way: the cluster is up (etcd, nodes, proxy) and the drill has started
        # its engines and gateways beside it.
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < children:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the drill's cluster did not start in 60 s"
            time.sleep(0.05)
        started = _children(proc.pid)
        seen = {pid: _cmdline(pid) for pid in started}
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        # Once (session 25, under the whole suite) it exited 0: what it had started and
        # what it said tell the next failure apart.
        assert proc.stderr is not None
        assert code == 128 + signal.SIGTERM, (
            f"exit {code} after SIGTERM; its children then: {seen}; stderr: "
            f"{proc.stderr.read()[-3000:]!r}")
        still = {pid: _cmdline(pid) for pid in started if alive(pid)}
        assert not still, f"left running after SIGTERM: {still}"
    finally:
        for pid in (proc.pid, *started):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_a_failed_gateway_call_is_in_doubt_unless_a_tier_shed_it() -> None:
    """A timeout, or a gateway (or its store) gone mid-call (UNAVAILABLE, CANCELLED), may
    have appended the order: the drill retries it with the same id and reports how it
    resolved. A tier's shed (its reason in the trailing metadata) ran nothing, nor did a
    refusal like RESOURCE_EXHAUSTED or INVALID_ARGUMENT."""
    import grpc

    from geo.drill import gateway_call_in_doubt
    from store.errors import MD_SHED_REASON
    code = grpc.StatusCode
    shed = {MD_SHED_REASON: "market-data shed"}
    assert gateway_call_in_doubt(code.DEADLINE_EXCEEDED, {})
    assert gateway_call_in_doubt(code.DEADLINE_EXCEEDED, shed)
    for c in (code.UNAVAILABLE, code.CANCELLED):
        assert gateway_call_in_doubt(c, {})
        assert not gateway_call_in_doubt(c, shed)
    for c in (code.RESOURCE_EXHAUSTED, code.INVALID_ARGUMENT, code.FAILED_PRECONDITION):
        assert not gateway_call_in_doubt(c, {})


@pytest.mark.timeout(240)
def test_sigterm_while_a_drill_run_stops_its_processes_leaves_none_running(
        tmp_path: Path) -> None:
    """A drill run that ends (ok or failed) stops its gateways, engines and cluster in
    run_once's `finally` (several seconds: each child gets TERM and up to 5 s). An
    operator's `kill PID` (or Ctrl-C) landing then raised SystemExit (KeyboardInterrupt)
    inside that `finally`: the children not yet stopped (gateways, engines, store nodes,
    the WAN proxy, etcd; 10 of 11) were left running, with their ports, in sessions of
    their own (helper-85's review). A SIGTERM must never cost the cleanup: it takes
    effect once the cleanup is done.

    The moment is found without a sleep: `switchover` kills nothing, so the first of the
    drill's 11 children to exit marks its cleanup."""
    runs = tmp_path / "runs"
    with open(tmp_path / "drill.stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xdc.cli", "drill", "switchover", "--runs", "1", "--seed",
             "11", "--quick", "--dir", str(runs)], stdout=subprocess.DEVNULL,
            stderr=err)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 200
        # The whole cluster under load: etcd, proxy, 3 nodes, 3 engines, 3 gateways.
        while len(kids := _children(proc.pid)) < 11:
            started |= kids
            assert proc.poll() is None, (tmp_path / "drill.stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "the drill's cluster did not start"
            time.sleep(0.02)
        started |= kids
        # The run's end: the first child gone (nothing dies during a switchover run).
        while len(kids := _children(proc.pid)) >= 11:
            started |= kids
            assert proc.poll() is None, "the drill ended before it stopped any child?"
            assert time.monotonic() < deadline, "the drill run did not end"
            time.sleep(0.005)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
        still = {pid: _cmdline(pid) for pid in started if alive(pid)}
        assert not still, (f"left running after a SIGTERM during the drill's cleanup "
                           f"(exit {code}): {still}")
    finally:
        for pid in (proc.pid, *started):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
