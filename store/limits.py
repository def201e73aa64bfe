"""Every limit the store enforces, in one place, with its default.

A request over a limit is refused with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for
load) and a message naming the field and the limit; nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    # One serialized ProposedEvent (id, type, content type, metadata, data).
    max_event_bytes: int = 1 * MiB
    # Events in one AppendRequest, and their summed sizes.
    max_append_events: int = 10_000
    max_append_bytes: int = 16 * MiB
    # AppendRequests in one AppendStream message; over it the call ends with
    # INVALID_ARGUMENT (an answer per append would be larger than the request).
    max_appends_per_message: int = 10_000
    # AppendStream messages one call has read ahead of their answers; past it the
    # server stops reading and gRPC flow control holds the client back.
    max_inflight_messages: int = 64
    # UTF-8 bytes of a stream name.
    max_stream_name_bytes: int = 255
    # UTF-8 bytes of an event type or content type.
    max_type_bytes: int = 256
    max_metadata_entries: int = 64
    max_metadata_key_bytes: int = 256
    # Events returned by one Read.
    max_read_count: int = 100_000
    # How long a Read waits for its min_position to commit when the call's deadline
    # is later (or absent); then DEADLINE_EXCEEDED.
    max_read_wait_ms: int = 60_000
    # Open Subscribe calls on a node; past it RESOURCE_EXHAUSTED with a retry hint.
    max_subscriptions: int = 10_000
    # Types in one Subscribe filter (each at most max_type_bytes; the stream prefix at
    # most max_stream_name_bytes).
    max_subscribe_types: int = 64
    # Events and bytes in one Read/Subscribe response message.
    max_batch_events: int = 2_000
    max_batch_bytes: int = 1 * MiB
    # Events, and their bytes, waiting for the writer; past either appends are shed
    # with RESOURCE_EXHAUSTED and a retry hint (the bytes bound the memory that queued
    # appends hold while the disk, or a quorum, is slow).
    max_pending_events: int = 200_000
    max_pending_bytes: int = 256 * MiB
    # Events one group commit takes from the queue (one write transaction, one fsync).
    max_group_events: int = 50_000

    @property
    def max_message_bytes(self) -> int:
        """gRPC message ceiling: the largest append plus framing, so that the store's
        own checks (which name the field) are what refuses oversized appends."""
        return self.max_append_bytes + 4 * MiB

    def __post_init__(self) -> None:
        """Refuses limits that cannot work together, naming them (`xdc serve` exits 2 with
        the message): a ValueError, not an assert, since operators set some of them."""
        for name in self.__slots__:  # type: ignore[attr-defined]
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        for low, high in (("max_event_bytes", "max_append_bytes"),
                          ("max_append_bytes", "max_pending_bytes"),
                          ("max_event_bytes", "max_batch_bytes"),
                          ("max_append_events", "max_group_events")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) must not exceed {high} "
                                 f"({getattr(self, high)})")
