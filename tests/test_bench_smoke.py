"""The benchmarks' cluster paths still run (they are not part of `make test` otherwise,
and once rotted unnoticed: every `xdc bench replication` died on the launcher's new
default of authentication). Tiny sizes: this checks that they work, not how fast."""

from __future__ import annotations

from bench import replication


def test_replicated_ingest_runs_against_a_real_cluster() -> None:
    assert replication.replicated_ingest(2_000) > 0


def test_switchover_write_pause_is_measured_under_load() -> None:
    (pause_s, key_s), = replication.switchover(1)
    # The pause ends with an ack in the new term (a position past the handover).
    assert 0 < pause_s < 10 and 0 < key_s < 10, (pause_s, key_s)
