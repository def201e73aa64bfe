"""Store benchmarks (`xdc bench store`, `make bench`): each figure next to its ceiling or
peer, measured in the same run, medians of several runs.

- batched durable ingest through gRPC (AppendStream, 200-byte events) vs the raw LMDB
  ceiling (putmulti of the same records, one fsync per 1000). Event ids as the client
  library makes them (UUIDv7, time-ordered); the same ingest with random UUIDv4 ids (a
  client of another library, or an order gateway's derived ids) is reported apart: such
  ids wait in memory and enter the id index a key slice at a time (store/recent_ids.py;
  put straight in, each dirtied an index page of its own and ingest fell as the index
  grew);
- single-event appends through the client, 256 in flight, fsync before every ack, vs
  NATS JetStream (Debian's nats-server, nats-py publish_async, 256 in flight);
- catch-up subscription throughput from a large log;
- restart: spawn of `xdc serve` on a large log until it answers a read;
- the writer path as the id index grows: group commits over the first and the last tenth
  of filling a log with random ids (what an order gateway's derived ids are), and with
  time-ordered ones on the same path (id_index_growth).
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import lmdb
from grpc_health.v1 import health_pb2_grpc

from bench import report
from geo.etcd_server import free_ports
from geo.tier_supervisor import HEALTH_ALL, wait_health
from store import records
from store.client import CaughtUp, StoreClient, new_event, new_id
from store.log import Log, PreparedAppend
from store.process import ServeProcess
from xdc.v1 import eventstore_pb2 as pb

PAYLOAD = 200


def _identity(b: bytes) -> bytes:
    return b


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- raw LMDB ceiling ----------------------------------------------------------------------

def lmdb_ceiling(n: int, batch: int = 1000) -> float:
    """Records/s writing n framed 200-byte records with putmulti(append) and one fsync per
    `batch`: what any store on LMDB from Python can at best do."""
    d = tempfile.mkdtemp(prefix="xdc-bench-lmdb-")
    try:
        env = lmdb.open(d, map_size=1 << 36, max_dbs=2, sync=True, metasync=True)
        db = env.open_db(b"log")
        value = records.encode(1, 1, 1, 0, records.stream_field(b"s"), b"x" * PAYLOAD)
        t0 = time.perf_counter()
        pos = 1
        while pos <= n:
            k = min(batch, n - pos + 1)
            with env.begin(write=True, db=db) as txn:
                txn.cursor().putmulti([(records.position_key(p), value)
                                       for p in range(pos, pos + k)], append=True)
            pos += k
        dt = time.perf_counter() - t0
        env.close()
        return n / dt
    finally:
        shutil.rmtree(d, ignore_errors=True)


def commit_latency_ms(samples: int = 200) -> float:
    """p50 of one durable LMDB commit of one record: two flushes (an fdatasync of the
    data pages, then the O_DSYNC write of the meta page). With k appends in flight, no
    durable store on this disk can answer more than k / this latency per second."""
    d = tempfile.mkdtemp(prefix="xdc-bench-fsync-")
    try:
        env = lmdb.open(d, map_size=1 << 30, sync=True, metasync=True)
        lat = []
        for i in range(samples):
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(records.position_key(i), b"x" * PAYLOAD)
            lat.append(time.perf_counter() - t)
        env.close()
        return _median(lat) * 1e3
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _prepared(stream: str, bodies: list[bytes]) -> PreparedAppend:
    """An `any` append of serialized events, as the writer takes it from
    store/validation.prepare (without its checks: the bench's events are valid). Each
    body starts with its 16-byte id field: tag, length, then the id."""
    return PreparedAppend(stream, stream.encode(), pb.EXPECTED_ANY, 0,
                          [b[2:18] for b in bodies], bodies)


def group_commit_ms(samples: int = 200) -> float:
    """p50 of the store's own group commit of one 100-byte event (Log.append_group: the
    log, id, stream and index entries in one durable transaction): what every append
    waits for at least, before any network hop."""
    d = tempfile.mkdtemp(prefix="xdc-bench-group-")
    try:
        log = Log(d)
        lat = []
        for _ in range(samples):
            body = pb.ProposedEvent(id=uuid.uuid4().bytes, type="T", data=b"x" * 80
                                    ).SerializeToString(deterministic=True)
            req = _prepared("s", [body])
            t = time.perf_counter()
            log.append_group([req], 1, time.time_ns())
            lat.append(time.perf_counter() - t)
        log.close()
        return _median(lat) * 1e3
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- batched ingest through gRPC ----------------------------------------------------------

def _ingest_messages(n: int, per_append: int, appends_per_msg: int, streams: int,
                     random_ids: bool = False) -> list[bytes]:
    """Pre-serialized AppendStream messages of `n` events. Ids as the client library makes
    them (store.client.new_id: UUIDv7, time-ordered), or with `random_ids` UUIDv4 (what
    a client of another library may send: the worst case for the store's id index)."""
    data = b"x" * PAYLOAD
    make_id = (lambda: uuid.uuid4().bytes) if random_ids else new_id
    msgs = []
    made = 0
    cid = 0
    while made < n:
        appends = []
        for a in range(appends_per_msg):
            k = min(per_append, n - made)
            if k <= 0:
                break
            appends.append(pb.AppendRequest(stream=f"ingest-{(cid + a) % streams}", events=[
                pb.ProposedEvent(id=make_id(), type="Tick", data=data)
                for _ in range(k)]))
            made += k
        cid += 1
        msgs.append(pb.AppendStreamRequest(correlation_id=cid, appends=appends)
                    .SerializeToString())
    return msgs


# Checkpoints of a run's progress: (time.monotonic(), units answered so far), from (start,
# 0) on. The clock is the machine's, so the progress of runs in several processes at once
# can be compared over the window they share (bench/tracing.py).
Progress = list[tuple[float, int]]


async def _pipeline(address: str, msgs: list[bytes], inflight: int,
                    progress: Progress | None = None) -> float:
    """Sends pre-serialized AppendStream messages with `inflight` outstanding; returns s.
    `progress` gets a checkpoint per answered message."""
    async with grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)]) as ch:
        method = ch.stream_stream("/xdc.v1.EventStore/AppendStream",
                                  request_serializer=_identity, response_deserializer=_identity)
        call = method()
        slots = asyncio.Semaphore(inflight)

        async def write() -> None:
            for m in msgs:
                await slots.acquire()
                await call.write(m)
            await call.done_writing()

        t0 = time.perf_counter()
        if progress is not None:
            progress.append((time.monotonic(), 0))
        writer = asyncio.ensure_future(write())
        got = 0
        async for resp in call:
            parsed = pb.AppendStreamResponse.FromString(resp)
            if any(r.WhichOneof("result") != "ok" for r in parsed.results):
                raise RuntimeError(f"append refused: {parsed.results[0]}")
            got += 1
            if progress is not None:
                progress.append((time.monotonic(), got))
            slots.release()
        await writer
        assert got == len(msgs)
        return time.perf_counter() - t0


def batched_ingest(n: int, random_ids: bool = False) -> float:
    msgs = _ingest_messages(n, per_append=500, appends_per_msg=2, streams=8,
                            random_ids=random_ids)
    with tempfile.TemporaryDirectory(prefix="xdc-bench-ingest-") as d, ServeProcess(d) as node:
        dt = report.run(_pipeline(node.address, msgs, inflight=16))
    return n / dt


# ---- single-event appends through the client ---------------------------------------------

PROGRESS_EVERY = 128


async def _single_appends(address: str, n: int, inflight: int,
                          progress: Progress | None = None) -> tuple[float, list[float]]:
    """One producer loop with `inflight` appends outstanding: the same shape as the NATS
    peer's publish_async loop. An append's latency ends when the loop sees it answered
    (no callback per append: the peer's loop has none either). `progress` gets a
    checkpoint every PROGRESS_EVERY answered appends."""
    data = b"x" * PAYLOAD
    latencies: list[float] = []
    async with StoreClient(address, timeout_s=30) as client:
        await client.append("warmup", new_event("Tick", data))
        window: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        perf = time.perf_counter
        t0 = perf()
        if progress is not None:
            progress.append((time.monotonic(), 0))
        for i in range(n):
            if len(window) >= inflight:
                fut, sent = window.popleft()
                await fut
                latencies.append(perf() - sent)
                if progress is not None and len(latencies) % PROGRESS_EVERY == 0:
                    progress.append((time.monotonic(), len(latencies)))
            window.append((client.append_nowait(f"single-{i % 16}", new_event("Tick", data)),
                           perf()))
        for fut, sent in window:
            await fut
            latencies.append(perf() - sent)
        dt = perf() - t0
        if progress is not None:
            progress.append((time.monotonic(), n))
    return n / dt, latencies


def single_appends(n: int, inflight: int = 256) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="xdc-bench-single-") as d, ServeProcess(d) as node:
        eps, lat = report.run(_single_appends(node.address, n, inflight))
    lat.sort()
    return eps, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


# ---- NATS JetStream peer -----------------------------------------------------------------

def nats_single(n: int, inflight: int = 256) -> float | None:
    binary = shutil.which("nats-server")
    if binary is None:
        return None
    import nats

    with tempfile.TemporaryDirectory(prefix="xdc-bench-nats-") as d:
        (port,) = free_ports(1)
        proc = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", d],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async def run() -> float:
                # Wait for the port first: nats-py logs every refused connect loudly.
                deadline = time.monotonic() + 10
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.05)
                nc = await nats.connect(f"nats://127.0.0.1:{port}")
                js = nc.jetstream(publish_async_max_pending=inflight)
                await js.add_stream(name="bench", subjects=["bench.>"])
                data = b"x" * PAYLOAD
                await js.publish("bench.warmup", data)
                t0 = time.perf_counter()
                for i in range(n):
                    await js.publish_async(f"bench.s{i % 16}", data)
                await js.publish_async_completed()
                dt = time.perf_counter() - t0
                info = await js.stream_info("bench")
                assert info.state.messages == n + 1, info.state
                await nc.close()
                return n / dt
            return report.run(run())
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)


# ---- catch-up subscription and restart -------------------------------------------------

def build_log(path: str, n: int, batch: int = 5000) -> None:
    """Fills a log through the store's own writer path (append_group), in batches."""
    log = Log(path)
    data = b"x" * PAYLOAD
    made = 0
    while made < n:
        k = min(batch, n - made)
        evs = [pb.ProposedEvent(id=new_id(), type="Tick", data=data)
               .SerializeToString(deterministic=True) for _ in range(k)]
        req = _prepared(f"s{made % 64}", evs)
        results, _ = log.append_group([req], 1, time.time_ns())
        assert not isinstance(results[0], Exception), results[0]
        made += k
    log.close()


def id_index_growth(n: int, random_ids: bool, per_commit: int = 1000) -> tuple[float, float]:
    """Events/s of the store's writer path (Log.append_group: sequencing with the id
    look-ups, the write and the fsync) in group commits of ``per_commit`` events, over the
    first and over the last tenth of filling an empty log with ``n`` events. With random
    ids (an order gateway's, derived from client order ids) every commit looks its ids up
    at random places of the id index and writes them there (store/recent_ids.py), so the
    cost grows with the index; time-ordered ids (the client library's UUIDv7) are the
    reference on the same path. Events are made before each tenth, untimed."""
    data = b"x" * PAYLOAD
    make_id = (lambda: uuid.uuid4().bytes) if random_ids else new_id
    tenth = max(per_commit, n // 10 // per_commit * per_commit)
    rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="xdc-bench-ids-") as d:
        log = Log(d)
        try:
            for _ in range(n // tenth):
                groups = []
                for c in range(tenth // per_commit):
                    evs = [pb.ProposedEvent(id=make_id(), type="NewOrder", data=data)
                           .SerializeToString(deterministic=True) for _ in range(per_commit)]
                    groups.append([_prepared(f"in-{c % 4}", evs)])
                t0 = time.perf_counter()
                for g in groups:
                    results, _ = log.append_group(g, 1, time.time_ns())
                    assert not isinstance(results[0], Exception), results[0]
                rates.append(tenth / (time.perf_counter() - t0))
        finally:
            log.close()
    return rates[0], rates[-1]


async def _all_tiers_admitted(client: StoreClient) -> None:
    """After a start the tier supervisor admits subscriptions and $all reads only once
    the tiers below them have served for settle_s each (geo/tiers.default.toml): measured
    apart, so that the catch-up rate is not diluted by that wait."""
    await wait_health(health_pb2_grpc.HealthStub(client.channel), HEALTH_ALL, timeout_s=30)


async def _catch_up(address: str) -> tuple[int, float]:
    async with StoreClient(address) as client:
        await _all_tiers_admitted(client)
        got = 0
        t0 = time.perf_counter()
        async for item in client.subscribe(batches=True):
            if isinstance(item, CaughtUp):
                break
            got += len(item.events)
        return got, time.perf_counter() - t0


def subscribe_catchup(path: str, n: int) -> float:
    with ServeProcess(path) as node:
        got, dt = report.run(_catch_up(node.address))
    assert got == n, (got, n)
    return got / dt


def restart_time(path: str) -> tuple[float, float, float]:
    """Seconds from spawn to the first answered StreamInfo of a stream of the log (tier 0:
    the node serves), from spawn to the first answered read of $all (every tier admitted,
    after the tier supervisor's staircase), and to open the LMDB log alone."""
    t0 = time.perf_counter()
    node = ServeProcess(path).start()
    try:
        async def first_answers() -> tuple[float, float]:
            async with StoreClient(node.address) as client:
                info = await client.stream_info("s0")
                assert info.last_revision > 0, info
                serve = time.perf_counter() - t0
                await _all_tiers_admitted(client)
                last = await client.read("$all", backwards=True, limit=1)
                assert len(last) == 1, last
                return serve, time.perf_counter() - t0
        serve, read_all = report.run(first_answers())
    finally:
        node.stop()
    t1 = time.perf_counter()
    Log(path).close()
    return serve, read_all, time.perf_counter() - t1


# ---- the suite ---------------------------------------------------------------------------

def _timed(label: str, fn: Callable[[], Any]) -> Any:
    print(f"  {label} ...", flush=True)
    return fn()


def run(quick: bool = False) -> dict[str, Any]:
    runs = 3
    ingest_n = 100_000 if quick else 500_000
    single_n = 20_480 if quick else 102_400
    log_n = 200_000 if quick else 1_000_000
    restart_n = 1_000_000 if quick else 10_000_000
    growth_n = 500_000 if quick else 5_000_000
    raw: dict[str, list[float]] = {k: [] for k in (
        "lmdb_ceiling_eps", "batched_ingest_eps", "batched_ingest_random_ids_eps",
        "single_append_eps", "single_append_p50_ms",
        "single_append_p99_ms", "nats_eps", "subscribe_eps", "commit_ms")}
    for r in range(runs):
        print(f"run {r + 1}/{runs}", flush=True)
        raw["commit_ms"].append(_timed("durable commit latency", commit_latency_ms))
        raw["lmdb_ceiling_eps"].append(_timed("raw LMDB ceiling", lambda: lmdb_ceiling(ingest_n)))
        raw["batched_ingest_eps"].append(_timed("batched ingest", lambda: batched_ingest(
            ingest_n)))
        raw["batched_ingest_random_ids_eps"].append(_timed(
            "batched ingest, random ids", lambda: batched_ingest(ingest_n, random_ids=True)))
        eps, p50, p99 = _timed("single appends", lambda: single_appends(single_n))
        raw["single_append_eps"].append(eps)
        raw["single_append_p50_ms"].append(p50)
        raw["single_append_p99_ms"].append(p99)
        nats_eps = _timed("NATS JetStream", lambda: nats_single(single_n))
        if nats_eps is not None:
            raw["nats_eps"].append(nats_eps)
    with tempfile.TemporaryDirectory(prefix="xdc-bench-log-") as d:
        _timed(f"building a {log_n}-event log", lambda: build_log(d, log_n))
        for _ in range(runs):
            raw["subscribe_eps"].append(_timed("catch-up subscription",
                                               lambda: subscribe_catchup(d, log_n)))
    with tempfile.TemporaryDirectory(prefix="xdc-bench-restart-") as d:
        _timed(f"building a {restart_n}-event log", lambda: build_log(d, restart_n, 20_000))
        restarts = [_timed("restart", lambda: restart_time(d)) for _ in range(runs)]
    # One run each: filling a log of growth_n events is the measurement.
    growth = {kind: _timed(f"filling a {growth_n}-event log, {kind} ids", lambda kind=kind:
                           id_index_growth(growth_n, random_ids=kind == "random"))
              for kind in ("random", "time-ordered")}
    out: dict[str, Any] = {k: _median(v) for k, v in raw.items()}
    out["id_growth_log_events"] = growth_n
    out["random_ids_first_tenth_eps"], out["random_ids_last_tenth_eps"] = growth["random"]
    out["v7_ids_first_tenth_eps"], out["v7_ids_last_tenth_eps"] = growth["time-ordered"]
    out["batched_vs_ceiling"] = _median([a / b for a, b in zip(
        raw["batched_ingest_eps"], raw["lmdb_ceiling_eps"], strict=True)])
    out["single_vs_nats"] = (_median([a / b for a, b in zip(
        raw["single_append_eps"], raw["nats_eps"], strict=True)]) if raw["nats_eps"] else None)
    out["single_append_bound_eps"] = 256 / (out["commit_ms"] / 1e3)
    out["restart_serve_s"] = _median([r[0] for r in restarts])
    out["restart_read_all_s"] = _median([r[1] for r in restarts])
    out["restart_open_s"] = _median([r[2] for r in restarts])
    out["restart_log_events"] = restart_n
    out["subscribe_log_events"] = log_n
    out["runs"] = runs
    out["quick"] = quick
    out["raw"] = raw
    out["notes"] = (
        "nats_eps: nats-server default JetStream file store, which does not fsync before "
        "acknowledging (sync_interval 2 min); xdc fsyncs before every acknowledgement.")
    return out


def print_table(out: dict[str, Any]) -> None:
    rows = [
        ("raw LMDB ceiling (putmulti, fsync/1000)", f"{out['lmdb_ceiling_eps']:,.0f} ev/s", ""),
        ("batched durable ingest via gRPC", f"{out['batched_ingest_eps']:,.0f} ev/s",
         f"{out['batched_vs_ceiling']:.0%} of ceiling (target >= 50%); client ids (UUIDv7)"),
        ("  the same with random UUIDv4 ids", f"{out['batched_ingest_random_ids_eps']:,.0f} ev/s",
         f"{out['batched_ingest_random_ids_eps'] / out['lmdb_ceiling_eps']:.0%} of ceiling"),
        ("single appends, 256 in flight", f"{out['single_append_eps']:,.0f} ev/s",
         f"p50 {out['single_append_p50_ms']:.2f} ms, p99 {out['single_append_p99_ms']:.2f} ms"),
        ("durable LMDB commit latency (p50)", f"{out['commit_ms']:.2f} ms",
         f"bound for 256 in flight: {out['single_append_bound_eps']:,.0f} ev/s"),
        ("NATS JetStream publish_async, 256", f"{out['nats_eps']:,.0f} ev/s",
         f"xdc/NATS = {out['single_vs_nats']:.2f}x (target >= 2x); NATS acks before its fsync"
         if out["single_vs_nats"] else "nats-server not installed"),
        (f"catch-up subscribe ({out['subscribe_log_events']:,} events)",
         f"{out['subscribe_eps']:,.0f} ev/s", "target >= 500k/s"),
        (f"restart on {out['restart_log_events']:,} events", f"{out['restart_serve_s']:.2f} s",
         f"spawn to first StreamInfo; LMDB open {out['restart_open_s'] * 1e3:.1f} ms "
         "(target < 1 s)"),
        ("  restart to every tier admitted", f"{out['restart_read_all_s']:.2f} s",
         "spawn to first read of $all, after the tier staircase"),
        (f"writer path, random ids, log 0-{out['id_growth_log_events'] // 10:,}",
         f"{out['random_ids_first_tenth_eps']:,.0f} ev/s",
         "commits of 1000 (Log.append_group, fsync'd); one run"),
        (f"  the same at {out['id_growth_log_events'] * 9 // 10:,}-"
         f"{out['id_growth_log_events']:,}", f"{out['random_ids_last_tenth_eps']:,.0f} ev/s",
         f"{out['random_ids_last_tenth_eps'] / out['random_ids_first_tenth_eps']:.0%} of the "
         f"first tenth; time-ordered ids: {out['v7_ids_first_tenth_eps']:,.0f} -> "
         f"{out['v7_ids_last_tenth_eps']:,.0f} ev/s"),
    ]
    report.print_table("store", out, rows)


def main(quick: bool = False, json_path: str | None = None) -> int:
    out = run(quick)
    print_table(out)
    report.write_json(json_path, out)
    return 0
