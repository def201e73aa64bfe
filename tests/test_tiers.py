"""Degradation tiers (DESIGN §6): the tier file, the pure supervisor machine with a fake
clock, and the shell against real servers: the interceptor on every call shape, overload
shedding on a standalone node whose writer is held, and a real three-node cluster whose
leader loses its quorum and recovers tier by tier (real etcd, LMDB, gRPC), or whose planned
switchover stalls (the target's messages of its new term are dropped in process): past
PARK_MAX_S it counts as a failover."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geo import tiers
from geo.config import ConfigError
from geo.etcd_server import free_ports
from geo.node import ClusterNode
from geo.replication.messages import Promise
from geo.replicator import PARK_MAX_S
from geo.tier_supervisor import (
    HEALTH_ALL,
    MD_SHED_REASON,
    MD_TIER,
    Reading,
    TierSupervisor,
    health_name,
    standalone_reader,
    wait_health,
)
from geo.tiers import Observation, Reason, State, TierMachine, Transition
from store.client import CaughtUp, StoreClient, new_event
from store.errors import MD_RETRY_AFTER_MS
from store.limits import Limits
from store.node import StoreNode
from store.server import StoreServer
from tests.support.cluster import LocalCluster
from tests.support.etcd import EtcdCluster
from tests.support.store import hold_writer, run, wait_until
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc
from xdc.v1 import exchange_pb2
from xdc.v1 import tiers_pb2 as tpb
from xdc.v1 import tiers_pb2_grpc as tpb_grpc

DEFAULT = tiers.load()
N = len(DEFAULT.tiers)
SETTLE = DEFAULT.supervisor.settle_s


def machine(spec: tiers.TierSpec = DEFAULT) -> TierMachine:
    return TierMachine(spec, 0.0, 0)


class Clock:
    """The fake clock: observations at chosen monotonic times (wall = 1e9 x time)."""

    def __init__(self, m: TierMachine) -> None:
        self.m = m
        self.t = 0.0

    def at(self, t: float, **kw: Any) -> list[tiers.Transition]:
        self.t = t
        return self.m.observe(Observation(t, int(t * 1e9), **kw))

    def step(self, dt: float, **kw: Any) -> list[tiers.Transition]:
        return self.at(self.t + dt, **kw)


def states(m: TierMachine) -> list[State]:
    return [s.state for s in m.states]


def serving_count(m: TierMachine) -> int:
    return sum(1 for s in m.states if s.state == State.SERVING)


def recover_fully(c: Clock, dt: float = 0.05, **kw: Any) -> None:
    for _ in range(int(N * SETTLE / dt) + 20):
        c.step(dt, **kw)
        if serving_count(c.m) == N:
            return
    raise AssertionError(f"did not recover: {states(c.m)}")


# ---- the tier file --------------------------------------------------------------------


def test_default_file_is_the_design_example_and_maps_every_rpc() -> None:
    assert DEFAULT.names == ("ledger", "matching", "order-entry", "market-data", "analytics")
    assert DEFAULT.tiers[0].services == ("leader", "replication", "append")
    assert DEFAULT.warnings == ()
    assert {s for t in DEFAULT.tiers for s in t.services} == set(tiers.SERVICES)
    # Every public method is tiered, except those deliberately never shed.
    never_shed = {"/xdc.v1.EventStore/NodeInfo"}
    for service in (pb.DESCRIPTOR.services_by_name["EventStore"],
                    exchange_pb2.DESCRIPTOR.services_by_name["OrderGateway"]):
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            assert path in tiers.METHOD_SERVICES or path in never_shed, path
    assert all(s in tiers.SERVICES for s in tiers.METHOD_SERVICES.values())
    assert tiers.service_of(tiers.READ_METHOD, pb.ReadRequest(stream="$all")) == "read-all"
    assert tiers.service_of(tiers.READ_METHOD, pb.ReadRequest(stream="orders")) == "history"
    assert tiers.service_of("/xdc.v1.OrderGateway/StreamExecutions") == "gateway.cancel"
    assert tiers.service_of("/grpc.health.v1.Health/Check") is None
    assert DEFAULT.resolve("market-data") == 3 and DEFAULT.resolve("engine") == 1
    assert DEFAULT.resolve("nonsense") is None


def test_tier_file_errors_are_all_reported_with_their_keys() -> None:
    text = """
        colour = "blue"
        [[tier]]
        name = "ledger"
        services = ["leader", "append"]
        [[tier]]
        name = "ledger"
        services = ["subscibe", "append", "replication"]
        [[tier]]
        name = "empty"
        services = []
        [[tier]]
        services = ["book"]
        [supervisor]
        settle_s = "soon"
        overload_from = 2.0
        max_commit_lag = 0
        retry_after = 5
    """
    with pytest.raises(ConfigError) as info:
        tiers.loads(text, source="t.toml")
    problems = dict(info.value.problems)
    assert problems["colour"].startswith("unknown key")
    assert "duplicate tier name 'ledger'" in problems["tier[1].name"]
    assert "did you mean 'subscribe'" in problems["tier[1].services[0]"]
    assert "listed twice (also tier[0].services[1])" in problems["tier[1].services[1]"]
    assert "must be in tier 0" in problems["tier[1].services[2]"]
    assert "empty tier" in problems["tier[2].services"]
    assert problems["tier[3].name"] == "is required"
    assert "expected a number" in problems["supervisor.settle_s"]
    assert "out of range" in problems["supervisor.overload_from"]
    assert "out of range" in problems["supervisor.max_commit_lag"]
    assert "did you mean 'retry_after_ms'" in problems["supervisor.retry_after"]
    assert str(info.value).startswith("t.toml: ")
    with pytest.raises(ConfigError, match="declare at least one"):
        tiers.loads("")
    many = "".join(f'[[tier]]\nname = "t{i}"\nservices = ["{s}"]\n'
                   for i, s in enumerate(list(tiers.SERVICES) * 2))
    with pytest.raises(ConfigError, match="at most 16"):
        tiers.loads(many)
    with pytest.raises(ConfigError, match="invalid TOML"):
        tiers.loads("[[tier]\n")


def test_unlisted_services_warn_and_take_a_place(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text('[[tier]]\nname = "core"\nservices = ["append"]\n'
                    '[[tier]]\nname = "rest"\nservices = ["subscribe"]\n')
    spec = tiers.load(path)
    assert spec.warnings and "leader (counted in tier 0)" in spec.warnings[0]
    assert spec.tier_of("leader") == 0 and spec.tier_of("read-all") == 1
    with pytest.raises(ConfigError, match="cannot read"):
        tiers.load(tmp_path / "missing.toml")


def test_cli_checks_tier_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xdc.cli import main
    assert main(["tiers", "check"]) == 0
    assert "ledger" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tier]]\nname = "x"\nservices = ["engines"]\n')
    assert main(["tiers", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "tier[0].services[0]: unknown service 'engines' (did you mean 'engine'?)" in err
    # The standalone server refuses to start on it, before binding anything.
    assert main(["serve", "--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                 "--tiers", str(bad)]) == 2
    assert "unknown service 'engines'" in capsys.readouterr().err


def test_cli_status_json_has_snake_case_keys_and_integers(tmp_path: Path) -> None:
    """`xdc tiers status --json` against a real `xdc serve`: the keys and numbers of
    `xdc info` (snake_case, 64-bit integers as numbers, every field); before, protobuf's
    JSON mapping: "nodeId", "commitLag": "0", "sinceUnixNs": "17..."."""
    import json

    from store.process import ServeProcess
    from tests.support.cli import xdc_cli
    with ServeProcess(str(tmp_path / "n")) as node:
        deadline = time.monotonic() + 10
        while True:  # until the supervisor's first observations made transitions
            r = xdc_cli("tiers", "status", "--json", "--target", node.address)
            assert r.returncode == 0, r.stderr
            st = json.loads(r.stdout)
            if st["transitions"] or time.monotonic() > deadline:
                break
        assert st["node_id"] == "standalone" and "nodeId" not in st
        for key in ("observed_at_unix_ns", "pending_events", "max_pending_events",
                    "commit_lag", "max_commit_lag", "observations", "term",
                    "commit_position"):
            assert type(st[key]) is int, (key, st)
        assert st["max_pending_events"] > 0
        assert [t["name"] for t in st["tiers"]] == [t.name for t in DEFAULT.tiers]
        first = st["tiers"][0]
        assert first["index"] == 0 and type(first["since_unix_ns"]) is int
        assert set(first) == {f.name for f in tpb.TierStatus.DESCRIPTOR.fields}
        assert st["transitions"] and type(st["transitions"][0]["at_unix_ns"]) is int


# ---- the machine ----------------------------------------------------------------------


def test_start_admits_tiers_in_order_each_after_the_settle_time() -> None:
    m = machine()
    assert states(m) == [State.DEGRADED] + [State.SHED] * (N - 1)
    assert [s.reason for s in m.states] == [Reason.STARTING] * N
    c = Clock(m)
    c.at(1.0)
    assert states(m) == [State.SERVING] + [State.RECOVERING] * (N - 1)
    assert m.refusal(0) is None
    r = m.refusal(1)
    assert r is not None and r.code == grpc.StatusCode.UNAVAILABLE
    assert r.reason == Reason.SETTLING and "'matching'" in r.message
    # The hint estimates when the tier comes back: one settle per tier below it, each
    # ending at an observation (up to one interval later).
    step = SETTLE + DEFAULT.supervisor.interval_s
    assert [m.refusal(i).retry_after_ms for i in range(1, N)] == [  # type: ignore[union-attr]
        round(step * 1000 * k) for k in range(1, N)]
    c.at(1.0 + SETTLE - 0.01)
    assert serving_count(m) == 1
    for k in range(1, N):
        c.at(1.0 + k * SETTLE)
        assert states(m) == [State.SERVING] * (k + 1) + [State.RECOVERING] * (N - k - 1)
    recovered = [s.recovered_at_ns for s in m.states]
    assert recovered == [int((1.0 + k * SETTLE) * 1e9) for k in range(N)]
    assert m.all_admitted


@pytest.mark.parametrize(("kw", "reason", "words"), [
    ({"quorum": False}, Reason.NO_QUORUM, "no quorum"),
    ({"failover": True}, Reason.FAILOVER, "failover in progress"),
    ({"quorum": False, "failover": True}, Reason.NO_QUORUM, "no quorum"),
])
def test_loss_of_leader_or_quorum_sheds_everything_above_tier_0(
        kw: dict[str, bool], reason: Reason, words: str) -> None:
    m = machine()
    c = Clock(m)
    recover_fully(c)
    changes = c.step(0.1, **kw)
    assert states(m) == [State.DEGRADED] + [State.SHED] * (N - 1)
    assert [t.index for t in changes] == list(range(N))  # reported in tier order
    assert m.refusal(0) is None  # tier 0 is never shed
    for i in range(1, N):
        r = m.refusal(i)
        assert r is not None and r.code == grpc.StatusCode.UNAVAILABLE and r.reason == reason
        assert f"'{DEFAULT.tiers[i].name}'" in r.message and words in r.message
        assert r.retry_after_ms == DEFAULT.supervisor.retry_after_ms
        assert f"retry after {r.retry_after_ms} ms" in r.message
    down_at = c.t
    assert all(s.down_at_ns == int(down_at * 1e9) for s in m.states)
    # Back: tier 0 at once, then one tier per settle time, in order.
    c.step(0.5)
    assert states(m) == [State.SERVING] + [State.RECOVERING] * (N - 1)
    order = []
    while serving_count(m) < N:
        order += [t.index for t in c.step(0.01) if t.new == State.SERVING]
    assert order == list(range(1, N))
    times = [s.recovered_at_ns for s in m.states]
    assert all(b - a >= int(SETTLE * 1e9) - 10**7 for a, b in itertools.pairwise(times))
    assert all(t > int(down_at * 1e9) for t in times)


def test_a_tier_lost_while_recovering_sends_the_ones_above_back() -> None:
    m = machine()
    c = Clock(m)
    recover_fully(c)
    c.step(0.1, failover=True)
    c.step(0.1)
    c.step(SETTLE)
    assert states(m)[:3] == [State.SERVING, State.SERVING, State.RECOVERING]
    c.step(0.05, failover=True)  # a second failover before order entry is back
    assert states(m) == [State.DEGRADED] + [State.SHED] * (N - 1)
    c.step(0.05)
    assert states(m) == [State.SERVING] + [State.RECOVERING] * (N - 1)  # from the start


def test_overload_sheds_from_the_top_with_hysteresis_and_never_tier_0() -> None:
    m = machine()
    c = Clock(m)
    recover_fully(c)
    limit = 1000
    shed_by_load = []
    for pending in range(0, 2 * limit + 1, 25):
        c.step(0.01, pending_events=pending, max_pending_events=limit)
        shed_by_load.append((pending, N - serving_count(m)))
    # Thresholds 0.5, 0.625, 0.75, 0.875 of the queue: the top tier first.
    first_shed = {k: next(p for p, n in shed_by_load if n >= k) for k in range(1, N)}
    assert first_shed == {1: 500, 2: 625, 3: 750, 4: 875}
    assert states(m) == [State.SERVING] + [State.SHED] * (N - 1)  # even at twice the limit
    assert m.refusal(0) is None
    r = m.refusal(N - 1)
    assert r is not None and r.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert r.reason == Reason.OVERLOAD and "'analytics'" in r.message
    assert "writer queue 2000/1000" in r.message
    # The hint: a quiet settle time for the lowest tier shed for load, then one settle
    # time per tier up to this one (before: the constant 200 ms, far too early).
    step = SETTLE + DEFAULT.supervisor.interval_s
    assert r.retry_after_ms == round(step * (N - 1) * 1000)
    # Under a threshold but above restore_below x threshold: still shed.
    c.step(1.0, pending_events=800, max_pending_events=limit)  # tier 1: 0.875 * 0.8 = 0.7
    assert states(m)[1] == State.SHED
    # Quiet: the tiers come back lowest first, each after its quiet time and the settle
    # time of the one below; none before the hint it gave when the load went quiet.
    c.step(0.01)
    quiet_at = c.t
    hints = {i: m.refusal(i).retry_after_ms / 1000 for i in range(1, N)}  # type: ignore[union-attr]
    order = []
    for _ in range(400):
        order += [(t.index, round(c.t, 2)) for t in c.step(0.01) if t.new == State.SERVING]
        if serving_count(m) == N:
            break
    assert [i for i, _ in order] == list(range(1, N))
    assert all(at - quiet_at <= hints[i] + 0.011 for i, at in order), (order, hints)
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(order)]
    assert all(g >= SETTLE - 0.011 for g in gaps), gaps


def test_commit_lag_counts_as_load() -> None:
    m = machine()
    c = Clock(m)
    recover_fully(c)
    lag = DEFAULT.supervisor.max_commit_lag
    c.step(0.01, commit_lag=lag // 2)
    assert states(m)[-1] == State.SHED and states(m)[-2] == State.SERVING
    r = m.refusal(N - 1)
    assert r is not None and f"commit lag {lag // 2}/{lag}" in r.message
    c.step(0.01, commit_lag=lag)
    assert states(m) == [State.SERVING] + [State.SHED] * (N - 1)


def test_a_service_down_degrades_its_tier_and_sheds_the_ones_above() -> None:
    m = machine()
    c = Clock(m)
    recover_fully(c)
    c.step(0.01, down=frozenset({"engine"}))
    assert states(m) == [State.SERVING, State.DEGRADED] + [State.SHED] * (N - 2)
    assert m.refusal(1) is None  # admitted: the engines' own calls pass to recover
    r = m.refusal(2)
    assert r is not None and r.reason == Reason.DEPENDENCY and r.code.name == "UNAVAILABLE"
    assert "tier 'matching' is not healthy (engine down)" in r.message
    r = m.refusal(4)
    assert r is not None and r.reason == Reason.DEPENDENCY and "'order-entry' is shed" in (
        r.message)
    recover_fully(c)


def test_zero_settle_recovers_all_at_once_in_order_and_backwards_clock_is_harmless() -> None:
    m = machine(DEFAULT.with_supervisor(settle_s=0))
    c = Clock(m)
    assert [t.index for t in c.at(5.0) if t.new == State.SERVING] == list(range(N))
    c.at(5.1, failover=True)
    c.at(4.0)  # a clock stepping back counts as no time passing
    assert m.states[1].since == 5.1 and serving_count(m) == N


@pytest.mark.parametrize("seed", range(8))
def test_random_schedules_keep_the_invariants(seed: int) -> None:
    """Admitted tiers always form a prefix including tier 0; a tier is only admitted
    (from shed or recovering) once the tier below has served for settle_s; every
    refusal names its tier; overload and only overload is RESOURCE_EXHAUSTED."""
    rnd = random.Random(seed)
    m = machine()
    t = 0.0
    for _ in range(3000):
        t += rnd.choice((0.0, 0.01, 0.05, 0.1, 0.3))
        before = m.states
        obs = Observation(
            t, int(t * 1e9), failover=rnd.random() < 0.05, quorum=rnd.random() > 0.05,
            pending_events=rnd.choice((0, 0, 0, 100, 600, 800, 1000)), max_pending_events=1000,
            commit_lag=rnd.choice((0, 0, 0, 90_000)),
            down=frozenset(rnd.sample(list(tiers.SERVICES), rnd.choice((0, 0, 0, 0, 1)))))
        m.observe(obs)
        admitted = [s.admitted for s in m.states]
        assert admitted[0]
        assert admitted == sorted(admitted, reverse=True), admitted
        for i in range(1, N):
            was, now = before[i], m.states[i]
            if now.admitted and not was.admitted:
                below = before[i - 1]
                assert below.state == State.SERVING and below.serving_since is not None
                assert t - below.serving_since >= SETTLE - 1e-9
            r = m.refusal(i)
            if r is not None:
                assert repr(now.name) in r.message
                assert (r.code == grpc.StatusCode.RESOURCE_EXHAUSTED) == (
                    r.reason == Reason.OVERLOAD)


# ---- the interceptor on every call shape (a real gRPC server) ------------------------------


def test_supervisor_outlives_a_reader_that_fails_in_any_way() -> None:
    """A reader whose gRPC call was cancelled under it (its channel closed: CancelledError
    although nobody cancelled the supervisor), or that raises anything else, counts as a
    failed observation; the supervisor goes on observing and the tiers recover. (A gateway's
    supervisor once died of the first, silently, and left order entry shed for good.)"""
    async def body() -> None:
        script = [asyncio.CancelledError(), RuntimeError("reader bug"), None]

        async def read() -> Reading:
            failure = script.pop(0) if script else None
            if failure is not None:
                raise failure
            return Reading()

        sup = TierSupervisor(DEFAULT.with_supervisor(settle_s=0, interval_s=0.01), read)
        servicer = health.aio.HealthServicer()
        await sup.start(servicer)
        try:
            await wait_until(lambda: not script and sup.machine.all_admitted, 5.0,
                             "tiers admitted after the failed observations")
            assert sup._task is not None and not sup._task.done()
        finally:
            await sup.stop()
        # The supervisor's own cancellation still stops it.
        assert sup._task is None

    run(body)


def test_interceptor_refuses_every_call_shape_and_passes_tier_0(tmp_path: Path) -> None:
    async def body() -> None:
        failing = {"on": False}

        async def read() -> Reading:
            return Reading(failover=failing["on"])

        sup = TierSupervisor(DEFAULT.with_supervisor(settle_s=0, interval_s=0.01), read)
        identity = (lambda b: b)  # noqa: E731

        async def uu(req: bytes, ctx: Any) -> bytes:
            return b"uu"

        async def us(req: bytes, ctx: Any) -> AsyncIterator[bytes]:
            yield b"us"

        async def su(reqs: Any, ctx: Any) -> bytes:
            return b"su"

        async def ss(reqs: Any, ctx: Any) -> AsyncIterator[bytes]:
            yield b"ss"

        handlers = grpc.method_handlers_generic_handler("t.Shapes", {
            "UU": grpc.unary_unary_rpc_method_handler(uu, identity, identity),
            "US": grpc.unary_stream_rpc_method_handler(us, identity, identity),
            "SU": grpc.stream_unary_rpc_method_handler(su, identity, identity),
            "SS": grpc.stream_stream_rpc_method_handler(ss, identity, identity),
        })
        server = grpc.aio.server(interceptors=sup.interceptors)
        server.add_generic_rpc_handlers((handlers,))
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await sup.start(hs)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                calls = {
                    "UU": lambda md: ch.unary_unary("/t.Shapes/UU")(b"x", metadata=md),
                    "US": lambda md: _drain(ch.unary_stream("/t.Shapes/US")(b"x", metadata=md)),
                    "SU": lambda md: ch.stream_unary("/t.Shapes/SU")(iter([b"x"]), metadata=md),
                    "SS": lambda md: _drain(ch.stream_stream("/t.Shapes/SS")(iter([b"x"]),
                                                                             metadata=md)),
                }
                await wait_until(lambda: sup.machine.all_admitted, what="all tiers admitted")
                for call in calls.values():
                    await call(((MD_TIER, "analytics"),))
                failing["on"] = True
                await wait_until(lambda: not sup.machine.all_admitted, what="shedding")
                for name, call in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(((MD_TIER, "analytics"),))
                    e = info.value
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, name
                    assert "tier 'analytics' (tier 4) is shed" in (e.details() or "")
                    md = dict(e.trailing_metadata() or ())
                    assert md[MD_TIER] == "analytics"
                    assert md[MD_RETRY_AFTER_MS] == str(sup.spec.supervisor.retry_after_ms)
                    assert md[MD_SHED_REASON] == "failover"
                    await call(((MD_TIER, "ledger"),))  # tier 0: never shed
                    await call(((MD_TIER, "append"),))  # a service name works too
                    await call(())  # a method no tier covers: never shed
                    await call((("x-xdc-tier", "ledger"),))
                    # An unknown name falls back to the method (here: none, so it passes).
                    await call(((MD_TIER, "no-such-tier"),))
                # Health: tier 0 is degraded, the rest not serving.
                stub = health_pb2_grpc.HealthStub(ch)
                for service in (health_name("ledger"), health_name("analytics"), HEALTH_ALL):
                    r = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                    assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await sup.stop()
            await server.stop(0)

    run(body)


async def _drain(call: Any) -> list[Any]:
    return [x async for x in call]


# ---- overload on a standalone node (real LMDB, real gRPC, the writer held) ----------------


def test_overload_sheds_top_tiers_with_resource_exhausted(tmp_path: Path) -> None:
    async def body() -> None:
        spec = DEFAULT.with_supervisor(settle_s=0.1, interval_s=0.02)
        node = StoreNode(tmp_path / "store", Limits(max_pending_events=20))
        sup = TierSupervisor(spec, standalone_reader(node), node_id="solo")
        server = StoreServer(node, "127.0.0.1:0", interceptors=sup.interceptors,
                             add_services=sup.add_services)
        await server.start()
        await sup.start(server)
        hold = hold_writer(node)
        gate, held = hold.gate, hold.held
        writes: list[asyncio.Task[Any]] = []
        try:
            async with grpc.aio.insecure_channel(server.address) as ch:
                store = pb_grpc.EventStoreStub(ch)
                tiers_stub = tpb_grpc.TiersStub(ch)
                health_stub = health_pb2_grpc.HealthStub(ch)
                await wait_health(health_stub, HEALTH_ALL, serving=True)

                def append(i: int) -> asyncio.Task[Any]:
                    return asyncio.ensure_future(store.Append(pb.AppendRequest(
                        stream=f"s{i}", events=[new_event("T", b"%d" % i)]), timeout=60))

                writes.append(append(0))  # taken by the writer, held in admit
                await wait_until(held.is_set, what="the writer held in admit")
                writes.extend(append(i) for i in range(1, 17))  # 16/20 queued: load 0.8
                await wait_until(lambda: node.writer.pending_events == 16,  # type: ignore
                                 what="16 queued events")
                await wait_health(health_stub, health_name("order-entry"), serving=False)

                async def observed_all_16() -> bool:
                    # The status is the supervisor's last observation: tiers shed from
                    # load 0.5 on, so one made at 15 queued events may still be the latest.
                    return (await tiers_stub.Status(tpb.TiersStatusRequest())
                            ).pending_events == 16
                await wait_until(observed_all_16, what="an observation of 16 queued events")
                st = await tiers_stub.Status(tpb.TiersStatusRequest())
                assert [t.state for t in st.tiers] == [
                    "serving", "serving", "shed", "shed", "shed"]
                assert st.cause == "" and st.pending_events == 16
                assert st.max_pending_events == 20
                # Read of $all (analytics) and Subscribe (market-data): shed for load.
                for call, tier in (
                        (lambda md: _drain(store.Read(pb.ReadRequest(stream="$all", limit=10),
                                                      metadata=md)), "analytics"),
                        (lambda md: _drain(store.Subscribe(pb.SubscribeRequest(), metadata=md)),
                         "market-data")):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(())
                    e = info.value
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert f"tier '{tier}'" in (e.details() or "")
                    assert "overload" in (e.details() or "")
                    md = dict(e.trailing_metadata() or ())
                    # When the tier is expected back (geo/tiers.TierMachine._retry_ms).
                    assert int(md[MD_RETRY_AFTER_MS]) >= \
                        spec.supervisor.overload_retry_after_ms
                    assert md[MD_TIER] == tier and md[MD_SHED_REASON] == "overload"
                # A stream's history is analytics too; the same read as tier 0 passes.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _drain(store.Read(pb.ReadRequest(stream="s1", limit=10)))
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert await _drain(store.Read(pb.ReadRequest(stream="$all", limit=10),
                                               metadata=((MD_TIER, "ledger"),))) == []
                # matching is not shed at this load: an engine's subscription passes.
                sub = store.Subscribe(pb.SubscribeRequest(), metadata=((MD_TIER, "engine"),))
                first = await sub.read()
                assert first.WhichOneof("kind") == "caught_up"
                sub.cancel()
                # The client names its tier (an engine's subscription passes), and a read
                # it is refused retries after the hint until the tier is back.
                async with StoreClient(server.address, tier="engine") as engine_client:
                    async for item in engine_client.subscribe():
                        assert isinstance(item, CaughtUp)
                        break
                client = StoreClient(server.address, timeout_s=30)
                refused = sup.interceptor.refused["analytics"]
                reader = asyncio.ensure_future(client.read("$all", limit=100))
                await wait_until(lambda: sup.interceptor.refused["analytics"] > refused,
                                 what="the client's read refused")
                # The writer moves again: the queue drains, the tiers return in order.
                gate.set()
                assert len(await reader) == 17  # only once analytics is admitted again
                await client.close()
                results = await asyncio.gather(*writes)
                assert len({r.first_position for r in results}) == 17
                await wait_health(health_stub, HEALTH_ALL, serving=True)
                st = await tiers_stub.Status(tpb.TiersStatusRequest())
                shed_at = max(t.at_unix_ns for t in st.transitions if t.to_state == "shed")
                back = [(t.index, t.at_unix_ns) for t in st.transitions
                        if t.to_state == "serving" and t.at_unix_ns > shed_at]
                assert [i for i, _ in back] == [2, 3, 4]
                assert [a for _, a in back] == sorted(a for _, a in back)
                events = await _drain(store.Read(pb.ReadRequest(stream="$all", limit=100)))
                assert sum(len(b.events) for b in events) == 17
        finally:
            gate.set()
            for w in writes:
                w.cancel()
            await sup.stop()
            await server.stop(0.5)

    run(body, timeout_s=60)


# ---- a real cluster losing its quorum -------------------------------------------------------


def _tiered_cluster(etcd: EtcdCluster, tmp_path: Path, settle: float) -> LocalCluster:
    """Three nodes (not started) whose tier file is the default one with `settle` and an
    observation every 50 ms."""
    tier_file = tmp_path / "tiers.toml"
    text = re.sub(r"(?m)^settle_s = \S+", f"settle_s = {settle}",
                  tiers.DEFAULT_PATH.read_text())
    tier_file.write_text(re.sub(r"(?m)^interval_s = \S+", "interval_s = 0.05", text))
    base = LocalCluster.make(etcd.endpoints, tmp_path)
    return LocalCluster(dataclasses.replace(base.config, tiers_file=tier_file))


def test_quorum_loss_sheds_upper_tiers_and_recovery_follows_tier_order(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    settle = 0.3

    async def body() -> None:
        cluster = _tiered_cluster(etcd, tmp_path, settle)
        await cluster.start()
        watchers: list[asyncio.Task[None]] = []
        try:
            leader = await cluster.leader()
            assert leader.tiers.supervisor.settle_s == settle
            followers = [mid for mid in cluster.nodes if mid != leader.id]
            async with grpc.aio.insecure_channel(leader.address) as ch:
                store = pb_grpc.EventStoreStub(ch)
                health_stub = health_pb2_grpc.HealthStub(ch)
                await wait_health(health_stub, HEALTH_ALL, serving=True)
                await store.Append(pb.AppendRequest(stream="orders",
                                                    events=[new_event("Placed", b"1")]))
                await cluster.stop(*followers)
                await wait_health(health_stub, health_name("matching"), serving=False)
                st = await tpb_grpc.TiersStub(ch).Status(tpb.TiersStatusRequest())
                assert st.cause in ("no_quorum", "failover")
                assert st.tiers[0].state == "degraded"
                # Shed tiers: a subscription marked market-data, an unmarked read of $all.
                for call, tier in (
                        (lambda md: _drain(store.Subscribe(pb.SubscribeRequest(),
                                                           metadata=md)), "market-data"),
                        (lambda md: _drain(store.Read(pb.ReadRequest(stream="$all", limit=5),
                                                      metadata=md)), "analytics")):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(((MD_TIER, tier),) if tier == "market-data" else ())
                    e = info.value
                    md = dict(e.trailing_metadata() or ())
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    assert f"tier '{tier}'" in (e.details() or "")
                    assert md[MD_TIER] == tier
                    assert md[MD_SHED_REASON] in ("no_quorum", "failover")
                    assert int(md[MD_RETRY_AFTER_MS]) > 0
                # Tier 0 is still attempted: committed reads are served, and a write
                # reaches the store, which cannot commit it (no shedding metadata).
                batches = await _drain(store.Read(pb.ReadRequest(stream="$all", limit=5),
                                                  metadata=((MD_TIER, "ledger"),)))
                assert "orders" in [e.stream for b in batches for e in b.events]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await store.Append(pb.AppendRequest(
                        stream="orders", events=[new_event("Placed", b"2")]), timeout=3)
                assert MD_TIER not in dict(info.value.trailing_metadata() or ())
                # Watch every tier's health on this node, then bring the others back.
                seen: list[tuple[int, int]] = []

                async def watch(i: int, name: str) -> None:
                    async for r in health_stub.Watch(
                            health_pb2.HealthCheckRequest(service=health_name(name))):
                        seen.append((i, r.status))

                watchers = [asyncio.ensure_future(watch(i, t.name))
                            for i, t in enumerate(leader.tiers.tiers)]
                await wait_until(lambda: {i for i, _ in seen} == set(range(N)),
                                 what="a first health answer per tier")
                await cluster.start(*followers)
                await wait_health(health_stub, HEALTH_ALL, serving=True, timeout_s=60)
                await wait_until(lambda: sum(1 for i, s in seen if s == 1) >= N)
                st = await tpb_grpc.TiersStub(ch).Status(tpb.TiersStatusRequest())
        finally:
            for w in watchers:
                w.cancel()
            await cluster.stop()
        # The last change to SERVING of each tier, in arrival order: 0, 1, 2, 3, 4.
        serving = health_pb2.HealthCheckResponse.SERVING
        last_up = {i: k for k, (i, s) in enumerate(seen) if s == serving}
        assert sorted(last_up, key=last_up.__getitem__) == list(range(N)), seen
        recovered = [t.recovered_at_unix_ns for t in st.tiers]
        assert recovered == sorted(recovered)
        gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(recovered)]
        assert all(g >= settle - 0.01 for g in gaps), gaps
        assert all(t.down_at_unix_ns < t.recovered_at_unix_ns for t in st.tiers)

    run(body, timeout_s=120)


# ---- a planned switchover whose target never opens its term ---------------------------------

# How late past its deadline a shed, or the answer to a parked append, may come: the
# supervisor observes and the writer ticks every 50 ms, the rest is slack for a loaded
# machine. Well under what would shed those tiers anyway (a follower's leader silent for
# a second) or answer the append (the candidate's recovery timeout, 2 s).
LATE_S = 0.3
# Transitions are stamped with the wall clock, deadlines kept on the monotonic one.
EARLY_S = 0.02


@dataclasses.dataclass
class Stalled:
    cluster: LocalCluster
    old: ClusterNode  # the leader that handed over
    target: ClusterNode  # designated, holds the leader key, never opens its term
    other: ClusterNode
    t0: int  # wall clock (ns) when the switchover was asked for...
    t1: int  # ...and when it returned (the target had taken the key)
    handover: int  # the position handed over
    asked: dict[str, int]  # node -> wall clock when the target's Promise reached it


@contextlib.asynccontextmanager
async def _stalled_switchover(etcd: EtcdCluster, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch, cut: str,
                              ) -> AsyncIterator[Stalled]:
    """A switchover to a target whose term never opens. `cut` "mute": what the target
    sends in a term above the old leader's is lost (its Promise reaches nobody); "deaf":
    what it receives of such terms is lost (the promises it asks for never come back)."""
    cluster = _tiered_cluster(etcd, tmp_path, settle=0.1)
    await cluster.start()
    try:
        old = await cluster.leader()
        for node in cluster.nodes.values():
            await wait_until(lambda n=node: n.supervisor.machine.all_admitted,  # type: ignore
                             timeout_s=20, what=f"every tier admitted on {node.id}")
        target, other = (n for n in cluster.nodes.values() if n is not old)
        term = old.store.role.term
        asked: dict[str, int] = {}
        for node in (old, other):
            assert node.replicator is not None

            def record(msgs: list[Any], node_id: str = node.id,
                       deliver: Any = node.replicator.deliver) -> None:
                if node_id not in asked and any(isinstance(m, Promise) and m.term > term
                                                for m in msgs):
                    asked[node_id] = time.time_ns()
                deliver(msgs)
            monkeypatch.setattr(node.replicator, "deliver", record)
        if cut == "mute":
            for sender in target.senders.values():
                monkeypatch.setattr(sender, "send", lambda m, ctx=None, send=sender.send:
                                    None if m.term > term else send(m, ctx))
        else:
            assert cut == "deaf" and target.replicator is not None
            deliver = target.replicator.deliver
            monkeypatch.setattr(target.replicator, "deliver",
                                lambda msgs: deliver([m for m in msgs if m.term <= term]))
        t0 = time.time_ns()
        resp = await old.switchover(target.id, timeout_s=10)
        t1 = time.time_ns()
        assert resp.new_leader == target.id
        yield Stalled(cluster, old, target, other, t0, t1, resp.handover_position, asked)
    finally:
        await cluster.stop()


def _first_shed(node: ClusterNode, after_ns: int) -> Transition | None:
    """The first time after `after_ns` that `node` stopped serving its matching tier."""
    return next((t for t in node.supervisor.machine.transitions if t.tier == "matching"
                 and t.wall_ns > after_ns and t.old == State.SERVING), None)


async def _shed(node: ClusterNode, after_ns: int) -> Transition:
    await wait_until(lambda: _first_shed(node, after_ns) is not None, timeout_s=5,
                     what=f"{node.id} to shed its tiers")
    shed = _first_shed(node, after_ns)
    assert shed is not None and shed.new == State.SHED, shed
    assert shed.reason == Reason.FAILOVER, shed
    return shed


def test_a_switchover_whose_target_never_opens_is_a_failover_after_the_park_window(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target wins the key but its Promise reaches nobody. The appends it holds are
    answered 'not the leader' once PARK_MAX_S has passed (not acknowledged, not left
    hanging), and it and the old leader shed their tiers then, as in a failover, instead
    of keeping them admitted; the third node sheds once its leader has been silent."""
    async def body() -> None:
        async with _stalled_switchover(etcd, tmp_path, monkeypatch, "mute") as s, \
                grpc.aio.insecure_channel(s.target.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.EventStoreStub(ch).Append(pb.AppendRequest(
                    stream="parked", events=[new_event("Placed", b"1")]), timeout=10)
            answered = time.time_ns()
            e = info.value
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert "does not accept writes" in (e.details() or ""), e
            assert "None" not in (e.details() or ""), e  # names a leader or none
            # Held while the target could still open, answered once it could not.
            held_s = (answered - s.t0) / 1e9
            assert PARK_MAX_S - EARLY_S <= held_s <= (s.t1 - s.t0) / 1e9 + PARK_MAX_S \
                + LATE_S, held_s
            assert s.target.store.log is not None
            assert s.target.store.log.last_position == s.handover, "nothing written"
            for node in (s.target, s.old):  # their planned windows began within t0..t1
                shed = await _shed(node, s.t0)
                after_s = (shed.wall_ns - s.t0) / 1e9
                assert PARK_MAX_S - EARLY_S <= after_s <= (s.t1 - s.t0) / 1e9 \
                    + PARK_MAX_S + LATE_S, (node.id, after_s)
            await _shed(s.other, s.t0)
            # An order-entry call to the target is refused with the tier's message.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _drain(pb_grpc.EventStoreStub(ch).Read(
                    pb.ReadRequest(stream="parked"), metadata=((MD_TIER, "order-entry"),)))
            e = info.value
            md = dict(e.trailing_metadata() or ())
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert "tier 'order-entry'" in (e.details() or ""), e
            assert md[MD_TIER] == "order-entry"
            assert md[MD_SHED_REASON] in ("failover", "no_quorum")

    run(body, timeout_s=60)


def test_followers_asked_for_a_promise_keep_their_tiers_for_at_most_the_park_window(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's Promise reaches the others, who promise, but their replies never reach
    it. Asked by a successor while the leader they followed spoke within the window, the
    old leader and the third node keep their tiers admitted, but for PARK_MAX_S from the
    request at most. The target, whose own term never opened, does not admit its tiers
    again after giving the term up: nobody asked it for a promise."""
    async def body() -> None:
        async with _stalled_switchover(etcd, tmp_path, monkeypatch, "deaf") as s:
            await wait_until(lambda: set(s.asked) == {s.old.id, s.other.id}, timeout_s=5,
                             what="the target's Promise to reach the others")
            for node in (s.old, s.other):
                shed = await _shed(node, s.t0)
                after_s = (shed.wall_ns - s.asked[node.id]) / 1e9
                assert PARK_MAX_S - EARLY_S <= after_s <= PARK_MAX_S + LATE_S, (node.id,
                                                                                after_s)
            await _shed(s.target, s.t0)
            await wait_until(lambda: s.target.store.role.name == "follower", timeout_s=10,
                             what="the target to give its term up")
            machine = s.target.supervisor.machine
            seen = machine.observations
            await wait_until(lambda: machine.observations >= seen + 10,
                             what="ten more observations")
            back = [t for t in machine.transitions if t.tier == "matching"
                    and t.wall_ns > s.t0 and t.new != State.SHED]
            assert back == [], back

    run(body, timeout_s=60)


def test_a_remote_reader_is_not_held_by_a_target_that_hangs() -> None:
    """The gateway reads its store's tiers through several targets. The first one hangs
    (a paused store): the healthy second one answers within one call's timeout, and a
    healthy answer wins over an unhealthy one (a cut-off member saying no_quorum) that
    comes first. Before, targets were asked one after the other: the hung one used the
    supervisor's whole observation time, every observation was a failover, and orders
    stayed shed for as long as it hung (a review found it)."""
    from geo.tier_supervisor import REMOTE_TIMEOUT_S, RemoteReader

    class Hang(tpb_grpc.TiersServicer):
        async def Status(self, request: Any, context: Any) -> tpb.TiersStatus:
            await asyncio.Event().wait()  # never answers (the call's deadline ends it)
            raise AssertionError("unreachable")

    class Answer(tpb_grpc.TiersServicer):
        def __init__(self, cause: str) -> None:
            self.cause = cause

        async def Status(self, request: Any, context: Any) -> tpb.TiersStatus:
            return tpb.TiersStatus(cause=self.cause, term=5, commit_position=10)

    async def body() -> None:
        servers, addresses = [], []
        for svc in (Hang(), Answer("no_quorum"), Answer("")):
            server = grpc.aio.server()
            tpb_grpc.add_TiersServicer_to_server(svc, server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            await server.start()
            servers.append(server)
        hang, cut_off, good = addresses
        try:
            for targets, healthy in (([hang, good], True), ([hang, cut_off, good], True),
                                     ([hang, cut_off], False), ([hang], None)):
                reader = RemoteReader(targets)
                try:
                    t0 = time.monotonic()
                    reading = await reader()
                    took = time.monotonic() - t0
                finally:
                    await reader.close()
                if healthy is None:  # nothing answered: a failover, after one timeout
                    assert reading.failover and took < 2 * REMOTE_TIMEOUT_S
                    continue
                assert not reading.failover and reading.quorum is healthy, (targets, reading)
                assert took < (0.5 if healthy else 2) * REMOTE_TIMEOUT_S + 0.2, took
        finally:
            for server in servers:
                await server.stop(0)
    run(body)


def test_wait_health_polls_through_a_server_not_listening_yet() -> None:
    """A process just restarted (a drill's gateway) refuses connections for a moment:
    wait_health keeps polling until it serves, and names what it last saw on timeout."""
    async def body() -> None:
        port = free_ports(1)[0]  # a loopback port nobody listens on, for now
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(TimeoutError, match="last: UNAVAILABLE"):
                await wait_health(stub, "svc", timeout_s=0.3)
            waiting = asyncio.ensure_future(wait_health(stub, "svc", timeout_s=20))
            await asyncio.sleep(0.2)  # the server comes up while it polls
            assert not waiting.done()
            server = grpc.aio.server()
            servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            try:
                await servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
                await asyncio.wait_for(waiting, 20)
            finally:
                await server.stop(0)
    run(body)
