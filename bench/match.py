"""In-process matching benchmark: xdc's order book core against liquibook (PyPI).

Workload (fixed seed): one symbol, 100 funded accounts, ``n`` commands of which 80% are
new orders and 20% cancels. A quarter of the new orders are marketable (half market IOC,
half limit IOC priced through the book); the rest are GTC limits resting 1-50 ticks away
from a fixed mid. Cancels target one of the last 1000 resting orders (some will have
filled already and are rejected, as in real flow). Self-trade prevention is off in the
workload because liquibook has none, so that both books must print identical fills.

Timed, each run: ``Engine.process_batch`` over the pre-built commands (the matching
core as the consumer calls it; raw tuple events), the same with CPython's default GC,
``Engine.apply`` (events as frozen dataclass records), liquibook (building its order
objects and adding/cancelling them, with a Python fill listener recording fills), and
the whole consumer on the same workload delivered as the store's subscription delivers
it (``Consumer.on_records`` over RecordBatches: decode, match, encode, chain hash): the
in-process ceiling of the end-to-end figure. Setup is not timed. Medians of the runs;
the xdc/liquibook ratio is the median of the per-run ratios (both measured back to back,
so less exposed to a busy machine). Nothing here asserts a time.

    .venv/bin/python -m bench.match [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

from bench import report
from engine import wire
from engine.book import Engine, gc_paused
from engine.commands import AddSymbol, CancelOrder, Deposit, NewOrder
from engine.constants import STP, OrderType, Side, TimeInForce
from engine.consumer import Consumer
from engine.events import FILL
from engine.workload import command_events
from xdc.v1 import eventstore_pb2 as pb

SYMBOL = "BENCH"
MID = 10_000
N_ACCOUNTS = 100
SEED = 20240501
FULL_N = 200_000
QUICK_N = 20_000


def setup_commands() -> list[object]:
    cmds: list[object] = [AddSymbol(0, SYMBOL, "B", "Q", 1, 1, 5000, MID)]
    for i in range(N_ACCOUNTS):
        cmds.append(Deposit(0, f"acct{i:03d}", "Q", 10**15))
        cmds.append(Deposit(0, f"acct{i:03d}", "B", 10**11))
    return cmds


def workload(n: int, seed: int = SEED, first_oid: int = 1) -> list[object]:
    """``n`` commands. Order ids are predictable because every new order is accepted:
    the k-th new order gets id ``first_oid + k - 1`` (``first_oid``: the book's next order
    id, 1 on a fresh book), which is what the cancels name."""
    rng = random.Random(seed)
    cmds: list[object] = []
    resting: list[int] = []  # order ids of GTC orders, most recent last
    next_oid = first_oid
    for i in range(n):
        ts = 1_000_000 + i
        account = f"acct{rng.randrange(N_ACCOUNTS):03d}"
        if rng.random() < 0.8 or not resting:
            side = Side.BUY if rng.random() < 0.5 else Side.SELL
            if rng.random() < 0.25:
                qty = rng.randint(1, 20)
                if rng.random() < 0.5:
                    cmds.append(NewOrder(ts, SYMBOL, account, "", side, qty, 0,
                                         OrderType.MARKET, TimeInForce.IOC, False, STP.NONE))
                else:
                    price = MID + 60 if side == Side.BUY else MID - 60
                    cmds.append(NewOrder(ts, SYMBOL, account, "", side, qty, price,
                                         OrderType.LIMIT, TimeInForce.IOC, False, STP.NONE))
            else:
                off = rng.randint(1, 50)
                price = MID - off if side == Side.BUY else MID + off
                cmds.append(NewOrder(ts, SYMBOL, account, "", side, rng.randint(1, 10), price,
                                     OrderType.LIMIT, TimeInForce.GTC, False, STP.NONE))
                resting.append(next_oid)
                if len(resting) > 1000:
                    del resting[0]
            next_oid += 1
        else:
            oid = resting.pop(rng.randrange(len(resting)))
            # Cancel as the owner: look the owner up from the order's command.
            cmds.append(CancelOrder(ts, SYMBOL, "", oid))
    # Fix up cancel owners (a cancel must come from the order's account).
    owners: dict[int, str] = {}
    k = first_oid - 1
    fixed: list[object] = []
    for c in cmds:
        if isinstance(c, NewOrder):
            k += 1
            owners[k] = c.account
            fixed.append(c)
        else:
            assert isinstance(c, CancelOrder)
            fixed.append(CancelOrder(c.ts_ns, SYMBOL, owners[c.order_id], c.order_id))
    return fixed


def _fresh_engine() -> Engine:
    eng = Engine()
    out: list[tuple] = []
    for c in setup_commands():
        eng.process(c, out)
    assert not any(t[0] == 2 for t in out), "setup rejected"
    return eng


def run_engine(cmds: list[object], default_gc: bool = False
               ) -> tuple[float, list[tuple[int, int, int, int]]]:
    """Seconds for ``process_batch`` over ``cmds`` in batches of 1024 (as the consumer
    shell will feed it), and the fills (maker, taker, price, qty). Runs under
    ``gc_paused`` like the shell, or with CPython's default GC if ``default_gc``."""
    eng = _fresh_engine()
    process_batch = eng.process_batch
    out: list[tuple] = []
    batch = 1024
    gc.collect()
    with contextlib.nullcontext() if default_gc else gc_paused():
        t0 = time.perf_counter()
        for i in range(0, len(cmds), batch):
            process_batch(cmds[i:i + batch], out)
            out.clear()
        dt = time.perf_counter() - t0
    # Second, untimed pass collects fills for the comparison.
    eng = _fresh_engine()
    eng.process_batch(cmds, out)
    fills = [(t[5], t[6], t[2], t[3]) for t in out if t[0] == FILL]
    return dt, fills


def run_engine_records(cmds: list[object]) -> float:
    eng = _fresh_engine()
    apply = eng.apply
    gc.collect()
    with gc_paused():
        t0 = time.perf_counter()
        for c in cmds:
            apply(c)
        return time.perf_counter() - t0


def _liquibook() -> Any:
    import liquibook  # optional peer, imported only when benchmarked

    return liquibook


def run_liquibook(cmds: list[object]) -> tuple[float, list[tuple[int, int, int, int]]]:
    lb = _liquibook()
    fills: list[tuple[int, int, int, int]] = []
    ids: dict[int, int] = {}  # liquibook order id -> our order id
    append = fills.append

    class Listener(lb.OrderListener):  # type: ignore[misc,name-defined]
        def on_fill(self, order: Any, matched: Any, qty: int, price: int) -> None:
            append((ids[matched.order_id_], ids[order.order_id_], price, qty))

        # The SWIG director calls these too; each must exist on the Python side.
        def on_accept(self, order: Any) -> None:
            pass

        def on_reject(self, order: Any, reason: str) -> None:
            pass

        def on_cancel(self, order: Any) -> None:
            pass

        def on_cancel_reject(self, order: Any, reason: str) -> None:
            pass

        def on_replace(self, order: Any, size_delta: int, new_price: int) -> None:
            pass

        def on_replace_reject(self, order: Any, reason: str) -> None:
            pass

        def on_trigger_stop(self, order: Any) -> None:
            pass

    listener = Listener()
    book = lb.DepthOrderBook()
    book.set_order_listener(listener)
    book.set_symbol(SYMBOL)
    live: dict[int, Any] = {}
    SimpleOrder = lb.SimpleOrder
    ioc = lb.oc_immediate_or_cancel
    none = lb.oc_no_conditions
    gc.collect()
    t0 = time.perf_counter()
    oid = 0
    for c in cmds:
        if type(c) is NewOrder:
            oid += 1
            is_buy = c.side == 0
            price = 0 if c.order_type == OrderType.MARKET else c.price
            o = SimpleOrder(is_buy, price, c.qty, 0, ioc if c.tif == TimeInForce.IOC else none)
            ids[o.order_id_] = oid
            if c.tif == TimeInForce.GTC:
                live[oid] = o
            book.add(o, ioc if c.tif == TimeInForce.IOC else none)
        else:
            o = live.pop(c.order_id, None)  # type: ignore[attr-defined]
            if o is not None:
                book.cancel(o)
    dt = time.perf_counter() - t0
    return dt, fills


def consumer_batches(cmds: list[object], group: str = "bench",
                     per_batch: int = 2000) -> list[pb.RecordBatch]:
    """``cmds`` as the engine's subscription delivers them: RecordBatches of input records
    (parsed from bytes, as the gRPC client hands them over)."""
    stream = wire.input_stream(group)
    recs = [pb.RecordedEvent(id=e.id, type=e.type, content_type=e.content_type, data=e.data,
                             stream=stream, revision=i, position=i + 1, term=1,
                             timestamp_ns=1_700_000_000_000_000_000 + i)
            for i, e in enumerate(command_events(group, cmds, "bench"))]
    return [pb.RecordBatch.FromString(pb.RecordBatch(events=recs[i:i + per_batch])
                                      .SerializeToString())
            for i in range(0, len(recs), per_batch)]


def run_consumer(batches: list[pb.RecordBatch], group: str = "bench") -> tuple[float, bytes]:
    """Seconds for a fresh consumer to process every batch (as the engine shell does,
    under ``gc_paused``), and the chain hash it ends with."""
    c = Consumer(group)
    gc.collect()
    with gc_paused():
        t0 = time.perf_counter()
        for b in batches:
            c.on_records(b.events)
        dt = time.perf_counter() - t0
    return dt, c.chain


def run(quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    n = QUICK_N if quick else FULL_N
    runs = runs or (3 if quick else 5)
    cmds = workload(n)
    load_before = os.getloadavg()[0]
    eng_times: list[float] = []
    default_gc_times: list[float] = []
    rec_times: list[float] = []
    lb_times: list[float] = []
    fills: list[tuple[int, int, int, int]] = []
    lb_fills: list[tuple[int, int, int, int]] | None = None
    lb_error: str | None = None
    ratios: list[float] = []
    batches = consumer_batches(setup_commands() + cmds)
    consumer_times: list[float] = []
    chains: set[bytes] = set()
    for _ in range(runs):
        dt, fills = run_engine(cmds)
        eng_times.append(dt)
        default_gc_times.append(run_engine(cmds, default_gc=True)[0])
        rec_times.append(run_engine_records(cmds))
        if lb_error is None:
            try:
                dt_lb, lb_fills = run_liquibook(cmds)
                lb_times.append(dt_lb)
                ratios.append(dt_lb / dt)
            except Exception as exc:  # peer missing or broken: report it, never fake it
                lb_error = f"{type(exc).__name__}: {exc}"
                lb_fills = None
        dt_c, chain = run_consumer(batches)
        consumer_times.append(dt_c)
        chains.add(chain)
    assert len(chains) == 1, "the consumer's chain hash differs between runs"
    match_cps = n / statistics.median(eng_times)
    rec_cps = n / statistics.median(rec_times)
    lb_cps = n / statistics.median(lb_times) if lb_times else None
    n_new = sum(1 for c in cmds if type(c) is NewOrder)
    inputs = sum(len(b.events) for b in batches)
    return {
        "commands": n,
        "runs": runs,
        "new_orders": n_new,
        "cancels": n - n_new,
        "fills": len(fills),
        "match_cps": round(match_cps),
        "match_records_cps": round(rec_cps),
        "match_default_gc_cps": round(n / statistics.median(default_gc_times)),
        "liquibook_cps": round(lb_cps) if lb_cps else None,
        "liquibook_error": lb_error,
        "liquibook_fills": len(lb_fills) if lb_fills is not None else None,
        "fills_identical": (lb_fills == fills) if lb_fills is not None else None,
        "ratio": round(statistics.median(ratios), 3) if ratios else None,
        "consumer_cps": round(inputs / statistics.median(consumer_times)),
        "python": platform.python_version(),
        # A shared 2-core machine: a busy neighbour halves any figure here.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "gc": "match_cps under engine.book.gc_paused(); match_default_gc_cps with CPython "
              "default GC",
        "seed": SEED,
    }


def _rows(res: dict[str, Any]) -> list[report.Row]:
    lb = (f"{res['liquibook_cps']:,} cmd/s" if res["liquibook_cps"] else
          f"n/a ({res['liquibook_error']})")
    rows: list[report.Row] = [
        (f"xdc matching, {res['commands']:,} commands", f"{res['match_cps']:,} cmd/s",
         f"x/liquibook {res['ratio']} (target >= 500k cmd/s)"),
        ("  with CPython's default GC", f"{res['match_default_gc_cps']:,} cmd/s", ""),
        ("  events as dataclass records", f"{res['match_records_cps']:,} cmd/s", ""),
        ("liquibook (peer, same workload)", lb,
         f"fills identical: {res['fills_identical']} ({res['fills']:,} fills)"),
        ("consumer in process (decode..hash)", f"{res['consumer_cps']:,} inputs/s",
         "ceiling of the end-to-end figure"),
    ]
    if "e2e_orders_per_s" in res:
        rows += [
            ("end to end, client -> outputs", f"{res['e2e_orders_per_s']:,} orders/s",
             f"{res['e2e_vs_consumer']:.0%} of the consumer ceiling (target >= 100k)"),
            (f"latency at {res['e2e_offered_load_per_s']}/s offered",
             f"p50 {res['e2e_p50_ms']} ms",
             f"p99 {res['e2e_p99_ms']} ms (targets 1 / 5 ms)"),
            (f"latency at {res['e2e_light_load_per_s']}/s offered",
             f"p50 {res['e2e_light_p50_ms']} ms", f"p99 {res['e2e_light_p99_ms']} ms"),
            ("  floor: 2 commits, 4 one-way hops", f"{res['e2e_floor_ms']} ms",
             f"group commit p50 {res['fsync_ms']} ms on this disk, gRPC round trip "
             f"{res['rpc_rtt_ms']} ms"),
            ("  append -> input commit", f"{res['e2e_hop_append_ms']} ms",
             "client, gRPC, store queue (p50)"),
            ("  input commit -> output commit", f"{res['e2e_hop_engine_ms']} ms",
             "fsync, delivery, engine, output append (p50)"),
            ("  output commit -> delivered", f"{res['e2e_hop_output_ms']} ms",
             "fsync, delivery to a subscriber (p50)"),
            ("replay (xdc engine verify)", f"{res['replay_cps']:,} inputs/s",
             f"{res['replay_vs_live']}x live (target >= 2x); checks every output"),
            ("catch-up of a new warm instance", f"{res['catchup_cps']:,} inputs/s",
             f"{res['catchup_vs_live']}x live; state alone through input "
             f"{res['catchup_trusted_inputs']:,}, then checks the last "
             f"{res['catchup_verify_window']:,}"),
            ("restore, 100k resting orders", f"{res['restore_100k_s']} s", "target <= 0.5 s"),
            ("snapshot capture, 100k resting orders", f"{res['capture_100k_s']} s",
             "matching stands still meanwhile (each --snapshot-every)"),
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_N} commands, 3 runs")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--json", metavar="PATH", help="write results as JSON")
    ap.add_argument("--match-only", action="store_true", help="skip the end-to-end part")
    args = ap.parse_args(argv)
    res = run(args.quick, args.runs)
    res["quick"] = args.quick
    if not args.match_only:
        from bench.exchange import run as run_exchange
        res.update(run_exchange(args.quick, args.runs))
        res["e2e_vs_consumer"] = round(res["e2e_orders_per_s"] / res["consumer_cps"], 3)
    report.print_table("engine", res, _rows(res))
    report.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
