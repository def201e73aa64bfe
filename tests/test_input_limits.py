"""Input hardening (issue 7, item 4): every server refuses malformed bytes with
INVALID_ARGUMENT, and each named limit of a request is refused with a status naming the
field and the limit, with nothing written. Real servers on loopback, real LMDB."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.support.store import run
from tests.test_gateway import exchange
from xdc.v1 import exchange_pb2 as xpb

GATEWAY_METHODS = {
    "/xdc.v1.OrderGateway/SubmitOrder": "unary_unary",
    "/xdc.v1.OrderGateway/CancelOrder": "unary_unary",
    "/xdc.v1.OrderGateway/ReplaceOrder": "unary_unary",
    "/xdc.v1.OrderGateway/StreamExecutions": "unary_stream",
    "/xdc.v1.OrderGateway/StreamBook": "unary_stream",
}


async def raw_call(channel: grpc.aio.Channel, method: str, shape: str, payload: bytes) -> None:
    """One call with `payload` as the request's bytes (no serializer); raises
    AioRpcError with the server's status. A stream is read to its first message."""
    if shape == "unary_unary":
        await channel.unary_unary(method)(payload, timeout=5)
    else:
        call = channel.unary_stream(method)(payload, timeout=5)
        await call.read()
        call.cancel()


def test_malformed_bytes_get_invalid_argument_on_a_generated_servicer(tmp_path: Path) -> None:
    """The gateway's servicer is generated code, whose deserializer raises on bad bytes
    (gRPC alone answers UNKNOWN): store.server.RequestGuard answers INVALID_ARGUMENT."""
    async def body() -> None:
        async with exchange(tmp_path) as x:
            async with grpc.aio.insecure_channel(x.gateway.address) as ch:
                for method, shape in GATEWAY_METHODS.items():
                    # Not protobuf at all; then field 1 (a string) holding invalid UTF-8.
                    for payload in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):
                        with pytest.raises(grpc.aio.AioRpcError) as rpc:
                            await raw_call(ch, method, shape, payload)
                        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                        assert f"not a valid request of {method}" in rpc.value.details()
            for g, n in x.init_counts.items():
                assert len(await x.inputs(g)) == n
            # The same server answers well-formed requests.
            ok = await x.stub.SubmitOrder(xpb.SubmitOrderRequest(
                symbol="BTC-USD", account="alice", client_order_id="c1", side=xpb.BUY, qty=1,
                price=50000))
            assert ok.input_position > 0
    run(body)
