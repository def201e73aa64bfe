"""Tracing overhead (`xdc bench tracing`): durable single-node ingest with and without
OpenTelemetry export, in the same run, alternating which goes first, medians of several
runs. Target: at most 10% slower with export enabled (issue #5).

With export on, `xdc serve` gets OTEL_TRACES_EXPORTER=otlp and OTEL_METRICS_EXPORTER=otlp
pointing at an OTLP/gRPC receiver (xdc/otlp_receiver.py) that is really listening, so
spans are batched, serialized and sent over loopback as in production; the client of
the single-append scenario traces too (its spans go to the same receiver). The receiver
runs in a process of its own, as a collector would: in this process its decoding of
every export took the GIL from the benchmark's client, which was then counted as
tracing overhead of the client.

- batched ingest: AppendStream, 1000 events of 200 bytes per message, 16 in flight
  (bench/store.py's pipeline): one server span and one group-commit span per message;
- single appends: one event per append through StoreClient, 256 in flight, coalesced
  by the client: a client span, a server span and a group-commit span per message.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench import report
from bench.store import _ingest_messages, _pipeline, _single_appends
from store.process import ServeProcess
from xdc import telemetry
from xdc.otlp_receiver import OtlpReceiverProcess


def _env(receiver: OtlpReceiverProcess | None) -> dict[str, str]:
    """What the server's environment adds to this process's: nothing (off; `run` has
    removed every OTEL_* from os.environ, which ServeProcess passes on), or export to
    the receiver."""
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


def _serve(receiver: OtlpReceiverProcess | None, fn: Callable[[str], float]) -> tuple[float, float]:
    """Runs fn(address) against a fresh durable `xdc serve`; returns (events/s, the
    server's CPU seconds during the run). Stops it with SIGTERM so its remaining spans
    are flushed to the receiver before the next measurement."""
    with tempfile.TemporaryDirectory(prefix="xdc-bench-tracing-") as d:
        node = ServeProcess(d)
        node.env = _env(receiver)
        node.start()
        try:
            cpu0 = _cpu_s(node.pid)
            eps = fn(node.address)
            return eps, _cpu_s(node.pid) - cpu0
        finally:
            node.stop()


def batched(n: int, receiver: OtlpReceiverProcess | None) -> tuple[float, float]:
    msgs = _ingest_messages(n, per_append=500, appends_per_msg=2, streams=8)
    return _serve(receiver, lambda address: n / report.run(_pipeline(address, msgs, 16)))


def single(n: int, receiver: OtlpReceiverProcess | None) -> tuple[float, float]:
    def run(address: str) -> float:
        if receiver is not None:  # the client process traces and exports as well
            telemetry.setup_from_env("xdc-bench-client", env=_env(receiver))
        try:
            eps, _ = report.run(_single_appends(address, n, 256))
        finally:
            telemetry.shutdown()
        return eps
    return _serve(receiver, run)


# Pairs of runs (off, on) per scenario. The machine's slow spells last seconds, about one
# measurement: the per-run ratios of single appends swing between 0.69 and 1.07 here with
# the same code. 11 pairs, not 7, keep one spell from moving the median.
RUNS = 11


def run(quick: bool = False, runs: int = RUNS) -> dict[str, Any]:
    # The "off" side must see no OTEL_* at all (ServeProcess passes this environment on).
    for k in [k for k in os.environ if k.startswith("OTEL_")]:
        print(f"ignoring {k} for the benchmark", flush=True)
        del os.environ[k]
    sizes = {"batched": 100_000 if quick else 500_000, "single": 20_480 if quick else 102_400}
    scenarios = {"batched": batched, "single": single}
    keys = ("off_eps", "on_eps", "ratio", "off_cpu_us", "on_cpu_us", "cpu_ratio")
    raw: dict[str, dict[str, list[float]]] = {s: {k: [] for k in keys} for s in scenarios}
    spans: list[int] = []
    with OtlpReceiverProcess() as receiver:
        for r in range(runs):
            print(f"run {r + 1}/{runs}", flush=True)
            for name, fn in scenarios.items():
                # Alternate which goes first: a drift of the machine hits both alike.
                order = ("off", "on") if r % 2 == 0 else ("on", "off")
                got: dict[str, tuple[float, float]] = {}
                for mode in order:
                    before = receiver.span_count
                    print(f"  {name} ingest, tracing {mode} ...", flush=True)
                    got[mode] = fn(sizes[name], receiver if mode == "on" else None)
                    if mode == "on":
                        # The spans of this run arrived (flushed at the server's exit).
                        receiver.wait(lambda rc, b=before: rc.span_count > b, 30.0)
                        spans.append(receiver.span_count - before)
                row = raw[name]
                row["off_eps"].append(got["off"][0])
                row["on_eps"].append(got["on"][0])
                row["ratio"].append(got["on"][0] / got["off"][0])
                row["off_cpu_us"].append(got["off"][1] / sizes[name] * 1e6)
                row["on_cpu_us"].append(got["on"][1] / sizes[name] * 1e6)
                row["cpu_ratio"].append(got["on"][1] / got["off"][1])
        metric_exports = receiver.metric_requests
    out: dict[str, Any] = {"runs": runs, "quick": quick, "events": sizes,
                           "spans_exported_per_run": spans,
                           "metric_exports": metric_exports, "raw": raw}
    for name in scenarios:
        row = raw[name]
        ratio = statistics.median(row["ratio"])
        cpu_ratio = statistics.median(row["cpu_ratio"])
        out[name] = {"off_eps": statistics.median(row["off_eps"]),
                     "on_eps": statistics.median(row["on_eps"]),
                     "on_over_off": ratio, "overhead": 1 - ratio,
                     "off_cpu_us_per_event": statistics.median(row["off_cpu_us"]),
                     "on_cpu_us_per_event": statistics.median(row["on_cpu_us"]),
                     "cpu_overhead": cpu_ratio - 1}
    out["target_overhead"] = 0.10
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out["load_average"] = os.getloadavg()
    return out


def print_table(out: dict[str, Any]) -> None:
    rows = []
    for name, label in (("batched", "batched durable ingest (AppendStream)"),
                        ("single", "single appends, 256 in flight")):
        r = out[name]
        rows.append((f"{label}, tracing off", f"{r['off_eps']:,.0f} ev/s",
                     f"server CPU {r['off_cpu_us_per_event']:.1f} us/event"))
        rows.append((f"{label}, OTLP export on", f"{r['on_eps']:,.0f} ev/s",
                     f"server CPU {r['on_cpu_us_per_event']:.1f} us/event"))
        rows.append((f"{label}, overhead", f"{r['overhead']:+.1%}",
                     f"throughput (median of per-run ratios; target <= "
                     f"{out['target_overhead']:.0%}); server CPU {r['cpu_overhead']:+.1%}"))
    spans = out["spans_exported_per_run"]
    rows.append(("spans received by the OTLP receiver", f"{statistics.median(spans):,.0f}",
                 f"per traced run (median); {out['metric_exports']} metric exports"))
    report.print_table("tracing", out, rows)
    print(f"  load average at the end: {', '.join(f'{x:.2f}' for x in out['load_average'])} "
          "(other work on this machine makes the throughput noisy; CPU per event less so)")


def main(quick: bool = False, json_path: str | None = None) -> int:
    out = run(quick)
    print_table(out)
    report.write_json(json_path, out)
    return 0
