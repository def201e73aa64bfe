"""Spans and metrics of a cluster node (xdc/telemetry.py does the OpenTelemetry plumbing).

- Leader: one CLIENT span `xdc.replicate` per batch of records shipped to a follower,
  from the send to that follower's durable acknowledgement; its context travels in the
  PeerMessage, so the follower's SERVER span `xdc.replica.append` (receipt to its own
  acknowledgement) is its child. Both point at the producers through the `traceparent`
  the records carry: the parent when the batch comes from one producer context, links
  otherwise. Metrics: the follower commit lag histogram, and replication lag gauges in
  records and seconds per follower.
- Elections: `xdc.failover` spans and the failover duration histogram, from lease loss
  or an observed vacancy to the new term (`elected`) and to open writes (`open`).

Everything runs on the node's event loop thread, except the gauge callbacks (the metric
reader's thread), which only read copies.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode

from geo.replication.messages import Append, AppendReply, Message
from store import records
from xdc import telemetry
from xdc.v1 import eventstore_pb2 as pb

log = logging.getLogger("xdc.node")

# Batches awaiting a follower's acknowledgement, tracked per follower; past it the
# oldest is given up (a follower that is down is visible in the lag gauges anyway).
MAX_TRACKED = 1024
_TRACEPARENT = telemetry.TRACEPARENT.encode()
_ProposedEvent = pb.ProposedEvent


def record_contexts(payloads: Iterable[bytes]) -> list[SpanContext]:
    """Distinct producer contexts of stored records (telemetry.contexts_of): each
    record's metadata, parsed from its body alone, as protobuf reads it. Only a metadata
    entry counts: the bytes searched for before, anywhere in the record, let any client
    pick the parent (~2 us more a record, with tracing on only)."""
    return telemetry.contexts_of(_ProposedEvent.FromString(records.body_of(v)).metadata
                                 for v in payloads if _TRACEPARENT in v)[0]


_Inbound = tuple[str, int, int, int, Span]


@dataclass(slots=True)
class _Shipped:
    first: int
    last: int
    sent: float  # monotonic
    span: Span | None


def _end(span: Span | None, error: str = "") -> None:
    if span is None:
        return
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


class ReplicationObserver:
    def __init__(self, node_id: str, last_position: Callable[[], int],
                 is_leader: Callable[[], bool]) -> None:
        self.node_id = node_id
        self._last_position = last_position
        self._is_leader = is_leader
        # Leader side, per follower: batches in flight and the acknowledged position.
        self._shipped: dict[str, collections.deque[_Shipped]] = {}
        self._match: dict[str, int] = {}
        # Follower side: spans of received batches until this node acknowledges them:
        # (leader, term, prev_pos, last position, span).
        self._inbound: collections.deque[_Inbound] = collections.deque()
        self._links: tuple[tuple[int, int], list[SpanContext]] = ((0, 0), [])
        self._gauges: list[tuple[str, int]] = []

    def start(self) -> None:
        self._gauges = [
            ("xdc.replication.lag.records", telemetry.add_gauge_source(
                "xdc.replication.lag.records", self._lag_records)),
            ("xdc.replication.lag.seconds", telemetry.add_gauge_source(
                "xdc.replication.lag.seconds", self._lag_seconds)),
        ]

    def stop(self) -> None:
        for gauge, handle in self._gauges:
            telemetry.remove_gauge_source(gauge, handle)
        self._gauges = []
        self.reset("node stopping")
        self._end_inbound("node stopping")

    def reset(self, reason: str) -> None:
        """Leadership ended: what was in flight will not be acknowledged to this term."""
        for batches in self._shipped.values():
            for b in batches:
                _end(b.span, reason)
        self._shipped.clear()
        self._match.clear()
        # Keyed by positions: the next leader may truncate the log and write other
        # records at the same ones, which must not be linked to these producers.
        self._links = ((0, 0), [])

    def _end_inbound(self, reason: str) -> None:
        while self._inbound:
            _end(self._inbound.popleft()[4], reason)

    # ---- leader ------------------------------------------------------------------------

    def _producers(self, msg: Append) -> list[SpanContext]:
        """Producer contexts of a batch; the followers usually get the same range."""
        key = (msg.entries[0].position, msg.entries[-1].position)
        if self._links[0] != key:
            self._links = (key, record_contexts(e.payload for e in msg.entries))
        return self._links[1]

    def on_send(self, msg: Message) -> dict[str, str] | None:
        """A message leaving this node. Returns the trace context to send along, if any.
        Telemetry never breaks replication: a failure here is logged and ignored."""
        if not telemetry.active():
            return None
        try:
            if isinstance(msg, Append):
                return self._ship(msg) if msg.entries else None
            if isinstance(msg, AppendReply):
                self._ack(msg)
        except Exception:
            log.exception("%s: replication telemetry failed on %s", self.node_id,
                          type(msg).__name__)
        return None

    def _ship(self, msg: Append) -> dict[str, str] | None:
        if self._inbound:
            # This node leads now: what it received as a follower will not be
            # acknowledged to the leader it came from (a reply carrying the promised
            # term ended those already, unless it was never sent).
            self._end_inbound("this node became leader")
        first, last = msg.entries[0].position, msg.entries[-1].position
        span = None
        if telemetry.tracing():
            parent, links = telemetry.parent_and_links(self._producers(msg))
            span = telemetry.open_span(
                "xdc.replicate", context=parent, links=links, kind=SpanKind.CLIENT,
                attributes={"xdc.node": self.node_id, "xdc.peer": msg.dst, "xdc.term": msg.term,
                            "xdc.position.first": first, "xdc.position.last": last,
                            telemetry.MESSAGING_BATCH_COUNT: len(msg.entries),
                            "xdc.replicate.bytes": sum([len(e[2]) for e in msg.entries])})
        batches = self._shipped.setdefault(msg.dst, collections.deque())
        if len(batches) >= MAX_TRACKED:
            _end(batches.popleft().span, "untracked: too many batches in flight")
        batches.append(_Shipped(first, last, time.monotonic(), span))
        return telemetry.carrier_of(span) if span is not None else None

    def observe(self, msg: Message, trace_context: Mapping[str, str]) -> None:
        """A message received from a peer, before the replicator sees it."""
        if not telemetry.active():
            return
        try:
            if isinstance(msg, AppendReply):
                self._replied(msg)
            elif isinstance(msg, Append) and msg.entries and telemetry.tracing():
                self._received(msg, trace_context)
        except Exception:
            log.exception("%s: replication telemetry failed on %s", self.node_id,
                          type(msg).__name__)

    def _replied(self, m: AppendReply) -> None:
        batches = self._shipped.get(m.src)
        if m.ok:
            if m.match > self._match.get(m.src, 0):
                self._match[m.src] = m.match
            if not batches:
                return
            now = time.monotonic()
            lag = telemetry.metrics().follower_commit_lag
            attrs = {"xdc.peer": m.src}
            while batches and batches[0].last <= m.match:
                b = batches.popleft()
                lag.record(now - b.sent, attrs)
                if b.span is not None:
                    b.span.set_attribute("xdc.match", m.match)
                    b.span.end()
        elif batches:
            # A mismatch or a fence: the leader backs up and ships again (new spans).
            error = (f"fenced by term {m.higher_term}" if m.higher_term
                     else f"log mismatch at {m.rejected}")
            while batches:
                _end(batches.popleft().span, error)

    def _lag_records(self) -> list[tuple[float, Mapping[str, Any]]]:
        if not self._is_leader():
            return []
        last = self._last_position()
        out = []
        match = dict(self._match)
        for peer, batches in list(self._shipped.items()):
            oldest = batches[0].first - 1 if batches else None
            acked = match.get(peer, oldest)
            if acked is not None:
                out.append((float(max(0, last - acked)), {"xdc.peer": peer}))
        for peer, acked in match.items():
            if peer not in self._shipped:
                out.append((float(max(0, last - acked)), {"xdc.peer": peer}))
        return out

    def _lag_seconds(self) -> list[tuple[float, Mapping[str, Any]]]:
        if not self._is_leader():
            return []
        now = time.monotonic()
        out = []
        for peer, batches in list(self._shipped.items()):
            oldest = batches[0].sent if batches else now
            out.append((max(0.0, now - oldest), {"xdc.peer": peer}))
        return out

    # ---- follower ----------------------------------------------------------------------

    def _received(self, msg: Append, carrier: Mapping[str, str]) -> None:
        """An Append with entries from the leader: a span until this node acknowledges."""
        producers = record_contexts(e.payload for e in msg.entries)
        first, last = msg.entries[0].position, msg.entries[-1].position
        parent = telemetry.extract(carrier)
        if not carrier:  # a leader that does not trace: the producers' rule instead
            parent, _ = telemetry.parent_and_links(producers)
        span = telemetry.open_span(
            "xdc.replica.append", context=parent, kind=SpanKind.SERVER,
            links=[Link(sc) for sc in producers],
            attributes={"xdc.node": self.node_id, "xdc.leader": msg.src, "xdc.term": msg.term,
                        "xdc.position.first": first, "xdc.position.last": last,
                        telemetry.MESSAGING_BATCH_COUNT: len(msg.entries)})
        if len(self._inbound) >= MAX_TRACKED:
            _end(self._inbound.popleft()[4], "untracked: too many batches in flight")
        self._inbound.append((msg.src, msg.term, msg.prev_pos, last, span))

    def _ack(self, reply: AppendReply) -> None:
        if not self._inbound:
            return
        keep: collections.deque[_Inbound] = collections.deque()
        for entry in self._inbound:
            leader, term, prev, last, span = entry
            if leader != reply.dst:
                keep.append(entry)
            elif reply.ok and last <= reply.match:
                span.set_attribute("xdc.match", reply.match)
                span.end()
            elif not reply.ok and reply.higher_term and term < reply.higher_term:
                # This node promised a later term: none of this leader's batches of an
                # earlier one will be acknowledged (the reply to a deferred ack names no
                # rejected position, core._release). The same leader's batches of the
                # promised term, if it won it, go on.
                _end(span, f"fenced: promised term {reply.higher_term}")
            elif not reply.ok and prev == reply.rejected:
                _end(span, f"log mismatch at {reply.rejected}")
            else:
                keep.append(entry)
        self._inbound = keep


class FailoverClock:
    """Times an election as this node sees it: from the lease lost (or leadership given
    up) or a vacancy observed, to the next term (`elected`) and, on the winner, to open
    writes (`open`). Each failover is one `xdc.failover` span."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._t0: float | None = None
        self._reason = ""
        self._span: Span | None = None
        self._term = 0

    def lost(self, reason: str) -> None:
        """This node gave up leadership (lease, quorum, switchover). Loop thread."""
        self._begin(f"leadership lost: {reason}")

    def vacant(self) -> None:
        self._begin("vacancy observed")

    def _begin(self, reason: str) -> None:
        if self._t0 is not None:
            return
        self._t0 = time.monotonic()
        self._reason = reason
        if telemetry.tracing():
            self._span = telemetry.tracer().start_span(
                "xdc.failover", context=Context(), kind=SpanKind.INTERNAL,
                attributes={"xdc.node": self.node_id, "xdc.failover.reason": reason,
                            "xdc.term.previous": self._term})

    def leader_seen(self, term: int, won: bool) -> None:
        """A leader holds `term` (this node when `won`)."""
        if term <= self._term:
            return
        self._term = term
        if self._t0 is None:
            return
        took = time.monotonic() - self._t0
        telemetry.metrics().failover_duration.record(took, {
            "xdc.failover.phase": "elected", "xdc.node": self.node_id,
            "xdc.failover.role": "winner" if won else "observer"})
        if self._span is not None:
            self._span.add_event("elected", {"xdc.term": term, "xdc.elected_s": took,
                                             "xdc.failover.role": "winner" if won
                                             else "observer"})
            self._span.set_attribute("xdc.term", term)
        log.info("%s: term %d elected %.3f s after %s", self.node_id, term, took, self._reason)
        if not won:
            self._finish()

    def opened(self, term: int) -> None:
        """This node's term `term` opened for writes."""
        self.leader_seen(term, won=True)
        if self._t0 is None:
            return
        took = time.monotonic() - self._t0
        telemetry.metrics().failover_duration.record(took, {
            "xdc.failover.phase": "open", "xdc.node": self.node_id,
            "xdc.failover.role": "winner"})
        if self._span is not None:
            self._span.add_event("open", {"xdc.term": term, "xdc.open_s": took})
        self._finish()

    def _finish(self) -> None:
        self._t0 = None
        if self._span is not None:
            self._span.end()
            self._span = None

    def stop(self) -> None:
        _end(self._span, "node stopping")
        self._span = None
        self._t0 = None
