"""The benchmarks' cluster paths still run (they are not part of `make test` otherwise,
and once rotted unnoticed: every `xdc bench replication` died on the launcher's new
default of authentication). Tiny sizes: this checks that they work, not how fast. And
the arithmetic the tracing benchmark's comparison rests on."""

from __future__ import annotations

from bench import replication


def test_replicated_ingest_runs_against_a_real_cluster() -> None:
    assert replication.replicated_ingest(2_000) > 0


def test_switchover_write_pause_is_measured_under_load() -> None:
    (pause_s, key_s), = replication.switchover(1)
    # The pause ends with an ack in the new term (a position past the handover).
    assert 0 < pause_s < 10 and 0 < key_s < 10, (pause_s, key_s)


def test_tracing_bench_rates_runs_over_the_window_they_share() -> None:
    """bench/tracing.py compares side-by-side runs over their common window only:
    progress interpolated at its ends, counted in events (units x events per unit)."""
    import pytest

    from bench.tracing import shared_rates

    a = [(0.0, 0), (1.0, 100), (2.0, 200)]        # 100 units/s throughout
    b = [(0.5, 0), (1.5, 300), (3.0, 600)]        # 300/s, then 200/s; 10 events a unit
    rates = shared_rates({"a": (1, a), "b": (10, b)})
    # Window 0.5..2.0: a goes 50 -> 200 units; b 0 -> 400 units.
    assert rates["a"] == pytest.approx(150 / 1.5)
    assert rates["b"] == pytest.approx(4000 / 1.5)
    with pytest.raises(RuntimeError, match="did not overlap"):
        shared_rates({"a": (1, a), "c": (1, [(2.5, 0), (3.0, 10)])})
