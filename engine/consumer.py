"""The deterministic consumer of one engine group, as a pure state machine (DESIGN §2, §5).

No I/O here: the shell (``engine.runner``) feeds it the group's records in log order —
input commands, controls and the committed output batches — and asks it for output
batches to append when it is the primary. Everything it decides depends only on those
records, so every instance fed the same log is in the same state, and tests can drive
it without a store.

State kept per instance:

* the engine (books and accounts) after input ``position``, and the chain hash of all
  outputs up to it;
* ``pending``: outputs computed for inputs whose committed outputs have not been seen
  yet, oldest first. A warm instance checks each committed batch against them (same
  inputs, same bytes, same chain) and raises an alarm on any difference; a primary
  appends them;
* ``committed_input``: the last input whose outputs are known committed, and
  ``out_revision``: the output stream's last revision seen;
* emission (primary): one output append in flight at most, with the exact expected
  revision ``max(out_revision, last revision this generation appended)``, so only one
  writer's batches can land. Never two: if the first were refused because another
  writer's batch took its revision, the second's expected revision would match and
  land it after a batch covering other inputs (a gap or a repeat). An append carries
  up to MAX_APPEND_BATCHES consecutive batches (one event each, written atomically), so
  a backlog drains that many batches per round trip. Answers of an older generation
  (before a refusal, a demotion, a promotion) change nothing.

Output format versions: an activation input (``wire.ACTIVATE_TYPE``) switches the engine's
output version at its position (``_activate``), as a function of the log alone like
everything else here. ``output_versions`` are the versions this instance may switch to:
one that meets an activation of any other raises its alarm there, so it emits no output
of an input after it (a primary demotes, a warm instance never takes over), and so does
one restored from a snapshot of an engine at another version.

Takeover is therefore exact with no extra protocol: a new primary appends exactly its
pending outputs, which start right after the last committed input, and a stale primary's
append fails its expected revision. An output batch never contains an input twice and
batches of one writer are consecutive, so "no gap, no duplicate" is checked here too
(``on_output`` asserts it and alarms when the log shows otherwise).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from engine import wire
from engine.book import Engine
from engine.codec import (
    GENESIS,
    CodecError,
    decode_or_none,
    encode_chained,
    record_frame,
    restore,
    snapshot_bytes,
    state_hash,
    take_inputs,
    take_raw_inputs,
)
from engine.constants import OUTPUT_VERSIONS
from xdc.v1 import eventstore_pb2 as pb

# Limits: outputs waiting for their commit (a primary stops taking inputs past this, a
# warm instance that lags the primary this much is alarmed), inputs per output batch.
MAX_PENDING_INPUTS = 200_000
MAX_BATCH_INPUTS = 4_096
MAX_BATCH_BYTES = 512 * 1024
# Output batches in one append: at most 4 MiB of events, well under the store's default
# max_append_bytes (16 MiB). With one batch per append, the outputs of a burst drained
# at one ~512 KiB batch per round trip after the last input was processed (~0.12 s of
# a 100k-order burst's 1.2 s in `xdc bench engine`).
MAX_APPEND_BATCHES = 8
# A batch's event beside its blobs (header, id, type, metadata) is at most this plus
# the instance name and group: measured by ``envelope_bytes``. The slack covers the
# varint of the data's length.
_ENVELOPE_SLACK = 16
_WIDEST_TRACEPARENT = f"00-{'f' * 32}-{'f' * 16}-ff"  # a W3C traceparent is 55 characters


def envelope_bytes(group: str, writer: str) -> int:
    """Bytes of an output batch's event beyond its blobs, at most (widest numbers, and
    the traceparent a traced engine puts in its metadata)."""
    widest = wire.OutputBatch(2**63 - 1, 2**63 - 1, b"\xff" * 32, ())
    return len(widest.event(group, writer, _WIDEST_TRACEPARENT).SerializeToString()) \
        + _ENVELOPE_SLACK


def _versions(versions: tuple[int, ...]) -> str:
    return ", ".join(map(str, versions))


class RecordLike(Protocol):
    """What ``on_record`` reads of a RecordedEvent."""

    stream: str
    type: str
    position: int
    revision: int
    timestamp_ns: int
    data: bytes


class Pending(NamedTuple):
    """One input's outputs awaiting their commit (a tuple: one is built per input)."""

    position: int
    blob: bytes
    chain: bytes  # chain after this input


# One Pending is built per input, by encode_chained as ``tuple.__new__`` builds one
# (``Pending(...)`` goes through namedtuple's Python-level __new__).


@dataclass(frozen=True, slots=True)
class Control:
    """A control input the shell acts on (switchover, snapshot request), at ``position``."""

    kind: str
    position: int
    body: dict[str, str]


@dataclass(frozen=True, slots=True)
class Capture:
    """A snapshot taken right after input ``position``: written to the store once every
    output up to ``position`` is committed (a snapshot ahead of its outputs would make a
    restored primary skip them)."""

    position: int
    data: bytes
    state_hash: bytes
    chain: bytes
    out_revision: int
    wait_for: int  # writable once outputs are committed through this input (0: now)
    # (the engine's output version, the position of the activation that put it in force:
    # Consumer.version_at); None when unknown or when the instance alarms.
    in_force: tuple[int, int] | None


_CONTROL_TYPE_BYTES = tuple(t.encode() for t in wire.CONTROL_TYPES)
_OUTPUT_TYPE_BYTES = wire.OUTPUT_TYPE.encode()
# What an input loop takes: positions, commands, deferred outputs, where it stopped.
_Taken = tuple[list[int], list[object], list[tuple[int, int, bytes]], int]


def _listed_record(items: list[RecordLike], i: int) -> tuple[RecordLike, int]:
    return items[i], i + 1


def _raw_record(buf: bytes, i: int) -> tuple[RecordLike | list[RecordLike] | None, int]:
    """The record of the RecordBatch bytes at or after byte ``i``, parsed by protobuf
    (DecodeError for what is not a record), and the offset after it; None at the end.
    Where ``record_frame`` does not walk the batch (a top-level group, bytes that are
    not protobuf), protobuf parses the rest: all its records (or DecodeError)."""
    try:
        frame = record_frame(buf, i)
    except ValueError:
        return list(pb.RecordBatch.FromString(buf[i:]).events), len(buf)
    if frame is None:
        return None, len(buf)
    return pb.RecordedEvent.FromString(buf[frame[0]:frame[1]]), frame[1]


@dataclass(slots=True)
class Consumer:
    group: str
    engine: Engine = field(default_factory=Engine)
    position: int = 0  # last input processed (global log position)
    chain: bytes = GENESIS
    base_position: int = 0  # inputs up to here came from a snapshot, not from replay
    # Inputs up to here are replayed for the state alone (``trust``): their outputs are
    # committed, and the chain after this input is the committed batch's.
    trusted_through: int = 0
    _trusted_chain: bytes = b""
    committed_input: int = 0
    out_revision: int = 0
    alarm: str = ""
    # A planned switchover marker at this input: nothing after it is emitted until the
    # shell of the instance that takes over calls ``release_hold`` (stop, marker, resume).
    hold_after: int = 0
    # Outputs of inputs up to here were never computed by this instance (backlog shed):
    # it may take over only once it has seen them committed by another instance.
    promotable_after: int = 0
    handover_to: str = ""
    # The position of the activation that put the engine's output version in force: 0
    # for version 1, None when unknown (restored from a snapshot that did not say).
    version_at: int | None = 0
    inputs: int = 0  # inputs processed by this instance
    pending: collections.deque[Pending] = field(default_factory=collections.deque)
    controls: list[Control] = field(default_factory=list)
    # The first ``_sent`` pending entries were handed to the shell to append (and are not
    # seen committed yet); the next batch starts after them.
    _sent: int = 0
    generation: int = 0  # of emission: bumped by every rewind
    inflight: int | None = None  # expected revision of the output append in flight
    inflight_batches: int = 0  # its batches: it lands at revisions inflight + 1..
    appended_through: int = 0  # last output revision appended in this generation
    resync_to: int = 0  # emit again once out_revision has reached this
    # What one output batch (one event) and one append may hold: the defaults above, cut
    # to what the store accepts (``fit_store``).
    batch_bytes: int = MAX_BATCH_BYTES
    append_batches: int = MAX_APPEND_BATCHES
    # Why emission is held (an input's outputs that no event the store accepts can
    # hold): an operator raises the store's limit; empty while emitting.
    emit_blocked: str = ""
    # The output format versions this instance may be activated to (engine.wire).
    output_versions: tuple[int, ...] = OUTPUT_VERSIONS
    _out: list[tuple] = field(default_factory=list)
    _input_stream: str = field(init=False, default="")
    _input_stream_bytes: bytes = field(init=False, default=b"")
    _output_stream: str = field(init=False, default="")
    _output_stream_bytes: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        assert 1 in self.output_versions and set(self.output_versions) <= set(
            OUTPUT_VERSIONS), f"output versions {self.output_versions} of {OUTPUT_VERSIONS}"
        self._input_stream = wire.input_stream(self.group)
        self._input_stream_bytes = self._input_stream.encode()
        self._output_stream = wire.output_stream(self.group)
        self._output_stream_bytes = self._output_stream.encode()

    @classmethod
    def from_snapshot(cls, group: str, data: bytes, position: int, chain: bytes,
                      out_revision: int, expected_hash: bytes | None = None,
                      output_versions: tuple[int, ...] = OUTPUT_VERSIONS,
                      in_force: tuple[int, int] | None = None) -> Consumer:
        """The consumer restored from a snapshot taken after input ``position``;
        ``in_force``: what the snapshot says of its output version (Capture.in_force),
        which must be the restored engine's to be believed."""
        # The state hash is that of the canonical bytes: bytes that are not the ones
        # hashed are not restored at all.
        if expected_hash is not None and hashlib.sha256(data).digest() != expected_hash:
            raise CodecError(f"snapshot at input {position}: its bytes do not have its "
                             f"state hash")
        engine = restore(data)
        if expected_hash is not None and state_hash(engine) != expected_hash:
            raise CodecError(f"snapshot at input {position}: state hash mismatch after restore")
        version_at = None
        if engine.output_version == 1:
            version_at = 0
        elif in_force is not None and in_force[0] == engine.output_version:
            version_at = in_force[1]
        c = cls(group, engine, position=position, chain=chain, base_position=position,
                committed_input=position, out_revision=out_revision,
                output_versions=output_versions, version_at=version_at)
        if engine.output_version not in output_versions:
            c.alarm = (f"the snapshot at input {position} is of an engine at output version "
                       f"{engine.output_version}; this instance supports output versions "
                       f"{_versions(output_versions)}: it emits nothing")
        return c

    def on_records(self, records: Iterable[RecordLike]) -> None:
        """``on_record`` for each record of a delivered batch (the shell's hot loop).

        The commands between two control inputs are decoded by ``take_inputs`` (C) and
        processed as one batch (``_process``: one engine call, then its outputs by
        input), and the committed outputs among them are verified after it, each against
        the inputs before it in the log (``through``). The consumer then stands exactly
        where ``on_record`` one by one leaves it: a verification reads only the pending
        outputs of inputs up to its batch's last, which later inputs leave as they are.
        In a log written at a modest rate a few inputs at a time are followed by their
        outputs: an engine call per such run replayed ~11% fewer inputs/s (the bench's
        latency runs: 2.3 inputs a run)."""
        items = records if type(records) is list else list(records)
        self._take_all(items, 0, len(items), self._take_listed, _listed_record)

    def on_raw_batch(self, buf: bytes, start: int = 0) -> None:
        """``on_records`` for the records of a serialized RecordBatch, ``buf`` from byte
        ``start`` (a Subscribe answer's bytes: store.client.RawBatch), read where they lie
        by ``take_raw_inputs``; a record it does not take is parsed by protobuf and goes
        to ``on_record``. Raises protobuf's DecodeError where protobuf refuses the bytes;
        the consumer then stands after a prefix of the records before them (those up to
        the last control input or record protobuf read)."""
        self._take_all(buf, start, len(buf), self._take_raw, _raw_record)

    def _take_listed(self, items: list[RecordLike], i: int, last: int) -> _Taken:
        positions, cmds, i = take_inputs(items, i, self._input_stream, last,
                                         wire.CONTROL_TYPES)
        return positions, cmds, [], i

    def _take_raw(self, buf: bytes, i: int, last: int) -> _Taken:
        return take_raw_inputs(buf, i, self._input_stream_bytes, last, _CONTROL_TYPE_BYTES,
                               self._output_stream_bytes, _OUTPUT_TYPE_BYTES)

    def _take_all(self, src: list[RecordLike] | bytes, i: int, n: int,
                  take: Callable[[Any, int, int], _Taken],
                  record: Callable[[Any, int], tuple[Any, int]]) -> None:
        input_stream, output_stream = self._input_stream, self._output_stream
        output_type = wire.OUTPUT_TYPE
        positions: list[int] = []
        cmds: list[object] = []
        # Committed outputs, deferred: (the last input before each, revision, data).
        outputs: list[tuple[int, int, bytes]] = []
        last = self.position
        while i < n:
            more, taken, found, i = take(src, i, last)
            if taken:
                positions += more
                cmds += taken
                last = more[-1]
            if found:
                outputs += found
            if i >= n:
                break
            e, i = record(src, i)
            if e is None:
                break
            if type(e) is list:  # raw bytes only protobuf reads: the rest, as it parsed it
                self._take_effect(positions, cmds, outputs)
                positions, cmds, outputs = [], [], []
                self.on_records(e)
                last = self.position
                continue
            if e.stream == output_stream:
                if e.type == output_type:
                    outputs.append((last, e.revision, e.data))
            elif e.stream == input_stream:
                # A control input (or, read raw, an input the C loop did not take): what
                # came before it first.
                self._take_effect(positions, cmds, outputs)
                positions, cmds, outputs = [], [], []
                self.on_record(e)
                last = self.position
        self._take_effect(positions, cmds, outputs)

    def _take_effect(self, positions: list[int], cmds: list[object],
                     outputs: list[tuple[int, int, bytes]]) -> None:
        if cmds:
            self._process(positions, cmds)
        for through, revision, data in outputs:
            self.on_output_data(revision, data, through)

    def on_record(self, e: RecordLike) -> None:
        """One record of the group's subscription, in log order: an input (command or
        control) or a committed output batch. Other records are not the group's."""
        if e.stream == self._input_stream:
            self.on_input(e.position, e.type, e.data, e.timestamp_ns)
        elif e.stream == self._output_stream and e.type == wire.OUTPUT_TYPE:
            self.on_output_data(e.revision, e.data)

    # ---------------------------------------------------------------- inputs

    def on_input(self, position: int, kind: str, data: bytes, ts_ns: int) -> None:
        """One input event of the group's input stream, in log order."""
        if position <= self.position:
            return  # already in the snapshot or already processed (a resumed stream)
        if kind in wire.CONTROL_TYPES:
            self.position = position
            self.inputs += 1
            if kind == wire.ACTIVATE_TYPE:
                self.controls.append(self._activate(position, data))
                return
            body = wire.json_object(data)
            control = Control(kind, position, {str(k): str(v) for k, v in body.items()})
            if kind == wire.SWITCHOVER_TYPE:
                self.hold_after, self.handover_to = position, control.body.get("to", "")
            self.controls.append(control)
            return
        # The record's time is the command's; None (not a command) becomes a reject.
        self._process([position], [decode_or_none(data, ts_ns)])

    def _activate(self, position: int, data: bytes) -> Control:
        """The activation input at ``position``: the engine emits the output version it
        names from the next input on, if that is newer than the one in force and this
        instance supports it; the alarm if it is newer and not supported. The returned
        control tells the shell what came of it (``outcome``)."""
        version = wire.parse_activation(data)
        current = self.engine.output_version
        if version is None:
            outcome = "unreadable: nothing changes"
        elif version <= current:
            outcome = f"output version {current} in force: nothing changes"
        elif version not in self.output_versions:
            outcome = "not supported: alarm"
            self.alarm = self.alarm or (
                f"input {position} activates output version {version}; this instance "
                f"supports output versions {_versions(self.output_versions)}: it emits no "
                f"output of any input after it")
        else:
            self.engine.set_output_version(version)
            self.version_at = position
            outcome = "activated"
        return Control(wire.ACTIVATE_TYPE, position,
                       {"output_version": str(version or ""), "outcome": outcome})

    def _process(self, positions: list[int], cmds: list[object]) -> None:
        """Commands (None: undecodable) of consecutive new inputs at ``positions``,
        increasing: one ``process_batch`` for all, then each input's outputs (if any)
        become its blob, chained and pending, as one ``process`` per input would."""
        self.position = positions[-1]
        self.inputs += len(positions)
        out = self._out
        out.clear()
        starts: list[int] = []
        self.engine.process_batch(cmds, out, starts)
        starts.append(len(out))
        first = 0
        trusted = self.trusted_through
        if positions[0] <= trusted:
            # Replayed for the state alone, up to the trusted input (which sets the chain).
            first = bisect.bisect_right(positions, trusted)
            if positions[first - 1] == trusted:
                self.chain = self._trusted_chain
        self.chain = encode_chained(out, starts, positions, first, self.chain,
                                    self.pending.append, Pending)

    # ---------------------------------------------------------------- committed outputs

    def on_output_data(self, revision: int, data: bytes, through: int | None = None) -> None:
        """A committed output event's payload, in log order. The usual batch, exactly the
        next pending outputs (this instance's own, or the primary's that a warm instance
        computed too), is verified with one comparison of its bytes; any other is decoded
        and checked blob by blob by ``on_output``, which names the difference.
        ``through``: the last input before it in the log (default: the last processed;
        ``on_records`` processes the inputs after it first)."""
        if through is None:
            through = self.position
        try:
            if revision > self.out_revision and self.base_position:
                last = wire.output_header(data)[1]
                if last <= self.base_position:
                    # Outputs of inputs restored or trusted, not computed here: on_output
                    # would only advance past them; its header is all there is to read.
                    self.out_revision = revision
                    self.committed_input = max(self.committed_input, last)
                    return
            if not self._verify_whole(revision, data, through):
                self.on_output(revision, wire.decode_output(data), through)
        except CodecError as exc:
            self.alarm = self.alarm or f"output revision {revision} undecodable: {exc}"

    def _verify_whole(self, revision: int, data: bytes, through: int) -> bool:
        """``on_output`` for a batch that it would verify with no divergence, in one byte
        comparison; False (nothing changed) for any other batch."""
        if revision <= self.out_revision or self.alarm:
            return False
        first, last, chain, n = wire.output_header(data)
        pending = self.pending
        if not (0 < n <= len(pending) and self.base_position < first and last <= through
                and (first > self.committed_input
                     or self.committed_input <= self.base_position)):
            return False
        tail = pending[n - 1]
        if tail.position > last or tail.chain != chain or (
                n < len(pending) and pending[n].position <= last):
            return False
        mine = b"".join([p.blob for p in itertools.islice(pending, n)])
        if len(data) - wire.OUT_HEAD_SIZE != len(mine) or not data.endswith(mine):
            return False
        for _ in range(n):
            pending.popleft()
        self._sent = max(0, self._sent - n)
        self.out_revision = revision
        self.committed_input = last
        return True

    def on_output(self, revision: int, batch: wire.OutputBatch,
                  through: int | None = None) -> None:
        """A committed output batch (revision of the output stream), in log order. It
        always follows its inputs in the log, so its outputs were computed already: a
        batch of inputs after ``through`` (the last input before it in the log; default,
        the last processed) is a divergence."""
        if through is None:
            through = self.position
        if revision <= self.out_revision:
            return
        self.out_revision = revision
        if self.alarm or batch.last_input <= self.base_position:
            self.committed_input = max(self.committed_input, batch.last_input)
            return
        # After a restore, the first batch may straddle the snapshot's input.
        if batch.first_input <= self.committed_input and self.committed_input > self.base_position:
            return self._diverged(f"output revision {revision} repeats inputs from "
                                  f"{batch.first_input} (outputs committed through input "
                                  f"{self.committed_input})")
        if batch.last_input > through:
            return self._diverged(f"output revision {revision} covers input "
                                  f"{batch.last_input}, beyond the last input before it "
                                  f"{through}")
        verified: Pending | None = None
        for blob in batch.blobs:
            pos = wire.blob_position(blob)
            if pos <= self.base_position:
                continue
            mine = self._pop(through)
            if mine is None or mine.position != pos or mine.blob != blob:
                what = "nothing" if mine is None else f"input {mine.position}'s"
                return self._diverged(f"output revision {revision}: the committed outputs "
                                      f"of input {pos} differ from this instance's ({what})")
            verified = mine
        if self.pending and self.pending[0].position <= batch.last_input:
            return self._diverged(f"output revision {revision} lacks the outputs of input "
                                  f"{self.pending[0].position}")
        if verified is not None and verified.chain != batch.chain:
            return self._diverged(f"output revision {revision}: chain hash differs after "
                                  f"input {batch.last_input}")
        self.committed_input = batch.last_input

    def _pop(self, through: int) -> Pending | None:
        """The next pending output if its input is at or before ``through`` (the last
        input before the committed batch in the log: ``on_records`` may have processed
        later ones already, whose outputs a batch before them cannot hold), else None."""
        if not self.pending or self.pending[0].position > through:
            return None
        self._sent = max(0, self._sent - 1)
        return self.pending.popleft()

    def _diverged(self, alarm: str) -> None:
        """A warm check failed: this instance never emits or takes over from now on (the
        shell reports the alarm); it keeps following the log for diagnosis."""
        self.alarm = alarm

    # ---------------------------------------------------------------- emission

    def fit_store(self, max_event_bytes: int, max_append_events: int, max_append_bytes: int,
                  writer: str) -> int:
        """Sizes output batches and appends to what the store refuses past (its NodeInfo
        limits; 0 is unknown: no cut), so that no append is refused for its size. Returns
        the most bytes an output event may then take."""
        envelope = envelope_bytes(self.group, writer)
        per_event = MAX_BATCH_BYTES + envelope
        if max_event_bytes:
            per_event = min(per_event, max_event_bytes)
        batches = MAX_APPEND_BATCHES
        if max_append_events:
            batches = min(batches, max_append_events)
        if max_append_bytes:
            batches = min(batches, max_append_bytes // per_event)
        self.batch_bytes = max(1, per_event - envelope)
        self.append_batches = max(1, batches)
        return per_event

    def _next_batches(self, limit: int) -> list[wire.OutputBatch]:
        """Up to ``limit`` consecutive next batches, cut in one pass over the pending
        outputs (a pass per batch would walk past the ones already cut each time)."""
        assert not self.alarm, "a diverged instance never emits"
        assert limit >= 1
        self.emit_blocked = ""
        out: list[wire.OutputBatch] = []
        blobs: list[bytes] = []
        size = 0
        last = Pending(0, b"", b"")  # the last pending output in blobs, once there is one
        hold = self.hold_after
        cap = self.batch_bytes
        for p in itertools.islice(self.pending, self._sent, None):
            if hold and p.position > hold:
                break
            if blobs and (len(blobs) >= MAX_BATCH_INPUTS or size + len(p.blob) > cap):
                out.append(self._cut(blobs, last))
                blobs, size = [], 0
                if len(out) == limit:
                    break
            if len(p.blob) > cap:
                # Alone in a batch it would still be refused: hold emission here.
                self.emit_blocked = (
                    f"outputs of input {p.position} take {len(p.blob)} bytes, over the "
                    f"{cap} an output event may hold under the store's max_event_bytes: "
                    "raise that limit")
                break
            blobs.append(p.blob)
            size += len(p.blob)
            last = p
        if blobs:
            out.append(self._cut(blobs, last))
        return out

    def _cut(self, blobs: list[bytes], last: Pending) -> wire.OutputBatch:
        self._sent += len(blobs)
        return wire.OutputBatch(wire.blob_position(blobs[0]), last.position, last.chain,
                                tuple(blobs))

    def release_hold(self) -> None:
        self.hold_after, self.handover_to = 0, ""

    def handed_over(self) -> bool:
        """True once every output up to the switchover marker is committed."""
        return bool(self.hold_after) and (
            not self.pending or self.pending[0].position > self.hold_after)

    def trust(self, through: int, chain: bytes) -> None:
        """Catch up to input ``through`` for the state alone: its outputs and those of
        the inputs before it are committed (a committed batch ends at ``through`` with
        chain ``chain``), so they are neither computed nor checked, as a restore from a
        snapshot at ``through`` would not. Replaying a command costs half as much without
        its outputs (decode and match only). The shell verifies a window of recent
        inputs before ``through`` as usual (engine.runner: ``verify_window``)."""
        assert through > self.position and not self.pending, "trust before any replay"
        self.trusted_through = self.base_position = through
        self._trusted_chain = chain

    def shed_backlog(self) -> None:
        """Drop unverified outputs to bound memory when no primary has emitted for a
        long time; this instance then stays out of the race for the lease (see
        ``promotable_after``)."""
        self.pending.clear()
        self._sent = 0
        self.base_position = self.promotable_after = self.position

    def rewind_emission(self) -> None:
        """A new generation of emission (an append refused or in doubt, a promotion, a
        demotion): what was handed out but is not seen committed is emitted again, and
        the answer of the append in flight, whenever it comes, changes nothing."""
        self._sent = 0
        self.generation += 1
        self.inflight = None
        self.inflight_batches = 0
        self.appended_through = 0

    def next_append(self) -> tuple[int, int, list[wire.OutputBatch]] | None:
        """(generation, exact expected revision, batches) of the next output append, or
        None while one is in flight, while resyncing, or with nothing to emit. The
        batches (at most MAX_APPEND_BATCHES, consecutive) are one event each, appended
        together."""
        if (self.alarm or self.inflight is not None or self.out_revision < self.resync_to
                or self.committed_input < self.promotable_after):
            # (The last: the outputs of a shed backlog were never computed here; emitting
            # what follows them would leave a gap.)
            return None
        batches = self._next_batches(self.append_batches)
        if not batches:
            return None
        self.inflight = max(self.out_revision, self.appended_through)
        self.inflight_batches = len(batches)
        return self.generation, self.inflight, batches

    def on_appended(self, generation: int, last_revision: int) -> bool:
        """The append of ``generation`` landed through ``last_revision``. True when that
        is further on than its batches (a resync follows), else False."""
        if generation != self.generation:
            return False
        assert self.inflight is not None
        landed = self.inflight + self.inflight_batches
        assert last_revision >= landed, (
            f"append of {self.inflight_batches} batches expected at {self.inflight} "
            f"landed through revision {last_revision}")
        if last_revision > landed:
            # The store answered an exact retry: these very batches (same bytes, this
            # instance's name) were appended before, further on than this instance has
            # seen: by its previous incarnation, when it emits before its subscription
            # shows that one's last append (the fault simulation of tests/test_consumer.py
            # reaches it after restores from snapshots; the runner emits only once caught
            # up). They are committed: catch up with the stream up to them (they are then
            # verified as the others) and go on.
            self.rewind_emission()
            self.resync_to = max(self.resync_to, last_revision)
            return True
        self.inflight = None
        self.inflight_batches = 0
        self.appended_through = last_revision
        return False

    def on_refused(self, generation: int, actual_last_revision: int = 0,
                   already_exists: bool = False) -> None:
        """The append was refused, or its outcome is unknown (no revision known: 0).
        Emission resumes from the last committed input once the subscription has shown
        the stream up to what the store reported, so new outputs are verified first."""
        if generation != self.generation:
            return
        assert self.inflight is not None
        expected = self.inflight
        self.rewind_emission()
        if already_exists:
            # Another primary's batch from the same first input is in the stream, past
            # the expected revision: emitting at once would be refused the same way.
            actual_last_revision = expected + 1
        self.resync_to = max(self.resync_to, actual_last_revision)

    @property
    def resyncing(self) -> bool:
        return self.out_revision < self.resync_to

    def reconcile(self, last_revision: int, seen_through: bool) -> str:
        """Emission has waited long for the output stream to reach ``resync_to``; the
        store now reports the stream's last revision, and ``seen_through`` says whether
        the subscription has delivered every record up to that last one. Returns what
        was wrong ("" if nothing, or if the wait should go on).

        * The stream ends before ``resync_to``: the revision a refusal named was never
          committed (a leader's uncommitted tail, lost in a failover). Waiting for it
          would hold emission for good; wait for the stream's real end instead.
        * Everything up to its end was delivered, yet ``out_revision`` is short of it:
          the stream's last events are not output batches (the subscription delivers
          every one), so they hold no outputs to verify; emission goes on after them.

        Safe because every append still names the exact revision it expects: a wrong
        view costs a refusal, never a gap or a repeat."""
        if not self.resyncing:
            return ""
        if last_revision < self.resync_to:
            named, self.resync_to = self.resync_to, max(self.out_revision, last_revision)
            return (f"revision {named} named by a refusal is not in the output stream "
                    f"(it ends at {last_revision})")
        if seen_through:
            skipped = f"{self.out_revision + 1}..{last_revision}"
            self.out_revision = last_revision
            return f"output stream revisions {skipped} hold no output batch"
        return ""

    # ---------------------------------------------------------------- snapshots

    def capture(self) -> Capture:
        data = snapshot_bytes(self.engine)
        return Capture(self.position, data, hashlib.sha256(data).digest(), self.chain,
                       self.out_revision, self.pending[-1].position if self.pending else 0,
                       None if self.alarm or self.version_at is None
                       else (self.engine.output_version, self.version_at))

    @property
    def backlog(self) -> int:
        return len(self.pending)
