"""The LMDB log's write path used by replication: records written elsewhere, truncation
of a suffix, and the deterministic position patch, checked against logs that never
held the removed records."""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import pytest

from store import records
from store.log import Appended, DataDirInUse, Log, PreparedAppend, StreamState
from xdc.v1 import eventstore_pb2 as pb

SEED = 7


def prepared(stream: str, n: int, rng: random.Random) -> PreparedAppend:
    bodies = [pb.ProposedEvent(id=uuid.UUID(int=rng.getrandbits(128)).bytes, type="T",
                               data=rng.randbytes(rng.randint(0, 40)))
              .SerializeToString(deterministic=True) for _ in range(n)]
    return PreparedAppend(stream, stream.encode(), pb.EXPECTED_ANY, 0,
                          [b[2:18] for b in bodies], bodies)


def of_ids(ids: list[bytes], stream: str = "s") -> PreparedAppend:
    """An append to `stream` of one empty event of type T per id."""
    bodies = [pb.ProposedEvent(id=i, type="T").SerializeToString(deterministic=True)
              for i in ids]
    return PreparedAppend(stream, stream.encode(), pb.EXPECTED_ANY, 0, list(ids), bodies)


def fill(log: Log, rng: random.Random, groups: int) -> list[bytes]:
    values: list[bytes] = []
    for g in range(groups):
        reqs = [prepared(rng.choice("abc"), rng.randint(1, 5), rng) for _ in range(3)]
        results, new = log.append_group(reqs, 1 + g // 5, 1_000 + g)
        assert all(not isinstance(r, Exception) for r in results)
        values.extend(new)
    return values


def snapshot(log: Log) -> tuple[list[bytes], dict[str, StreamState | None], list[list[int]]]:
    allv = log.read_all(1, 10**6, log.last_position)
    states = {s: log.stream_state(s.encode()) for s in "abc"}
    per_stream = [[records.position_of(v) for v in log.read_stream(s.encode(), 1, 10**6,
                                                                   log.last_position)]
                  for s in "abc"]
    return allv, states, per_stream


def test_follower_writes_are_byte_identical(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    leader = Log(tmp_path / "leader")
    values = fill(leader, rng, 20)
    follower = Log(tmp_path / "follower")
    # Shipped in uneven slices, indexes derived from the bytes alone.
    i = 0
    while i < len(values):
        k = rng.randint(1, 9)
        with follower.write() as txn:
            follower.write_records(txn, values[i:i + k], i + 1)
        i += k
    assert snapshot(follower) == snapshot(leader)
    # Idempotency works on the follower: the ids were indexed.
    stream = records.stream_of(values[0])
    dup = PreparedAppend(stream, stream.encode(), pb.EXPECTED_ANY, 0,
                         [records.id_of(values[0])], [records.body_of(values[0])])
    with follower.write() as txn:
        seq = follower.sequence(txn, [dup], follower.last_position + 1, 9, 0)
    assert seq.values == [] and seq.results[0].duplicate  # type: ignore[union-attr]


@pytest.mark.parametrize("cut", [0, 1, 17, 40])
def test_truncation_equals_a_log_that_never_had_the_suffix(tmp_path: Path, cut: int) -> None:
    rng = random.Random(SEED)
    full = Log(tmp_path / "full")
    values = fill(full, rng, 20)
    assert len(values) > 40
    with full.write() as txn:
        full.write_records(txn, [], full.last_position + 1, truncate_after=cut)
    short = Log(tmp_path / "short")
    if cut:
        with short.write() as txn:
            short.write_records(txn, values[:cut], 1)
    assert full.last_position == cut
    assert snapshot(full) == snapshot(short)
    # The truncated ids are gone: the same events can be appended again, as new.
    again = prepared("b", 1, random.Random(1))
    again.ids = [records.id_of(values[-1])]
    again.bodies = [records.body_of(values[-1])]
    results, new = full.append_group([again], 9, 0)
    assert len(new) == 1 and not results[0].duplicate  # type: ignore[union-attr]
    # And a reopened log agrees with what is in memory.
    last = full.last_position
    full.close()
    assert Log(tmp_path / "full").last_position == last


def test_truncation_below_commit_is_refused(tmp_path: Path) -> None:
    log = Log(tmp_path / "n")
    fill(log, random.Random(SEED), 3)
    with log.write() as txn:
        log.set_meta(txn, commit_position=4)
    with pytest.raises(AssertionError, match="below the commit position"), log.write() as txn:
        log.write_records(txn, [], log.last_position + 1, truncate_after=3)
    assert log.commit_position == 4 and log.last_position > 4


def test_a_record_without_position_gets_its_entry_position(tmp_path: Path) -> None:
    log = Log(tmp_path / "n")
    body = pb.ProposedEvent(id=uuid.UUID(int=5).bytes, type="$term-start")
    marker = records.encode(0, 3, 1, 42, records.stream_field(b"$xdc"),
                            body.SerializeToString(deterministic=True))
    with log.write() as txn:
        log.write_records(txn, [marker], 1)
    stored = log.record(1)
    assert stored is not None and records.position_of(stored) == 1
    assert records.term_of(stored) == 3 and log.last_term == 3
    with pytest.raises(AssertionError, match="carries position"), log.write() as txn:
        log.write_records(txn, [records.encode(7, 3, 2, 42, records.stream_field(b"$xdc"),
                                               body.SerializeToString())], 2)
    assert log.last_position == 1


def test_backward_read_skips_records_beyond_the_commit_position(tmp_path: Path) -> None:
    """A follower (or a standalone node between write and fsync) holds records past its
    commit position: a backwards read with a limit returns the last *committed* ones."""
    rng = random.Random(SEED)
    log = Log(str(tmp_path / "log"))
    try:
        log.append_group([prepared("s", 5, rng)], 1, 1)
        log.append_group([prepared("s", 3, rng)], 1, 2)  # positions 6..8, not committed
        last = log.read_stream(b"s", 10**6, 1, 5, backwards=True)
        assert [records.position_of(v) for v in last] == [5]
        two = log.read_stream(b"s", 10**6, 2, 5, backwards=True)
        assert [records.position_of(v) for v in two] == [5, 4]
    finally:
        log.close()


def test_reads_stop_at_a_byte_budget_and_paging_on_from_there_reads_everything(
        tmp_path: Path) -> None:
    """A read step holds at most about `max_bytes` (one record at least) while the server
    waits for a slow client: before, a step was max_batch_events records whatever their
    size (2000 of 1 MiB: ~2 GiB held per stalled Read or Subscribe; a review measured
    ~383 MiB per stalled consumer). Paged on by position (or revision), in both
    directions, the steps read exactly what one unbounded read does."""
    rng = random.Random(SEED)
    log = Log(str(tmp_path / "log"))
    try:
        values = fill(log, rng, 40)
        last = log.last_position
        budget = 200  # a few records' bytes
        for backwards in (False, True):
            got: list[bytes] = []
            start = last if backwards else 1
            while True:
                step = log.read_all(start, 10**6, last, backwards, max_bytes=budget)
                if not step:
                    break
                assert len(step) == 1 or sum(map(len, step[:-1])) < budget
                got += step
                start = records.position_of(step[-1]) + (-1 if backwards else 1)
                if start == 0:
                    break
            assert got == (values[::-1] if backwards else values)
            for s in "abc":
                whole = log.read_stream(s.encode(), 1, 10**6, last)
                got, rev = [], 1
                while step := log.read_stream(s.encode(), rev, 10**6, last, max_bytes=budget):
                    assert len(step) == 1 or sum(map(len, step[:-1])) < budget
                    got += step
                    rev = records.revision_of(step[-1]) + 1
                assert got == whole and len(whole) > 3
    finally:
        log.close()


def test_subscription_filter_reads_stream_and_type_like_the_general_parsers() -> None:
    """records.select (a subscription's filter) reads stream and type in place at fixed
    steps for the usual layout, and must agree with the general parsers on every layout:
    one- and two-byte lengths of the frame, stream and type, bodies without a type."""
    rng = random.Random(SEED)
    values = []
    for i in range(400):
        stream = rng.choice(["o", "orders.a", "x" * 127, "orders." + "y" * 140, "é" * 70])
        body = pb.ProposedEvent(
            id=uuid.UUID(int=rng.getrandbits(128)).bytes,
            type=rng.choice(["T", "Placed", "t" * 127, "u" * 128, "", "ü" * 100]),
            metadata={"k": "v"} if i % 3 else {}, content_type="c" * rng.randint(0, 3),
            data=rng.randbytes(rng.choice([0, 10, 200, 20_000]))
        ).SerializeToString(deterministic=True)
        values.append(records.encode(i + 1, 1, i, 5, records.stream_field(stream.encode()),
                                     body))
    for v in values:
        assert records.stream_and_type(v) == (records.stream_bytes_of(v),
                                              records.type_of(v).encode())
    for prefix in (b"", b"orders.", b"x" * 127, "é".encode()):
        for types in (frozenset(), frozenset([b"T"]), frozenset([b"u" * 128, "ü".encode() * 100])):
            want = [v for v in values if records.stream_bytes_of(v).startswith(prefix)
                    and (not types or records.type_of(v).encode() in types)]
            assert records.select(values, prefix, types) == want


def test_encode_run_frames_every_record_as_protobuf_reads_it() -> None:
    """encode_run packs the frame tag, a two-byte frame length and the header in one call
    for the usual sizes and falls back for the others: frame lengths of 1, 2 and 3 varint
    bytes (at and around 128 and 16 KiB) all parse back, as a RecordBatch, to the fields
    given, with consecutive positions and revisions; encode is the one-record case."""
    stream = b"orders.1"
    fld = records.stream_field(stream)
    base = records.HEADER_SIZE + len(fld)
    bodies = []
    for frame_length in (base, 127, 128, 129, 0x3FFF, 0x4000, 0x4001, 40_000):
        event = pb.ProposedEvent(id=uuid.UUID(int=frame_length).bytes, type="T")
        pad = frame_length - base - len(event.SerializeToString())
        if pad >= 3:  # data field: tag, length varint (1-3 bytes), bytes
            for k in (1, 2, 3):
                event.data = b"d" * (pad - 1 - k)
                if len(event.SerializeToString()) + base == frame_length:
                    break
        bodies.append(event.SerializeToString())
    values = records.encode_run(5, 3, 11, 77, fld, bodies)
    lengths = [records.read_varint(v, 1)[0] for v in values]
    assert {1, 2, 3} <= {records.read_varint(v, 1)[1] - 1 for v in values}, lengths
    assert {127, 128, 0x3FFF, 0x4000} <= set(lengths), lengths
    batch = pb.RecordBatch.FromString(b"".join(values))
    assert len(batch.events) == len(bodies)
    for i, (e, body) in enumerate(zip(batch.events, bodies, strict=True)):
        assert (e.position, e.term, e.revision, e.timestamp_ns) == (5 + i, 3, 11 + i, 77)
        assert e.stream == stream.decode()
        assert pb.ProposedEvent(id=e.id, type=e.type, data=e.data).SerializeToString() == body
        assert records.body_of(values[i]) == body and records.position_of(values[i]) == 5 + i
    assert records.encode(5, 3, 11, 77, fld, bodies[0]) == values[0]


def test_indexed_runs_match_a_parse_of_every_record() -> None:
    """What a node indexes of records it did not build (replication, term-start records)
    is read record by record at each run's start and by one prefix comparison for the
    rest of a run: seeded mixes of streams (names under and over 127 bytes), frame
    lengths of 1, 2 and 3 varint bytes and records to patch (position 0) give what a
    full parse of every record gives."""
    from store.log import _indexed

    rng = random.Random(SEED)
    for _ in range(200):
        first = rng.randint(1, 10_000)
        values: list[bytes] = []
        while len(values) < rng.randint(1, 60):
            stream = rng.choice([b"a", b"b", b"orders." + b"x" * 130, b"$xdc"])
            size = rng.choice([0, 10, 200, 20_000])
            for _ in range(rng.choice([1, 1, 3, 20])):
                pos = first + len(values)
                body = pb.ProposedEvent(id=uuid.UUID(int=rng.getrandbits(128)).bytes, type="T",
                                        data=b"d" * size).SerializeToString()
                embedded = 0 if rng.random() < 0.05 else pos
                values.append(records.encode(embedded, 2, 1, 42, records.stream_field(stream),
                                             body))
        want_stored = []
        want_spans: list[tuple[bytes, int, list[bytes]]] = []
        for i, v in enumerate(values):
            kept, k, event_id = records.index_fields(v, first + i)
            want_stored.append(kept)
            if not want_spans or want_spans[-1][0] != k:
                want_spans.append((k, first + i, []))
            want_spans[-1][2].append(event_id)
        stored, spans = _indexed(values, first)
        assert stored == want_stored and spans == want_spans
        assert (stored is values) == all(a is b for a, b in zip(want_stored, values, strict=True))


def test_index_fields_reads_stream_and_id_across_varint_sizes() -> None:
    """One parse gives what the separate readers give: frame lengths of 1, 2 and 3 varint
    bytes and stream names under and over 127 bytes; position 0 is patched, others kept."""
    for stream in (b"s", b"orders." + b"x" * 200):
        for size in (0, 40, 2_000, 40_000):
            body = pb.ProposedEvent(id=uuid.UUID(int=size + 1).bytes, type="T",
                                    data=b"d" * size).SerializeToString(deterministic=True)
            for embedded in (0, 9):
                value = records.encode(embedded, 2, 1, 42, records.stream_field(stream), body)
                stored, k, event_id = records.index_fields(value, 9)
                assert records.position_of(stored) == 9
                assert (stored is value) == (embedded == 9), "unpatched records are kept"
                assert k == records.stream_bytes_of(value) == stream
                assert event_id == records.id_of(value) == uuid.UUID(int=size + 1).bytes
                assert records.term_of(stored) == 2 and records.body_of(stored) == body


# ---- ids buffered in memory before the ids index (store/recent_ids.py) ---------------------

def _ids_through(log: Log) -> int:
    with log.env.begin() as txn:
        raw = txn.get(b"ids_through", db=log.meta_db)
    assert raw is not None
    return int.from_bytes(raw, "big")


def _indexed(log: Log, event_id: bytes) -> bool:
    with log.env.begin() as txn:
        return txn.get(event_id, db=log.ids_db) is not None


def _retry(log: Log, value: bytes) -> PreparedAppend:
    stream = records.stream_of(value)
    return PreparedAppend(stream, stream.encode(), pb.EXPECTED_ANY, 0, [records.id_of(value)],
                          [records.body_of(value)])


def test_buffered_ids_are_found_before_and_after_a_reopen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("store.log.MAX_UNINDEXED", 60)
    monkeypatch.setattr("store.log.IDS_THROUGH_STEP", 1)  # stored at every move
    rng = random.Random(SEED)
    log = Log(tmp_path / "n")
    values: list[bytes] = []
    for _ in range(10):
        values += fill(log, rng, 5)
        # However far the index lags, never by more than MAX_UNINDEXED records.
        assert 0 <= log.last_position - _ids_through(log) <= 60
    unindexed = [v for v in values if not _indexed(log, records.id_of(v))]
    assert unindexed, "the test needs ids that are only in memory"
    assert all(records.position_of(v) > _ids_through(log) for v in unindexed)
    log.close()
    # After an open (as after a crash: nothing is flushed on close) every id is known.
    log = Log(tmp_path / "n")
    for v in values:
        results, new = log.append_group([_retry(log, v)], 9, 0)
        assert new == [] and results[0] == Appended(  # type: ignore[comparison-overlap]
            records.position_of(v), records.position_of(v), records.revision_of(v), True)


def test_ids_of_a_failed_write_are_not_known(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    log = Log(tmp_path / "n")
    fill(log, rng, 3)
    last = log.last_position
    req = prepared("a", 3, rng)
    with pytest.raises(RuntimeError), log.write() as txn:
        seq = log.sequence(txn, [req], last + 1, 1, 0)
        log.write_records(txn, seq.values, seq.first, seq.spans)
        raise RuntimeError("the transaction fails after the records were written")
    assert log.last_position == last
    # Not a duplicate of records that were never committed: appended, as new.
    results, new = log.append_group([req], 1, 0)
    assert len(new) == 3 and not results[0].duplicate  # type: ignore[union-attr]
    assert [records.position_of(v) for v in new] == [last + 1, last + 2, last + 3]


def test_stream_rows_read_before_a_truncation_are_not_used_after_it(tmp_path: Path) -> None:
    """write_records may reuse the stream rows Log.sequence read in the same transaction,
    but not once it has truncated: the rows then describe records that are gone. A
    stream at revision 3, its rows read, then positions 2.. replaced by another term's
    record: the stream ends at revision 2, position 2 (not 4, from the stale row)."""
    rng = random.Random(SEED)
    log = Log(tmp_path / "n")
    for _ in range(3):
        log.append_group([prepared("s", 1, rng)], 1, 0)
    assert log.stream_state(b"s").last_revision == 3  # type: ignore[union-attr]
    with log.write() as txn:
        seq = log.sequence(txn, [prepared("s", 1, rng)], 4, 1, 0)
        assert seq.stream_rows[b"s"] is not None
        other = prepared("s", 1, rng)
        value = records.encode(2, 2, 2, 0, other.stream_fld, other.bodies[0])
        log.write_records(txn, [value], 2, [(b"s", 2, other.ids)], seq.stream_rows,
                          truncate_after=1)
    state = log.stream_state(b"s")
    assert state is not None and (state.last_revision, state.last_position) == (2, 2)


def test_truncated_buffered_ids_are_forgotten_across_a_reopen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("store.log.MAX_UNINDEXED", 5)  # the index close behind the log
    monkeypatch.setattr("store.log.IDS_THROUGH_STEP", 1)
    rng = random.Random(SEED)
    log = Log(tmp_path / "n")
    values = fill(log, rng, 20)
    cut = len(values) // 2
    assert _ids_through(log) > cut
    with log.write() as txn:  # a transaction that only truncates, then a crash
        log.write_records(txn, [], log.last_position + 1, truncate_after=cut)
    assert _ids_through(log) <= cut
    log.close()
    log = Log(tmp_path / "n")
    for v in values[:cut]:  # kept: still known
        assert log.append_group([_retry(log, v)], 9, 0)[1] == []
    # Removed: new again, written at the positions the truncation freed...
    _, new = log.append_group([_retry(log, values[cut])], 9, 0)
    assert len(new) == 1 and records.position_of(new[0]) == cut + 1
    new += fill(log, rng, 1)
    log.close()
    # ...and known after another crash, though written below the index's old mark.
    log = Log(tmp_path / "n")
    for v in new:
        assert log.append_group([_retry(log, v)], 9, 0)[1] == []


def test_with_time_ordered_ids_only_an_open_refills_less_than_a_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from store.client import new_id
    monkeypatch.setattr("store.log.IDS_THROUGH_STEP", 100)
    log = Log(tmp_path / "n")
    for g in range(300):  # more write transactions than buckets
        log.append_group([of_ids([new_id() for _ in range(3)])], 1, g)
    # UUIDv7s go straight to the index: nothing held back, the mark follows the log.
    assert 800 < _ids_through(log) <= log.last_position == 900
    log.close()
    log = Log(tmp_path / "n")
    assert len(log._recent) < 100


def test_ids_repeated_within_one_group_are_answered_like_retries(tmp_path: Path) -> None:
    """A retry can reach the writer in the same group commit as its first attempt (sent
    again before the first was answered). Groups without a repeated id skip that
    bookkeeping (Log.sequence); groups with one must answer exactly as across groups."""
    rng = random.Random(SEED)
    log = Log(tmp_path / "log")
    try:
        a = prepared("a", 2, rng)
        retry = PreparedAppend("a", b"a", pb.EXPECTED_ANY, 0, list(a.ids), list(a.bodies))
        other = prepared("b", 1, rng)
        new_id, new_body = _fresh(rng)
        mixed = PreparedAppend("a", b"a", pb.EXPECTED_ANY, 0, [a.ids[0], *new_id],
                               [a.bodies[0], *new_body])
        changed = prepared("a", 1, rng)
        changed = PreparedAppend("a", b"a", pb.EXPECTED_ANY, 0, [a.ids[1]], changed.bodies)
        exact = PreparedAppend("a", b"a", pb.EXPECTED_EXACT, 2, *_fresh(rng))
        results, new = log.append_group([a, retry, other, mixed, changed, exact], 1, 1_000)
        assert results[0] == Appended(1, 2, 2) and results[1] == Appended(1, 2, 2, True)
        assert results[2] == Appended(3, 3, 1)
        assert isinstance(results[3], Exception) and "is new but" in str(results[3])
        assert isinstance(results[4], Exception) and "different content" in str(results[4])
        # The stream's revision counts only what was written: 2 events, then this one.
        assert results[5] == Appended(4, 4, 3)
        assert len(new) == 4 and log.last_position == 4
        # The same answers from the next group, where the ids are known from the log.
        results, new = log.append_group([retry, mixed, changed], 1, 2_000)
        assert results[0] == Appended(1, 2, 2, True) and new == []
        assert [type(r).__name__ for r in results[1:]] == ["StoreError", "StoreError"]
    finally:
        log.close()


def test_ids_above_every_indexed_id_skip_the_look_up_and_retries_are_still_found(
        tmp_path: Path) -> None:
    """Log.sequence looks up in the index only the ids at or below the greatest id
    written (an upper bound kept in memory, from the index and the unindexed records at
    an open). Seeded mixes of time-ordered ids (straight into the index) and random ones
    (held in memory, flushed later), retried in later groups and after reopening: every
    retry is a duplicate, every new id is new, and the bound is above every id written."""
    from store.client import new_id

    rng = random.Random(SEED)
    path = tmp_path / "n"
    log = Log(path)
    written: list[PreparedAppend] = []

    def group(n: int) -> list[PreparedAppend]:
        reqs = []
        for _ in range(n):
            reqs.append(of_ids([new_id() if rng.random() < 0.5
                                else uuid.UUID(int=rng.getrandbits(128)).bytes
                                for _ in range(rng.randint(1, 3))]))
        return reqs

    try:
        for round_ in range(6):
            for _ in range(40):  # more groups than buckets: random ids reach the index too
                retries = rng.sample(written, min(2, len(written)))
                fresh = group(2)
                results, _ = log.append_group([*retries, *fresh], 1, 1_000)
                assert [r.duplicate for r in results] == [True] * len(retries) + [False] * 2
                written += fresh
            log.close()
            log = Log(path)
            # After an open: the bound covers the index and the records not indexed yet.
            assert log._id_bound >= max(i for r in written for i in r.ids)
            results, new = log.append_group([
                PreparedAppend(r.stream, r.stream_key, r.expected, 0, r.ids, r.bodies)
                for r in written[-40:]], 1, 2_000)
            assert new == [] and all(r.duplicate for r in results), round_
    finally:
        log.close()


def _fresh(rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    p = prepared("a", 1, rng)
    return p.ids, p.bodies


def test_stored_positions_of_a_closed_log(tmp_path: Path) -> None:
    """stored_positions reads a stopped node's persisted commit and last position without
    opening the log for writing (the fault tests read dead nodes' disks with it)."""
    from store.log import stored_positions

    path = tmp_path / "log"
    log = Log(path)
    try:
        fill(log, random.Random(SEED), 4)
        last = log.last_position
        with log.write() as txn:
            log.set_meta(txn, commit_position=last - 2)
    finally:
        log.close()
    assert stored_positions(str(path)) == (last - 2, last) and last > 2
    empty = tmp_path / "empty"
    Log(empty).close()
    assert stored_positions(str(empty)) == (0, 0)


def test_a_data_directory_opens_in_one_log_at_a_time(tmp_path: Path) -> None:
    """A second Log on an open directory (here, in the same process) is refused; closing
    the first frees it."""
    first = Log(tmp_path / "n")
    with pytest.raises(DataDirInUse, match=f"data directory {tmp_path / 'n'} is already "
                                           "open in this process"):
        Log(tmp_path / "n")
    first.close()
    second = Log(tmp_path / "n")
    del second  # collected unclosed: its lock goes with it
    Log(tmp_path / "n").close()


def test_a_server_that_cannot_listen_releases_its_data_directory(tmp_path: Path) -> None:
    """A start that fails after the log was opened (the port is taken) closes it: the
    directory opens again in the same process. Before, the lock stayed for the life of
    the process and a second start was refused as 'in use'."""
    import asyncio
    import socket

    from store.node import StoreNode
    from store.server import StoreServer

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = StoreServer(StoreNode(str(tmp_path / "n")), f"127.0.0.1:{port}")
        with pytest.raises(OSError, match="cannot listen"):
            asyncio.run(server.start())
    Log(tmp_path / "n").close()


# ---- id runs (store/log.py `id_runs`) --------------------------------------------------------

def _v7(ms: int, prefix: int, counter: int) -> bytes:
    """A UUIDv7 as store.client.new_id lays it out: millisecond, version and 42-bit
    producer prefix (bytes 6-11), 32-bit counter."""
    return (ms << 80 | 0x7 << 76 | 0b10 << 62 | prefix << 32 | counter).to_bytes(16, "big")


def _prefix(rng: random.Random) -> int:
    """42 random bits spread over the prefix bytes the version and variant leave free."""
    return rng.getrandbits(12) << 32 | rng.getrandbits(30)


def _run_entries(log: Log) -> list[tuple[bytes, bytes, int, int]]:
    """(first id, last id, first position, count) of every entry of `id_runs`, checked
    against the records it points at: consecutive positions whose ids share their first
    12 bytes and increase from the first id to the last; entries disjoint."""
    from store.log import _ID_RUN, RUN_PREFIX
    entries = []
    with log.env.begin() as txn:
        for hi, raw in txn.cursor(log.runs_db):
            lo, pos, count = _ID_RUN.unpack(raw)
            ids = [records.id_of(txn.get(p.to_bytes(8, "big"), db=log.log_db))
                   for p in range(pos, pos + count)]
            assert ids[0] == lo and ids[-1] == hi and ids == sorted(set(ids))
            assert len({i[:RUN_PREFIX] for i in ids}) == 1
            if entries:
                assert entries[-1][1] < lo, "id runs overlap"
            entries.append((lo, hi, pos, count))
    return entries


def _known(log: Log, ids: list[bytes]) -> dict[bytes, int]:
    with log.env.begin() as txn:
        return {i: int.from_bytes(p, "big") for i, p in log.known_ids(txn, ids).items()}


class _Producers:
    """Seeded appends mixing what reaches a store: producers' runs (one millisecond,
    one prefix, counters up), a millisecond moving on, appends whose ids interleave with
    another's of the same producer, ids shuffled within an append, UUIDv4s and UUIDv7s of
    another library (random after the millisecond). Some counters are drawn and never
    sent: `unsent` ids inside runs' intervals, which must stay unknown. An append may
    cross a millisecond."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ms = 1_700_000_000_000
        self.prefixes = [_prefix(rng) for _ in range(3)]
        self.counters = [rng.getrandbits(31) for _ in range(3)]
        self.unsent: list[bytes] = []
        self.pending: list[list[bytes]] = []  # the second halves of interleaved pairs

    def _draw(self, p: int, n: int) -> list[bytes]:
        ids = []
        for _ in range(n):
            self.counters[p] += 1 + (self.rng.random() < 0.1)
            if self.counters[p] - 1 > 0 and self.rng.random() < 0.1:
                self.unsent.append(_v7(self.ms, self.prefixes[p], self.counters[p] - 1))
            ids.append(_v7(self.ms, self.prefixes[p], self.counters[p]))
        return ids

    def ids(self) -> list[bytes]:
        rng = self.rng
        if rng.random() < 0.2:
            self.ms += rng.randint(1, 3)
        if self.pending and rng.random() < 0.5:
            return self.pending.pop()
        kind = rng.random()
        p = rng.randrange(3)
        n = rng.choice([1, 1, 2, 3, 8, 30])
        if kind < 0.5:
            return self._draw(p, n)
        if kind < 0.6:  # the millisecond moves on within the append
            first = self._draw(p, n)
            self.ms += 1
            return first + self._draw(p, n)
        if kind < 0.7:  # two appends of one producer, their ids interleaved
            both = self._draw(p, 2 * n)
            self.pending.append(both[1::2])
            return both[::2]
        if kind < 0.8:
            ids = self._draw(p, n)
            rng.shuffle(ids)
            return ids
        if kind < 0.9:
            return [uuid.UUID(int=rng.getrandbits(128)).bytes for _ in range(n)]
        return [_v7(self.ms, rng.getrandbits(42), rng.getrandbits(32)) for _ in range(n)]

    def append(self) -> PreparedAppend:
        ids = self.ids()
        return of_ids(ids, self.rng.choice("abc"))


def test_id_runs_find_every_written_id_and_no_other_on_leader_and_follower(
        tmp_path: Path) -> None:
    """Seeded mixes of appends (_Producers) written by a leader (Log.append_group, with
    retries that must be answered as duplicates at their positions) and shipped to a
    follower in uneven slices (runs derived from the records), which is sometimes
    truncated and rewritten; both reopened now and then. After each step every written
    id is found at its position, every id drawn and never sent, or removed by the
    truncation, is not, and `id_runs` holds disjoint, exact runs; most ids end in runs."""
    rng = random.Random(SEED)
    producers = _Producers(rng)
    leader, follower = Log(tmp_path / "leader"), Log(tmp_path / "follower")
    model: dict[bytes, int] = {}
    written: list[PreparedAppend] = []
    values: list[bytes] = []
    try:
        for step in range(120):
            retries = rng.sample(written, min(len(written), rng.choice([0, 0, 1, 2])))
            fresh = [producers.append() for _ in range(rng.randint(1, 6))]
            results, new = leader.append_group([*retries, *fresh], 1, 1_000 + step)
            for req, res in zip([*retries, *fresh], results, strict=True):
                assert isinstance(res, Appended), res
                assert res.duplicate == (req in retries)
                positions = range(res.first_position, res.last_position + 1)
                if req in retries:
                    assert [model[i] for i in req.ids] == list(positions)
                model.update(zip(req.ids, positions, strict=True))
            written += fresh
            values += new
            # The follower: behind by up to a few records, sometimes truncated.
            shipped = follower.last_position
            if shipped and rng.random() < 0.15:
                after = rng.randint(0, shipped)
                with follower.write() as txn:
                    follower.write_records(txn, [], after + 1, truncate_after=after)
                gone = [records.id_of(v) for v in values[after:shipped]]
                assert _known(follower, gone) == {}
                shipped = after
            upto = len(values) - rng.randint(0, 3)
            while shipped < upto:
                k = min(rng.randint(1, 40), upto - shipped)
                with follower.write() as txn:
                    follower.write_records(txn, values[shipped:shipped + k], shipped + 1)
                shipped += k
            if rng.random() < 0.1:
                leader.close()
                leader = Log(tmp_path / "leader")
                follower.close()
                follower = Log(tmp_path / "follower")
            probes = [i for i in producers.unsent if i not in model]
            assert _known(leader, [*model, *probes]) == model
            on_follower = {i: p for i, p in model.items() if p <= follower.last_position}
            assert _known(follower, [*model, *probes]) == on_follower
        leader_runs = _run_entries(leader)
        assert sum(count for *_, count in leader_runs) > len(model) // 2
        assert len(_run_entries(follower)) > 10
        # An open takes the runs' ids into its bound: a retry is not taken for new.
        leader.close()
        leader = Log(tmp_path / "leader")
        assert leader._id_bound >= max(model)
    finally:
        leader.close()
        follower.close()


def test_a_version_1_log_is_upgraded_and_a_version_1_binary_would_refuse_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 2 adds `id_runs`: a version-1 log opens (nothing to convert) and is
    recorded as version 2, which a version-1 binary refuses (it would not look in the
    runs). Its per-id entries are still found."""
    from store.client import new_id
    log = Log(tmp_path / "n")
    ids = [new_id() for _ in range(5)]
    log.append_group([of_ids(ids[:2])], 1, 0)
    with log.write() as txn:  # as version 1 wrote them: one `ids` entry per id
        txn.put(b"schema_version", b"1", db=log.meta_db)
        assert txn.stat(log.runs_db)["entries"] == 1
        txn.drop(log.runs_db, delete=False)
        txn.cursor(log.ids_db).putmulti([(i, (p + 1).to_bytes(8, "big"))
                                         for p, i in enumerate(ids[:2])])
    log.close()
    log = Log(tmp_path / "n")
    with log.env.begin() as txn:
        assert txn.get(b"schema_version", db=log.meta_db) == b"2"
    assert _known(log, ids) == {ids[0]: 1, ids[1]: 2}
    log.close()
    monkeypatch.setattr("store.log.SCHEMA_VERSION", 1)
    monkeypatch.setattr("store.log.UPGRADES_FROM", ())
    with pytest.raises(RuntimeError, match="schema version 2, expected 1"):
        Log(tmp_path / "n")


def test_truncation_shortens_or_drops_only_the_runs_it_cuts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run [c0 c2 c4] at 1-3; [c1 c3] of the same producer at 4-5 would overlap it, so
    its ids are indexed one by one; a run [c5..c9] at 6-10. Truncating after 7 shortens
    the last run to c5 c6, after 4 drops it, after 3 removes c1 c3 and keeps the first
    run whole (their look-up seeks land in it). After an open that refills nothing in
    memory, ids of runs only are still below the bound: a retry is a retry."""
    monkeypatch.setattr("store.log.IDS_THROUGH_STEP", 1)
    rng = random.Random(SEED)
    prefix = _prefix(rng)
    c = [_v7(1_700_000_000_000, prefix, 100 + k) for k in range(10)]
    log = Log(tmp_path / "n")

    def append(ids: list[bytes]) -> PreparedAppend:
        req = of_ids(ids)
        log.append_group([req], 1, 0)
        return req

    def truncate(after: int) -> None:
        with log.write() as txn:
            log.write_records(txn, [], after + 1, truncate_after=after)

    try:
        first = append(c[0:5:2])
        append(c[1:5:2])
        append(c[5:10])
        assert [(lo, hi, p, n) for lo, hi, p, n in _run_entries(log)] == [
            (c[0], c[4], 1, 3), (c[5], c[9], 6, 5)]
        truncate(7)
        assert _run_entries(log) == [(c[0], c[4], 1, 3), (c[5], c[6], 6, 2)]
        assert _known(log, c) == {c[0]: 1, c[2]: 2, c[4]: 3, c[1]: 4, c[3]: 5, c[5]: 6,
                                  c[6]: 7}
        truncate(4)
        assert _run_entries(log) == [(c[0], c[4], 1, 3)]
        truncate(3)
        assert _run_entries(log) == [(c[0], c[4], 1, 3)]
        assert _known(log, c) == {c[0]: 1, c[2]: 2, c[4]: 3}
        log.close()
        log = Log(tmp_path / "n")
        assert len(log._recent) == 0
        results, new = log.append_group([first], 1, 0)
        assert new == [] and results == [Appended(1, 3, 3, True)]
    finally:
        log.close()


def test_spans_are_cut_into_runs_where_the_prefix_changes_or_the_ids_stop_increasing(
        tmp_path: Path) -> None:
    """A producer's append whose ids cross a millisecond is two runs (before, none: every
    id went to `ids`); a follower given two such appends of one stream, which it reads as
    one span, indexes the runs the leader did (before, none); an append whose ids are out
    of order is cut where they stop increasing; a stretch of one id goes to `ids`."""
    rng = random.Random(SEED)
    prefix = _prefix(rng)
    ms = 1_700_000_000_000

    def ids_entries(log: Log) -> int:
        with log.env.begin() as txn:
            return int(txn.stat(log.ids_db)["entries"])

    crossing = [_v7(ms, prefix, k) for k in range(300)] + [
        _v7(ms + 1, prefix, k) for k in range(300, 500)]
    second = [_v7(ms + 2, prefix, k) for k in range(500, 700)]
    leader, follower = Log(tmp_path / "leader"), Log(tmp_path / "follower")
    try:
        _, v1 = leader.append_group([of_ids(crossing)], 1, 0)
        _, v2 = leader.append_group([of_ids(second)], 1, 0)
        expected = [(crossing[0], crossing[299], 1, 300), (crossing[300], crossing[-1], 301, 200),
                    (second[0], second[-1], 501, 200)]
        assert _run_entries(leader) == expected and ids_entries(leader) == 0
        with follower.write() as txn:  # one span: both appends are of stream "s"
            follower.write_records(txn, v1 + v2, 1)
        assert _run_entries(follower) == expected and ids_entries(follower) == 0
        # Out of order: [c3 c4 c5 c1 c2 c0]: runs c3..c5 and c1..c2, c0 alone in `ids`.
        c = [_v7(ms + 3, prefix, k) for k in range(10)]
        leader.append_group([of_ids([c[3], c[4], c[5], c[1], c[2], c[0]])], 1, 0)
        assert _run_entries(leader)[3:] == [(c[1], c[2], 704, 2), (c[3], c[5], 701, 3)]
        assert ids_entries(leader) == 1
        assert _known(leader, c) == {c[3]: 701, c[4]: 702, c[5]: 703, c[1]: 704, c[2]: 705,
                                     c[0]: 706}
    finally:
        leader.close()
        follower.close()


def test_a_data_file_shorter_than_its_meta_pages_is_created_again(tmp_path: Path) -> None:
    """A first open cut short by a full volume left a data file shorter than LMDB's two
    meta pages (half of its first 8 KiB write): it never held a commit, and every later
    open failed with MDB_INVALID "not an LMDB file", also once space was freed, until an
    operator deleted it (helper-88's review). It is removed and created again."""
    d = tmp_path / "log"
    d.mkdir()
    (d / "data.mdb").write_bytes(os.urandom(4096))
    log = Log(str(d))
    try:
        assert log.last_position == 0
        assert (d / "data.mdb").stat().st_size >= 8192
    finally:
        log.close()
    # A whole data file is never touched.
    log = Log(str(d))
    log.close()
