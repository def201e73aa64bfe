"""Event ids not yet in the LMDB `ids` index: the write buffer of that index.

Why: ids made by hashing (an order gateway derives its input ids from the client order
id, so that a retried submit maps to the same id) or UUIDv4s land at random places in
the index's B-tree. Put straight into it, every id of a group commit dirtied a page of
its own: 1000 random ids into an index of 3M meant ~1000 pages (4 MiB) copied and
fsync'd, and raw ingest fell from ~240k ids/s (time-ordered) to ~44k ids/s.

So new ids that are not time-ordered (the Log puts UUIDv7s straight into the index or
its runs, `id_runs`: they land at its end, beside each other) stay here, in memory,
bucketed by their first byte, which is a slice of the index's key order. Each write
transaction moves the bucket flushed longest ago into the index as one sorted
`putmulti`: those ids share the index pages of their slice, and a bucket gathers about
256 transactions' worth of ids before it is flushed.

Durability: the log itself is the write-ahead log of this buffer. `through` is a
position such that the id of every record at or below it is in the index (`ids` or
`id_runs`); the Log persists it with each write and, on open, refills the buffer from
the records after it.
Its lag is bounded (`Log.MAX_UNINDEXED`), which bounds the buffer's memory and the
time an open takes.

Invariant: the id of every record in the log is in the index (`ids` or `id_runs`) or
here (or both).
Writer thread only.
"""

from __future__ import annotations

BUCKETS = 256


class RecentIds:
    def __init__(self, through: int) -> None:
        self._buckets: list[dict[bytes, int]] = [{} for _ in range(BUCKETS)]
        # Per bucket: every id of that bucket at a position <= this is in the index.
        self._flushed: list[int] = [through] * BUCKETS

    def through(self, last_position: int) -> int:
        """Every record's id at or below this position is in the index. An empty bucket
        holds nothing back: with only time-ordered ids (never buffered) it is the last
        position, and an open has nothing to refill."""
        return min((f for f, b in zip(self._flushed, self._buckets, strict=True) if b),
                   default=last_position)

    def __len__(self) -> int:
        return sum(map(len, self._buckets))

    def split(self, ids: list[bytes]) -> tuple[dict[bytes, int], list[bytes]]:
        """(position of each of `ids` held here, the others): one call per group
        commit, not one per id."""
        buckets = self._buckets
        if not any(buckets):  # only time-ordered ids so far: none is ever held here
            return {}, ids
        held: dict[bytes, int] = {}
        others: list[bytes] = []
        for event_id in ids:
            p = buckets[event_id[0]].get(event_id)
            if p is None:
                others.append(event_id)
            else:
                held[event_id] = p
        return held, others

    def add_run(self, ids: list[bytes], first: int) -> None:
        """`ids` are those of the records at first, first + 1, ..."""
        buckets, flushed = self._buckets, self._flushed
        for position, event_id in enumerate(ids, first):
            bucket = buckets[event_id[0]]
            if not bucket:  # it held nothing back: its ids before this one are indexed
                flushed[event_id[0]] = position - 1
            bucket[event_id] = position

    def discard(self, event_id: bytes) -> None:
        self._buckets[event_id[0]].pop(event_id, None)

    def truncated(self, after: int) -> None:
        """Records after `after` are gone (their ids discarded by the caller): whatever
        is written there next is not in the index yet."""
        self._flushed = [min(f, after) for f in self._flushed]

    def take_oldest(self, last_position: int) -> list[tuple[bytes, int]]:
        """Empties the non-empty bucket flushed longest ago and returns its ids, sorted,
        for the index; the caller writes them in the transaction that reaches
        `last_position`."""
        held = [b for b in range(BUCKETS) if self._buckets[b]]
        if not held:
            return []
        b = min(held, key=self._flushed.__getitem__)
        bucket = self._buckets[b]
        self._buckets[b] = {}
        self._flushed[b] = last_position
        return sorted(bucket.items())
