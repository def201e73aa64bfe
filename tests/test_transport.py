"""The peer link (geo/transport.py) with real gRPC servers on loopback."""

from __future__ import annotations

import logging
import socket
from typing import Any

import grpc
import pytest

from geo.replication.messages import Promise
from geo.transport import PeerSender, ReplicationService
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_idle_sender_replaces_a_failed_stream_before_it_has_anything_to_send(
        caplog: pytest.LogCaptureFixture) -> None:
    """A stream opened while the peer was down used to be found dead only by the next
    write, and that write's messages were lost: in a switchover it was a follower's
    promise to the new leader, which then waited for another voter's. The sender now
    reconnects while idle, so the first message after the peer is back is delivered."""
    caplog.set_level(logging.DEBUG, logger="xdc.transport")
    delivered: list[object] = []

    async def status() -> rpb.NodeStatus:
        return rpb.NodeStatus(node_id="b")

    async def switchover(target: str, timeout_s: float) -> rpb.SwitchoverResponse:
        raise AssertionError("not called")

    async def body() -> None:
        port = _free_port()
        sender = PeerSender(CLUSTER, "a", "b", f"127.0.0.1:{port}")
        sender.start()
        service = CountingService(CLUSTER, "b", {"a", "b"}, delivered.extend,
                                  lambda: rpb.TipResponse(node_id="b"), status, switchover)
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
