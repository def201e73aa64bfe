"""Event ids not yet in the LMDB `ids` index: the write buffer of that index.

Why: ids made by hashing (an order gateway derives its input ids from the client order
id, so that a retried submit maps to the same id) or UUIDv4s land at random places in
the index's B-tree. Put straight into it, every id of a group commit dirtied a page of
its own: 1000 random ids into an index of 3M meant ~1000 pages (4 MiB) copied and
fsync'd, and raw ingest fell from ~240k ids/s (time-ordered) to ~44k ids/s.

So new ids that are not time-ordered (the Log puts UUIDv7s straight into the index:
they land at its end, beside each other) stay here (in memory), bucketed by their
first byte, which is a slice of
the index's key order. Each write transaction moves the bucket flushed longest ago
into the index as one sorted `putmulti`: those ids share the index pages of their slice,
and a bucket gathers about 256 transactions' worth of ids before it is flushed.

Durability: the log itself is the write-ahead log of this buffer. `through` is a
position such that the id of every record at or below it is in the index; the Log
persists it with each write and, on open, refills the buffer from the records after it.
Its lag is bounded (`Log.MAX_UNINDEXED`), which bounds the buffer's memory and the
time an open takes.

Invariant: the id of every record in the log is in the index or here (or both).
Writer thread only.
"""

from __future__ import annotations

BUCKETS = 256


class RecentIds:
    def __init__(self, through: int) -> None:
        self._buckets: list[dict[bytes, int]] = [{} for _ in range(BUCKETS)]
        # Per bucket: every id of that bucket at a position <= this is in the index.
        self._flushed: list[int] = [through] * BUCKETS

    @property
    def through(self) -> int:
        return min(self._flushed)

    def __len__(self) -> int:
        return sum(map(len, self._buckets))

    def get(self, event_id: bytes) -> int | None:
        return self._buckets[event_id[0]].get(event_id)

    def add_run(self, ids: list[bytes], first: int) -> None:
        """`ids` are those of the records at first, first + 1, ..."""
        buckets = self._buckets
        for position, event_id in enumerate(ids, first):
            buckets[event_id[0]][event_id] = position

    def discard(self, event_id: bytes) -> None:
        self._buckets[event_id[0]].pop(event_id, None)

    def truncated(self, after: int) -> None:
        """Records after `after` are gone (their ids discarded by the caller): whatever
        is written there next is not in the index yet."""
        self._flushed = [min(f, after) for f in self._flushed]

    def take_oldest(self, last_position: int) -> list[tuple[bytes, int]]:
        """Empties the bucket flushed longest ago and returns its ids, sorted, for the
        index; the caller writes them in the transaction that reaches `last_position`."""
        b = min(range(BUCKETS), key=self._flushed.__getitem__)
        bucket = self._buckets[b]
        self._buckets[b] = {}
        self._flushed[b] = last_position
        return sorted(bucket.items())
