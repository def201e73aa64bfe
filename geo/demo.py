"""`make demo`: the local multi-region demo.

Starts etcd, a WAN proxy (30 ms RTT between regions) and one store node per region as
real processes, pushes traffic from producers that only know the node list, SIGKILLs
every process of the leader region, keeps pushing, and prints the measured RTO (kill to
the first write acknowledged by the new leader) and the number of acknowledged events
lost (read back from the surviving regions). Everything speaks TLS (the launcher's
default). The killed region then restarts, rejoins
as a follower and catches up; the logs are compared byte for byte; everything stops.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from geo import launcher
from store.client import StoreClient, channel_options, new_event
from store.errors import MD_TIER
from xdc.tls import Tls, aio_channel
from xdc.v1 import eventstore_pb2 as pb

PRODUCERS = 8


@dataclass
class Load:
    """Producers appending until stopped; every acknowledgement is recorded."""

    acked: dict[int, bytes] = field(default_factory=dict)  # position -> event id
    ack_times: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    errors: int = 0

    async def producer(self, client: StoreClient, k: int) -> None:
        i = 0
        while not self.stop.is_set():
            event = new_event("OrderPlaced", b'{"producer": %d, "n": %d}' % (k, i),
                              content_type="application/json")
            try:
                r = await client.append(f"orders.P{k}", event, timeout_s=15)
            except Exception:
                self.errors += 1
                continue
            self.acked[r.first_position] = event.id
            self.ack_times.append(time.monotonic())
            i += 1

    def acks_after(self, t: float) -> int:
        return sum(1 for a in self.ack_times if a > t)


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def raw_log_hash(address: str, upto: int, tls: Tls | None = None) -> str:
    """sha256 of a node's stored records 1..upto, read as raw bytes."""
    h = hashlib.sha256()
    async with aio_channel(address, tls, options=channel_options()) as ch:
        read = ch.unary_stream("/xdc.v1.EventStore/Read",
                               request_serializer=pb.ReadRequest.SerializeToString,
                               response_deserializer=lambda b: b)
        req = pb.ReadRequest(stream="$all", limit=upto, min_position=upto)
        setattr(req, "from", 1)
        # A verification read, wanted most while degraded: tier 0, never shed.
        async for raw in read(req, timeout=30, metadata=((MD_TIER, "ledger"),)):
            h.update(raw)
    return h.hexdigest()


async def committed_records(address: str, tls: Tls | None = None
                            ) -> AsyncIterator[pb.RecordedEvent]:
    """Every committed record the node serves, in order. A verification read like
    raw_log_hash's: tier 0, never shed (not even by a node without quorum)."""
    async with StoreClient(address, tls=tls, tier="ledger") as client:
        async for batch in client.read_batches("$all", limit=100_000, timeout_s=30):
            for e in batch.events:
                yield e


async def read_all_ids(address: str, tls: Tls | None = None) -> dict[int, bytes]:
    """position -> event id of every committed record the node serves."""
    return {e.position: e.id async for e in committed_records(address, tls)}


@dataclass
class Crash:
    """What one SIGKILL of the leader region under load did."""

    leader: launcher.NodeProc
    old_term: int
    new_leader: launcher.NodeProc
    new_term: int
    victims: list[launcher.NodeProc]
    rto_s: float  # kill -> first write acknowledged afterwards
    acked: int
    lost: int  # acknowledged events not in the survivors' log at their position
    errors: int


async def crash_leader_region(state: launcher.ClusterState, producers: int = PRODUCERS,
                              before: int = 500, after: int = 500) -> Crash:
    """SIGKILLs every process of the leader's region while producers that know only the
    node list keep appending; measures the RTO and checks every acknowledgement."""
    leader, st = await launcher.wait_leader(state)
    load = Load()
    tls = launcher.client_tls(state)
    async with StoreClient([n.client for n in state.nodes], timeout_s=15, tls=tls) as client:
        tasks = [asyncio.ensure_future(load.producer(client, k)) for k in range(producers)]
        await wait_for(lambda: len(load.acked) >= before, 30, "traffic before the fault")
        killed_at = time.monotonic()
        victims = launcher.signal_node(state, leader.region, signal.SIGKILL)
        for v in victims:
            launcher.reap(v.pid)
        await wait_for(lambda: load.acks_after(killed_at) >= 1, 30, "the first write after")
        rto = min(a for a in load.ack_times if a > killed_at) - killed_at
        new_leader, new_st = await launcher.wait_leader(state, exclude=(leader.id,))
        await wait_for(lambda: load.acks_after(killed_at) >= after, 30, "traffic after")
        load.stop.set()
        await asyncio.gather(*tasks)
    survivors = await read_all_ids(new_leader.client, tls)
    lost = sum(1 for p, i in load.acked.items() if survivors.get(p) != i)
    return Crash(leader, st.term, new_leader, new_st.term, victims, rto, len(load.acked), lost,
                 load.errors)


async def run(state: launcher.ClusterState) -> dict[str, object]:
    crash = await crash_leader_region(state)
    # The killed region comes back as a follower and catches up.
    for v in crash.victims:
        launcher.start_node(state, v)
    upto = await launcher.wait_converged(state)
    tls = launcher.client_tls(state)
    hashes = {n.id: await raw_log_hash(n.client, upto, tls) for n in state.nodes}
    return {
        "leader before": f"{crash.leader.id} (term {crash.old_term})",
        "fault": f"SIGKILL of every process of region {crash.leader.region}",
        "leader after": f"{crash.new_leader.id} (term {crash.new_term})",
        "RTO (kill -> first ack)": f"{crash.rto_s * 1000:.0f} ms",
        "acknowledged events": crash.acked,
        "acknowledged events lost": crash.lost,
        "client retries (errors seen)": crash.errors,
        "logs identical after rejoin": f"{len(set(hashes.values())) == 1} (up to position "
                                       f"{upto})",
    }


def run_demo(rtt_ms: float = 30.0) -> int:
    with tempfile.TemporaryDirectory(prefix="xdc-demo-") as directory:
        print(f"xdc demo: 3 regions, {rtt_ms:g} ms RTT between them, under {directory}",
              flush=True)
        state = launcher.up(directory, regions=3, rtt_ms=rtt_ms)
        try:
            print(launcher.format_status(state, asyncio.run(launcher.statuses(state))),
                  flush=True)
            summary = asyncio.run(run(state))
            print(launcher.format_status(state, asyncio.run(launcher.statuses(state))))
        finally:
            launcher.down(directory)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
    ok = summary["acknowledged events lost"] == 0 and str(
        summary["logs identical after rejoin"]).startswith("True")
    print("xdc demo: " + ("no acknowledged event lost" if ok else "FAILED"))
    # The demo ends with one DR drill run (geo/drill.py) on a fresh cluster.
    from geo.drill import DrillOptions, run_once, summary_table

    print("xdc demo: one `xdc drill leader-crash --quick` run", flush=True)
    drill = run_once("leader-crash", 1, DrillOptions(rtt_ms=rtt_ms, quick=True))
    print(summary_table([drill]))
    return 0 if ok and drill["ok"] else 1
