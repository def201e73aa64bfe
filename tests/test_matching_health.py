"""The gateway's view of the matching tier (engine/matching_health.py).

The decision rules are checked on MatchingWatch itself, fed store readings and engine
statuses on a controlled clock (no I/O in the decision); the wiring with a real store, a
real gateway and a real `xdc engine run` process killed with SIGKILL is checked end to
end: orders are shed while no engine primary is current and admitted again once one is."""

from __future__ import annotations

import asyncio
import json
import signal
import tomllib
from pathlib import Path
from typing import Any

import grpc

from engine import wire
from engine.exchange_config import parse
from engine.gateway import GatewayServer
from engine.matching_health import ENGINE_SERVICE, MatchingWatch
from geo.replicator import ELECTION, HANDOVER
from geo.tier_supervisor import Reading
from store.process import ServeProcess
from tests.support.cli import xdc_cli
from tests.support.exchange import lease_dir
from tests.support.store import run, running_store, wait_until
from tests.test_gateway import EXCHANGE, order, refused
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def primary(name: str, delivered: int, handover_to: str = "") -> xpb.EngineStatus:
    return xpb.EngineStatus(instance=name, role="primary", delivered_position=delivered,
                            handover_to=handover_to)


def warm(name: str, delivered: int, handover_to: str = "") -> xpb.EngineStatus:
    return xpb.EngineStatus(instance=name, role="warm", delivered_position=delivered,
                            handover_to=handover_to)


class Judge:
    """Drives MatchingWatch's decision as its __call__ does, one observation at a time."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.watch = MatchingWatch(_no_reader, ["unused:1"], clock=self.clock, max_lag_s=1.0)

    def __call__(self, reading: Reading, *statuses: xpb.EngineStatus, dt: float = 0.1) -> str:
        self.clock.t += dt
        why = self.watch._judge(reading, list(statuses))
        self.watch.why = why
        return why


async def _no_reader() -> Reading:
    raise AssertionError("not called: the tests feed readings")


def test_a_primary_must_pass_the_commit_position_seen_after_a_failover() -> None:
    j = Judge()
    assert "failing over" in j(Reading(failover=True), primary("a", 10))
    # The first reading after it is the reference: 50 must reach the primary.
    assert "not yet 50" in j(Reading(term=2, commit_position=50), primary("a", 40))
    assert "not yet 50" in j(Reading(term=2, commit_position=60), primary("a", 49))
    assert j(Reading(term=2, commit_position=70), primary("a", 50)) == ""
    # Current from then on, while it keeps up.
    assert j(Reading(term=2, commit_position=80), primary("a", 75)) == ""


def test_no_primary_or_two_primaries_is_down() -> None:
    j = Judge()
    assert "no engine primary" in j(Reading(term=1, commit_position=5), warm("a", 5))
    assert "2 instances claim primary" in j(Reading(term=1, commit_position=5),
                                            primary("a", 5), primary("b", 5))
    assert j(Reading(term=1, commit_position=5), primary("a", 5), warm("b", 5)) == ""


def test_a_primary_that_stops_being_delivered_inputs_goes_down_after_max_lag() -> None:
    j = Judge()
    assert j(Reading(term=1, commit_position=10), primary("a", 10)) == ""
    # The store commits on; the primary's subscription is stuck at 10 (a replica cut off
    # from the leader, no term change the gateway could see).
    for k in range(9):
        assert j(Reading(term=1, commit_position=20 + k), primary("a", 10)) == "", k
    why = j(Reading(term=1, commit_position=40), primary("a", 10), dt=0.25)
    assert "lags" in why and "delivered up to 10" in why
    assert j(Reading(term=1, commit_position=41), primary("a", 41)) == ""


def test_a_new_term_under_a_current_primary_gets_a_grace_a_failover_does_not() -> None:
    j = Judge()
    assert j(Reading(term=1, commit_position=10), primary("a", 10)) == ""
    # A planned switchover: term 2 without a failover seen; the primary is 3 behind.
    assert j(Reading(term=2, commit_position=13), primary("a", 10)) == ""
    assert j(Reading(term=2, commit_position=14), primary("a", 12)) == ""
    # Still short of the reference past the grace (TERM_CHANGE_GRACE_S, shorter than
    # max_lag_s: a missed failover looks the same): down.
    assert "not yet 13" in j(Reading(term=2, commit_position=15), primary("a", 12), dt=0.5)
    assert j(Reading(term=2, commit_position=16), primary("a", 16)) == ""
    # After a failover, the same shortfall is down at once.
    assert j(Reading(failover=True), primary("a", 16)) != ""
    assert "not yet 20" in j(Reading(term=3, commit_position=20), primary("a", 17))


def test_a_new_terms_reference_is_past_what_the_old_term_committed() -> None:
    """A reading that shows the new term before its first commit (the member the gateway
    asked has not learnt it yet) must not let a primary pass that still reads a replica
    the old term left behind: the reference is at least the position after the old
    term's last commit (the new term's term-start record). Before, such a primary was
    current at once (drill leader-partition: orders admitted before matching was)."""
    j = Judge()
    assert j(Reading(term=1, commit_position=10), primary("a", 10)) == ""
    assert j(Reading(term=1, commit_position=12), primary("a", 12)) == ""
    # Term 2 seen at commit 12 (nothing of term 2 committed yet, as far as this member
    # knows): the primary, delivered 12, is not current in term 2 once the grace ends.
    assert j(Reading(term=2, commit_position=12), primary("a", 12)) == ""  # the grace
    assert "not yet 13" in j(Reading(term=2, commit_position=12), primary("a", 12), dt=0.5)
    assert j(Reading(term=2, commit_position=14), primary("a", 13)) == ""


def test_a_new_term_the_store_says_began_with_an_election_gets_no_grace() -> None:
    """A failover the readings missed (the seat vacant for less than one observation, a
    leader cut off by a partition) looks like a switchover, but the new term's start
    record says it began with an election (Reading.term_began): no grace, whether the
    member knows it at the first reading of the term or learns it during the grace.
    Before, a primary still reading the cut-off region's replica was trusted for the
    grace while orders were admitted (drill leader-partition)."""
    j = Judge()
    assert j(Reading(term=1, commit_position=10), primary("a", 10)) == ""
    assert "not yet 13" in j(Reading(term=2, commit_position=13, term_began=ELECTION),
                             primary("a", 10))
    assert j(Reading(term=2, commit_position=14, term_began=ELECTION), primary("a", 13)) == ""
    # Learnt during the grace: down from that reading on.
    assert j(Reading(term=3, commit_position=20), primary("a", 14)) == ""
    assert "not yet 20" in j(Reading(term=3, commit_position=21, term_began=ELECTION),
                             primary("a", 15))
    # A handover keeps its grace once the record is known.
    assert j(Reading(term=3, commit_position=22, term_began=ELECTION), primary("a", 22)) == ""
    assert j(Reading(term=4, commit_position=25, term_began=HANDOVER), primary("a", 22)) == ""
    assert j(Reading(term=4, commit_position=26, term_began=HANDOVER), primary("a", 24)) == ""
    assert j(Reading(term=4, commit_position=27, term_began=HANDOVER), primary("a", 25)) == ""


def test_a_planned_engine_switchover_is_not_a_matching_outage() -> None:
    j = Judge()
    assert j(Reading(term=1, commit_position=10), primary("a", 10), warm("b", 10)) == ""
    # a processed the marker and let go; b takes over at it.
    assert j(Reading(term=1, commit_position=11), warm("a", 11, "b"), warm("b", 11, "b")) == ""
    assert j(Reading(term=1, commit_position=12), warm("a", 11, "b"),
             primary("b", 11, "b")) == ""
    assert j(Reading(term=1, commit_position=13), warm("a", 13, "b"),
             primary("b", 13, "b")) == ""
    # The marker stays in both instances' state: when b is later lost, it is no excuse.
    assert "no engine primary" in j(Reading(term=1, commit_position=14), warm("a", 14, "b"))
    # Nor is a handover whose target does not answer.
    k = Judge()
    assert k(Reading(term=1, commit_position=10), primary("a", 10)) == ""
    assert "no engine primary" in k(Reading(term=1, commit_position=11), warm("a", 11, "b"))


def test_a_handover_that_does_not_complete_in_time_is_down() -> None:
    j = Judge()
    assert j(Reading(term=1, commit_position=10), primary("a", 10), warm("b", 10)) == ""
    assert j(Reading(term=1, commit_position=11), warm("a", 11, "b"), warm("b", 11, "b")) == ""
    assert "no engine primary" in j(Reading(term=1, commit_position=12), warm("a", 12, "b"),
                                    warm("b", 12, "b"), dt=1.0)


# ---------------------------------------------------------------------- real processes

T = 20.0


def _engine(store: str, lease: str, control: str = "127.0.0.1:0",
            instance: str = "e1") -> ServeProcess:
    return ServeProcess(command=["engine", "run", "--store", store, "--group", "g1",
                                 "--instance", instance, "--lease", lease, "--control", control,
                                 "--lease-ttl", "1"]).start()


def test_gateway_sheds_orders_while_no_engine_primary_is_current(tmp_path: Path) -> None:
    """With --engines, the gateway admits orders only while an engine primary is current:
    SIGKILL of the engine sheds order entry (the message names the matching tier's engine),
    a restarted engine brings it back."""
    async def body() -> None:
        config = parse(tomllib.loads(EXCHANGE))
        lease = lease_dir(tmp_path)
        async with running_store(tmp_path / "store") as (store, _client):
            # Started from a thread: the engine reads the store (served by this loop)
            # before it reports ready.
            engine = await asyncio.to_thread(_engine, store.address, lease)
            gateway = GatewayServer(config, store.address, engines=[engine.address])
            try:
                await gateway.start()
                await gateway.wait_admitted(timeout_s=T)
                async with grpc.aio.insecure_channel(gateway.address) as channel:
                    stub = xpb_grpc.OrderGatewayStub(channel)
                    ok = await stub.SubmitOrder(order("c1", xpb.BUY, 1, 50000))
                    assert ok.input_position > 0
                    engine.signal(signal.SIGKILL)
                    engine.proc.wait()  # type: ignore[union-attr]
                    matching = gateway.tiers.machine.states[1]
                    await wait_until(lambda: not gateway.tiers.machine.states[2].admitted, T,
                                     "order entry shed")
                    assert matching.name == "matching"
                    err = await refused(stub.SubmitOrder(order("c2", xpb.BUY, 1, 50000)))
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    assert "tier 'order-entry'" in (err.details() or ""), err
                    assert f"{ENGINE_SERVICE} down" in (err.details() or ""), err
                    md = dict(err.trailing_metadata() or ())
                    assert md["xdc-tier"] == "order-entry" and int(md["xdc-retry-after-ms"]) > 0
                    # The same engine comes back on its address: orders are admitted again.
                    engine = await asyncio.to_thread(_engine, store.address, lease,
                                                     engine.address)
                    await gateway.wait_admitted("order-entry", timeout_s=T)
                    again = await stub.SubmitOrder(order("c2", xpb.BUY, 1, 50000))
                    assert again.input_position > ok.input_position
            finally:
                await gateway.stop(grace_s=0.5)
                engine.signal(signal.SIGKILL)
                engine.proc.wait()  # type: ignore[union-attr]
    run(body, timeout_s=90)


def test_gateway_discovers_a_new_engine_instance_that_takes_over(tmp_path: Path) -> None:
    """A release: the gateway knows only e1's address; e2 starts elsewhere, advertises
    itself in the group's instances stream, and takes over by a planned switchover; e1 is
    killed. With --discover-engines the gateway judges matching by e2 alone and keeps
    admitting orders; configured addresses alone would leave it with no primary to ask."""
    async def body() -> None:
        config = parse(tomllib.loads(EXCHANGE))
        lease = lease_dir(tmp_path)
        async with running_store(tmp_path / "store") as (store, client):
            e1 = await asyncio.to_thread(_engine, store.address, lease)
            e2: ServeProcess | None = None
            gateway = GatewayServer(config, store.address, engines=[e1.address],
                                    discover_engines=True)
            try:
                await gateway.start()
                await gateway.wait_admitted(timeout_s=T)
                watch = gateway.tiers._read
                assert isinstance(watch, MatchingWatch)
                e2 = await asyncio.to_thread(_engine, store.address, lease, "127.0.0.1:0", "e2")

                async def advertised() -> set[tuple[str, str] | None]:
                    return {wire.parse_instance(e.data)
                            for e in await client.read(wire.instances_stream("g1"))}

                assert e2 is not None
                want = {("e1", e1.address), ("e2", e2.address)}
                await wait_until(lambda: _has(advertised(), want), T, "both advertised")
                await wait_until(lambda: e2.address in watch.engines, T, "e2 discovered")
                # An operator finds them the same way: `xdc engine status --group --store`.
                cli = await asyncio.to_thread(xdc_cli, "engine", "status", "--group", "g1",
                                              "--store", store.address)
                assert cli.returncode == 0, cli.stderr
                assert {json.loads(line)["instance"] for line in cli.stdout.splitlines()} == {
                    "e1", "e2"}
                await client.append(wire.input_stream("g1"), [wire.control_event(
                    "g1", wire.SWITCHOVER_TYPE, {"to": "e2"}, "release-1")])
                await wait_until(lambda: _role(e2.address, "primary"), T, "e2 primary")
                e1.signal(signal.SIGKILL)
                e1.proc.wait()  # type: ignore[union-attr]
                await wait_until(lambda: watch.answered == 1 and watch.why == "", T,
                                 "matching judged current by e2 alone")
                assert gateway.tiers.machine.states[2].admitted
                async with grpc.aio.insecure_channel(gateway.address) as channel:
                    ok = await xpb_grpc.OrderGatewayStub(channel).SubmitOrder(
                        order("after-release", xpb.BUY, 1, 50000))
                    assert ok.input_position > 0
            finally:
                await gateway.stop(grace_s=0.5)
                e1.kill()
                if e2 is not None:
                    e2.kill()
    run(body, timeout_s=90)


async def _has(found: Any, want: set[tuple[str, str]]) -> bool:
    return want <= await found


async def _role(address: str, role: str) -> bool:
    from engine.runner import status_or_none
    s = await status_or_none(address, 1.0)
    return s is not None and s.role == role


def test_instance_events_parse_or_are_ignored() -> None:
    """What a gateway reads in an instances stream: an engine's own event parses to
    (instance, address); anything else (not JSON, not an object, fields missing or of
    the wrong type, an address without a port or over MAX_ADDRESS_BYTES) is ignored."""
    e = wire.instance_event("g1", "e7", "10.0.0.7:7200", "1.0.0")
    assert e.type == wire.INSTANCE_TYPE and wire.parse_instance(e.data) == ("e7", "10.0.0.7:7200")
    assert e.id == wire.instance_event("g1", "e7", "10.0.0.7:7200", "1.0.0").id
    assert e.id != wire.instance_event("g1", "e7", "10.0.0.8:7200", "1.0.0").id
    long = "h" * wire.MAX_ADDRESS_BYTES + ":1"
    for data in (b"", b"not json", b"[1]", b'{"instance": "e7"}',
                 b'{"instance": 7, "address": "h:1"}', b'{"instance": "", "address": "h:1"}',
                 b'{"instance": "e7", "address": "no-port"}',
                 json.dumps({"instance": "e7", "address": long}).encode()):
        assert wire.parse_instance(data) is None, data


def test_an_engine_advertises_a_reachable_address() -> None:
    """What an instance writes to its instances stream: the address it is bound to, or,
    bound to a wildcard host, this machine's name with the same port."""
    import socket

    from engine.runner import advertised
    assert advertised("127.0.0.1:7201") == "127.0.0.1:7201"
    assert advertised("engine-a.example:7201") == "engine-a.example:7201"
    for wildcard in ("0.0.0.0:7201", "[::]:7201", ":7201"):
        assert advertised(wildcard) == f"{socket.getfqdn()}:7201", wildcard
