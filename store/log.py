"""The LMDB log of one node (DESIGN §3).

Named databases:
- `log`: 8-byte big-endian position -> framed record (store/records.py);
- `streams`: stream name -> (last revision, first position, last position);
- `stream_index`: stream name + NUL + 8-byte revision -> (position, count). One entry
  per *run*: events of one append get consecutive revisions at consecutive positions,
  so a run indexes a whole append (and consecutive appends of one group commit) with
  one put instead of one per event. A revision is found by seeking to the greatest
  key <= (stream, revision);
- `ids`: 16-byte event id -> 8-byte position (durable idempotency). New ids that are
  not time-ordered wait in memory (store/recent_ids.py) and enter it a key slice at a
  time; `meta`'s `ids_through` says up to where every record's id is in it or in
  `id_runs`, and an open refills the memory from the records after that;
- `id_runs`: last id of a run -> its first id, first position and count (`_ID_RUN`),
  the other half of durable idempotency. A run is records at consecutive positions
  whose UUIDv7 ids share their first 12 bytes and increase: a producer's ids of one
  millisecond (store/client.py new_id); a write cuts its spans into runs where the
  prefix changes or the ids stop increasing, so leader and follower index the same
  records alike. One put indexes the run, not one per id (the second put per event was
  what kept batched ingest under half the LMDB ceiling), and a look-up seeks the run
  with the least last id >= the id, then searches its records. Runs never overlap as id
  intervals, which that seek needs: ids a new run would overlap go to `ids`, one entry
  each, as do stretches of one id (a truncation may leave a run of one in `id_runs`);
- `meta`: cluster id, node id, promised term, commit position, schema version,
  `ids_through` (absent in a log written before it existed: every id is indexed); for a
  cluster member also `cluster` (the name of the cluster it joined: a directory without
  it is new, or lost its former content), `rejoin_term` (a voter that lost its disk
  and has not caught up yet, geo/replication/core.py), both absent otherwise, and
  `promised_to` (the member the promised term was promised to, Raft's votedFor; "" when
  promised to nobody known yet, as a wiped voter's fence; absent in a log written before
  it existed, which promised its term to a member it did not record: it reads as
  PROMISED_TO_UNKNOWN).

Only the writer thread calls the `append_*` and `write_*` methods; readers open their
own read transactions. Positions are dense from 1; revisions are dense from 1 per
stream; a stream with no event has last revision 0.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import os
import shutil
import struct
import uuid
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc
import lmdb

from store import _speedups, records
from store.errors import StoreError, wrong_revision
from store.recent_ids import RecentIds
from xdc.v1 import eventstore_pb2 as pb

# 2: `id_runs`. A log of version 1 is upgraded on open (it has no runs: nothing to do
# but record the version); a version-1 binary refuses a version-2 log, whose runs it
# would not look in (it would take retried appends for new ones).
SCHEMA_VERSION = 2
UPGRADES_FROM = (1,)
# `promised_to` of a log that promised a term before the key existed: to a member it did
# not record. No member id matches it (ids start with a letter or digit, geo/config.py), so
# that term is refused to every node (geo/replication/core.py rule 1): read as "" (bind to
# the first), a term granted again by an etcd that lost its data could get two leaders.
# Costs at most one election after an upgrade (the leader of that term steps down).
PROMISED_TO_UNKNOWN = "?"
# The map is a reservation of address space, not of disk: on Linux LMDB grows the file
# as pages are written, so a large map means the store grows without operator action
# and the disk, not the map, is what fills first (handled as a clear error).
DEFAULT_MAP_SIZE = 1 << 40
# Records whose ids may still be only in memory (store/recent_ids.py): it holds at most
# this many ids, and an open reads at most this many records (~0.1 s), plus
# IDS_THROUGH_STEP, to refill it.
MAX_UNINDEXED = 100_000
# ids_through is written when it has moved this far (or back, on truncation): a lower
# stored value is always safe (an open refills a little more), and leaving it alone
# keeps the meta database out of most write transactions (two pages fewer to write).
IDS_THROUGH_STEP = 10_000

# last revision, first position, last position, and the stream's current index run:
# its first revision and first position.
_STREAM = struct.Struct(">QQQQQ")
_RUN = struct.Struct(">QQ")  # first position, count
_ID_RUN = struct.Struct(">16sQQ")  # first id, first position, count
# Ids of one run share these leading bytes (millisecond, version, producer prefix).
RUN_PREFIX = 12
_TOP_COUNTER = b"\xff" * (16 - RUN_PREFIX)  # the greatest id of a prefix ends so
_BE64 = struct.Struct(">Q")
_pos_key = _BE64.pack

ANY = pb.EXPECTED_ANY
NO_STREAM = pb.EXPECTED_NO_STREAM
STREAM_EXISTS = pb.EXPECTED_STREAM_EXISTS
EXACT = pb.EXPECTED_EXACT


@dataclass(slots=True)
class PreparedAppend:
    """A validated append, ready for the writer (built by store/validation.py)."""

    stream: str
    stream_key: bytes
    expected: int
    expected_revision: int
    ids: list[bytes]
    # Serialized ProposedEvents (deterministic serialization: equal content, equal bytes).
    bodies: list[bytes]
    stream_fld: bytes = field(default=b"")
    # Summed len(bodies), for the writer queue's byte bound (0: not counted).
    size: int = 0

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.bodies) > 0
        if not self.stream_fld:
            self.stream_fld = records.stream_field(self.stream_key)


class Appended(NamedTuple):
    """One append's outcome. A tuple: one is made per append, twice as fast as a frozen
    dataclass."""

    first_position: int
    last_position: int
    last_revision: int
    duplicate: bool = False


# (stream key, first position, event ids): one append's records, for the index.
Span = tuple[bytes, int, list[bytes]]


@dataclass(slots=True)
class Sequenced:
    """Appends turned into records at positions first.., not yet written."""

    first: int
    results: list[Appended | StoreError] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    # The streams rows read (None: a new stream), for write_records to reuse.
    stream_rows: dict[bytes, bytes | None] = field(default_factory=dict)


def _indexed(values: list[bytes], first: int) -> tuple[list[bytes], list[Span]]:
    """Records from elsewhere (replication, a term-start record): as stored (patched with
    their positions; `values` itself when none needed it), and spans of consecutive
    records of one stream, read from the records themselves in one parse each."""
    spans: list[Span] = []
    stored: list[bytes] = []
    patched = False
    key = b""
    ids: list[bytes] = []
    index_fields, same_stream_ids = records.index_fields, records.same_stream_ids
    i, n = 0, len(values)
    while i < n:
        value = values[i]
        kept, k, event_id = index_fields(value, first + i)
        if k != key or not spans:
            ids = []
            spans.append((k, first + i, ids))
            key = k
        ids.append(event_id)
        if kept is not value:
            patched = True
            stored.extend(values[len(stored):i])
            stored.append(kept)
            i += 1
        else:
            i = same_stream_ids(values, i + 1, first + i + 1, ids)
    if not patched:
        return values, spans
    stored.extend(values[len(stored):])
    return stored, spans


class _RunsBuilder:
    """The id runs of one write's UUIDv7 spans, in position order (`id_runs` in the
    module's docstring)."""

    __slots__ = ("_next", "_open", "runs")

    def __init__(self) -> None:
        self.runs: list[tuple[int, list[bytes]]] = []  # (first position, ids)
        self._open: list[bytes] | None = None  # the ids of the run that may grow
        self._next = 0  # the position after it

    def add(self, ids: list[bytes], pos: int) -> None:
        """Adds the span of `ids` at pos.. to the runs: each stretch of it whose ids
        share their prefix and increase is one, the first extending the open run when it
        can. Runs of one id go to `ids` (Log._put_runs)."""
        n = len(ids)
        # Ids in the log are unique, so sorted means increasing.
        if n > 1 and ids != sorted(ids):
            start = 0  # ids of several producers, or out of order: one look at each
            for i in range(1, n):
                a, b = ids[i - 1], ids[i]
                if not (a < b and a[:RUN_PREFIX] == b[:RUN_PREFIX]):
                    self._add(ids[start:i], pos + start)
                    start = i
            self._add(ids[start:], pos + start)
        elif ids[0][:RUN_PREFIX] == ids[-1][:RUN_PREFIX]:
            self._add(ids, pos)
        else:  # a producer's span: cut where its millisecond changes, found by bisection
            start = 0
            while start < n:
                end = bisect.bisect_right(ids, ids[start][:RUN_PREFIX] + _TOP_COUNTER,
                                          start)
                self._add(ids[start:end], pos + start)
                start = end

    def _add(self, ids: list[bytes], pos: int) -> None:
        run = self._open
        if (run is not None and pos == self._next and run[-1] < ids[0]
                and run[-1][:RUN_PREFIX] == ids[0][:RUN_PREFIX]):
            run.extend(ids)
        else:
            self._open = run = list(ids)
            self.runs.append((pos, run))
        self._next = pos + len(ids)

    def cut(self) -> None:
        """A record that is in no run comes next."""
        self._open = None


@dataclass(slots=True, frozen=True)
class StreamState:
    last_revision: int
    first_position: int
    last_position: int


def _expected_text(kind: int, revision: int) -> str:
    if kind == EXACT:
        return f"exact({revision})"
    return {ANY: "any", NO_STREAM: "no_stream", STREAM_EXISTS: "stream_exists"}[kind]


def check_expected(stream: str, kind: int, revision: int, last_revision: int) -> None:
    if kind == ANY:
        return
    if kind == NO_STREAM:
        ok = last_revision == 0
    elif kind == STREAM_EXISTS:
        ok = last_revision > 0
    else:
        ok = last_revision == revision
    if not ok:
        raise wrong_revision(stream, _expected_text(kind, revision), last_revision)


# Metadata that describes the attempt, not the event: a client retrying an append in a
# new trace sends another traceparent, and that is still the same event.
ATTEMPT_METADATA = ("traceparent", "tracestate")


def same_event(stored: bytes, retried: bytes) -> bool:
    """Is a retried event (serialized ProposedEvent) the stored one? Byte-equal, or equal
    once the attempt's trace metadata is set aside (the stored copy is kept as it is)."""
    if stored == retried:
        return True
    a, b = pb.ProposedEvent.FromString(stored), pb.ProposedEvent.FromString(retried)
    for e in (a, b):
        for key in ATTEMPT_METADATA:
            if key in e.metadata:
                del e.metadata[key]
    return a == b


def _disk_error(path: str, exc: Exception) -> StoreError:
    # LMDB reports a full disk as EIO from its page writes: say what the disk says.
    try:
        free = f"{shutil.disk_usage(path).free} bytes free on the data volume"
    except OSError as err:
        free = f"free space unknown ({err})"
    return StoreError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"storage full or failing, nothing was written ({free}; {type(exc).__name__}: {exc}); "
        "reads still work",
    )


def _advance_stream(st: list[int], runs: dict[tuple[bytes, int], tuple[int, int]],
                    stream_key: bytes, pos: int, n: int) -> None:
    """Moves a stream's state past `n` new events at `pos`, and records the index run
    they belong to: the stream's current run when they follow it directly in the log,
    a new run otherwise."""
    last_rev, first_pos, last_pos, run_rev, run_pos = st
    if last_rev == 0:
        first_pos = pos
    if last_rev == 0 or last_pos != pos - 1:
        run_rev, run_pos = last_rev + 1, pos
    last_rev += n
    st[:] = (last_rev, first_pos, pos + n - 1, run_rev, run_pos)
    runs[(stream_key, run_rev)] = (run_pos, last_rev - run_rev + 1)


@contextlib.contextmanager
def _stopped(path: str) -> Iterator[tuple[lmdb.Environment, lmdb.Transaction, Any]]:
    """(environment, read transaction, meta database) of a log that no process has open,
    read without writing anything or taking LMDB's lock: a stopped node's data."""
    env = lmdb.open(path, readonly=True, lock=False, subdir=True, max_dbs=8)
    try:
        with env.begin() as txn:
            yield env, txn, env.open_db(b"meta", txn=txn, create=False)
    finally:
        env.close()


def stored_positions(path: str) -> tuple[int, int]:
    """(persisted commit position, last position) of a stopped node's log."""
    with _stopped(path) as (env, txn, meta):
        cur = txn.cursor(env.open_db(b"log", txn=txn, create=False))
        last = records.key_position(cur.key()) if cur.last() else 0
        return _BE64.unpack(txn.get(b"commit_position", db=meta))[0], last


def stored_cluster(path: str) -> str:
    """The cluster a stopped node's log is marked as (meta `cluster`: its node joined),
    "" when unmarked or when there is no log there."""
    try:
        with _stopped(path) as (_env, txn, meta):
            return (txn.get(b"cluster", db=meta) or b"").decode()
    except lmdb.Error:
        return ""


# Written by the process whose Log has the directory open: its pid, for the message a
# second opener gets. Informational: the lock is on the directory itself.
LOCK_FILE = "xdc.lock"


class DataDirInUse(OSError):
    """Another Log (another process, or this one) has the data directory open."""


def _lock_data_dir(path: str) -> int:
    """The descriptor of the data directory itself, flocked for this Log. LMDB lets any
    number of processes write one environment, but a Log keeps the log's tip (position,
    term, stream revisions) in memory: a second writer would hand out the same positions
    and overwrite acknowledged records. The directory, not a file in it: a lock file can
    be deleted as stale or replaced by a restore, and a second opener would then lock the
    new file. The lock goes with the descriptor (closed, or the process gone, it is
    free)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            with open(os.path.join(path, LOCK_FILE)) as f:
                holder = f.read(32).strip()
        except OSError:
            holder = ""
        who = ("already open in this process" if holder == str(os.getpid()) else
               f"in use by another store process{f' (pid {holder})' if holder.isdigit() else ''}")
        raise DataDirInUse(f"data directory {path} is {who}: one Log per data "
                           f"directory") from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError), open(os.path.join(path, LOCK_FILE), "w") as f:
        f.write(f"{os.getpid()}\n")  # the pid is for messages only
    return fd


_logger = logging.getLogger("xdc.store")

# LMDB's files, as it lays them out (subdir=True), and what it needs of them before it
# can say anything itself.
_DATA_FILE, _LOCK_FILE = "data.mdb", "lock.mdb"
_META_BYTES = 2 * 4096  # the two meta pages a new data file is created with
_LOCK_BYTES = 64 << 10  # more than the lock table of max_readers=512 (~33 KiB)


def _prepare_files(path: str) -> None:
    """What a full volume would otherwise turn into a crash or a store that never opens:
    - LMDB creates its lock file sparse and writes it through a shared mapping: on a
      full volume the first store is a SIGBUS, no message. Its blocks are allocated
      here first, so that a full volume is an OSError naming it.
    - A first open cut short by a full volume leaves a data file shorter than the two
      meta pages it starts with: it never held a commit, and LMDB refuses it for good
      ("not an LMDB file"). It is removed, and created again whole."""
    data = os.path.join(path, _DATA_FILE)
    with contextlib.suppress(FileNotFoundError):
        size = os.path.getsize(data)
        if size < _META_BYTES:
            _logger.warning("%s: %d bytes, less than LMDB's two meta pages: left by a "
                            "first open cut short (a full volume), never committed to: "
                            "removed", data, size)
            os.unlink(data)
    lock = os.path.join(path, _LOCK_FILE)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < _LOCK_BYTES:
            try:
                os.posix_fallocate(fd, 0, _LOCK_BYTES)
            except OSError as exc:
                raise OSError(exc.errno, f"{lock}: no room for LMDB's lock file "
                                         f"({_LOCK_BYTES} bytes) on the data volume: "
                                         f"{exc.strerror}") from None
    finally:
        os.close(fd)


class Log:
    def __init__(self, path: str | os.PathLike[str], *, map_size: int = DEFAULT_MAP_SIZE,
                 node_id: str = "standalone") -> None:
        os.makedirs(path, exist_ok=True)
        self.path = str(path)
        # Closed by close(), or when the Log is collected unclosed: the lock never
        # outlives the Log.
        self._unlock = weakref.finalize(self, os.close, _lock_data_dir(self.path))
        try:
            self._open(map_size, node_id)
        except BaseException:
            self._unlock()
            raise

    def _open(self, map_size: int, node_id: str) -> None:
        _prepare_files(self.path)
        self.env = lmdb.open(
            self.path, map_size=map_size, max_dbs=8, subdir=True, sync=True, metasync=True,
            max_readers=512, readahead=False,
        )
        self.log_db = self.env.open_db(b"log")
        self.streams_db = self.env.open_db(b"streams")
        self.index_db = self.env.open_db(b"stream_index")
        self.ids_db = self.env.open_db(b"ids")
        self.runs_db = self.env.open_db(b"id_runs")
        self.meta_db = self.env.open_db(b"meta")
        with self.env.begin(write=True) as txn:
            version = txn.get(b"schema_version", db=self.meta_db)
            if version is None:
                txn.put(b"schema_version", str(SCHEMA_VERSION).encode(), db=self.meta_db)
                txn.put(b"cluster_id", str(uuid.uuid4()).encode(), db=self.meta_db)
                txn.put(b"node_id", node_id.encode(), db=self.meta_db)
                txn.put(b"promised_term", _pos_key(0), db=self.meta_db)
                txn.put(b"commit_position", _pos_key(0), db=self.meta_db)
                txn.put(b"ids_through", _pos_key(0), db=self.meta_db)
            elif int(version) in UPGRADES_FROM:
                txn.put(b"schema_version", str(SCHEMA_VERSION).encode(), db=self.meta_db)
            elif int(version) != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {int(version)}, expected "
                                   f"{SCHEMA_VERSION}")
            self.cluster_id = txn.get(b"cluster_id", db=self.meta_db).decode()
            self.node_id = txn.get(b"node_id", db=self.meta_db).decode()
            self.promised_term = _BE64.unpack(txn.get(b"promised_term", db=self.meta_db))[0]
            promised_to = txn.get(b"promised_to", db=self.meta_db)
            self.promised_to = (promised_to.decode() if promised_to is not None
                                else PROMISED_TO_UNKNOWN if self.promised_term else "")
            self.commit_position = _BE64.unpack(txn.get(b"commit_position", db=self.meta_db))[0]
            self.cluster = (txn.get(b"cluster", db=self.meta_db) or b"").decode()
            rejoin = txn.get(b"rejoin_term", db=self.meta_db)
            self.rejoin_term = _BE64.unpack(rejoin)[0] if rejoin else 0
            cur = txn.cursor(self.log_db)
            if cur.last():
                self.last_position = records.key_position(cur.key())
                last = cur.value()
                self.last_term = records.term_of(last)
                self.last_timestamp_ns = records.timestamp_of(last)
            else:
                self.last_position = 0
                self.last_term = 0
                self.last_timestamp_ns = 0
        # Opening reads a few keys, the last record and at most MAX_UNINDEXED records
        # (the ids not indexed yet): bounded, whatever the log's length.
        assert self.commit_position <= self.last_position
        self._recent = self._refill_recent()

    def _refill_recent(self) -> RecentIds:
        """The ids of the records after `ids_through`, from the committed log."""
        with self.env.begin() as txn:
            raw = txn.get(b"ids_through", db=self.meta_db)
            through = min(_BE64.unpack(raw)[0], self.last_position) if raw else \
                self.last_position
            self._ids_through_stored = through
            recent = RecentIds(through)
            cur = txn.cursor(self.log_db)
            unindexed: list[bytes] = []
            if through < self.last_position and cur.set_key(_pos_key(through + 1)):
                id_of = records.id_of
                unindexed = [id_of(v) for v in cur.iternext(keys=False)]
                recent.add_run(unindexed, through + 1)
            ids, runs = txn.cursor(self.ids_db), txn.cursor(self.runs_db)
            # Every run ends at or below this (b"": no run): ids above it are in none.
            self._runs_top = runs.key() if runs.last() else b""
            # Every id in the index or in memory is <= this (b"": none yet). An upper
            # bound is all it must be: ids above it are new without a look-up, and a
            # time-ordered (UUIDv7) id from a producer is nearly always above it.
            self._id_bound = max(ids.key() if ids.last() else b"", self._runs_top,
                                 *unindexed, b"")
        return recent

    def close(self) -> None:
        self.env.close()
        self._unlock()  # the directory's lock with it (once: a finalizer runs at most once)

    # ---- writer side -------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """One write transaction, committed with fsync on exit. The writer thread only.
        On any failure nothing is written and the in-memory tips are restored."""
        tips = (self.last_position, self.last_term, self.last_timestamp_ns, self.promised_term,
                self.promised_to, self.commit_position, self.cluster, self.rejoin_term)
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except BaseException:
            (self.last_position, self.last_term, self.last_timestamp_ns, self.promised_term,
             self.promised_to, self.commit_position, self.cluster, self.rejoin_term) = tips
            # The transaction changed the buffered ids too: take them from the log again.
            self._recent = self._refill_recent()
            raise

    def append_group(self, reqs: list[PreparedAppend], term: int,
                     now_ns: int) -> tuple[list[Appended | StoreError], list[bytes]]:
        """A standalone node's group commit: sequence the appends and write them in one
        write transaction with one fsync.

        Each append is atomic on its own: a refused one writes nothing and the others
        proceed. Returns the per-append results and the new stored records. On a storage
        failure nothing is written and every append of the group gets the same
        RESOURCE_EXHAUSTED error, except the retries of appends committed before it: their
        original positions stand (a retry is how a caller learns an append's outcome;
        told "nothing was written", it could drop an order the log holds).
        """
        seq: Sequenced | None = None
        try:
            with self.write() as txn:
                seq = self.sequence(txn, reqs, self.last_position + 1, term, now_ns)
                if seq.values:
                    self.write_records(txn, seq.values, seq.first, seq.spans, seq.stream_rows)
        except lmdb.Error as exc:
            err = self.disk_error(exc)
            if seq is None:
                return [err] * len(reqs), []
            return [r if isinstance(r, Appended) and r.last_position < seq.first else err
                    for r in seq.results], []
        return seq.results, seq.values

    def disk_error(self, exc: Exception) -> StoreError:
        return _disk_error(self.path, exc)

    def sequence(self, txn: lmdb.Transaction, reqs: list[PreparedAppend], first: int,
                 term: int, now_ns: int) -> Sequenced:
        """Turns appends into records at positions first.., in `term`, writing nothing:
        checks idempotency and expected revisions against the transaction's state plus
        the appends sequenced before them in this group."""
        assert term >= 1 and first >= 1
        pos = first
        ts = max(now_ns, self.last_timestamp_ns)
        out = Sequenced(first)
        revisions: dict[bytes, int] = {}
        # One look-up of every id of the group; most groups have no repeat at all.
        group = [i for r in reqs for i in r.ids]
        known = self.known_ids(txn, group)
        # Ids this group writes, when an id comes twice in it (a retry sent before the
        # first attempt was answered); None, and no bookkeeping, when none does.
        group_ids: dict[bytes, int] | None = {} if len(set(group)) != len(group) else None
        encode_run = records.encode_run
        values, results, spans = out.values, out.results, out.spans
        for req in reqs:
            key = req.stream_key
            last_rev = revisions.get(key)
            if last_rev is None:
                raw = out.stream_rows[key] = txn.get(key, db=self.streams_db)
                last_rev = _STREAM.unpack(raw)[0] if raw else 0
            ids = req.ids
            if known or group_ids:
                found = [(i, known[i]) for i in ids if i in known] if known else []
                if group_ids:
                    found += [(i, _pos_key(group_ids[i])) for i in ids if i in group_ids]
                if found:
                    try:
                        results.append(self._duplicate(txn, req, found, first, values))
                    except StoreError as err:
                        err.as_of = pos - 1  # read from the log up to here
                        results.append(err)
                    continue
            if req.expected != ANY:
                try:
                    check_expected(req.stream, req.expected, req.expected_revision, last_rev)
                except StoreError as err:
                    err.as_of = pos - 1
                    results.append(err)
                    continue
            bodies = req.bodies
            n = len(bodies)
            values.extend(encode_run(pos, term, last_rev + 1, ts, req.stream_fld, bodies))
            if group_ids is not None:
                group_ids.update(zip(ids, range(pos, pos + n), strict=True))
            spans.append((key, pos, ids))
            revisions[key] = last_rev + n
            results.append(Appended(pos, pos + n - 1, last_rev + n))
            pos += n
        return out

    def write_records(self, txn: lmdb.Transaction, values: list[bytes], first: int,
                      spans: list[Span] | None = None,
                      stream_rows: Mapping[bytes, bytes | None] | None = None,
                      truncate_after: int | None = None) -> list[bytes]:
        """The only way records enter the log, on leaders and followers alike: optionally
        drop the suffix after `truncate_after`, then append `values` at first.. and derive
        the streams, stream index and ids entries from them. `spans` (stream, position,
        ids per append) saves re-parsing when the caller already knows them, and
        `stream_rows` (Sequenced.stream_rows, read in this transaction) a second read of
        the streams' rows. Returns the records as stored: `values` itself unless one was
        patched (a record built before its position was known, a term-start record:
        records.index_fields)."""
        if truncate_after is not None and truncate_after < self.last_position:
            assert truncate_after >= self.commit_position, (
                f"truncating at {truncate_after} below the commit position "
                f"{self.commit_position}")
            self._truncate(txn, truncate_after)
            stream_rows = None  # read before the truncation changed them
        rows = stream_rows or {}
        if not values:
            return values
        assert first == self.last_position + 1, (
            f"gap: writing at {first} after {self.last_position}")
        derived = spans is None
        if spans is None:  # records from elsewhere (replication, a term-start record)
            values, spans = _indexed(values, first)
        else:
            assert records.position_of(values[-1]) == first + len(values) - 1
        last = first + len(values) - 1
        # The log's (key, record) pairs.
        log_items = _speedups.keyed(first, values)
        streams: dict[bytes, list[int]] = {}
        runs: dict[tuple[bytes, int], tuple[int, int]] = {}
        add_ids = self._recent.add_run
        id_runs = _RunsBuilder()
        for key, pos, ids in spans:
            st = streams.get(key)
            if st is None:
                raw = rows[key] if key in rows else txn.get(key, db=self.streams_db)
                st = list(_STREAM.unpack(raw)) if raw else [0, 0, 0, 0, 0]
                streams[key] = st
            if derived:
                assert records.revision_of(values[pos - first]) == st[0] + 1, (
                    f"stream revisions must be dense: {key!r} at position {pos}")
            _advance_stream(st, runs, key, pos, len(ids))
            top = max(ids)
            if top > self._id_bound:
                self._id_bound = top
            if ids[0][6] >> 4 == 7:
                # UUIDv7 (what the client library makes): time-ordered. In runs (the
                # module's docstring) where they form them, else straight into `ids`:
                # they land beside each other at its end, cheap to put at once. Any
                # other id (random, derived) waits in memory (recent_ids.py). Each way
                # is correct: look-ups see all three.
                id_runs.add(ids, pos)
            else:
                id_runs.cut()
                add_ids(ids, pos)
        id_items = self._put_runs(txn, id_runs.runs)
        if id_items:
            txn.cursor(self.ids_db).putmulti(id_items)
        txn.cursor(self.log_db).putmulti(log_items, append=True)
        self._put_streams_and_runs(txn, streams, runs)
        self.last_position = last
        self.last_term = records.term_of(values[-1])
        self.last_timestamp_ns = max(self.last_timestamp_ns, records.timestamp_of(values[-1]))
        self._flush_ids(txn)
        return values

    def known_ids(self, txn: lmdb.Transaction, ids: list[bytes]) -> dict[bytes, bytes]:
        """The position key of each of `ids` in the log: from memory (recent_ids.py),
        then `ids` and `id_runs` for those at or below every id written."""
        held, unseen = self._recent.split(ids)
        known = {i: _pos_key(p) for i, p in held.items()}
        if unseen and min(unseen) <= self._id_bound:
            bound = self._id_bound
            below = [i for i in unseen if i <= bound]
            known.update(txn.cursor(self.ids_db).getmulti(below))
            top = self._runs_top
            in_range = [i for i in below if i <= top]
            if in_range:
                known.update(self._in_runs(txn, in_range))
        return known

    def _put_runs(self, txn: lmdb.Transaction,
                  runs: list[tuple[int, list[bytes]]]) -> list[tuple[bytes, bytes]]:
        """Puts each run of two ids or more that overlaps no run in `id_runs` (nor one
        put before it here); returns the (id, position key) pairs of the other runs' ids,
        for `ids`."""
        single: list[tuple[bytes, bytes]] = []
        if not runs:
            return single
        cur = txn.cursor(self.runs_db)
        for pos, ids in runs:
            lo, hi = ids[0], ids[-1]
            # The run with the least last id >= lo is the only one that can overlap
            # [lo, hi] (runs are disjoint): it does if it starts at or below hi.
            if len(ids) > 1 and not (cur.set_range(lo) and cur.value()[:16] <= hi):
                cur.put(hi, _ID_RUN.pack(lo, pos, len(ids)))
                if hi > self._runs_top:
                    self._runs_top = hi
            else:
                single.extend(zip(ids, map(_pos_key, range(pos, pos + len(ids))),
                                  strict=True))
        return single

    def _in_runs(self, txn: lmdb.Transaction,
                 ids: list[bytes]) -> list[tuple[bytes, bytes]]:
        """(id, position key) of each of `ids` that `id_runs` indexes: one seek per run
        the sorted ids meet, then a search of that run's records (_run_position)."""
        found: list[tuple[bytes, bytes]] = []
        cur = txn.cursor(self.runs_db)
        hi, lo, low, high = b"", b"", 0, -1
        for event_id in sorted(ids):
            if event_id > hi:
                if not cur.set_range(event_id):
                    break  # above every run
                hi = cur.key()
                lo, pos, count = _ID_RUN.unpack(cur.value())
                low, high = pos, pos + count - 1
            if event_id >= lo:
                p, low = self._run_position(txn, event_id, low, high)
                if p is not None:
                    found.append((event_id, _pos_key(p)))
        return found

    def _run_position(self, txn: lmdb.Transaction, event_id: bytes, low: int,
                      high: int) -> tuple[int | None, int]:
        """(the position of `event_id` among a run's records at low..high, if there; the
        first of them whose id is greater): ids increase with positions in a run, so the
        sorted ids of a look-up search on from there. A galloping search: the records
        at low, low + 2, low + 6, low + 14... until one is past `event_id`, then a
        bisection of the last gap. A retried append's ids are the run's next records
        (one read each), new ids of another thread of its producer fall between them
        (two reads), any other id costs about two bisections."""
        def id_at(position: int) -> bytes:
            value = txn.get(_pos_key(position), db=self.log_db)
            assert value is not None, f"an id run points at missing position {position}"
            return records.id_of(value)

        step = 1
        while low <= high:
            probe = min(low + step - 1, high)
            got = id_at(probe)
            if got == event_id:
                return probe, probe + 1
            if got > event_id:
                high = probe - 1
                break
            low = probe + 1
            step *= 2
        while low <= high:
            mid = (low + high) // 2
            got = id_at(mid)
            if got == event_id:
                return mid, mid + 1
            if got < event_id:
                low = mid + 1
            else:
                high = mid - 1
        return None, low

    def _truncate_runs(self, txn: lmdb.Transaction, removed: list[bytes],
                       after: int) -> None:
        """Drops the runs wholly after `after` and shortens the one holding it. Each run
        with a removed position holds the id of a removed record: the seek of that id
        finds it (disjoint runs)."""
        cur = txn.cursor(self.runs_db)
        for event_id in sorted(removed):
            if not cur.set_range(event_id):
                break
            lo, pos, count = _ID_RUN.unpack(cur.value())
            if lo > event_id or pos + count - 1 <= after:
                continue  # in no run, or in one that keeps all of its records
            cur.delete()
            if pos <= after:
                kept = txn.get(_pos_key(after), db=self.log_db)
                assert kept is not None
                txn.put(records.id_of(kept), _ID_RUN.pack(lo, pos, after - pos + 1),
                        db=self.runs_db)

    def _flush_ids(self, txn: lmdb.Transaction) -> None:
        """Moves the bucket of buffered ids flushed longest ago into the index (more, if
        the records not fully indexed would exceed MAX_UNINDEXED), and persists how far
        the index is complete."""
        recent, last = self._recent, self.last_position
        ids = txn.cursor(self.ids_db)
        while True:
            items = recent.take_oldest(last)
            if items:
                ids.putmulti([(i, _pos_key(p)) for i, p in items])
            through = recent.through(last)
            if not items or last - through <= MAX_UNINDEXED:
                break
        if through - self._ids_through_stored >= IDS_THROUGH_STEP:
            self._put_ids_through(txn, through)

    def _put_ids_through(self, txn: lmdb.Transaction, through: int) -> None:
        txn.put(b"ids_through", _pos_key(through), db=self.meta_db)
        self._ids_through_stored = through

    def _truncate(self, txn: lmdb.Transaction, after: int) -> None:
        """Removes positions > after and every index entry derived from them."""
        cur = txn.cursor(self.log_db)
        cut: dict[bytes, int] = {}  # stream -> lowest removed revision
        ids_db = self.ids_db
        removed: list[bytes] = []
        if cur.set_key(_pos_key(after + 1)):
            for value in cur.iternext(keys=False):
                key = records.stream_bytes_of(value)
                rev = records.revision_of(value)
                cut[key] = min(rev, cut.get(key, rev))
                event_id = records.id_of(value)
                txn.delete(event_id, db=ids_db)
                self._recent.discard(event_id)
                removed.append(event_id)
            self._truncate_runs(txn, removed, after)
            cur.set_key(_pos_key(after + 1))
            while cur.delete():
                pass
        self._recent.truncated(after)
        # Now, not with the next write: a transaction that only truncates must not leave
        # an ids_through above records written later at those positions.
        through = self._recent.through(after)
        if self._ids_through_stored > through:
            self._put_ids_through(txn, through)
        idx = txn.cursor(self.index_db)
        for key, lowest in cut.items():
            keep = lowest - 1
            prefix = key + b"\x00"
            # Drop runs starting after `keep`, then shorten the run holding it.
            if idx.set_range(prefix + _pos_key(keep + 1)):
                while idx.key().startswith(prefix) and idx.delete():
                    pass
            if keep == 0:
                txn.delete(key, db=self.streams_db)
                continue
            raw = txn.get(key, db=self.streams_db)
            assert raw is not None
            first_pos = _STREAM.unpack(raw)[1]
            target = prefix + _pos_key(keep)
            if idx.set_range(target):
                if idx.key() != target:
                    idx.prev()
            else:
                idx.last()
            assert idx.key().startswith(prefix), "the kept revision must have a run"
            run_rev = _BE64.unpack(idx.key()[len(prefix):])[0]
            run_pos, _ = _RUN.unpack(idx.value())
            assert run_rev <= keep, "a run must hold the kept revision"
            idx.put(idx.key(), _RUN.pack(run_pos, keep - run_rev + 1))
            last_pos = run_pos + keep - run_rev
            txn.put(key, _STREAM.pack(keep, first_pos, last_pos, run_rev, run_pos),
                    db=self.streams_db)
        self.last_position = after
        value = txn.get(_pos_key(after), db=self.log_db) if after else None
        self.last_term = records.term_of(value) if value else 0

    def set_meta(self, txn: lmdb.Transaction, *, promised_term: int | None = None,
                 promised_to: str | None = None, commit_position: int | None = None,
                 cluster: str | None = None, rejoin_term: int | None = None) -> None:
        """Meta writes in `txn`. A raised `promised_term` is promised to `promised_to`
        ("" or None: to nobody known yet); with the term unchanged, `promised_to` may
        only bind a promise made to nobody known (geo/replication/core.py, rule 1)."""
        if cluster is not None and cluster != self.cluster:
            assert not self.cluster, "a log belongs to one cluster"
            txn.put(b"cluster", cluster.encode(), db=self.meta_db)
            self.cluster = cluster
        if rejoin_term is not None and rejoin_term != self.rejoin_term:
            if rejoin_term:
                txn.put(b"rejoin_term", _pos_key(rejoin_term), db=self.meta_db)
            else:
                txn.delete(b"rejoin_term", db=self.meta_db)
            self.rejoin_term = rejoin_term
        if promised_term is not None and promised_term != self.promised_term:
            assert promised_term > self.promised_term, "promised_term never decreases"
            txn.put(b"promised_term", _pos_key(promised_term), db=self.meta_db)
            self.promised_term = promised_term
            self._put_promised_to(txn, promised_to or "")
        elif promised_to is not None and promised_to != self.promised_to:
            assert not self.promised_to, (
                f"term {self.promised_term} was promised to {self.promised_to!r}, not "
                f"{promised_to!r}")
            self._put_promised_to(txn, promised_to)
        if commit_position is not None and commit_position > self.commit_position:
            txn.put(b"commit_position", _pos_key(commit_position), db=self.meta_db)
            self.commit_position = commit_position

    def _put_promised_to(self, txn: lmdb.Transaction, node: str) -> None:
        # Written even when "" (promised to nobody known yet: the first leader of the term
        # binds it): an absent key means PROMISED_TO_UNKNOWN.
        txn.put(b"promised_to", node.encode(), db=self.meta_db)
        self.promised_to = node

    def _put_streams_and_runs(self, txn: lmdb.Transaction, streams: dict[bytes, list[int]],
                              runs: dict[tuple[bytes, int], tuple[int, int]]) -> None:
        txn.cursor(self.streams_db).putmulti(
            [(k, _STREAM.pack(*st)) for k, st in streams.items() if st[0]])
        txn.cursor(self.index_db).putmulti(sorted(
            (key + b"\x00" + _pos_key(rev), _RUN.pack(*run)) for (key, rev), run in runs.items()))

    def _duplicate(self, txn: lmdb.Transaction, req: PreparedAppend,
                   found: list[tuple[bytes, bytes]], group_first: int,
                   group_values: list[bytes]) -> Appended:
        """An append some of whose ids are already in the log: either an exact retry
        (same stream, same content) answered with the original positions, or an error."""
        where = dict(found)
        for i, event_id in enumerate(req.ids):
            raw = where.get(event_id)
            if raw is None:
                other = next(k for k in req.ids if k in where)
                raise StoreError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"events[{i}].id is new but event id {uuid.UUID(bytes=other)} is already "
                    f"in the log: a retried append must carry exactly the original events",
                )
        positions = [_BE64.unpack(where[event_id])[0] for event_id in req.ids]
        for i, p in enumerate(positions):
            # An append is written whole, in order, at consecutive positions: events
            # found elsewhere were appended separately, and first..last would not be
            # this request's positions.
            if p != positions[0] + i:
                raise StoreError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"events[{i}].id {uuid.UUID(bytes=req.ids[i])} is at position {p}, not "
                    f"{positions[0] + i}: these events are in the log, but not as one append "
                    f"in this order; a retried append must carry exactly the original events",
                )
            value = group_values[p - group_first] if p >= group_first else txn.get(
                _pos_key(p), db=self.log_db)
            assert value is not None, f"ids index points at missing position {p}"
            if records.stream_bytes_of(value) != req.stream_key:
                raise StoreError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"events[{i}].id {uuid.UUID(bytes=req.ids[i])} already exists at position "
                    f"{p} in stream {records.stream_of(value)!r}, not {req.stream!r}",
                )
            if not same_event(records.body_of(value), req.bodies[i]):
                raise StoreError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"events[{i}].id {uuid.UUID(bytes=req.ids[i])} already exists at position "
                    f"{p} with different content",
                )
        # `value` is the record at positions[-1], the loop's last.
        return Appended(positions[0], positions[-1], records.revision_of(value), True)

    # ---- reader side -------------------------------------------------------------

    def stream_state(self, stream_key: bytes,
                     txn: lmdb.Transaction | None = None) -> StreamState | None:
        if txn is None:
            with self.env.begin() as own:
                return self.stream_state(stream_key, own)
        raw = txn.get(stream_key, db=self.streams_db)
        return StreamState(*_STREAM.unpack(raw)[:3]) if raw else None

    def stream_count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.streams_db)["entries"]

    def record(self, position: int) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(_pos_key(position), db=self.log_db)

    def read_all(self, start: int, limit: int, upto: int, backwards: bool = False,
                 max_bytes: int = 0) -> list[bytes]:
        """Stored records from position `start` (inclusive), at most `limit`, none past
        `upto`; with `max_bytes`, no more once they hold that many bytes (one at least),
        so that what a reader holds for a slow client is bounded by bytes too."""
        if backwards:
            start = min(start, upto)
            limit = min(limit, start)
            if limit <= 0:
                return []
        else:
            limit = min(limit, upto - start + 1)
            if limit <= 0:
                return []
        with self.env.begin() as txn:
            cur = txn.cursor(self.log_db)
            if not cur.set_key(_pos_key(start)):
                return []
            it = cur.iterprev(keys=False) if backwards else cur.iternext(keys=False)
            out = []
            size = 0
            for value in it:
                out.append(value)
                size += len(value)
                if len(out) == limit or size >= max_bytes > 0:
                    break
            return out

    def read_stream(self, stream_key: bytes, start: int, limit: int, upto: int,
                    backwards: bool = False, max_bytes: int = 0) -> list[bytes]:
        """Stored records of one stream from revision `start` (inclusive); `max_bytes` as
        in read_all."""
        out: list[bytes] = []
        size = 0
        with self.env.begin() as txn:
            log_cur = txn.cursor(self.log_db)  # one cursor, repositioned per run
            for first_pos, count in self._stream_runs(txn, stream_key, start, backwards):
                if not log_cur.set_key(_pos_key(first_pos)):
                    break
                it = log_cur.iterprev(keys=False) if backwards else log_cur.iternext(keys=False)
                for value in it:
                    if count == 0 or len(out) == limit:
                        break
                    count -= 1
                    # Backwards, records beyond the commit position come first: skip
                    # them without spending the limit (a limit-1 read of the last
                    # committed event must not come back empty).
                    if backwards and records.position_of(value) > upto:
                        continue
                    out.append(value)
                    size += len(value)
                    if size >= max_bytes > 0:
                        limit = len(out)
                if len(out) == limit:
                    break
        if not backwards:
            # Positions grow with revisions: cut at the commit position.
            while out and records.position_of(out[-1]) > upto:
                out.pop()
        return out

    def _stream_runs(self, txn: lmdb.Transaction, stream_key: bytes, revision: int,
                     backwards: bool) -> Iterator[tuple[int, int]]:
        """Yields (position, count) spans of the stream from `revision` on: forwards a span
        runs up the log from `position`; backwards `position` is its last and it runs down."""
        prefix = stream_key + b"\x00"
        cur = txn.cursor(self.index_db)
        target = prefix + _pos_key(revision)
        # The floor entry: the greatest run key <= target.
        if cur.set_range(target):
            floor = cur.key() == target or cur.prev()
        else:
            floor = cur.last()
        if not (floor and cur.key().startswith(prefix)):
            if backwards or not cur.set_range(prefix) or not cur.key().startswith(prefix):
                return
        step = cur.prev if backwards else cur.next
        while True:
            first_rev = _BE64.unpack(cur.key()[len(prefix):])[0]
            pos, count = _RUN.unpack(cur.value())
            if backwards:
                last = min(first_rev + count - 1, revision)
                if last >= first_rev:
                    yield pos + last - first_rev, last - first_rev + 1
            elif first_rev + count > revision:
                skip = max(0, revision - first_rev)
                yield pos + skip, count - skip
            if not step() or not cur.key().startswith(prefix):
                return
