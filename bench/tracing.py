"""Tracing overhead (`xdc bench tracing`): durable single-node ingest with and without
OpenTelemetry export, in the same run, at the same time. Target: at most 10% slower with
export enabled (issue #5).

Three sides run for the whole benchmark, each a durable `xdc serve` and a client process
of its own:

- `on`: server and client export traces and metrics (OTEL_TRACES_EXPORTER and
  OTEL_METRICS_EXPORTER = otlp) to an OTLP/gRPC receiver (xdc/otlp_receiver.py) that
  is really listening, in a process of its own as a collector would be: spans are
  batched, serialized and sent over loopback as in production;
- `off`: no OTEL_* at all;
- `off2`: the same as `off`, the control: its ratio to `off` is what the method makes of
  identical code. The overhead measured means something only when it stands clear of it.

How the sides are compared: one after the other, two runs of identical code a second
apart differ by 15-20% on this machine (its speed moves under every process alike: client
and server CPU per event rise and fall together), and a median of such ratios cannot tell
5% from 15%.

- Single appends are CPU-bound: a round runs one segment of every side at once, each
  reporting checkpoints of its progress on the machine's monotonic clock, and each side's
  rate is taken over the window the three share. They share the machine's slow and fast
  spells and its two cores; a side that needs more CPU per event (client and server
  together) gets fewer events through, which is the cost this measures. The control's
  round ratios stay within 1-2% of each other. The same workload is also measured in
  turn ("single appends, in turn"), for comparison with the method it replaced.
- Batched ingest is bound by the disk (an fsync per group of thousands of events): side
  by side, three servers fsyncing at once measure the disk's fairness, not tracing. A
  round runs one segment of each side in turn, in a rotating order; the ratios are
  noisier (quartiles about 0.9-1.1) and the overhead is small.

Workloads:
- batched ingest: AppendStream, 1000 events of 200 bytes per message, 16 in flight
  (bench/store.py's pipeline): one server span and one group-commit span per message;
- single appends: one event per append through StoreClient, 256 in flight, coalesced
  by the client: a client span, a server span and a group-commit span per message.

Server CPU per event is counted per segment, and over the whole benchmark (from each
server's start to its stop), so that work an exporter does between segments counts too.
"""

from __future__ import annotations

import bisect
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from contextlib import ExitStack, suppress
from multiprocessing.connection import Connection
from typing import Any

from bench import report
from bench.store import Progress, _ingest_messages, _pipeline, _single_appends
from store.process import ServeProcess
from xdc import telemetry
from xdc.otlp_receiver import OtlpReceiverProcess

SIDES = ("off", "on", "off2")
# Scenario -> its workload. "single_in_turn" is the single-append workload measured the
# other way (one side after the other), for comparison: noisier, same code.
SCENARIOS = {"batched": "batched", "single": "single", "single_in_turn": "single"}
SIDE_BY_SIDE = ("single",)  # the scenarios whose sides run at once (module docstring)
LABELS = {"batched": "batched durable ingest (AppendStream)",
          "single": "single appends, 256 in flight",
          "single_in_turn": "single appends, in turn"}
ROUNDS = 31
QUICK_ROUNDS = 11


def _env(receiver: OtlpReceiverProcess | None) -> dict[str, str]:
    """What a side's processes add to this process's environment: nothing (`run` has
    removed every OTEL_* from os.environ, which the children inherit), or export to the
    receiver."""
    if receiver is None:
        return {}
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
            "OTEL_SERVICE_NAME": "xdc-bench-store", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _segment(address: str, scenario: str, n: int) -> tuple[int, Progress]:
    """One segment against `address`: (events per progress unit, checkpoints)."""
    progress: Progress = []
    if scenario == "batched":
        # Fresh ids every segment (the same ids again would be idempotent retries).
        msgs = _ingest_messages(n, per_append=500, appends_per_msg=2, streams=8)
        report.run(_pipeline(address, msgs, 16, progress))
        return n // len(msgs), progress
    report.run(_single_appends(address, n, 256, progress))
    return 1, progress


def _client(conn: Connection, address: str, env: dict[str, str]) -> None:
    """A side's client process: runs the segments it is sent and answers with their
    progress; tracing and export as `env` says (the `on` side's client traces)."""
    if env:
        telemetry.setup_from_env("xdc-bench-client", env=env)
    try:
        while (job := conn.recv()) is not None:
            conn.send(_segment(address, *job))
    finally:
        telemetry.shutdown()
        conn.close()


def _at(progress: Progress, t: float) -> float:
    """Units answered by time t, interpolated between checkpoints."""
    i = bisect.bisect_right(progress, (t, math.inf))
    if i == 0:
        return 0.0
    if i == len(progress):
        return float(progress[-1][1])
    (t0, u0), (t1, u1) = progress[i - 1], progress[i]
    return u0 + (u1 - u0) * (t - t0) / (t1 - t0) if t1 > t0 else float(u1)


def _rate(per: int, progress: Progress) -> float:
    """A segment's events/s, first checkpoint to last."""
    return progress[-1][1] * per / (progress[-1][0] - progress[0][0])


def shared_rates(runs: dict[str, tuple[int, Progress]]) -> dict[str, float]:
    """Each run's events/s over the window every run was under way."""
    start = max(p[0][0] for _, p in runs.values())
    end = min(p[-1][0] for _, p in runs.values())
    if end <= start:
        raise RuntimeError("the segments did not overlap")
    return {name: (_at(p, end) - _at(p, start)) * per / (end - start)
            for name, (per, p) in runs.items()}


class _Side:
    """One side's server and client process."""

    def __init__(self, name: str, data_dir: str, env: dict[str, str]) -> None:
        self.name = name
        self.server = ServeProcess(data_dir)
        self.server.env = env
        self.env = env
        self.conn: Connection | None = None
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.cpu_start = 0.0
        self.cpu_mark = 0.0
        self.server_cpu_s = 0.0  # start to stop, filled in by stop()

    def start(self) -> None:
        self.server.start()
        self.cpu_start = _cpu_s(self.server.pid)
        ctx = multiprocessing.get_context("spawn")  # the parent may have gRPC running
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_client, args=(child, self.server.address, self.env),
                                name=f"bench-tracing-{self.name}", daemon=True)
        self.proc.start()
        child.close()

    def send(self, scenario: str, n: int) -> None:
        assert self.conn is not None
        self.cpu_mark = _cpu_s(self.server.pid)
        self.conn.send((scenario, n))

    def receive(self, timeout_s: float = 300.0) -> tuple[tuple[int, Progress], float]:
        """(the segment's progress, server CPU seconds since send)."""
        assert self.conn is not None
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"side {self.name}: segment not done in {timeout_s} s")
        got = self.conn.recv()
        return got, _cpu_s(self.server.pid) - self.cpu_mark

    def stop(self) -> None:
        """Stops the client (it flushes its spans), then the server with SIGTERM (it
        flushes its own)."""
        if self.conn is not None and self.proc is not None:
            with suppress(OSError):
                self.conn.send(None)
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
            self.conn.close()
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server_cpu_s = _cpu_s(self.server.pid) - self.cpu_start
        self.server.stop()


def run(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    # The "off" sides must see no OTEL_* at all (their processes inherit this environment).
    for k in [k for k in os.environ if k.startswith("OTEL_")]:
        print(f"ignoring {k} for the benchmark", flush=True)
        del os.environ[k]
    rounds = rounds or (QUICK_ROUNDS if quick else ROUNDS)
    sizes = {"batched": 60_000 if quick else 120_000, "single": 12_288 if quick else 24_576}
    eps: dict[str, dict[str, list[float]]] = {s: {side: [] for side in SIDES}
                                              for s in SCENARIOS}
    seg_cpu: dict[str, dict[str, list[float]]] = {s: {side: [] for side in SIDES}
                                                  for s in SCENARIOS}
    with OtlpReceiverProcess() as receiver, ExitStack() as stack:
        sides = {}
        for name in SIDES:
            d = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"xdc-bench-{name}-"))
            sides[name] = _Side(name, d, _env(receiver if name == "on" else None))
            stack.callback(sides[name].stop)
            sides[name].start()
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            for scenario in SCENARIOS:
                workload = SCENARIOS[scenario]
                if scenario in SIDE_BY_SIDE:
                    for side in sides.values():
                        side.send(workload, sizes[workload])
                    got = {name: side.receive() for name, side in sides.items()}
                else:  # one side after the other; each goes first equally often
                    got = {}
                    for name in SIDES[r % 3:] + SIDES[:r % 3]:
                        sides[name].send(workload, sizes[workload])
                        got[name] = sides[name].receive()
                rates = (shared_rates({name: g[0] for name, g in got.items()})
                         if scenario in SIDE_BY_SIDE else
                         {name: _rate(*g[0]) for name, g in got.items()})
                for name in SIDES:
                    eps[scenario][name].append(rates[name])
                    seg_cpu[scenario][name].append(got[name][1] / sizes[workload] * 1e6)
        # Stops every side; each flushes its last spans, synchronously, before it exits.
        stack.close()
        spans = receiver.span_count
        metric_exports = receiver.metric_requests
    total_events = rounds * sum(sizes[w] for w in SCENARIOS.values())
    out: dict[str, Any] = {
        "runs": rounds, "quick": quick, "events_per_segment": sizes,
        "spans_exported": spans, "metric_exports": metric_exports,
        "raw": {"eps": eps, "segment_server_cpu_us": seg_cpu},
        "server_cpu_us_per_event_whole_run": {
            name: sides[name].server_cpu_s / total_events * 1e6 for name in SIDES}}
    for scenario in SCENARIOS:
        e = eps[scenario]
        ratio = [on / off for on, off in zip(e["on"], e["off"], strict=True)]
        control = [b / a for b, a in zip(e["off2"], e["off"], strict=True)]
        cpu = seg_cpu[scenario]
        q = statistics.quantiles(control, n=4)
        out[scenario] = {
            "off_eps": statistics.median(e["off"]), "on_eps": statistics.median(e["on"]),
            "off2_eps": statistics.median(e["off2"]),
            "on_over_off": statistics.median(ratio), "overhead": 1 - statistics.median(ratio),
            "control_off2_over_off": statistics.median(control),
            "control_quartiles": [q[0], q[2]],
            "off_cpu_us_per_event": statistics.median(cpu["off"]),
            "on_cpu_us_per_event": statistics.median(cpu["on"]),
            "cpu_overhead": statistics.median(cpu["on"]) / statistics.median(cpu["off"]) - 1}
    out["target_overhead"] = 0.10
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out["load_average"] = os.getloadavg()
    return out


def print_table(out: dict[str, Any]) -> None:
    rows = []
    for name, label in LABELS.items():
        r = out[name]
        rows.append((f"{label}, tracing off", f"{r['off_eps']:,.0f} ev/s",
                     f"server CPU {r['off_cpu_us_per_event']:.1f} us/event"))
        rows.append((f"{label}, OTLP export on", f"{r['on_eps']:,.0f} ev/s",
                     f"server CPU {r['on_cpu_us_per_event']:.1f} us/event"))
        rows.append((f"{label}, overhead", f"{r['overhead']:+.1%}",
                     f"throughput ({'side by side' if name in SIDE_BY_SIDE else 'in turn'}"
                     f", median of rounds; target <= "
                     f"{out['target_overhead']:.0%}); server CPU {r['cpu_overhead']:+.1%}"))
        lo, hi = r["control_quartiles"]
        rows.append((f"{label}, control (off again)", f"{1 - r['control_off2_over_off']:+.1%}",
                     f"identical code, same method: its noise (quartiles "
                     f"{lo:.2f}-{hi:.2f})"))
    whole = out["server_cpu_us_per_event_whole_run"]
    rows.append(("server CPU over the whole run (all scenarios)",
                 f"{whole['on'] / whole['off'] - 1:+.1%}",
                 f"on {whole['on']:.1f} vs off {whole['off']:.1f} us/event, exporters' "
                 "background work included"))
    rows.append(("spans received by the OTLP receiver", f"{out['spans_exported']:,}",
                 f"{out['metric_exports']} metric exports"))
    report.print_table("tracing", out, rows)
    print(f"  load average at the end: {', '.join(f'{x:.2f}' for x in out['load_average'])} "
          "(other work on this machine makes the throughput noisy; CPU per event less so)")


def main(quick: bool = False, json_path: str | None = None) -> int:
    out = run(quick)
    print_table(out)
    report.write_json(json_path, out)
    return 0
