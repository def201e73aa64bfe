"""The peer link (geo/transport.py) with real gRPC servers on loopback."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from typing import Any

import grpc
import pytest

from geo.etcd_server import free_ports
from geo.replication.messages import Append, Entry, Promise
from geo.transport import PeerSender, ReplicationService, decode, encode
from store.server import listen_on, new_server
from tests.support.store import run, wait_until
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc

CLUSTER = "xdc-test"


class CountingService(ReplicationService):
    """Counts the replication streams opened to it (before any message arrives)."""

    streams = 0

    async def Stream(self, request_iterator: Any,
                     context: grpc.aio.ServicerContext) -> rpb.StreamSummary:
        self.streams += 1
        return await super().Stream(request_iterator, context)


async def _status() -> rpb.NodeStatus:
    return rpb.NodeStatus(node_id="b")


async def _switchover(target: str, timeout_s: float) -> rpb.SwitchoverResponse:
    raise AssertionError("not called")


def test_an_idle_sender_replaces_a_failed_stream_before_it_has_anything_to_send(
        caplog: pytest.LogCaptureFixture) -> None:
    """A stream opened while the peer was down used to be found dead only by the next
    write, and that write's messages were lost: in a switchover it was a follower's
    promise to the new leader, which then waited for another voter's. The sender now
    reconnects while idle, so the first message after the peer is back is delivered."""
    caplog.set_level(logging.DEBUG, logger="xdc.transport")
    delivered: list[object] = []

    async def body() -> None:
        port = free_ports(1)[0]
        sender = PeerSender(CLUSTER, "a", "b", f"127.0.0.1:{port}")
        sender.start()
        service = CountingService(CLUSTER, "b", {"a", "b"}, delivered.extend,
                                  lambda: rpb.TipResponse(node_id="b"), _status, _switchover)
        server = new_server()
        try:
            await wait_until(lambda: any("a -> b: stream ended" in r.getMessage()
                                         for r in caplog.records), 10,
                             "a failed stream while the peer is down")
            rpb_grpc.add_ReplicationServicer_to_server(service, server)
            assert listen_on(server, f"127.0.0.1:{port}", None) == port
            await server.start()
            await wait_until(lambda: service.streams >= 1, 10,
                             "the idle sender's new stream to the peer")
            sender.send(Promise(src="a", dst="b", term=7))
            await wait_until(lambda: delivered == [Promise(src="a", dst="b", term=7)], 5,
                             "the first message after the peer came back")
            assert sender.sent == 1
        finally:
            await sender.stop()
            await server.stop(0)
    run(body, 40)


def test_a_backlog_queued_while_the_peer_was_down_goes_stale_and_never_wedges_the_link(
        ) -> None:
    """While the peer is down, the leader queues probes of ~0.7 MB each: past
    MAX_QUEUED_BYTES the oldest are dropped, and once STALE_AFTER_S old they are dropped
    instead of sent. Before, every failed attempt counted as connected, so nothing was
    ever stale, and the first 256 queued messages (~28 MB) made one write over the
    peers' gRPC message limit that failed on every retry: nothing was delivered again
    (a review found it). Batches now stay under MAX_BATCH_BYTES."""
    from geo import transport

    delivered: list[object] = []

    async def body() -> None:
        port = free_ports(1)[0]
        sender = PeerSender(CLUSTER, "a", "b", f"127.0.0.1:{port}")
        sender.start()
        server = new_server()
        try:
            probe = Append("a", "b", 5, 10, 5, (Entry(11, 5, b"x" * 700_000),), 10)
            for _ in range(120):  # 84 MB
                sender.send(probe)
            assert sender._queued_bytes <= transport.MAX_QUEUED_BYTES
            assert sender.dropped > 0 and not sender.connected
            # The queue ages past STALE_AFTER_S (the scenario: a peer down that long).
            await asyncio.sleep(transport.STALE_AFTER_S + 0.1)
            fresh = [Append("a", "b", 5, 10, 5, (), 10 + i) for i in range(3)]
            service = ReplicationService(CLUSTER, "b", {"a", "b"}, delivered.extend,
                                         lambda: rpb.TipResponse(node_id="b"), _status,
                                         _switchover)
            rpb_grpc.add_ReplicationServicer_to_server(service, server)
            assert listen_on(server, f"127.0.0.1:{port}", None) == port
            await server.start()
            for m in fresh:
                sender.send(m)
            await wait_until(lambda: delivered[-3:] == fresh, 10,
                             "the fresh messages after the peer came back")
            assert probe not in delivered  # stale: dropped, not sent late
            assert sender.connected
            # A burst sent at once travels in writes under the byte cap, all delivered.
            delivered.clear()
            burst = [Append("a", "b", 5, 10, 5, (Entry(11, 5, b"y" * 700_000),), 20 + i)
                     for i in range(40)]  # 28 MB: over the peers' message limit at once
            for m in burst:
                sender.send(m)
            await wait_until(lambda: len(delivered) == len(burst), 20, "the burst")
            assert delivered == burst
        finally:
            await sender.stop()
            await server.stop(0)
    run(body, 60)


def test_entries_sent_to_several_peers_in_differently_cut_slices_decode_exactly() -> None:
    """A leader ships the same records to each follower in slices cut differently; whole
    blocks of them are serialized once (geo/transport.py). Every slice must decode to
    exactly its entries, and a block is reused only for the very same Entry objects: a
    rewritten suffix (new objects at the same positions, another term) is encoded anew."""
    rng = random.Random(7)

    def entries(first: int, n: int, term: int) -> tuple[Entry, ...]:
        return tuple(Entry(first + i, term, rng.randbytes(rng.randrange(1, 300)))
                     for i in range(n))

    log = entries(1, 3000, 2)
    cuts = [(0, 1000), (0, 2000), (1000, 2000), (2000, 3000), (1000, 3000), (5, 6),
            (63, 129), (0, 3000)]
    for lo, hi in cuts * 2:  # the second pass hits the blocks cached by the first
        msg = Append(src="a", dst="b", term=2, prev_pos=lo, prev_term=2 if lo else 0,
                     entries=log[lo:hi], commit=1)
        assert decode(encode(msg)) == msg, (lo, hi)
    rewritten = log[:1500] + entries(1501, 1500, 3)
    for lo, hi in cuts:
        msg = Append(src="a", dst="b", term=3, prev_pos=lo, prev_term=2 if lo else 0,
                     entries=rewritten[lo:hi], commit=1)
        assert decode(encode(msg)) == msg, (lo, hi)

    # Framed by a sender into one PeerBatch: what the peer's service parses.
    sender = PeerSender(CLUSTER, "a", "b", "127.0.0.1:1")
    msgs = [Append(src="a", dst="b", term=3, prev_pos=lo, prev_term=2 if lo else 0,
                   entries=rewritten[lo:hi], commit=1) for lo, hi in cuts]
    for m in msgs:
        sender.send(m, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    batch = rpb.PeerBatch.FromString(b"".join(itertools.chain(
        (sender._head,), *(parts for _, _, parts in sender._queue))))
    assert (batch.cluster, batch.src) == (CLUSTER, "a")
    assert [decode(pm) for pm in batch.messages] == msgs
    assert all(pm.trace_context["traceparent"].startswith("00-1111") for pm in batch.messages)
