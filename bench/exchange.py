"""End-to-end exchange benchmark: client -> store -> matching engine -> outputs committed.

Real processes on this machine: one `xdc serve` (durable, fsync before every answer) and
one `xdc engine run` (primary, file lease). The bench process appends order commands to
the group's input stream with the store client and watches the output stream.

* e2e_orders_per_s: the matching workload of bench.match (80% new orders, 25% of them
  marketable, 20% cancels), appended as fast as the client pipelines them, 100 orders
  per append request (each its own event), 10 requests per AppendStream message (as a
  gateway sends its clients' orders: a million-order message would be one group commit
  that the engine could not start on before it is durable); time from the first append
  to the output batch that covers the last order.
* e2e_p50_ms / e2e_p99_ms: at a stated offered load (orders paced on a schedule), time
  from the append call to the moment the output batch holding that order's outputs is
  delivered to a subscriber: append, fsync, engine, output append, fsync, delivery. The
  same run measures the store's durable group commit of one event on this disk
  (``fsync_ms``; the floor is two of them, ``e2e_floor_ms``) and splits each order's time
  at the store's timestamps of the two group commits (wall clock, one machine):
  ``e2e_hop_append_ms`` (client, gRPC, store queue), ``e2e_hop_engine_ms`` (input fsync,
  delivery to the engine, matching, output append, store queue), ``e2e_hop_output_ms``
  (output fsync, delivery), p50s. It also measures a gRPC round trip between two Python
  processes on this machine (``rpc_rtt_ms``: NodeInfo, nothing to compute, 1 ms apart as
  the paced orders are): an order crosses four one-way hops (client -> store -> engine
  -> store -> subscriber), so ``e2e_floor_ms`` = two durable commits + two round trips.
  ``e2e_light_p50_ms`` / ``e2e_light_p99_ms``: the same at a light load
  (``e2e_light_load_per_s``, LATENCY_RATES).
* replay_cps: a fresh instance replaying the whole group log from the store and checking
  every committed output (`xdc engine verify`'s code), inputs per second.
* catchup_cps: a new warm instance (`xdc engine run --role warm`) catching up with the
  whole group log with the default verify window (engine.runner.VERIFY_WINDOW): inputs
  before the window are replayed for the state alone, the window's outputs are checked
  (``catchup_trusted_inputs``: the last input replayed for the state alone).
* restore_100k_s: restoring an engine snapshot holding 100k resting orders;
  capture_100k_s: taking one (canonical bytes and their hash: what a primary's
  matching stands still for at every `--snapshot-every` inputs; the end-to-end runs
  take none, with `--snapshot-every 0`).

Nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench import report
from bench.match import SYMBOL, setup_commands, workload
from bench.store import group_commit_ms
from engine import wire
from engine.book import Engine, gc_paused
from engine.cli import verify
from engine.codec import restore, snapshot_bytes
from engine.commands import AddSymbol, Deposit, NewOrder
from engine.constants import Side
from engine.runner import VERIFY_WINDOW
from engine.workload import command_events, outputs_through
from store.client import StoreClient
from store.process import ServeProcess
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc

GROUP = "bench"
# Offered loads of the latency runs: (headline, light). Each order is its own append, so
# at the headline load the store's writer spends most of its time in commits (input and
# output appends, ~0.4 ms each on this disk) and orders queue behind them; the light
# load shows the latency of an idle pipeline.
LATENCY_RATES = (1_000, 200)
LATENCY_RATES_QUICK = (500, 100)
ORDERS_PER_APPEND = 100
APPENDS_PER_MESSAGE = 10


def _events(cmds: list[object], tag: str) -> list:  # type: ignore[type-arg]
    return list(command_events(GROUP, cmds, tag))


async def _wait_outputs(client: StoreClient, position: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while await outputs_through(client, GROUP) < position:
        if time.monotonic() > deadline:
            raise TimeoutError(f"outputs not committed through input {position}")
        # Each poll is a read on the store's loop, beside the engine's subscription: a
        # coarse poll disturbs less (and errs on the slow side by at most 10 ms).
        await asyncio.sleep(0.01)
    return time.perf_counter()


async def _throughput(client: StoreClient, n: int, run: int, first_oid: int
                      ) -> tuple[float, int]:
    """Orders/s of one burst of ``n`` orders, and the book's next order id after it (the
    runs share one engine: each run's cancels name orders of its own)."""
    cmds = workload(n, seed=1000 + run, first_oid=first_oid)
    events = _events(cmds, f"t{run}")
    stream = wire.input_stream(GROUP)
    t0 = time.perf_counter()
    # Orders travel ORDERS_PER_APPEND to a request, as a gateway batching its clients'
    # orders would send them; each order is still its own event with its own id. The
    # producer lets the client send each message as soon as it is full: building all
    # 1000 requests before the first left took ~0.1 s in which nothing reached the store.
    futs = []
    for k, i in enumerate(range(0, len(events), ORDERS_PER_APPEND), 1):
        futs.append(client.append_nowait(stream, events[i:i + ORDERS_PER_APPEND]))
        if k % APPENDS_PER_MESSAGE == 0:
            await asyncio.sleep(0)
    results = await asyncio.gather(*futs)
    last = max(r.last_position for r in results)
    t1 = await _wait_outputs(client, last, 120)
    return n / (t1 - t0), first_oid + sum(1 for c in cmds if isinstance(c, NewOrder))


async def _latency(client: StoreClient, rate: int, seconds: float, run: int
                   ) -> list[tuple[float, float, float, float]]:
    """Orders paced at ``rate``/s; per order (ms): total, then its three hops."""
    n = int(rate * seconds)
    # Resting limit orders far from the touch: every order is one Accepted + BookUpdate.
    cmds = [NewOrder(0, SYMBOL, f"acct{i % 100:03d}", "", Side.BUY if i % 2 else Side.SELL,
                     1, 9_000 - (i % 50) if i % 2 else 11_000 + (i % 50)) for i in range(n)]
    events = _events(cmds, f"l{run}")
    sent: dict[int, int] = {}  # input position -> wall clock ns of the append call
    # input position -> (its record's timestamp, its output record's timestamp, arrival)
    arrived: dict[int, tuple[int, int, int]] = {}
    done = asyncio.Event()
    stream = wire.input_stream(GROUP)
    start_after = await outputs_through(client, GROUP)

    async def watch() -> None:
        async for item in client.subscribe(from_end=True, stream_prefix=wire.output_stream(GROUP),
                                           event_types=[wire.OUTPUT_TYPE], batches=True):
            now = time.time_ns()
            if not hasattr(item, "events"):
                continue
            for e in item.events:
                for blob in wire.decode_output(e.data).blobs:
                    p, raws = wire.blob_outputs(blob)
                    if p > start_after:  # raws[0] is the order's Accepted: ts_ns last
                        arrived[p] = (raws[0][-1], e.timestamp_ns, now)
            if len(arrived) >= n:
                done.set()
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)  # let the subscription reach the live tail before pacing
    t0 = time.perf_counter()

    def record(fut: asyncio.Future, t: int) -> None:  # type: ignore[type-arg]
        if not fut.cancelled() and fut.exception() is None:
            sent[fut.result().first_position] = t

    for i, e in enumerate(events):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.time_ns()
        fut = client.append_nowait(stream, [e])
        fut.add_done_callback(lambda f, t=t: record(f, t))
    try:
        async with asyncio.timeout(60):
            await done.wait()
    finally:
        watcher.cancel()
    out = []
    for p, t in sent.items():
        if p in arrived:
            t_in, t_out, t_seen = arrived[p]
            out.append(((t_seen - t) / 1e6, (t_in - t) / 1e6, (t_out - t_in) / 1e6,
                        (t_seen - t_out) / 1e6))
    return out


async def _rpc_rtt_ms(client: StoreClient, n: int = 300) -> float:
    """p50 of a NodeInfo round trip, the calls 1 ms apart (an idle process wakes up for
    each, as it does for paced orders)."""
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        await client.node_info()
        lat.append((time.perf_counter() - t) * 1e3)
        await asyncio.sleep(0.001)
    return statistics.median(lat)


def _p(sample: list[float], q: float) -> float:
    return sorted(sample)[min(len(sample) - 1, int(len(sample) * q))]


def restore_100k() -> tuple[float, float]:
    """(restore, capture) medians, seconds, of a snapshot of 100k resting orders."""
    eng = Engine()
    out: list[tuple] = []
    eng.process(AddSymbol(1, "R", "B", "Q", 1, 1, 10_000, 100_000), out)
    for a in range(100):
        eng.process(Deposit(1, f"a{a}", "Q", 10**15), out)
        eng.process(Deposit(1, f"a{a}", "B", 10**12), out)
    with gc_paused():
        for i in range(100_000):
            side = i % 2
            price = 100_000 - 1 - (i % 5000) if side == Side.BUY else 100_001 + (i % 5000)
            out.clear()
            eng.process(NewOrder(2, "R", f"a{i % 100}", "", side, 1, price), out)
    captures = []
    for _ in range(3):
        t0 = time.perf_counter()
        data = snapshot_bytes(eng)
        hashlib.sha256(data).digest()
        captures.append(time.perf_counter() - t0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        restore(data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(captures)


async def _catch_up(client: StoreClient, address: str, lease: str, instance: str
                    ) -> tuple[float, int]:
    """(inputs/s, inputs replayed for the state alone) of a new warm instance catching
    up with the whole group log, with the default verify window. Timed inside the
    instance, from its first processed input to the log's last (brief status polls
    every 5 ms on one channel: a full status hashes the whole book, and a channel per
    poll would be a connection a poll for the instance to accept)."""
    last = (await client.stream_info(wire.input_stream(GROUP))).last_position
    warm = ServeProcess(command=[
        "engine", "run", "--store", address, "--group", GROUP, "--instance", instance,
        "--lease", lease, "--snapshot-every", "0", "--role", "warm"]).start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        start: tuple[float, int] | None = None
        async with grpc.aio.insecure_channel(warm.address) as ch:
            status = xpb_grpc.EngineControlStub(ch).Status
            while True:
                s = await status(xpb.EngineStatusRequest(brief=True), timeout=5)
                now = time.perf_counter()
                if start is None and s.inputs_processed:
                    start = (now, s.inputs_processed)
                if s.input_position >= last:
                    break
                if loop.time() > deadline:
                    raise TimeoutError(f"{instance} did not catch up with input {last}")
                await asyncio.sleep(0.005)
        assert start is not None and not s.alarm, s
        return (s.inputs_processed - start[1]) / (now - start[0]), s.trusted_through
    finally:
        warm.stop()


async def _run_async(quick: bool, address: str, lease: str, runs: int
                     ) -> dict[str, Any]:
    client = StoreClient(address, timeout_s=120, max_batch_appends=APPENDS_PER_MESSAGE)
    try:
        await client.append(wire.input_stream(GROUP), _events(setup_commands(), "setup"))
        n = 20_000 if quick else 100_000
        tput = []
        next_oid = 1
        for r in range(runs):
            eps, next_oid = await _throughput(client, n, r, next_oid)
            tput.append(eps)
        rate, light = LATENCY_RATES_QUICK if quick else LATENCY_RATES
        seconds = 2.0 if quick else 5.0
        lat = 0
        p50s, p99s, fsyncs, rtts = [], [], [], []
        light_p50s, light_p99s = [], []
        hops: list[list[float]] = [[], [], []]
        for r in range(runs):
            fsyncs.append(group_commit_ms(100))
            rtts.append(await _rpc_rtt_ms(client))
            sample = await _latency(client, rate, seconds, r)
            lat += len(sample)
            total = [x[0] for x in sample]
            p50s.append(_p(total, 0.5))
            p99s.append(_p(total, 0.99))
            for i in range(3):
                hops[i].append(_p([x[i + 1] for x in sample], 0.5))
            total = [x[0] for x in await _latency(client, light, seconds, runs + r)]
            light_p50s.append(_p(total, 0.5))
            light_p99s.append(_p(total, 0.99))
        replay = []
        for _ in range(runs):
            t0 = time.perf_counter()
            res = await verify([address], GROUP)
            replay.append(int(res["inputs"]) / (time.perf_counter() - t0))  # type: ignore[call-overload]
            assert res["ok"], res
        catchup = [await _catch_up(client, address, lease, f"c{r}") for r in range(runs)]
        return {
            "e2e_orders_per_s": round(statistics.median(tput)),
            "e2e_runs_orders_per_s": [round(x) for x in tput],
            "e2e_orders_per_append": ORDERS_PER_APPEND,
            "e2e_appends_per_message": APPENDS_PER_MESSAGE,
            "e2e_offered_load_per_s": rate,
            "e2e_latency_orders": lat,
            "e2e_p50_ms": round(statistics.median(p50s), 3),
            "e2e_p99_ms": round(statistics.median(p99s), 3),
            "e2e_light_load_per_s": light,
            "e2e_light_p50_ms": round(statistics.median(light_p50s), 3),
            "e2e_light_p99_ms": round(statistics.median(light_p99s), 3),
            "fsync_ms": round(statistics.median(fsyncs), 3),
            "rpc_rtt_ms": round(statistics.median(rtts), 3),
            "e2e_floor_ms": round(2 * statistics.median(fsyncs) + 2 * statistics.median(rtts),
                                  3),
            "e2e_hop_append_ms": round(statistics.median(hops[0]), 3),
            "e2e_hop_engine_ms": round(statistics.median(hops[1]), 3),
            "e2e_hop_output_ms": round(statistics.median(hops[2]), 3),
            "replay_cps": round(statistics.median(replay)),
            "catchup_cps": round(statistics.median(c for c, _ in catchup)),
            "catchup_trusted_inputs": catchup[0][1],
            "catchup_verify_window": VERIFY_WINDOW,
            "replay_inputs": int(res["inputs"]),  # type: ignore[call-overload]
        }
    finally:
        await client.close()


def run(quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    runs = runs or 3
    with tempfile.TemporaryDirectory(prefix="xdc-bench-exchange-") as tmp:
        store = ServeProcess(str(Path(tmp) / "store")).start()
        lease = f"file:{tmp}/lease"
        engine = ServeProcess(command=[
            "engine", "run", "--store", store.address, "--group", GROUP, "--instance", "p",
            "--lease", lease, "--snapshot-every", "0"]).start()
        try:
            out = report.run(_run_async(quick, store.address, lease, runs))
        finally:
            engine.stop()
            store.stop()
    restored, captured = restore_100k()
    out["restore_100k_s"], out["capture_100k_s"] = round(restored, 3), round(captured, 3)
    out["replay_vs_live"] = round(out["replay_cps"] / out["e2e_orders_per_s"], 2)
    out["catchup_vs_live"] = round(out["catchup_cps"] / out["e2e_orders_per_s"], 2)
    return out
