"""The fault-injecting WAN proxy (geo/proxy.py) with real sockets on loopback.

Every test runs its own event loop; timing assertions are lower bounds only, and waits
are on conditions with timeouts (the only fixed waits assert that nothing arrives)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geo.proxy import (
    AsyncProxyControl,
    Link,
    ProxyControl,
    ProxyControlError,
    ProxyServer,
)

ROOT = Path(__file__).resolve().parent.parent
SILENCE_S = 0.3  # how long "no answer" is watched for


def run(fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(fn(), timeout)
    return asyncio.run(main())


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    """Echoes every byte back; half-closes after the client's EOF."""
    writers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            writers.discard(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for w in list(writers):
            w.close()
        await server.wait_closed()


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    data: bytes = b"ping", timeout: float = 5.0) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout)


async def is_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the peer closed (EOF) or reset the connection, within timeout."""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                return True
    except (ConnectionError, OSError):
        return True


async def silent(reader: asyncio.StreamReader) -> bool:
    """True when nothing (not even EOF) arrives within SILENCE_S."""
    try:
        await asyncio.wait_for(reader.read(1), SILENCE_S)
    except TimeoutError:
        return True
    return False


def close(writer: asyncio.StreamWriter) -> None:
    writer.close()


# -- forwarding, delay, ordering --

def test_bytes_arrive_intact_and_in_order_under_jitter() -> None:
    async def main() -> None:
        rng = random.Random(7)
        payload = rng.randbytes(1_500_000)
        async with echo_server() as target, \
                Link("a->b", target, delay_ms=3, jitter_ms=3, seed=11,
                     max_buffer=16 * 1024) as link:
            reader, writer = await connect(link.address)

            async def send() -> None:
                i = 0
                while i < len(payload):
                    n = rng.randint(1, 40_000)
                    writer.write(payload[i:i + n])
                    await writer.drain()
                    i += n
                writer.write_eof()  # half-close travels through the proxy

            sender = asyncio.create_task(send())
            got = await reader.read()  # until the echo server's EOF comes back
            await sender
            assert len(got) == len(payload)
            assert got == payload
            st = link.status()
            assert st["bytes_forward"] == st["bytes_backward"] == len(payload)
            assert st["max_buffered"] <= 16 * 1024
            close(writer)
            await wait_until(lambda: link.status()["connections"] == 0, what="conn closed")
    run(main)


def test_one_way_delay_is_applied_each_direction() -> None:
    async def main() -> None:
        async with echo_server() as target, Link("a->b", target, delay_ms=50) as link:
            reader, writer = await connect(link.address)
            t0 = time.monotonic()
            assert await roundtrip(reader, writer) == b"ping"
            assert time.monotonic() - t0 >= 0.095
            t0 = time.monotonic()
            assert await roundtrip(reader, writer, b"again") == b"again"
            assert time.monotonic() - t0 >= 0.095
            # Only the forward direction delayed now.
            link.set(delay_ms=0, direction="backward")
            t0 = time.monotonic()
            assert await roundtrip(reader, writer) == b"ping"
            assert time.monotonic() - t0 >= 0.045
            st = link.status()
            assert st["forward"]["delay_ms"] == 50 and st["backward"]["delay_ms"] == 0
            close(writer)
    run(main)


def test_bandwidth_cap_slows_transfer() -> None:
    async def main() -> None:
        async with echo_server() as target, \
                Link("a->b", target, bandwidth_bps=200_000) as link:
            reader, writer = await connect(link.address)
            data = random.Random(3).randbytes(40_000)
            t0 = time.monotonic()
            assert await roundtrip(reader, writer, data) == data
            # 40 kB each way at 200 kB/s: at least 0.2 s each way, minus a chunk.
            assert time.monotonic() - t0 >= 0.3
            close(writer)
    run(main)


# -- partitions --

def test_blackhole_keeps_connections_silent_and_heal_restores() -> None:
    async def main() -> None:
        async with echo_server() as target, Link("a->b", target) as link:
            r1, w1 = await connect(link.address)
            assert await roundtrip(r1, w1) == b"ping"
            link.partition("blackhole")
            w1.write(b"lost?")
            assert await silent(r1)
            assert not r1.at_eof() and not w1.is_closing()
            # A new connection is accepted but never connected onward.
            r2, w2 = await connect(link.address)
            w2.write(b"hello")
            assert await silent(r2)
            st = link.status()
            assert st["partition"] == "blackhole" and st["held"] == 1
            link.heal()
            # The established connection resumes: the held request is answered.
            assert await asyncio.wait_for(r1.readexactly(5), 5) == b"lost?"
            assert await roundtrip(r1, w1) == b"ping"
            # The connection accepted during the blackhole is reset on heal.
            assert await is_closed(r2)
            # New connections work again.
            r3, w3 = await connect(link.address)
            assert await roundtrip(r3, w3) == b"ping"
            assert link.status()["partition"] is None
            for w in (w1, w2, w3):
                close(w)
    run(main)


def test_heal_with_reset_closes_blackholed_connections() -> None:
    async def main() -> None:
        async with echo_server() as target, Link("a->b", target) as link:
            r1, w1 = await connect(link.address)
            assert await roundtrip(r1, w1) == b"ping"
            link.partition("blackhole")
            link.heal(reset=True)
            assert await is_closed(r1)
            r2, w2 = await connect(link.address)
            assert await roundtrip(r2, w2) == b"ping"
            close(w1)
            close(w2)
    run(main)


def test_reset_partition_closes_and_refuses() -> None:
    async def main() -> None:
        async with echo_server() as target, Link("a->b", target) as link:
            r1, w1 = await connect(link.address)
            assert await roundtrip(r1, w1) == b"ping"
            link.partition("reset")
            assert await is_closed(r1)
            try:
                r2, w2 = await connect(link.address)
            except ConnectionError:
                pass  # refused outright is fine too
            else:
                w2.write(b"x")
                assert await is_closed(r2)
                close(w2)
            await wait_until(lambda: link.status()["refused"] >= 1, what="refused")
            assert link.status()["connections"] == 0
            link.heal()
            r3, w3 = await connect(link.address)
            assert await roundtrip(r3, w3) == b"ping"
            close(w1)
            close(w3)
    run(main)


def test_drop_rate_one_cuts_connections() -> None:
    async def main() -> None:
        async with echo_server() as target, Link("a->b", target, drop_rate=1.0) as link:
            for _ in range(3):
                r, w = await connect(link.address)
                w.write(b"ping")
                assert await is_closed(r)
                close(w)
            assert link.status()["drops"] == 3
            link.set(drop_rate=0.0)
            r, w = await connect(link.address)
            assert await roundtrip(r, w) == b"ping"
            close(w)
    run(main)


def test_drop_rate_is_seeded() -> None:
    async def pattern(seed: int) -> list[bool]:
        out = []
        async with echo_server() as target, \
                Link("a->b", target, drop_rate=0.4, seed=seed) as link:
            for _ in range(16):
                r, w = await connect(link.address)
                w.write(b"ping")
                try:
                    out.append(await asyncio.wait_for(r.read(4), 5) == b"ping")
                except ConnectionError:
                    out.append(False)
                close(w)
                # Wait for the connection to go, so the next one draws the next samples.
                await wait_until(lambda: link.status()["connections"] == 0, what="closed")
        return out

    async def main() -> None:
        first = await pattern(5)
        assert first == await pattern(5)
        assert True in first and False in first
    run(main)


# -- bounded buffering --

def test_slow_reader_does_not_grow_proxy_buffers() -> None:
    cap = 32 * 1024

    async def main() -> None:
        go = asyncio.Event()
        received: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await go.wait()  # reads nothing until released
            h, n = hashlib.sha256(), 0
            while data := await reader.read(65536):
                h.update(data)
                n += len(data)
            received.set_result((n, h.hexdigest()))
            writer.close()

        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accept
        lsock.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(slow, sock=lsock)
        target = f"127.0.0.1:{lsock.getsockname()[1]}"
        payload = random.Random(9).randbytes(8 * 1024 * 1024)
        try:
            async with Link("a->b", target, max_buffer=cap) as link:
                _, writer = await connect(link.address)
                writer.write(payload)  # far more than every buffer on the way
                await wait_until(lambda: link.status()["backpressured"] >= 1, 10,
                                 "the proxy to stop reading")
                st = link.status()
                assert cap // 2 <= st["buffered"] <= cap
                assert st["max_buffered"] <= cap
                go.set()
                await writer.drain()
                writer.write_eof()
                n, digest = await asyncio.wait_for(received, 10)
                assert n == len(payload)
                assert digest == hashlib.sha256(payload).hexdigest()
                st = link.status()
                assert st["max_buffered"] <= cap
                assert st["bytes_forward"] == len(payload)
                close(writer)
        finally:
            server.close()
            await server.wait_closed()
    run(main)


def test_close_cleans_up_connections_and_tasks() -> None:
    async def main() -> None:
        async with echo_server() as target:
            link = await Link("a->b", target, delay_ms=20).start()
            conns = [await connect(link.address) for _ in range(3)]
            for r, w in conns:
                assert await roundtrip(r, w) == b"ping"
            link.partition("blackhole")
            held = await connect(link.address)
            await wait_until(lambda: link.status()["held"] == 1, what="held")
            conns[0][1].write(b"in flight")
            await link.close()
            assert link.status()["connections"] == 0 and not link.tasks
            for r, w in [*conns, held]:
                assert await is_closed(r)
                close(w)
            with pytest.raises(ConnectionError):
                await connect(link.address)
            # Nothing of the proxy is left running in this loop.
            left = [t for t in asyncio.all_tasks()
                    if t.get_coro().cr_code.co_filename.endswith("geo/proxy.py")]
            assert not left
    run(main)


# -- control plane --

REGIONS = ("us-east", "eu-west", "ap-south")


def mesh_links(target: str) -> list[dict[str, Any]]:
    return [{"name": f"{a}-1->{b}-1", "listen": "127.0.0.1:0", "target": target}
            for a in REGIONS for b in REGIONS if a != b]


def test_control_plane_over_tcp() -> None:
    async def main() -> None:
        async with echo_server() as target:
            config = {"seed": 1, "links": mesh_links(target)}
            async with ProxyServer.from_config(config, control="127.0.0.1:0") as server:
                ctl = AsyncProxyControl(server.control_address)
                await ctl.ping()
                status = await ctl.status()
                assert sorted(status) == sorted(server.links)
                us_eu, eu_ap = "us-east-1->eu-west-1", "eu-west-1->ap-south-1"

                assert await ctl.set(link=us_eu, delay_ms=30, jitter_ms=2) == [us_eu]
                st = (await ctl.status(link=us_eu))[us_eu]
                assert st["forward"]["delay_ms"] == 30 and st["backward"]["jitter_ms"] == 2
                await ctl.set(link=us_eu, delay_ms=5, direction="forward")
                st = (await ctl.status(link=us_eu))[us_eu]
                assert st["forward"]["delay_ms"] == 5 and st["backward"]["delay_ms"] == 30

                r_early, w_early = await connect(status[us_eu]["listen"])
                assert await roundtrip(r_early, w_early) == b"ping"
                # Cut us-east off: the four links touching it, nothing else.
                cut = await ctl.partition(region="us-east", mode="blackhole")
                assert sorted(cut) == sorted(n for n in server.links if "us-east" in n)
                status = await ctl.status()
                assert {n for n, s in status.items() if s["partition"]} == set(cut)
                r, w = await connect(status[eu_ap]["listen"])
                assert await roundtrip(r, w) == b"ping"
                close(w)
                w_early.write(b"ping")
                assert await silent(r_early)
                r, w = await connect(status[us_eu]["listen"])  # accepted, held, reset on heal
                w.write(b"ping")
                assert await silent(r)
                healed = await ctl.heal(region="us-east")
                assert sorted(healed) == sorted(cut)
                assert await asyncio.wait_for(r_early.readexactly(4), 5) == b"ping"
                assert await is_closed(r)
                close(w)
                close(w_early)

                assert sorted(await ctl.partition(between=["eu-west", "ap-south"],
                                                  mode="reset")) == \
                    ["ap-south-1->eu-west-1", "eu-west-1->ap-south-1"]
                assert sorted(await ctl.set(src="us-east", drop_rate=0.5)) == \
                    ["us-east-1->ap-south-1", "us-east-1->eu-west-1"]
                assert await ctl.set(src="us-east", dst="ap-south", drop_rate=0) == \
                    ["us-east-1->ap-south-1"]
                assert len(await ctl.heal()) == len(server.links)  # no selector: all
                assert all(s["partition"] is None for s in (await ctl.status()).values())
                assert len(await ctl.set(all_links=True, delay_ms=1)) == 6

                # Errors change nothing.
                for bad in ({"op": "nope"},
                            {"op": "set", "link": "x->y", "delay_ms": 1},
                            {"op": "set", "link": us_eu, "drop_rate": 2},
                            {"op": "set", "link": us_eu, "delay_ms": -1},
                            {"op": "set", "link": us_eu, "delay_ms": "1"},
                            {"op": "set", "link": us_eu, "dealy_ms": 1},
                            {"op": "set", "link": us_eu, "direction": "up"},
                            {"op": "partition", "link": us_eu, "mode": "cut"},
                            {"op": "partition"},
                            {"op": "partition", "region": "mars"},
                            {"op": "partition", "region": "us-east", "link": us_eu},
                            [1, 2]):
                    with pytest.raises(ProxyControlError):
                        await ctl.request(bad)  # type: ignore[arg-type]
                status = await ctl.status()
                assert all(s["partition"] is None for s in status.values())
                assert status[us_eu]["forward"]["drop_rate"] == 0.5
                assert status[us_eu]["forward"]["delay_ms"] == 1

                # Several requests on one connection, and a malformed line.
                r, w = await connect(server.control_address)
                w.write(b'{"op": "ping"}\nnot json\n{"op": "status", "link": "%s"}\n'
                        % us_eu.encode())
                replies = [json.loads(await asyncio.wait_for(r.readline(), 5))
                           for _ in range(3)]
                assert replies[0] == {"ok": True}
                assert replies[1]["ok"] is False and "JSON" in replies[1]["error"]
                assert list(replies[2]["links"]) == [us_eu]
                close(w)

                # The blocking client, from a thread.
                blocking = ProxyControl(server.control_address)
                assert await asyncio.to_thread(blocking.partition, link=eu_ap) == [eu_ap]
                st = await asyncio.to_thread(blocking.status)
                assert st[eu_ap]["partition"] == "blackhole"
                assert await asyncio.to_thread(blocking.heal, link=eu_ap) == [eu_ap]
                with pytest.raises(ProxyControlError):
                    await asyncio.to_thread(blocking.set, link="nope", delay_ms=1)
    run(main)


def test_command_line_process(tmp_path: Path) -> None:
    async def main() -> None:
        async with echo_server() as target:
            config = tmp_path / "links.json"
            config.write_text(json.dumps({"seed": 1, "links": [
                {"name": "us-east-1->eu-west-1", "listen": "127.0.0.1:0", "target": target,
                 "delay_ms": 15, "jitter_ms": 2},
                {"name": "eu-west-1->us-east-1", "listen": "127.0.0.1:0", "target": target},
            ]}))
            with open(tmp_path / "proxy.log", "wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "geo.proxy", "--config", str(config),
                    "--control", "127.0.0.1:0", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                    stderr=log)
            try:
                assert proc.stdout is not None
                ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15))
                assert ready["event"] == "ready"
                assert set(ready["links"]) == {"us-east-1->eu-west-1", "eu-west-1->us-east-1"}
                assert ready["control"].startswith("127.0.0.1:")
                link = ready["links"]["us-east-1->eu-west-1"]
                r, w = await connect(link)
                t0 = time.monotonic()
                assert await roundtrip(r, w) == b"ping"
                assert time.monotonic() - t0 >= 0.02  # 15 ms +- 2 each way
                ctl = AsyncProxyControl(ready["control"])
                await ctl.set(link="us-east-1->eu-west-1", delay_ms=50, jitter_ms=0)
                t0 = time.monotonic()
                assert await roundtrip(r, w) == b"ping"
                assert time.monotonic() - t0 >= 0.095
                await ctl.partition(region="eu-west", mode="reset")
                assert await is_closed(r)
                close(w)
                status = await ctl.status()
                assert all(s["partition"] == "reset" for s in status.values())
                os.kill(proc.pid, signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 10) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert b"Traceback" not in (tmp_path / "proxy.log").read_bytes()
    run(main)


def test_command_line_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "links.json"
    config.write_text(json.dumps({"links": [{"name": "a->b", "target": "nowhere"}]}))
    import subprocess
    out = subprocess.run([sys.executable, "-m", "geo.proxy", "--config", str(config)],
                         cwd=ROOT, capture_output=True, timeout=15)
    assert out.returncode == 1
    assert json.loads(out.stdout.splitlines()[0])["event"] == "error"


# -- gRPC through the proxy --

def test_grpc_through_proxy_and_blackhole() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    async def main() -> None:
        async with Link("a->b", f"127.0.0.1:{port}", delay_ms=5) as link:
            channel = grpc.insecure_channel(link.address, options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 300)])
            stub = health_pb2_grpc.HealthStub(channel)
            req = health_pb2.HealthCheckRequest(service="")

            def check(timeout: float, wait: bool = False) -> Any:
                return stub.Check(req, timeout=timeout, wait_for_ready=wait)

            async def serving(timeout: float = 10.0) -> None:
                # After a heal a call can still land on a connection the partition
                # doomed (accepted and reset just before): like a node, retry.
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        reply = await asyncio.to_thread(check, 5, True)
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.UNAVAILABLE or \
                                time.monotonic() > deadline:
                            raise
                        continue
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                    return

            try:
                reply = await asyncio.to_thread(check, 5, True)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                link.partition("blackhole")
                with pytest.raises(grpc.RpcError) as err:
                    await asyncio.to_thread(check, 0.5)
                assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                            grpc.StatusCode.UNAVAILABLE)
                link.heal()
                await serving()
                link.partition("reset")
                with pytest.raises(grpc.RpcError) as err:
                    await asyncio.to_thread(check, 1)
                assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                            grpc.StatusCode.UNAVAILABLE)
                link.heal()
                await serving()
            finally:
                channel.close()

    try:
        run(main, timeout=25)
    finally:
        server.stop(None)
