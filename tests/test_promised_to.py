"""`promised_to` (Raft's votedFor, geo/replication/core.py rule 1) on a real LMDB log: kept
in `meta` with the promised term, read back by the replicator at start, and absent in a
data directory written before it existed: read as PROMISED_TO_UNKNOWN, which refuses that
term to every node."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from geo.replicator import term_start_record
from store.log import PROMISED_TO_UNKNOWN, Log
from tests.test_replicator import Harness, run


def meta_of(path: Path) -> tuple[int, str, bytes | None]:
    with contextlib.closing(Log(str(path))) as log_, log_.env.begin() as txn:
        return (log_.promised_term, log_.promised_to,
                txn.get(b"promised_to", db=log_.meta_db))


def test_the_promise_and_its_node_are_kept_together(tmp_path: Path) -> None:
    path = tmp_path / "log"
    assert meta_of(path) == (0, "", None)  # a new log: promised to nobody
    with contextlib.closing(Log(str(path))) as log_:
        with log_.write() as txn:
            log_.set_meta(txn, promised_term=3, promised_to="a")
        assert (log_.promised_term, log_.promised_to) == (3, "a")
    assert meta_of(path) == (3, "a", b"a")
    # a new term raised without knowing who holds it
    with contextlib.closing(Log(str(path))) as log_, log_.write() as txn:
        log_.set_meta(txn, promised_term=4)
    assert meta_of(path) == (4, "", b"")  # written: absent would mean unknown
    with contextlib.closing(Log(str(path))) as log_:
        with log_.write() as txn:  # ... is bound by the first leader of that term
            log_.set_meta(txn, promised_term=4, promised_to="b")
        with pytest.raises(AssertionError, match="promised to 'b', not 'c'"), \
                log_.write() as txn:
            log_.set_meta(txn, promised_to="c")
        assert log_.promised_to == "b"
        # a failed transaction leaves the in-memory copy as it was on disk
        with pytest.raises(RuntimeError), log_.write() as txn:
            log_.set_meta(txn, promised_term=5, promised_to="c")
            raise RuntimeError("disk full")
        assert (log_.promised_term, log_.promised_to) == (4, "b")
    assert meta_of(path) == (4, "b", b"b")


def test_a_data_directory_older_than_promised_to_opens_promised_to_an_unknown_node(
        tmp_path: Path) -> None:
    path = tmp_path / "log"
    with contextlib.closing(Log(str(path))) as log_, log_.write() as txn:
        # what a log of the previous version holds: a promised term, no promised_to key
        txn.put(b"promised_term", (9).to_bytes(8, "big"), db=log_.meta_db)
    assert meta_of(path) == (9, PROMISED_TO_UNKNOWN, None)

    async def body(h: Harness) -> None:
        core = h.rep.core
        assert (core.promised_term, core.promised_to) == (9, PROMISED_TO_UNKNOWN)
    run(body, path)


def test_the_replicator_persists_whom_it_promised_and_reads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "log"

    async def lead(h: Harness) -> None:
        h.rep.become_leader(7, term_start_record(7, "a", time.time_ns()))
        await h.until(lambda: bool(h.opened), "the term to open")
        assert (h.log.promised_term, h.log.promised_to) == (7, "a")  # a candidate: itself
    run(lead, path)
    assert meta_of(path) == (7, "a", b"a")

    async def restarted(h: Harness) -> None:
        core = h.rep.core
        assert (core.promised_term, core.promised_to) == (7, "a")
        h.rep.become_leader(7, b"")  # term 7 again (etcd lost its data): given back
        await h.cycled()
        assert not h.opened and core.promised_to == "a"
    run(restarted, path)
