"""The deterministic consumer's pure core, driven by a simulated log with seeded fault
schedules: instances crash and restart (from a snapshot or from scratch), two of them
believe they are primary at once, appends are delayed, lost, refused or land with their
answer lost, appends sent before a crash still land after it, and the output stream
must end up holding every input's outputs exactly once, identical to a run without
failures."""

from __future__ import annotations

import dataclasses
import itertools
import random
import struct
from dataclasses import dataclass, field

import pytest
from google.protobuf import message

from engine import consumer as consumer_module
from engine import events as ev
from engine import wire
from engine.book import Engine
from engine.codec import (
    _CMD_FIELDS,
    COMMAND_CLASSES,
    GENESIS,
    CodecError,
    _Reader,
    encode_command,
    encode_event,
    state_hash,
)
from engine.consumer import Capture, Consumer
from store.records import varint
from tests.support.exchange import Rec
from tests.test_book_model import random_commands
from xdc.v1 import eventstore_pb2 as pb

GROUP = "g"


@dataclass
class Record:
    position: int
    kind: str  # "in" or "out"
    type: str = ""
    data: bytes = b""
    ts: int = 0
    revision: int = 0
    batch: wire.OutputBatch | None = None
    writer: int = -1  # the instance that appended an output batch


@dataclass
class Log:
    records: list[Record] = field(default_factory=list)
    out_revision: int = 0
    snapshots: list[Capture] = field(default_factory=list)
    landed: list[int] = field(default_factory=list)  # batches of each append that landed

    def add_input(self, cmd: object) -> None:
        ts = cmd.ts_ns  # type: ignore[attr-defined]
        data = encode_command(cmd._replace(ts_ns=0))  # type: ignore[attr-defined]
        self.records.append(Record(len(self.records) + 1, "in", type(cmd).__name__, data, ts))

    def add_control(self, kind: str, body: str) -> None:
        self.records.append(Record(len(self.records) + 1, "in", kind, body.encode()))

    def append_output(self, expected: int, batch: wire.OutputBatch) -> bool:
        return self.try_append(expected, [batch]) == "ok"

    def try_append(self, expected: int, batches: list[wire.OutputBatch],
                   writer: int = 0) -> str:
        """As the store answers one append of batches (all written or none): their ids
        (derived from each first input) are checked before the expected revision. An
        exact retry (every batch already there, the same bytes from the same writer, at
        consecutive positions) is answered with its revision ("dup:<last revision>");
        any other overlap is "exists"."""
        by_first = {r.batch.first_input: r for r in self.records if r.batch is not None}
        found = [by_first.get(b.first_input) for b in batches]
        if any(found):
            if all(r is not None and r.batch == b and r.writer == writer
                   and r.position == found[0].position + i  # type: ignore[union-attr]
                   for i, (r, b) in enumerate(zip(found, batches, strict=True))):
                return f"dup:{found[-1].revision}"  # type: ignore[union-attr]
            return "exists"
        if expected != self.out_revision:
            return "wrong"
        for batch in batches:
            self.out_revision += 1
            self.records.append(Record(len(self.records) + 1, "out",
                                       revision=self.out_revision, batch=batch,
                                       writer=writer))
        self.landed.append(len(batches))
        return "ok"

    def committed_blobs(self) -> list[bytes]:
        return [b for r in self.records if r.kind == "out" for b in r.batch.blobs]  # type: ignore[union-attr]


def feed(c: Consumer, r: Record, as_bytes: bool = True) -> None:
    """One record, as the shell delivers it (outputs as bytes: verified whole when they
    match), or with outputs decoded first (always verified blob by blob)."""
    if r.kind == "in":
        c.on_input(r.position, r.type, r.data, r.ts)
    elif as_bytes:
        c.on_output_data(r.revision, r.batch.encode())  # type: ignore[union-attr]
    else:
        c.on_output(r.revision, r.batch)  # type: ignore[arg-type]


def first_batch(c: Consumer) -> wire.OutputBatch:
    """The first batch of ``c``'s next output append."""
    nxt = c.next_append()
    assert nxt is not None
    return nxt[2][0]


def commit_all(c: Consumer, log: Log, *others: Consumer) -> list[wire.OutputBatch]:
    """Appends every output ``c`` emits, one append at a time as the shell does, feeding
    each landed batch back to ``c`` and to ``others``; returns the batches."""
    landed: list[wire.OutputBatch] = []
    while (nxt := c.next_append()) is not None:
        generation, expected, batches = nxt
        assert log.try_append(expected, batches) == "ok"
        c.on_appended(generation, log.out_revision)
        for r in log.records[-len(batches):]:
            for x in (c, *others):
                feed(x, r)
        landed += batches
    return landed


def reference(log: Log) -> list[bytes]:
    """Outputs of one instance that sees every input and never fails."""
    c = Consumer(GROUP)
    for r in log.records:
        if r.kind == "in":
            c.on_input(r.position, r.type, r.data, r.ts)
    return [p.blob for p in c.pending]


@dataclass
class Instance:
    consumer: Consumer
    cursor: int = 0  # records read


@dataclass
class Sent:
    """An output append on the wire: it lands or not whatever becomes of its sender."""

    sender: Instance
    writer: int  # which instance (its name survives a restart)
    generation: int
    expected: int
    batches: list[wire.OutputBatch]


def boot(log: Log, rng: random.Random) -> Instance:
    usable = [s for s in log.snapshots]
    if usable and rng.random() < 0.7:
        s = usable[-1]
        c = Consumer.from_snapshot(GROUP, s.data, s.position, s.chain, s.out_revision,
                                   s.state_hash)
        return Instance(c, s.position)
    return Instance(Consumer(GROUP))


def deliver(log: Log, sent: Sent, rng: random.Random, faults: bool) -> None:
    """The store processes one append, then its answer reaches the sender (unless lost,
    or the sender is gone: an answer to a crashed incarnation changes nothing)."""
    c = sent.sender.consumer
    if faults and rng.random() < 0.05:  # lost before the store: outcome unknown
        c.on_refused(sent.generation)
        return
    outcome = log.try_append(sent.expected, sent.batches, sent.writer)
    if faults and rng.random() < 0.05:  # answer lost: outcome unknown
        c.on_refused(sent.generation)
    elif outcome == "ok":
        c.on_appended(sent.generation, log.out_revision)
    elif outcome.startswith("dup:"):
        c.on_appended(sent.generation, int(outcome[4:]))
    else:
        c.on_refused(sent.generation, log.out_revision if outcome == "wrong" else 0,
                     already_exists=outcome == "exists")


def as_rec(r: Record) -> Rec:
    """The record as the store delivers it (a RecordedEvent's fields)."""
    if r.kind == "in":
        return Rec(wire.input_stream(GROUP), r.type, r.position, 0, r.ts, r.data)
    assert r.batch is not None
    return Rec(wire.output_stream(GROUP), wire.OUTPUT_TYPE, r.position, r.revision, 0,
               r.batch.encode())


def as_batch(rs: list[Record]) -> bytes:
    """The records as a serialized RecordBatch (what a raw subscription delivers)."""
    return pb.RecordBatch(events=[pb.RecordedEvent(
        stream=r.stream, type=r.type, position=r.position, revision=r.revision,
        timestamp_ns=r.timestamp_ns, data=r.data) for r in map(as_rec, rs)]).SerializeToString()


def simulate(seed: int, n_inputs: int = 400, as_bytes: bool = True,
             activate_at: int = -1, delivered: str = "") -> tuple[Log, list[Instance]]:
    """``activate_at``: the input after which output version 2 is activated (-1: never).
    ``delivered``: each read's records go together to ``on_records`` ("records") or, as a
    serialized RecordBatch, to ``on_raw_batch`` ("raw"), as the shell delivers a batch,
    instead of one by one."""
    rng = random.Random(seed)
    cmds = random_commands(seed, n_inputs)
    log = Log()
    inst = [Instance(Consumer(GROUP)), Instance(Consumer(GROUP))]
    wire_: list[Sent] = []  # appends in flight, in the order the store will see them
    primaries = {0}
    pending_snap: list[Capture] = []
    i = 0
    steps = 0
    while True:
        steps += 1
        assert steps < 100_000
        faults = i < len(cmds)
        if i < len(cmds) and rng.random() < 0.5:
            for _ in range(rng.randint(1, 8)):
                if i < len(cmds):
                    log.add_input(cmds[i])
                    i += 1
                    if i == activate_at:
                        log.add_control(wire.ACTIVATE_TYPE, '{"output_version": 2}')
        who = rng.randrange(2)
        x = inst[who]
        # read some records
        upto = min(len(log.records), x.cursor + rng.randint(0, 20))
        if delivered == "records":
            x.consumer.on_records([as_rec(r) for r in log.records[x.cursor:upto]])
        elif delivered == "raw":
            x.consumer.on_raw_batch(as_batch(log.records[x.cursor:upto]))
        else:
            for r in log.records[x.cursor:upto]:
                feed(x.consumer, r, as_bytes)
        x.cursor = upto
        assert not x.consumer.alarm, x.consumer.alarm
        # the store takes some appends off the wire (each sender's in order)
        while wire_ and rng.random() < 0.6:
            deliver(log, wire_.pop(0), rng, faults)
        # primaries emit (sometimes both: only expected revisions keep them apart)
        if who in primaries:
            if (nxt := x.consumer.next_append()) is not None:
                wire_.append(Sent(x, who, *nxt))
            if rng.random() < 0.05:
                pending_snap.append(x.consumer.capture())
        for s in list(pending_snap):
            if any(c.consumer.committed_input >= s.wait_for for c in inst):
                log.snapshots.append(s)
                pending_snap.remove(s)
        if faults:
            event = rng.random()
            if event < 0.02:  # crash: state rebuilt; what it sent may still land
                inst[who] = boot(log, rng)
            elif event < 0.05:
                primaries = {rng.randrange(2)}
                for k in range(2):
                    if k not in primaries:  # a demotion starts a new generation
                        inst[k].consumer.rewind_emission()
            elif event < 0.06:
                primaries = {0, 1}  # a stale primary that has not noticed yet
            continue
        # Quiesce: one primary, no more faults; done once everything is committed and
        # both instances have read the whole log.
        primaries = {0}
        if all(c.cursor == len(log.records) for c in inst) and not wire_ \
                and not inst[0].consumer.pending and not inst[1].consumer.pending:
            break
    return log, inst


@pytest.mark.parametrize("seed", range(60))
def test_outputs_exactly_once_under_faults(seed: int) -> None:
    log, inst = simulate(seed)
    committed = log.committed_blobs()
    assert committed == reference(log)
    positions = [wire.blob_position(b) for b in committed]
    assert positions == sorted(set(positions))
    chains = {c.consumer.chain for c in inst if c.cursor == len(log.records)}
    assert len(chains) == 1
    for c in inst:
        assert not c.consumer.alarm


@pytest.mark.parametrize("seed", range(20))
def test_outputs_exactly_once_under_faults_across_an_output_activation(seed: int) -> None:
    """The same fault schedules with output version 2 activated in the middle of the
    inputs: instances restored from snapshots on either side of it, and takeovers around
    it, still land every input's outputs exactly once, as one instance without failures
    makes them (version 1 before the activation, version 2 after)."""
    log, inst = simulate(seed, activate_at=200)
    committed = log.committed_blobs()
    assert committed == reference(log)
    at = next(r.position for r in log.records if r.type == wire.ACTIVATE_TYPE)
    tags: dict[bool, set[int]] = {False: set(), True: set()}
    for b in committed:
        position, raws = wire.blob_outputs(b)
        tags[position > at].update(r[0] for r in raws)
    assert {ev.CANCELLED, ev.REJECTED} <= tags[False] and ev.CANCELLED_V2 not in tags[False]
    assert {ev.CANCELLED_V2, ev.REJECTED_V2} <= tags[True] and ev.CANCELLED not in tags[True]
    for c in inst:
        assert not c.consumer.alarm and c.consumer.engine.output_version == 2


@pytest.mark.parametrize("seed", range(20))
def test_outputs_exactly_once_with_many_batches_per_append(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same fault schedules with batches of at most 2 inputs, so that appends carry
    several batches (all landing or none) and takeovers cut across them."""
    monkeypatch.setattr(consumer_module, "MAX_BATCH_INPUTS", 2)
    log, inst = simulate(seed)
    assert max(log.landed) > 1, "no append carried several batches"
    assert max(log.landed) <= consumer_module.MAX_APPEND_BATCHES
    committed = log.committed_blobs()
    assert committed == reference(log)
    positions = [wire.blob_position(b) for b in committed]
    assert positions == sorted(set(positions))
    for c in inst:
        assert not c.consumer.alarm


def test_an_append_gathers_consecutive_batches_and_lands_them_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "MAX_BATCH_INPUTS", 1)
    log, primary, warm = fed_pair(5, 40)
    n = len(primary.pending)
    assert n > consumer_module.MAX_APPEND_BATCHES
    nxt = primary.next_append()
    assert nxt is not None
    generation, expected, batches = nxt
    assert expected == 0 and len(batches) == consumer_module.MAX_APPEND_BATCHES
    assert [b.first_input for b in batches] == [p.position for p in
                                                list(primary.pending)[:len(batches)]]
    assert primary.next_append() is None  # one append in flight
    assert log.try_append(expected, batches) == "ok"
    assert primary.on_appended(generation, log.out_revision) is False
    assert primary.appended_through == len(batches)
    nxt = primary.next_append()
    assert nxt is not None and nxt[1] == len(batches)  # the next one follows it
    for r in log.records:
        feed(warm, r)
    assert not warm.alarm and warm.committed_input == batches[-1].last_input
    with pytest.raises(AssertionError, match="landed through revision"):
        primary.on_appended(nxt[0], nxt[1] + len(nxt[2]) - 1)
    # Answered further on (an exact retry of batches landed before): resync to there.
    beyond = nxt[1] + len(nxt[2]) + 2
    assert primary.on_appended(nxt[0], beyond) is True
    assert primary.resync_to == beyond and primary.next_append() is None


def test_a_resync_to_a_revision_never_committed_or_holding_no_output_ends() -> None:
    """A refusal names a revision the output stream never reaches (a leader's
    uncommitted tail lost in a failover), or one the subscription never delivers (an
    event of another type at the stream's end): ``reconcile``, given where the stream
    really ends, lets emission go on; while that end may still be on its way, the wait
    goes on. Without it, every later output was held for good."""
    log, primary, warm = fed_pair(7, 200)
    primary.fit_store(2_000, 1, 0, "a")  # one small batch per append: several appends
    nxt = primary.next_append()
    assert nxt is not None
    generation, expected, batches = nxt
    assert log.try_append(expected, batches) == "ok"
    primary.on_appended(generation, log.out_revision)
    for r in log.records[-len(batches):]:
        feed(primary, r)
    landed = log.out_revision
    assert primary.out_revision == landed and not primary.resyncing
    # Refused, naming revision landed + 3, which never commits.
    nxt = primary.next_append()
    assert nxt is not None
    primary.on_refused(nxt[0], landed + 3)
    assert primary.resyncing and primary.next_append() is None
    assert primary.reconcile(landed + 5, seen_through=False) == ""  # may be on its way
    assert primary.resyncing
    found = primary.reconcile(landed, seen_through=False)
    assert f"revision {landed + 3} named by a refusal is not in the output stream" in found
    assert not primary.resyncing
    nxt = primary.next_append()
    assert nxt is not None and nxt[1] == landed  # the stream's real end
    # Two events of another type end the stream: refused, naming the last.
    primary.on_refused(nxt[0], landed + 2)
    assert primary.reconcile(landed + 2, seen_through=False) == ""  # not all delivered
    assert primary.reconcile(landed + 2, seen_through=True) == (
        f"output stream revisions {landed + 1}..{landed + 2} hold no output batch")
    log.out_revision += 2  # those two events, in the simulated log
    nxt = primary.next_append()
    assert nxt is not None and nxt[1] == landed + 2
    assert log.try_append(nxt[1], nxt[2]) == "ok"
    primary.on_appended(nxt[0], log.out_revision)
    for r in log.records:
        feed(primary, r)
        feed(warm, r)
    assert not primary.alarm and not warm.alarm
    assert primary.committed_input == warm.committed_input == nxt[2][-1].last_input
    assert primary.reconcile(landed, seen_through=True) == ""  # not resyncing: no-op


def test_batches_and_appends_fit_the_store_limits() -> None:
    """Under a store's small limits every output event fits max_event_bytes and an
    append holds at most max_append_events of them and max_append_bytes; the warm
    instance verifies the smaller batches all the same."""
    log, primary, warm = fed_pair(6, 400)
    max_event, max_events, max_bytes = 2_000, 3, 5_000
    primary.fit_store(max_event, max_events, max_bytes, "a")
    assert primary.append_batches == 2  # 5000 bytes hold two events of up to 2000
    assert primary.batch_bytes < max_event
    appends = 0
    while (nxt := primary.next_append()) is not None:
        generation, expected, batches = nxt
        events = [b.event(GROUP, "a").SerializeToString() for b in batches]
        assert len(events) <= max_events and sum(map(len, events)) <= max_bytes
        assert all(len(e) <= max_event for e in events)
        assert log.try_append(expected, batches) == "ok"
        primary.on_appended(generation, log.out_revision)
        appends += 1
    assert not primary.emit_blocked and primary._sent == len(primary.pending)
    assert appends > 5 and log.out_revision > appends  # several batches per append
    for r in log.records:
        feed(warm, r)
    assert not warm.alarm and warm.committed_input == primary.position


def test_outputs_no_event_can_hold_block_emission_with_a_reason() -> None:
    _, primary, _ = fed_pair(6, 50)
    biggest = max(len(p.blob) for p in primary.pending)
    primary.fit_store(consumer_module.envelope_bytes(GROUP, "a") + biggest - 1, 0, 0, "a")
    while (nxt := primary.next_append()) is not None:
        primary.on_appended(nxt[0], nxt[1] + len(nxt[2]))
    held = primary.pending[primary._sent]
    assert len(held.blob) == biggest
    assert primary.emit_blocked.startswith(f"outputs of input {held.position} take {biggest}")
    assert "max_event_bytes" in primary.emit_blocked
    primary.fit_store(0, 0, 0, "a")  # limits unknown: the engine's own sizes
    assert primary.next_append() is not None and not primary.emit_blocked


def _emitted(seed: int, n: int, batch_inputs: int,
             monkeypatch: pytest.MonkeyPatch) -> tuple[Log, Consumer]:
    """A log of ``n`` random inputs whose outputs a primary committed in batches of at
    most ``batch_inputs`` inputs, and that primary, fed all of it."""
    monkeypatch.setattr(consumer_module, "MAX_BATCH_INPUTS", batch_inputs)
    log, primary, _ = fed_pair(seed, n)
    commit_all(primary, log)
    assert not primary.pending and not primary.alarm
    return log, primary


@pytest.mark.parametrize("seed", range(4))
def test_trusted_catch_up_ends_where_a_full_replay_does(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance that trusts the committed outputs up to a batch's last input (state
    only), then verifies, ends with the engine, chain, positions and revisions of one that
    computed and checked everything; and it goes on verifying after that point."""
    log, primary = _emitted(seed, 300, 7, monkeypatch)
    batches = [r for r in log.records if r.kind == "out"]
    assert len(batches) > 10
    cut = batches[len(batches) // 2].batch
    assert cut is not None
    fast = Consumer(GROUP)
    fast.trust(cut.last_input, cut.chain)
    for r in log.records:
        feed(fast, r)
    assert not fast.alarm and not fast.pending
    assert (fast.position, fast.chain, fast.committed_input, fast.out_revision) == (
        primary.position, primary.chain, primary.committed_input, primary.out_revision)
    assert state_hash(fast.engine) == state_hash(primary.engine)
    # After the trusted point a forged batch is caught as before.
    log2, _ = _emitted(seed, 300, 7, monkeypatch)
    outs = [r for r in log2.records if r.kind == "out"]
    victim = outs[-1].batch
    assert victim is not None and victim.last_input > cut.last_input
    blob = victim.blobs[-1]
    forged = blob[:-1] + bytes([blob[-1] ^ 1])
    outs[-1].batch = dataclasses.replace(victim, blobs=(*victim.blobs[:-1], forged))
    checked = Consumer(GROUP)
    checked.trust(cut.last_input, cut.chain)
    for r in log2.records:
        feed(checked, r)
    assert "differ" in checked.alarm


@pytest.mark.parametrize("seed", range(8))
def test_whole_batch_verification_changes_nothing(seed: int) -> None:
    """Verifying a committed batch in one byte comparison (the usual case) leaves every
    instance exactly where checking it blob by blob does, under the fault schedules."""
    log_b, inst_b = simulate(seed, as_bytes=True)
    log_d, inst_d = simulate(seed, as_bytes=False)
    assert log_b.committed_blobs() == log_d.committed_blobs()
    assert log_b.out_revision == log_d.out_revision
    for b, d in zip(inst_b, inst_d, strict=True):
        cb, cd = b.consumer, d.consumer
        assert (cb.position, cb.chain, cb.committed_input, cb.out_revision, list(cb.pending),
                cb.alarm) == (cd.position, cd.chain, cd.committed_input, cd.out_revision,
                              list(cd.pending), cd.alarm)


@pytest.mark.parametrize("delivered", ["records", "raw"])
@pytest.mark.parametrize("activate_at", [-1, 200])
@pytest.mark.parametrize("seed", range(8))
def test_delivered_batches_change_nothing(seed: int, activate_at: int, delivered: str) -> None:
    """Each read's records given to ``on_records`` together (commands processed as one
    engine batch, then the committed outputs among them verified) leave every instance
    where feeding them one by one does, under the fault schedules: the same log, the
    same outputs committed, the same end states. With an output version activated
    midway, the commands before it in a delivered batch are processed before it. Raw,
    the batch's bytes are read where they lie (``on_raw_batch``)."""
    log_b, inst_b = simulate(seed, delivered=delivered, activate_at=activate_at)
    log_o, inst_o = simulate(seed, activate_at=activate_at)
    assert log_b.committed_blobs() == log_o.committed_blobs() == reference(log_o)
    assert log_b.out_revision == log_o.out_revision
    assert [r.position for r in log_b.records] == [r.position for r in log_o.records]
    for b, o in zip(inst_b, inst_o, strict=True):
        cb, co = b.consumer, o.consumer
        assert (cb.position, cb.chain, cb.committed_input, cb.out_revision, list(cb.pending),
                cb.alarm) == (co.position, co.chain, co.committed_input, co.out_revision,
                              list(co.pending), co.alarm)


def fed_pair(seed: int, n: int) -> tuple[Log, Consumer, Consumer]:
    """A log of ``n`` random inputs and two instances that have read all of it."""
    log = Log()
    for cmd in random_commands(seed, n):
        log.add_input(cmd)
    a, b = Consumer(GROUP), Consumer(GROUP)
    for r in log.records:
        feed(a, r)
        feed(b, r)
    return log, a, b


def test_matching_batch_is_verified_whole() -> None:
    _, primary, warm = fed_pair(11, 60)
    batch = first_batch(primary)
    assert len(batch.blobs) > 1
    assert warm._verify_whole(1, batch.encode(), warm.position)
    assert not warm.pending and warm.committed_input == batch.last_input
    # not the bytes it holds, not a new revision, not after the inputs it covers
    assert not primary._verify_whole(1, batch.encode()[:-1], primary.position)
    assert not primary._verify_whole(0, batch.encode(), primary.position)
    assert not primary._verify_whole(1, batch.encode(), batch.last_input - 1)
    assert len(primary.pending) == len(batch.blobs)


def test_warm_detects_divergent_outputs() -> None:
    log, primary, warm = fed_pair(7, 50)
    batch = first_batch(primary)
    blobs = list(batch.blobs)
    pos, raws = wire.blob_outputs(blobs[-1])
    tampered = wire.input_blob(pos, [encode_event(r) for r in raws[:-1]] or [b"\x02"])
    forged = dataclasses.replace(batch, blobs=(*blobs[:-1], tampered))
    assert log.append_output(0, forged)
    feed(warm, log.records[-1])
    assert "differ" in warm.alarm
    assert warm.next_append() is None  # a diverged instance never emits


def test_warm_detects_chain_mismatch_and_gap() -> None:
    log, a, b = fed_pair(8, 30)
    batch = first_batch(a)
    assert len(batch.blobs) > 2
    log.append_output(0, dataclasses.replace(batch, chain=GENESIS))
    feed(b, log.records[-1])
    assert "chain" in b.alarm
    c = Consumer(GROUP)
    for r in log.records[:-1]:
        feed(c, r)
    skipped = dataclasses.replace(batch, blobs=batch.blobs[1:])
    c.on_output(1, skipped)
    assert "differ" in c.alarm


def test_switchover_marker_holds_emission_until_released() -> None:
    log = Log()
    cmds = random_commands(9, 40)
    for cmd in cmds[:20]:
        log.add_input(cmd)
    log.add_control(wire.SWITCHOVER_TYPE, '{"to": "b"}')
    marker = len(log.records)
    for cmd in cmds[20:]:
        log.add_input(cmd)
    old = Consumer(GROUP)
    for r in log.records:
        feed(old, r)
    emitted = commit_all(old, log)
    assert emitted and all(b.last_input < marker for b in emitted)
    assert old.handed_over() and old.handover_to == "b"
    new = Consumer(GROUP)
    for r in log.records:
        feed(new, r)
    new.release_hold()
    taken = commit_all(new, log)
    assert taken and all(b.first_input > marker for b in taken)
    assert log.committed_blobs() == reference(log)


def test_deeply_nested_control_bodies_are_not_poison() -> None:
    """json raises RecursionError past a depth that depends on the caller's stack: a
    control (or an activation) nested that deep crashed every instance at the same input,
    after every restart. Such a body is read as {} everywhere, as any unreadable one: no
    activation, and the inputs after it are processed as in a log without it."""
    deep = "[" * 100_000 + "]" * 100_000
    log = Log()
    cmds = random_commands(11, 40)
    for cmd in cmds[:20]:
        log.add_input(cmd)
    log.add_control(wire.SNAPSHOT_REQUEST_TYPE, deep)
    log.add_control(wire.ACTIVATE_TYPE, '{"output_version": 2, "x": ' + deep + "}")
    for cmd in cmds[20:]:
        log.add_input(cmd)
    c = Consumer(GROUP)
    for r in log.records:
        feed(c, r)
    assert not c.alarm and c.position == len(log.records)
    assert c.engine.output_version == 1 and c.controls[0].body == {}
    assert commit_all(c, log) and log.committed_blobs() == reference(log)
    # A switchover marker whose body is unreadable holds emission after it, as before,
    # naming no target.
    marker = Consumer(GROUP)
    marker.on_input(1, wire.SWITCHOVER_TYPE, ('{"to": "b", "x": ' + deep + "}").encode(), 0)
    assert marker.controls[0].body == {} and marker.hold_after == 1
    assert marker.handover_to == ""
    assert wire.parse_instance(('{"instance": "a", "address": "h:1", "x": ' + deep + "}")
                               .encode()) is None
    # Parsed or not depending on PYTHONINTMAXSTRDIGITS: not parsed, whatever the setting.
    assert wire.json_object(('{"to": "b", "x": ' + "7" * 5000 + "}").encode()) == {}
    assert wire.json_object(b'{"to": "b"}') == {"to": "b"}


def test_snapshot_restore_equals_full_replay() -> None:
    log = Log()
    for cmd in random_commands(10, 300):
        log.add_input(cmd)
    full = Consumer(GROUP)
    for r in log.records[:150]:
        feed(full, r)
    cap = full.capture()
    restored = Consumer.from_snapshot(GROUP, cap.data, cap.position, cap.chain,
                                      cap.out_revision, cap.state_hash)
    for r in log.records[150:]:
        feed(full, r)
        feed(restored, r)
    assert restored.chain == full.chain
    from engine.codec import state_hash
    assert state_hash(restored.engine) == state_hash(full.engine)
    with pytest.raises(ValueError):
        Consumer.from_snapshot(GROUP, cap.data, cap.position, cap.chain, 0, b"\0" * 32)


def test_shed_backlog_bars_takeover_until_the_shed_inputs_are_seen_committed() -> None:
    """A warm instance that dropped its unverified outputs (memory bound) must not take
    over before another instance's committed outputs cover the dropped inputs: it would
    emit from after them and leave a gap."""
    log = Log()
    for cmd in random_commands(14, 60):
        log.add_input(cmd)
    primary, warm = Consumer(GROUP), Consumer(GROUP)
    for r in log.records[:40]:
        feed(primary, r)
        feed(warm, r)
    warm.shed_backlog()
    assert warm.promotable_after == 40 and not warm.pending
    assert warm.committed_input < warm.promotable_after  # the shell's campaign condition
    # Whatever the shell does (a promotion that raced the shedding), the consumer itself
    # emits nothing past the inputs whose outputs it never computed.
    feed(warm, log.records[40])
    assert warm.pending and warm.next_append() is None
    feed(primary, log.records[40])
    for r in log.records[41:]:
        feed(primary, r)
        feed(warm, r)
    commit_all(primary, log, warm)
    assert not warm.alarm and warm.committed_input >= warm.promotable_after
    assert warm.chain == primary.chain and not warm.pending


def test_undecodable_input_is_a_deterministic_reject() -> None:
    c = Consumer(GROUP)
    c.on_input(1, "NewOrder", b"\xff garbage", 5)
    (p,) = c.pending
    _, raws = wire.blob_outputs(p.blob)
    assert raws[0][0] == 2 and raws[0][6] == "UNKNOWN_COMMAND"  # Rejected
    assert Engine is not None


def test_fast_command_decoder_agrees_with_the_reference_decoder() -> None:
    """decode_command (compiled per class) accepts and refuses exactly the bytes the
    field-by-field reference decoder does: valid commands, truncations, bad bools,
    trailing bytes, random mutations."""
    from engine.codec import CodecError, decode_command

    assert issubclass(CodecError, ValueError)

    rng = random.Random(3)
    samples = [encode_command(c._replace(ts_ns=0))  # type: ignore[attr-defined]
               for c in random_commands(3, 300)]
    cases = list(samples)
    for b in samples[:100]:
        cases.append(b[:rng.randrange(len(b))])
        cases.append(b + b"\0")
        m = bytearray(b)
        m[rng.randrange(len(m))] = rng.randrange(256)
        cases.append(bytes(m))
    for b in cases:
        try:
            want: object = _decode_generic(b)
        except ValueError:  # CodecError, or a non-ASCII string
            want = "refused"
        try:
            got: object = decode_command(b)
        except CodecError:
            got = "refused"
        assert got == want, b


def test_fused_output_encoder_agrees_with_the_per_event_encoders() -> None:
    """encode_framed (one generated loop over the events) writes exactly the bytes of
    each event's own encoder, framed, for every kind of output the engine makes."""
    from engine.codec import _FRAMED, encode_framed

    eng = Engine()
    tags: set[int] = set()
    for i, cmd in enumerate(random_commands(5, 2000)):
        out: list[tuple] = []
        eng.process(cmd, out)
        head = struct.pack("<qH", i, len(out))
        assert encode_framed(out, head) == head + b"".join(_FRAMED[r[0]](r) for r in out)
        assert encode_framed(out) == b"".join(_FRAMED[r[0]](r) for r in out)
        tags.update(r[0] for r in out)
    assert len(tags) >= 7, sorted(tags)  # the common tags and some of the rest



def _command_cases(seed: int, rng_seed: int) -> list[bytes]:
    """400 seeded well-formed commands' bytes, then per command: truncated, extended by a
    byte, a non-ASCII byte at 9, and 1-3 bytes corrupted."""
    rng = random.Random(rng_seed)
    samples = [encode_command(c._replace(ts_ns=0))  # type: ignore[attr-defined]
               for c in random_commands(seed, 400)]
    cases = list(samples)
    for b in samples:
        cases += [b[:rng.randrange(len(b))], b + b"\0", b[:9] + b"\x80" + b[10:]]
        m = bytearray(b)
        for _ in range(rng.randint(1, 3)):
            m[rng.randrange(len(m))] = rng.choice((0, 1, 2, 0x80, 0xff, rng.randrange(256)))
        cases.append(bytes(m))
    return cases


def test_fast_decoder_answers_as_the_checked_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoders the consumer calls (well-formed bytes read by their length, interned
    symbols and accounts) return the same command, and refuse with the same reason, as
    the checked decoder they fall back to, also while the intern cache is cleared."""
    from engine import codec

    monkeypatch.setattr(codec, "_INTERNED_MAX", 3)  # cleared every few strings
    cases = _command_cases(4, 5)
    checked = {tag: codec._compile_decoder(cls) for tag, cls in enumerate(COMMAND_CLASSES, 1)}

    def answer(decode: object, data: bytes, ts: int | None) -> object:
        try:
            cmd = decode(data, ts)  # type: ignore[operator]
        except CodecError as exc:
            return "refused", str(exc)
        return type(cmd), tuple(cmd), [type(v) for v in cmd]

    for b in cases:
        if b and b[0] in checked:
            for ts in (None, 17):
                assert answer(codec.COMMAND_DECODERS[b[0]], b, ts) == \
                    answer(checked[b[0]], b, ts), b



def test_input_loop_decodes_as_the_python_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """take_inputs (C) gives each input record the command of decode_or_none (the Python
    decoders), None where that is None, for well-formed, truncated, extended and
    corrupted commands, empty data and unknown tags, also while the intern caches are
    cleared; it skips records at or before ``last`` and stops at a control or another
    stream's record, on the store's records (pb.RecordedEvent) as on Rec."""
    from engine import codec
    from xdc.v1 import eventstore_pb2 as pb

    monkeypatch.setattr(codec, "_INTERNED_MAX", 3)  # cleared every few strings
    cases = _command_cases(12, 11)
    samples = cases[:400]
    cases += [b"", b"\0", b"\xff" + samples[0][1:]]

    def shape(cmd: object) -> object:
        return None if cmd is None else (type(cmd), tuple(cmd), [type(v) for v in cmd])  # type: ignore[call-overload]

    ins = wire.input_stream(GROUP)
    for make in (Rec, lambda *a: pb.RecordedEvent(stream=a[0], type=a[1], position=a[2],
                                                  revision=a[3], timestamp_ns=a[4],
                                                  data=a[5])):
        records = [make(ins, "NewOrder", 10 + k, k, 1000 + k, b) for k, b in enumerate(cases)]
        positions, cmds, i = codec.take_inputs(records, 0, ins, 0, wire.CONTROL_TYPES)
        assert i == len(records) and positions == [r.position for r in records]
        assert [shape(c) for c in cmds] == [
            shape(codec.decode_or_none(b, 1000 + k)) for k, b in enumerate(cases)]
        stop = [make(ins, "NewOrder", 5, 0, 1, samples[0]),  # at or before last: skipped
                make(ins, "NewOrder", 6, 0, 1, samples[0]),
                make(ins, "NewOrder", 7, 0, 1, samples[1]),
                make(ins, wire.SWITCHOVER_TYPE, 8, 0, 1, b"{}"),
                make(ins, "NewOrder", 9, 0, 1, samples[2])]
        assert codec.take_inputs(stop, 0, ins, 6, wire.CONTROL_TYPES)[::2] == ([7], 3)
        other = [make(ins, "NewOrder", 9, 0, 1, samples[2]),
                 make(wire.output_stream(GROUP), wire.OUTPUT_TYPE, 10, 0, 1, b"")]
        assert codec.take_inputs(other, 0, ins, 6, wire.CONTROL_TYPES)[::2] == ([9], 1)
        assert codec.take_inputs(other, 1, ins, 6, wire.CONTROL_TYPES)[::2] == ([], 1)


def _field(number: int, value: bytes | int, wire_type: int = 2) -> bytes:
    """One protobuf field's bytes (wire types 0: varint, 1: fixed64, 2: bytes)."""
    out = varint((number << 3) | wire_type)
    if wire_type == 0:
        return out + varint(int(value))
    if wire_type == 1:
        return out + struct.pack("<Q", int(value))
    assert isinstance(value, bytes)
    return out + varint(len(value)) + value


def _odd_batch(rng: random.Random, cmds: list[object], refused: bool) -> bytes:
    """A RecordBatch of the group's inputs and outputs, each record serialized by
    protobuf and then, now and then, given what protobuf parses but a hand-written
    parser may not: unknown fields, a field twice (the last wins), fields in another
    order, metadata, a top-level field that is not a record, a wire type that is not the
    field's; and with ``refused``, in one record, what protobuf refuses: a string that is
    not UTF-8, bytes cut short."""
    spoilt = rng.randrange(len(cmds)) + 1 if refused else 0
    ins, outs = wire.input_stream(GROUP), wire.output_stream(GROUP)
    parts = []
    for i, cmd in enumerate(cmds, 1):
        e = pb.RecordedEvent(id=bytes(16), stream=ins, type=type(cmd).__name__, position=i,
                             timestamp_ns=1000 + i, revision=i,
                             data=encode_command(cmd._replace(ts_ns=0)))  # type: ignore[attr-defined]
        x = rng.random()
        if x < 0.1:
            e.metadata["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        if x < 0.05:
            e.type, e.stream = wire.ACTIVATE_TYPE, outs  # a record of the output stream
        body = e.SerializeToString()
        y = rng.random()
        if y < 0.05:
            body += _field(15, 7, 0) + _field(16, b"x") + _field(17, 9, 1)  # unknown
        elif y < 0.1:
            body = _field(2, b"Nope") + body  # the serialized type comes last: it wins
        elif y < 0.13:
            body += _field(5, b"\x00junk")  # data twice: the junk wins (a reject)
        elif y < 0.16:
            body += _field(8, i + 10_000, 1)  # position twice
        elif y < 0.19:
            body += _field(10, b"\x08" * 7)  # a time as bytes: not the field's wire type
        if i == spoilt:
            body = rng.choice((
                body + _field(3, b"\xff"),  # content type not UTF-8
                body + _field(4, _field(1, b"k") + _field(2, b"\xc3")),  # metadata value
                body + _field(2, b"\xed\xa0\x80"),  # type: a surrogate
                body[:-1]))  # cut short
        parts.append(_field(1, body))
        if rng.random() < 0.03:
            parts.append(_field(2, i, 1))  # a top-level field that is not a record
    return b"".join(parts)


def test_raw_batches_leave_a_consumer_where_parsed_records_do() -> None:
    """``on_raw_batch`` reads what protobuf reads, or leaves the record to protobuf: on
    every batch protobuf parses, it leaves the consumer where ``on_records`` of the
    parsed events does; on one it refuses, it raises (DecodeError or ValueError)."""
    rng = random.Random(27)
    refused = taken = 0
    for k in range(300):
        cmds = random_commands(100 + k, rng.randint(1, 40))
        buf = _odd_batch(rng, cmds, rng.random() < 0.2)
        cut = rng.random() < 0.1
        if cut:
            buf = buf[:rng.randrange(len(buf))]
        raw, parsed = Consumer(GROUP), Consumer(GROUP)
        try:
            events = pb.RecordBatch.FromString(buf).events
        except message.DecodeError:
            refused += 1
            with pytest.raises(message.DecodeError):
                raw.on_raw_batch(buf)
            continue
        taken += 1
        parsed.on_records(events)
        raw.on_raw_batch(buf)
        assert (raw.position, raw.inputs, raw.chain, list(raw.pending), raw.controls,
                raw.alarm) == (parsed.position, parsed.inputs, parsed.chain,
                               list(parsed.pending), parsed.controls, parsed.alarm), k
    assert refused > 30 and taken > 200, (refused, taken)


@pytest.mark.parametrize("case", [
    # helper-78's reproducers: varints upb refuses (a tag over 5 bytes or over
    # UINT32_MAX, a length prefix over 5 bytes; in a record, at the top level, in a
    # metadata entry), which the C loop took.
    "0a20321065786368616e67652e672e696e707574c180808080000100000000000000",
    "8a80808080001b321065786368616e67652e672e696e707574410100000000000000",
    "8080808010000a1b321065786368616e67652e672e696e707574410100000000000000",
    "0a23321065786368616e67652e672e696e7075744101000000000000002206808080801000",
    "0a24321065786368616e67652e672e696e707574410100000000000000220798808080800000",
    "0a203290808080800065786368616e67652e672e696e707574410100000000000000",
    "0a9b8080808000321065786368616e67652e672e696e707574410100000000000000",
    # A top-level group, which protobuf skips and the C loop does not walk.
    "23240a1b321065786368616e67652e672e696e707574410100000000000000",
])
def test_raw_batches_that_only_protobuf_reads_or_refuses(case: str) -> None:
    """Bytes where the C loop and protobuf parse differently: the consumer reads them as
    protobuf does (the C loop stops, protobuf reads the rest) or raises where protobuf
    refuses them, having taken nothing protobuf would not."""
    buf = bytes.fromhex(case)
    raw, parsed = Consumer(GROUP), Consumer(GROUP)
    try:
        events = pb.RecordBatch.FromString(buf).events
    except message.DecodeError:
        with pytest.raises(message.DecodeError):
            raw.on_raw_batch(buf)
        assert raw.inputs == 0 and raw.position == 0
        return
    parsed.on_records(events)
    raw.on_raw_batch(buf)
    assert parsed.inputs == 1
    assert (raw.position, raw.inputs, list(raw.pending)) == (
        parsed.position, parsed.inputs, list(parsed.pending))


def _misframed_outputs(kind: str) -> list[Rec]:
    """Twenty inputs and two committed batches, the first misframed (``kind``)."""
    ins, outs = wire.input_stream(GROUP), wire.output_stream(GROUP)
    inputs = [Rec(ins, type(cmd).__name__, i, 0, 1000 + i,
                  encode_command(cmd._replace(ts_ns=0)))  # type: ignore[attr-defined]
              for i, cmd in enumerate(random_commands(12, 20)[:20], 1)]
    ref = Consumer(GROUP)
    ref.on_records(inputs)
    p = list(ref.pending)
    assert [x.position for x in p] == list(range(1, 21))
    if kind == "beyond":
        # Header says inputs 1..4, but the blobs run to input 5 (chain after 5); the
        # record lies between inputs 4 and 5. The next batch goes on from input 6.
        a = wire.OutputBatch(1, 4, p[4].chain, tuple(x.blob for x in p[:5]))
        b = wire.OutputBatch(6, 20, p[19].chain, tuple(x.blob for x in p[5:]))
    else:  # "extra": a repeated last blob
        a = wire.OutputBatch(1, 4, p[3].chain, (*(x.blob for x in p[:4]), p[3].blob))
        b = wire.OutputBatch(5, 20, p[19].chain, tuple(x.blob for x in p[4:]))
    return [*inputs[:4], Rec(outs, wire.OUTPUT_TYPE, 0, 1, 0, a.encode()), *inputs[4:],
            Rec(outs, wire.OUTPUT_TYPE, 0, 2, 0, b.encode())]


@pytest.mark.parametrize("kind", ["beyond", "extra"])
@pytest.mark.parametrize("how", ["records", "raw"])
def test_deferred_verification_takes_no_output_of_a_later_input(kind: str, how: str) -> None:
    """A committed batch whose blobs run past its header's last input (or repeat one),
    verified after the inputs that follow it were processed, meets no pending output of
    those later inputs: the alarm, the committed input and the pending outputs are
    those of feeding the records one by one (helper-79: a batch running one input past
    its header passed unnoticed)."""
    log = _misframed_outputs(kind)
    one = Consumer(GROUP)
    for r in log:
        one.on_record(r)
    many = Consumer(GROUP)
    if how == "raw":
        many.on_raw_batch(pb.RecordBatch(events=[pb.RecordedEvent(
            stream=r.stream, type=r.type, position=r.position, revision=r.revision,
            timestamp_ns=r.timestamp_ns, data=r.data) for r in log]).SerializeToString())
    else:
        many.on_records(log)
    assert one.alarm
    assert (many.alarm, many.committed_input, many.out_revision, list(many.pending)) == (
        one.alarm, one.committed_input, one.out_revision, list(one.pending))


def test_on_records_leaves_a_consumer_where_one_record_at_a_time_does() -> None:
    """``on_records`` processes each run of commands as one engine batch; its outputs,
    chain, controls, alarms and state equal ``on_record`` fed the same records one by one,
    whatever the runs (controls, undecodable inputs, positions seen before, committed
    outputs and other streams between them), also when catching up under ``trust``."""
    rng = random.Random(8)
    ins, outs = wire.input_stream(GROUP), wire.output_stream(GROUP)
    records: list[Rec] = []
    for i, cmd in enumerate(random_commands(6, 600)):
        pos = len(records) + 1
        records.append(Rec(ins, type(cmd).__name__, pos, 0, 1000 + i,
                            encode_command(cmd._replace(ts_ns=0))))  # type: ignore[attr-defined]
        x = rng.random()
        if x < 0.05:
            records.append(Rec(ins, "NewOrder", pos + 1, 0, 5, b"\x01\x00junk"))
        elif x < 0.08:
            body = rng.choice((b'{"to": "b"}', b"not json"))
            records.append(Rec(ins, rng.choice(wire.CONTROL_TYPES), pos + 1, 0, 0, body))
        elif x < 0.12:
            records.append(Rec(ins, "CancelOrder", rng.randint(1, pos), 0, 0, b""))  # again
            continue
        elif x < 0.15:
            records.append(Rec("exchange.other.input", "NewOrder", pos + 1, 0, 0, b""))
    ref = Consumer(GROUP)
    for r in records:
        ref.on_record(r)
    # The reference's outputs, committed: one batch per few inputs, between the inputs.
    log = list(records)
    for revision, k in enumerate(range(0, len(ref.pending), 5), 1):
        chunk = list(ref.pending)[k:k + 5]
        batch = wire.OutputBatch(chunk[0].position, chunk[-1].position, chunk[-1].chain,
                                 tuple(p.blob for p in chunk))
        at = next(j for j, r in enumerate(log) if r.position == chunk[-1].position) + 1
        log.insert(at + rng.randrange(3), Rec(outs, wire.OUTPUT_TYPE, 0, revision, 0,
                                               batch.encode()))
    trusted = list(ref.pending)[len(ref.pending) // 2]

    def state(c: Consumer) -> tuple:
        return (c.position, c.chain, c.inputs, list(c.pending), c.committed_input,
                c.out_revision, c.alarm, c.hold_after, c.handover_to, c.controls,
                c.capture().data)

    for trust in (False, True):
        one, many = Consumer(GROUP), Consumer(GROUP)
        if trust:
            for c in (one, many):
                c.trust(trusted.position, trusted.chain)
        for r in log:
            one.on_record(r)
        k = 0
        while k < len(log):
            n = rng.choice((1, 2, 5, 40, 300))
            many.on_records(log[k:k + n])
            k += n
        assert state(many) == state(one)
        assert not many.alarm and many.chain == ref.chain and many.inputs > 600


@pytest.mark.parametrize("fault", ["early", "long-early", "tampered"])
def test_on_records_raises_the_alarms_one_record_at_a_time_does(fault: str) -> None:
    """Outputs verified after the commands around them are processed (``on_records``)
    are still checked against the inputs before them in the log: a committed batch that
    comes before its last input, or whose bytes differ, raises the alarm that feeding the
    records one by one raises, whatever the delivered batches."""
    ins, outs = wire.input_stream(GROUP), wire.output_stream(GROUP)
    inputs = [Rec(ins, type(cmd).__name__, i, 0, 1000 + i,
                  encode_command(cmd._replace(ts_ns=0)))  # type: ignore[attr-defined]
              for i, cmd in enumerate(random_commands(12, 80), 1)]
    ref = Consumer(GROUP)
    ref.on_records(inputs)
    pending = list(ref.pending)
    log: list[Rec] = list(inputs)
    for revision, k in enumerate(range(0, len(pending), 4), 1):
        chunk = pending[k:k + 4]
        blobs = [p.blob for p in chunk]
        if fault == "tampered" and k == 20:
            pos, raws = wire.blob_outputs(blobs[1])
            blobs[1] = wire.input_blob(pos, [encode_event(r) for r in raws[:-1]] or [b"\x02"])
        batch = wire.OutputBatch(chunk[0].position, chunk[-1].position, chunk[-1].chain,
                                 tuple(blobs))
        at = next(j for j, r in enumerate(log) if r is inputs[chunk[-1].position - 1]) + 1
        if fault.endswith("early") and k == 20:
            # before its last input (its first with long-early): not knowable yet
            at -= 2 if fault == "early" else 6
        log.insert(at, Rec(outs, wire.OUTPUT_TYPE, 0, revision, 0, batch.encode()))
    one = Consumer(GROUP)
    for r in log:
        one.on_record(r)
    expected = "differ" if fault == "tampered" else "beyond the last input before it"
    assert expected in one.alarm
    rng = random.Random(fault)
    for sizes, raw in itertools.product(((len(log),), (1,), (3, 7), (40,)), (False, True)):
        many = Consumer(GROUP)
        k = 0
        while k < len(log):
            n = rng.choice(sizes)
            if raw:
                many.on_raw_batch(pb.RecordBatch(events=[pb.RecordedEvent(
                    stream=r.stream, type=r.type, position=r.position, revision=r.revision,
                    timestamp_ns=r.timestamp_ns, data=r.data) for r in log[k:k + n]]
                ).SerializeToString())
            else:
                many.on_records(log[k:k + n])
            k += n
        assert (many.alarm, many.position, many.chain, many.committed_input,
                many.out_revision, list(many.pending)) == (
            one.alarm, one.position, one.chain, one.committed_input, one.out_revision,
            list(one.pending))


def test_chained_encoder_agrees_with_outputs_blob_and_chain_next() -> None:
    """encode_chained (one generated loop per batch of inputs) gives each input the blob
    of ``wire.outputs_blob`` and the chain of ``wire.chain_next``, skips inputs without
    outputs and those before ``first``."""
    from engine.codec import encode_chained
    from engine.consumer import Pending

    eng = Engine()
    cmds = random_commands(9, 1500)
    out: list[tuple] = []
    starts: list[int] = []
    eng.process_batch(cmds, out, starts)
    starts.append(len(out))
    positions = [10 + 3 * i for i in range(len(cmds))]
    for first in (0, 1, 700, len(cmds)):
        want: list[Pending] = []
        chain = GENESIS
        for i in range(first, len(cmds)):
            if starts[i] < starts[i + 1]:
                blob = wire.outputs_blob(positions[i], out[starts[i]:starts[i + 1]])
                chain = wire.chain_next(chain, blob)
                want.append(Pending(positions[i], blob, chain))
        got: list[Pending] = []
        assert encode_chained(out, starts, positions, first, GENESIS, got.append,
                              Pending) == chain
        assert got == want and all(type(p) is Pending for p in got)



def test_chained_encoder_frames_odd_events_as_the_python_encoder() -> None:
    """Events that the C loop of encode_chained does not take as they are (an unknown tag,
    a str not ASCII, over 255 characters or of a subclass, an int outside int64 or not an
    int, a tuple too short, a list) get the bytes, or the refusal, of encode_framed; an
    int subclass, a bool and extra fields are taken as struct takes them."""
    import enum

    from engine.codec import encode_chained
    from engine.consumer import Pending

    class Sub(str):
        pass

    class Kind(enum.IntEnum):
        TWO = 2

    acc = (ev.ACCEPTED, "BTC-USD", 7, "acct1", "c1", 1, 0, 0, 100, 5, 123)
    def at(i: int, v: object) -> tuple:
        return (*acc[:i], v, *acc[i + 1:])

    odd = [
        (200, "x"), at(0, True), at(1, "BTC-\u00e9"), at(3, "a" * 255), at(3, "a" * 256),
        at(4, Sub("c9")), at(2, 2**63), at(2, -2**63), at(2, 2**63 - 1), at(5, True),
        at(5, Kind.TWO), at(5, 1.0), at(5, None), at(3, None), acc[:6], (*acc, "extra", 9),
        list(acc), (ev.BOOK, "BTC-USD", 1, 100, 5), (),
    ]
    for k, event in enumerate(odd):
        raws = [acc, event, acc]
        try:
            want: object = wire.outputs_blob(5, raws)
        except Exception as exc:  # the refusal is what is compared
            want = type(exc)
        got: list[Pending] = []
        try:
            chain: object = encode_chained([acc, *raws], [0, 1, 4], [4, 5], 0, GENESIS,
                                           got.append, Pending)
        except Exception as exc:
            chain = type(exc)
        first = Pending(4, wire.outputs_blob(4, [acc]),
                        wire.chain_next(GENESIS, wire.outputs_blob(4, [acc])))
        if isinstance(want, type):
            assert chain is want and got == [first], (k, event, chain, want)
        else:
            assert got == [first, Pending(5, want, wire.chain_next(first.chain, want))], (
                k, event)
            assert chain == got[-1].chain


def test_chained_encoder_refuses_starts_it_cannot_read() -> None:
    """encode_chained reads raws and positions only inside the lists (a crash before: the
    C loop read raws[start] for a negative start, and positions[i] after a start's
    __index__ had emptied positions); such starts are refused with IndexError. The
    consumer's starts (process_batch's) are ints from 0 up."""
    from engine.codec import encode_chained
    from engine.consumer import Pending

    acc = (ev.ACCEPTED, "BTC-USD", 7, "acct1", "c1", 1, 0, 0, 100, 5, 123)
    got: list[Pending] = []
    far = -(1 << 40)  # far before the list's items: unmapped memory
    with pytest.raises(IndexError):
        encode_chained([acc], [far, far + 1], [4], 0, GENESIS, got.append, Pending)
    assert encode_chained([acc], [-1, -1], [4], 0, GENESIS, got.append, Pending) == GENESIS

    positions = [4]

    class Emptying:
        def __index__(self) -> int:
            positions.clear()
            return 1

    with pytest.raises(IndexError):
        encode_chained([acc], [0, Emptying()], positions, 0, GENESIS, got.append, Pending)
    assert got == []


_Q1 = struct.Struct("<q")
_B1 = struct.Struct("<B")


def _decode_generic(data: bytes) -> object:
    """The reference: one field at a time, as the encoder writes them."""
    if not data or not 1 <= data[0] <= len(COMMAND_CLASSES):
        raise CodecError("unknown command tag")
    cls = COMMAND_CLASSES[data[0] - 1]
    r = _Reader(data)
    r.pos = 1
    values: list[object] = []
    for _, typ in _CMD_FIELDS[cls]:
        if typ == "str":
            values.append(r.str())
        elif typ == "bool":
            (b,) = r.take(_B1)
            if b > 1:
                raise CodecError("bad bool")
            values.append(bool(b))
        else:
            values.append(r.take(_Q1)[0])
    if r.pos != len(data):
        raise CodecError("trailing bytes")
    return cls(*values)

