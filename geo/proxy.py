"""A fault-injecting TCP proxy for the WAN links of the local multi-region cluster.

This kernel has no `tc netem`, so the WAN between regions is a user-space proxy on
loopback (DESIGN §4): every inter-region link is a listening port that forwards each
accepted connection to one target `host:port`, both directions, with faults that can be
changed at run time. Nodes speak gRPC (HTTP/2 over TCP) through it; the proxy never
looks inside the bytes.

Faults
------
Per direction of a link (`forward` = from the connecting side to the target,
`backward` = the answers), changeable at any time:

- `delay_ms`, `jitter_ms`: one-way delay of every chunk read from a socket, plus a
  uniform sample in [-jitter, +jitter] (never below zero) from the link's seeded
  `random.Random`. A TCP byte stream cannot be reordered, so a chunk leaves at
  max(arrival + delay + jitter sample, the previous chunk's departure) within its
  connection. New settings apply to chunks read from then on.
- `drop_rate`: probability, per chunk, that the connection is cut (both sockets closed
  with RST). TCP cannot lose bytes without breaking the stream: a lossy link shows up to
  its users as failed connections and retries. Seeded like the jitter.
- `bandwidth_bps`: a cap in bytes per second shared by every connection of the link in
  that direction (0 = unlimited); a chunk is held for its serialisation time.

Per link:

- `partition("blackhole")`: nothing is forwarded any more, in either direction, and
  nothing is read (senders' kernel buffers fill up, as behind a real cut); new
  connections are accepted but not connected onward. Peers see silence and time out.
- `partition("reset")`: every connection is closed with RST, and new ones are accepted
  and immediately reset (the listening socket stays bound, so a client's connect() may
  succeed before its first read or write fails; gRPC reports UNAVAILABLE either way).
  Right after a heal, a client may still hold such a doomed connection: callers retry.
- `heal(reset=False)`: forwarding resumes. Connections established before a blackhole
  resume where they stopped (data held in the proxy is delivered, in order, like TCP
  retransmissions after a short cut); connections accepted during the blackhole were
  never connected onward and are reset, so their clients reconnect at once. With
  `reset=True` every existing connection of the link is reset as well.

Memory is bounded: per connection and direction at most `max_buffer` bytes (default
256 KiB) are held between reading them from one socket and the other socket's kernel
accepting them. At the cap the proxy stops reading from the source (backpressure
reaches the sender through TCP) and reads again at half the cap. `Link.stats` counts
the bytes held now (`buffered`) and the highest figure seen for one connection and
direction (`max_buffered`). At most `MAX_HELD` connections accepted during a blackhole
are kept per link (the oldest is reset beyond that).

Control plane
-------------
`ProxyServer` hosts many named links (e.g. "us-east-1->eu-west-1") in one event loop and
listens on a loopback TCP port for newline-delimited JSON requests, each answered with
one JSON line: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. A connection may
carry any number of requests, one at a time.

    {"op": "ping"}                                  -> {"ok": true}
    {"op": "status"}                                -> {"ok": true, "links": {name: {...}}}
    {"op": "set", <selector>, "delay_ms": 30, "jitter_ms": 2, "drop_rate": 0.01,
     "bandwidth_bps": 0, "direction": "both" | "forward" | "backward"}
                                                    -> {"ok": true, "links": [names]}
    {"op": "partition", <selector>, "mode": "blackhole" | "reset"}
                                                    -> {"ok": true, "links": [names]}
    {"op": "heal", [<selector>], "reset": false}    -> {"ok": true, "links": [names]}

Fault fields left out of `set` keep their values; `direction` defaults to "both".
`mode` defaults to "blackhole". `heal` without a selector heals every link.

A selector is exactly one of:

- `"link": "a->b"` or `"links": ["a->b", ...]` (unknown names are an error);
- `"region": "R"`: every link with one end in R (cuts R off from the other regions);
- `"between": ["R1", "R2"]`: the links from R1 to R2 and from R2 to R1;
- `"src": "R1"` and/or `"dst": "R2"`: links from R1 and/or to R2 (one-way faults);
- `"all": true`: every link.

The ends of a link are its `src_region`/`dst_region` when its configuration names them,
else the two sides of its name split on "->" (node ids). A region name R matches an end
E when E == R or E starts with R + "-" (node "us-east-1" lies in region "us-east").

`ProxyControl(address)` is a blocking client and `AsyncProxyControl(address)` an asyncio
one, with methods mirroring the ops; both raise `ProxyControlError` on `"ok": false`.

Command line
------------
    python -m geo.proxy --config links.json --control 127.0.0.1:0 [--seed N]

links.json: `{"seed": 1, "max_buffer": 262144, "links": [{"name": "a->b", "listen":
"127.0.0.1:0", "target": "127.0.0.1:7101", "delay_ms": 15, "jitter_ms": 2,
"drop_rate": 0, "bandwidth_bps": 0, "src_region": "a", "dst_region": "b"}]}` (only
`links`, `name` and `target` are required). Once every port listens, one JSON line goes
to stdout: `{"event": "ready", "control": "127.0.0.1:PORT", "links": {name:
"127.0.0.1:PORT"}}` (on a start-up failure: `{"event": "error", "error": "..."}` and
exit status 1). SIGTERM or SIGINT closes every connection and exits with status 0.
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import socket
import struct
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("xdc.proxy")

# Bytes held per connection and direction before the proxy stops reading the source.
DEFAULT_MAX_BUFFER = 256 * 1024
# Largest single read from a socket: half the default buffer, so reading and writing a
# bulk transfer overlap (each chunk costs the proxy the same, whatever its size).
READ_CHUNK = 128 * 1024
# Connections accepted during a blackhole kept per link (the oldest is reset beyond).
MAX_HELD = 128
CONNECT_TIMEOUT_S = 5.0
# Longest control request line.
MAX_REQUEST = 1 << 20

PARTITION_MODES = ("blackhole", "reset")
DIRECTIONS = ("both", "forward", "backward")
FAULT_FIELDS = ("delay_ms", "jitter_ms", "drop_rate", "bandwidth_bps")
SELECTOR_FIELDS = ("link", "links", "region", "between", "src", "dst", "all")

_EOF = object()  # queued after the data when the source half-closed
_RESET = object()  # queued after the data when the source socket failed


def parse_address(address: str) -> tuple[str, int]:
    """"host:port" (or "[v6]:port") -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Faults:
    """Faults of one direction of a link."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    drop_rate: float = 0.0
    bandwidth_bps: float = 0.0  # bytes per second, 0 = unlimited

    def update(self, **values: Any) -> None:
        new = Faults(**{**asdict(self), **{k: v for k, v in values.items() if v is not None}})
        new.validate()
        for k, v in asdict(new).items():
            setattr(self, k, float(v))

    def validate(self) -> None:
        for name in FAULT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.drop_rate > 1:
            raise ValueError(f"drop_rate must be within [0, 1], got {self.drop_rate!r}")


class _Direction:
    """One direction of a link: its faults, bandwidth clock and byte counter."""

    def __init__(self) -> None:
        self.faults = Faults()
        self.free_at = 0.0  # when the (bandwidth-capped) wire is free again
        self.bytes = 0


def _set_linger0(transport: asyncio.BaseTransport) -> None:
    """Makes the next close of this socket send RST instead of FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Side(asyncio.BufferedProtocol):
    """One socket of a proxied connection (the accepted client or the upstream)."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.out: _Pipe  # bytes read here go there
        self.inp: _Pipe  # bytes written here come from there
        self.reading = True
        self.lost = False
        self.drained = asyncio.Event()
        self.drained.set()
        self._buf = bytearray(READ_CHUNK)

    # -- asyncio protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Nothing may wait in the transport's own buffer: a write "completes" only when
        # the kernel took every byte, so `buffered` counts all the proxy holds.
        transport.set_write_buffer_limits(high=0)
        self.conn.side_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)[: self.out.room()]

    def buffer_updated(self, nbytes: int) -> None:
        self.out.push(bytes(memoryview(self._buf)[:nbytes]))  # one copy, not two

    def eof_received(self) -> bool:
        self.out.push_end(_EOF)
        self.update_reading()
        return True  # keep the other half open

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.drained.set()
        self.conn.side_lost(self, exc)

    def pause_writing(self) -> None:
        self.drained.clear()

    def resume_writing(self) -> None:
        self.drained.set()

    # -- helpers --
    def update_reading(self) -> None:
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return
        want = not (self.conn.link.blackholed or self.conn.held or self.out.full
                    or self.out.ended)
        if want != self.reading:
            self.reading = want
            if want:
                t.resume_reading()
            else:
                t.pause_reading()


class _Pipe:
    """Bytes read from `src`, waiting for their departure time, then written to `dst`."""

    def __init__(self, conn: _Conn, src: _Side, dst: _Side, direction: _Direction) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.direction = direction
        self.queue: deque[tuple[float, Any]] = deque()
        self.buffered = 0
        self.full = False
        self.ended = False  # EOF or reset queued: nothing more is read from src
        self.done = False  # the sender finished (EOF written, or dst gone)
        self.last_at = 0.0
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def room(self) -> int:
        cap = self.conn.link.max_buffer
        # Reading is paused at the cap, so this is >= 1 whenever the transport reads.
        return max(1, min(READ_CHUNK, cap - self.buffered))

    def _depart(self, nbytes: int, faults: Faults) -> float:
        link = self.conn.link
        now = link.loop.time()
        at = now
        if faults.bandwidth_bps > 0 and nbytes:
            d = self.direction
            d.free_at = max(now, d.free_at) + nbytes / faults.bandwidth_bps
            at = d.free_at
        delay = faults.delay_ms
        if faults.jitter_ms > 0:
            delay += link.rng.uniform(-faults.jitter_ms, faults.jitter_ms)
        at += max(0.0, delay) / 1000.0
        self.last_at = max(at, self.last_at)
        return self.last_at

    def push(self, data: bytes) -> None:
        link = self.conn.link
        faults = self.direction.faults
        if faults.drop_rate > 0 and link.rng.random() < faults.drop_rate:
            link.stats["drops"] += 1
            self.conn.cut("drop")
            return
        self.queue.append((self._depart(len(data), faults), data))
        self.buffered += len(data)
        link.note_buffered(self.buffered)
        if self.buffered >= link.max_buffer:
            self.full = True
            self.src.update_reading()
        self.wake.set()

    def push_end(self, marker: object) -> None:
        if self.ended:
            return
        self.ended = True
        self.queue.append((self._depart(0, self.direction.faults), marker))
        self.wake.set()

    async def run(self) -> None:
        link = self.conn.link
        loop = link.loop
        while True:
            if self.dst.lost:
                self._finish()
                return
            if not self.queue or link.blackholed or self.dst.transport is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            at, data = self.queue[0]
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self.queue.popleft()
            if data is _RESET:
                self.conn.cut("peer reset")
                return
            if data is _EOF:
                assert self.dst.transport is not None
                with contextlib.suppress(OSError, RuntimeError):
                    self.dst.transport.write_eof()
                self._finish()
                return
            self.dst.transport.write(data)
            await self.dst.drained.wait()
            self.buffered -= len(data)
            self.direction.bytes += len(data)
            if self.full and self.buffered <= link.max_buffer // 2:
                self.full = False
                self.src.update_reading()

    def _finish(self) -> None:
        self.done = True
        self.queue.clear()
        self.buffered = 0
        self.conn.maybe_finish()


class _Conn:
    """One proxied connection: the accepted client socket and its upstream socket."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.fwd = _Pipe(self, self.client, self.upstream, link.forward)
        self.bwd = _Pipe(self, self.upstream, self.client, link.backward)
        self.client.out, self.client.inp = self.fwd, self.bwd
        self.upstream.out, self.upstream.inp = self.bwd, self.fwd
        self.held = False  # accepted during a blackhole, never connected onward
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None

    @property
    def buffered(self) -> int:
        return self.fwd.buffered + self.bwd.buffered

    def side_made(self, side: _Side) -> None:
        link = self.link
        assert side.transport is not None
        if side is self.upstream:
            if self.closed:
                _set_linger0(side.transport)
                side.transport.abort()
                return
            side.update_reading()
            self.fwd.wake.set()
            return
        link.stats["accepted"] += 1
        if link.closed or link.partition_mode == "reset":
            link.stats["refused"] += 1
            self.closed = True
            _set_linger0(side.transport)
            side.transport.abort()
            return
        link.conns[self] = None
        if link.blackholed:
            self.held = True
            side.update_reading()
            link.hold(self)
            return
        self.start()

    def start(self) -> None:
        self.held = False
        link = self.link
        self.connect_task = link.spawn(self._connect())
        self.fwd.task = link.spawn(self.fwd.run())
        self.bwd.task = link.spawn(self.bwd.run())

    async def _connect(self) -> None:
        link = self.link
        host, port = link.target_host, link.target_port
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await link.loop.create_connection(lambda: self.upstream, host, port)
        except (OSError, TimeoutError) as e:
            link.stats["connect_failures"] += 1
            log.debug("%s: connect to %s:%s failed: %s", link.name, host, port, e)
            self.cut("connect failed")

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if self.closed:
            return
        # What was read from this socket still goes out (in order), then a reset.
        side.out.push_end(_RESET)
        side.inp.wake.set()
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.fwd.done and self.bwd.done:
            self.close(abort=False)

    def cut(self, reason: str) -> None:
        log.debug("%s: connection cut (%s)", self.link.name, reason)
        self.close(abort=True)

    def close(self, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.link.conns.pop(self, None)
        self.link.held.pop(self, None)
        for side in (self.client, self.upstream):
            t = side.transport
            if t is not None and not t.is_closing():
                if abort:
                    _set_linger0(t)
                    t.abort()
                else:
                    t.close()
        current = asyncio.current_task()
        for task in (self.connect_task, self.fwd.task, self.bwd.task):
            if task is not None and task is not current and not task.done():
                task.cancel()
        self.fwd.queue.clear()
        self.bwd.queue.clear()
        self.fwd.buffered = self.bwd.buffered = 0


class Link:
    """One listening port forwarding every accepted connection to `target`.

    Methods other than `start`/`close` are synchronous and must be called on the event
    loop's thread (the control plane does so)."""

    def __init__(self, name: str, target: str, listen: str = "127.0.0.1:0", *,
                 delay_ms: float = 0.0, jitter_ms: float = 0.0, drop_rate: float = 0.0,
                 bandwidth_bps: float = 0.0, max_buffer: int = DEFAULT_MAX_BUFFER,
                 seed: int | str = 0, src_region: str | None = None,
                 dst_region: str | None = None) -> None:
        if not isinstance(max_buffer, int) or max_buffer < 1:
            raise ValueError(f"max_buffer must be a positive integer, got {max_buffer!r}")
        self.name = name
        self.target = target
        self.target_host, self.target_port = parse_address(target)
        self.listen_host, self.listen_port = parse_address(listen)
        self.max_buffer = max_buffer
        self.src_region = src_region
        self.dst_region = dst_region
        self.rng = random.Random(f"{seed}:{name}")
        self.forward = _Direction()
        self.backward = _Direction()
        self.set(delay_ms=delay_ms, jitter_ms=jitter_ms, drop_rate=drop_rate,
                 bandwidth_bps=bandwidth_bps)
        self.partition_mode: str | None = None
        self.conns: dict[_Conn, None] = {}  # insertion-ordered set
        self.held: dict[_Conn, None] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stats = {"accepted": 0, "refused": 0, "drops": 0, "connect_failures": 0,
                      "max_buffered": 0}
        self.closed = False
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop

    # -- lifecycle --
    async def start(self) -> Link:
        if self._server is not None:
            return self
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            self._accept, self.listen_host, self.listen_port, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        self.listen_port = sockname[1]
        log.info("link %s listening on %s -> %s", self.name, self.address, self.target)
        return self

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.cut("link closed")
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Link:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> str:
        return format_address(self.listen_host, self.listen_port)

    @property
    def port(self) -> int:
        return self.listen_port

    # -- faults --
    def set(self, *, delay_ms: float | None = None, jitter_ms: float | None = None,
            drop_rate: float | None = None, bandwidth_bps: float | None = None,
            direction: str = "both") -> None:
        """Changes the faults of one or both directions (None keeps a value)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        values = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "drop_rate": drop_rate,
                  "bandwidth_bps": bandwidth_bps}
        targets = [self.forward, self.backward] if direction == "both" else \
            [self.forward if direction == "forward" else self.backward]
        Faults(**{**asdict(targets[0].faults),
                  **{k: v for k, v in values.items() if v is not None}}).validate()
        for d in targets:
            d.faults.update(**values)

    @property
    def blackholed(self) -> bool:
        return self.partition_mode == "blackhole"

    def partition(self, mode: str = "blackhole") -> None:
        if mode not in PARTITION_MODES:
            raise ValueError(f"partition mode must be one of {PARTITION_MODES}, got {mode!r}")
        self.partition_mode = mode
        log.info("link %s partitioned (%s)", self.name, mode)
        for conn in list(self.conns):
            if mode == "reset":
                conn.cut("partition")
            else:
                conn.client.update_reading()
                conn.upstream.update_reading()

    def heal(self, reset: bool = False) -> None:
        """Ends a partition; see the module docstring for what happens to connections."""
        self.partition_mode = None
        log.info("link %s healed", self.name)
        for conn in list(self.conns):
            if conn.held or reset:
                conn.cut("heal")
                continue
            for side in (conn.client, conn.upstream):
                side.update_reading()
            conn.fwd.wake.set()
            conn.bwd.wake.set()

    # -- internals --
    def _accept(self) -> _Side:
        return _Conn(self).client

    def hold(self, conn: _Conn) -> None:
        self.held[conn] = None
        while len(self.held) > MAX_HELD:
            next(iter(self.held)).cut("too many held connections")

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def note_buffered(self, n: int) -> None:
        if n > self.stats["max_buffered"]:
            self.stats["max_buffered"] = n

    def ends(self) -> tuple[str, str]:
        src, _, dst = self.name.partition("->")
        return self.src_region or src, self.dst_region or dst

    def status(self) -> dict[str, Any]:
        return {
            "listen": self.address,
            "target": self.target,
            "partition": self.partition_mode,
            "forward": asdict(self.forward.faults),
            "backward": asdict(self.backward.faults),
            "connections": len(self.conns),
            "held": len(self.held),
            "bytes_forward": self.forward.bytes,
            "bytes_backward": self.backward.bytes,
            "buffered": sum(c.buffered for c in self.conns),
            # directions of connections not read from right now because their buffer is full
            "backpressured": sum(p.full for c in self.conns for p in (c.fwd, c.bwd)),
            "max_buffer": self.max_buffer,
            **self.stats,
        }


def _in_region(end: str, region: str) -> bool:
    return end == region or end.startswith(region + "-")


class ProxyServer:
    """Many named links in one event loop, plus the JSON-lines control plane."""

    def __init__(self, *, seed: int | str = 0, control: str | None = "127.0.0.1:0",
                 max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.seed = seed
        self.control = control
        self.max_buffer = max_buffer
        self.links: dict[str, Link] = {}
        self._control_server: asyncio.Server | None = None
        self._control_address: str | None = None
        self._control_tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_config(cls, config: dict[str, Any], *, control: str | None = "127.0.0.1:0",
                    seed: int | str | None = None) -> ProxyServer:
        """Builds (without starting) a server from the links.json shape."""
        if not isinstance(config, dict) or not isinstance(config.get("links"), list):
            raise ValueError('config must be an object with a "links" list')
        unknown = set(config) - {"seed", "links", "max_buffer"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        server = cls(seed=config.get("seed", 0) if seed is None else seed, control=control,
                     max_buffer=config.get("max_buffer", DEFAULT_MAX_BUFFER))
        for spec in config["links"]:
            if not isinstance(spec, dict) or "name" not in spec or "target" not in spec:
                raise ValueError(f'every link needs "name" and "target": {spec!r}')
            server.add_link(**spec)
        return server

    def add_link(self, name: str, target: str, listen: str = "127.0.0.1:0",
                 **options: Any) -> Link:
        """Adds a link (started by `start`, or at once with `await link.start()`)."""
        if name in self.links:
            raise ValueError(f"duplicate link name {name!r}")
        options.setdefault("max_buffer", self.max_buffer)
        link = Link(name, target, listen, seed=self.seed, **options)
        self.links[name] = link
        return link

    async def start(self) -> ProxyServer:
        try:
            for link in self.links.values():
                await link.start()
            if self.control is not None and self._control_server is None:
                host, port = parse_address(self.control)
                self._control_server = await asyncio.start_server(
                    self._serve_control, host, port, limit=MAX_REQUEST, reuse_address=True)
                sockname = self._control_server.sockets[0].getsockname()
                self._control_address = format_address(host, sockname[1])
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self._control_server is not None:
            self._control_server.close()
        tasks = list(self._control_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in self.links.values()))
        if self._control_server is not None:
            await self._control_server.wait_closed()
            self._control_server = None

    async def __aenter__(self) -> ProxyServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def control_address(self) -> str:
        if self._control_address is None:
            raise RuntimeError("control plane not listening")
        return self._control_address

    def ready_info(self) -> dict[str, Any]:
        return {"event": "ready", "control": self._control_address,
                "links": {name: link.address for name, link in self.links.items()}}

    # -- control plane --
    def select(self, request: dict[str, Any], default_all: bool = False) -> list[Link]:
        """The links a request's selector names (see the module docstring)."""
        kinds = [k for k in ("link", "links", "region", "between", "all") if k in request]
        if "src" in request or "dst" in request:
            kinds.append("src/dst")
        if len(kinds) > 1:
            raise ValueError(f"give one selector, got {kinds}")
        if not kinds:
            if default_all:
                return list(self.links.values())
            raise ValueError(f"no selector: give one of {list(SELECTOR_FIELDS)}")
        kind = kinds[0]
        if kind in ("link", "links"):
            names = [request["link"]] if kind == "link" else request["links"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{kind} must name links")
            missing = [n for n in names if n not in self.links]
            if missing:
                raise ValueError(f"unknown links: {missing}")
            return [self.links[n] for n in dict.fromkeys(names)]
        if kind == "all":
            if request["all"] is not True:
                raise ValueError('"all" must be true')
            return list(self.links.values())
        out = []
        for link in self.links.values():
            src, dst = link.ends()
            if kind == "region":
                r = request["region"]
                hit = _in_region(src, r) or _in_region(dst, r)
            elif kind == "between":
                pair = request["between"]
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError('"between" must be a list of two regions')
                a, b = pair
                hit = (_in_region(src, a) and _in_region(dst, b)) or \
                    (_in_region(src, b) and _in_region(dst, a))
            else:
                hit = ("src" not in request or _in_region(src, request["src"])) and \
                    ("dst" not in request or _in_region(dst, request["dst"]))
            if hit:
                out.append(link)
        if not out:
            raise ValueError(f"no link matches {({k: request[k] for k in request if k != 'op'})}")
        return out

    def handle(self, request: Any) -> dict[str, Any]:
        """Applies one control request; never raises."""
        try:
            return self._handle(request)
        except (ValueError, TypeError, KeyError) as e:
            return {"ok": False, "error": str(e)}

    def _handle(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise ValueError("a request must be a JSON object")
        op = request.get("op")
        allowed = {"op", *SELECTOR_FIELDS}
        if op == "set":
            allowed |= {*FAULT_FIELDS, "direction"}
        elif op == "partition":
            allowed |= {"mode"}
        elif op == "heal":
            allowed |= {"reset"}
        elif op not in ("status", "ping"):
            raise ValueError(f"unknown op {op!r}: expected set, partition, heal, status, ping")
        unknown = set(request) - allowed
        if unknown:
            raise ValueError(f"unknown fields for {op}: {sorted(unknown)}")
        if op == "ping":
            return {"ok": True}
        if op == "status":
            links = self.select(request, default_all=True)
            return {"ok": True, "links": {link.name: link.status() for link in links}}
        links = self.select(request, default_all=(op == "heal"))
        if op == "set":
            faults = {k: request[k] for k in FAULT_FIELDS if k in request}
            direction = request.get("direction", "both")
            if direction not in DIRECTIONS:  # validate before changing anything
                raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
            Faults(**faults).validate()
            for link in links:
                link.set(direction=direction, **faults)
        elif op == "partition":
            mode = request.get("mode", "blackhole")
            if mode not in PARTITION_MODES:
                raise ValueError(f"mode must be one of {PARTITION_MODES}, got {mode!r}")
            for link in links:
                link.partition(mode)
        else:
            reset = request.get("reset", False)
            if not isinstance(reset, bool):
                raise ValueError('"reset" must be true or false')
            for link in links:
                link.heal(reset=reset)
        return {"ok": True, "links": [link.name for link in links]}

    async def _serve_control(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._control_tasks.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "request too long"}\n')
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except ValueError as e:
                    reply: dict[str, Any] = {"ok": False, "error": f"bad JSON: {e}"}
                else:
                    reply = self.handle(request)
                    if _request_op(request) != "status":
                        log.info("control %s -> %s", line.strip().decode(errors="replace"),
                                 reply)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._control_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _request_op(request: Any) -> Any:
    return request.get("op") if isinstance(request, dict) else None


# -- clients --

class ProxyControlError(RuntimeError):
    """The proxy answered {"ok": false, "error": ...}."""


def _request(op: str, link: str | None = None, links: list[str] | None = None,
             region: str | None = None, between: list[str] | tuple[str, str] | None = None,
             src: str | None = None, dst: str | None = None, all_links: bool = False,
             **fields: Any) -> dict[str, Any]:
    req: dict[str, Any] = {"op": op}
    for key, value in (("link", link), ("links", links), ("region", region),
                       ("between", between), ("src", src), ("dst", dst)):
        if value is not None:
            req[key] = list(value) if key in ("links", "between") else value
    if all_links:
        req["all"] = True
    req.update({k: v for k, v in fields.items() if v is not None})
    return req


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise ProxyControlError(reply.get("error", "unknown error"))
    return reply


class ProxyControl:
    """Blocking client of the control plane (one TCP connection per request).

    Selector keywords: link, links, region, between, src, dst, all_links."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        host, port = parse_address(self.address)
        with socket.create_connection((host, port), timeout=self.timeout) as sock, \
                sock.makefile("rwb") as f:
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            line = f.readline(MAX_REQUEST)
        if not line:
            raise ProxyControlError("control connection closed without an answer")
        return _check(json.loads(line))

    def ping(self) -> None:
        self.request({"op": "ping"})

    def status(self, **selector: Any) -> dict[str, dict[str, Any]]:
        return self.request(_request("status", **selector))["links"]

    def set(self, *, delay_ms: float | None = None, jitter_ms: float | None = None,
            drop_rate: float | None = None, bandwidth_bps: float | None = None,
            direction: str | None = None, **selector: Any) -> list[str]:
        return self.request(_request(
            "set", delay_ms=delay_ms, jitter_ms=jitter_ms, drop_rate=drop_rate,
            bandwidth_bps=bandwidth_bps, direction=direction, **selector))["links"]

    def partition(self, mode: str = "blackhole", **selector: Any) -> list[str]:
        return self.request(_request("partition", mode=mode, **selector))["links"]

    def heal(self, reset: bool = False, **selector: Any) -> list[str]:
        return self.request(_request("heal", reset=reset, **selector))["links"]


class AsyncProxyControl:
    """asyncio client of the control plane, same methods as ProxyControl."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout

    async def request(self, req: dict[str, Any]) -> dict[str, Any]:
        async with asyncio.timeout(self.timeout):
            return await self._request(req)

    async def _request(self, req: dict[str, Any]) -> dict[str, Any]:
        host, port = parse_address(self.address)
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_REQUEST)
        try:
            writer.write(json.dumps(req).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if not line:
            raise ProxyControlError("control connection closed without an answer")
        return _check(json.loads(line))

    async def ping(self) -> None:
        await self.request({"op": "ping"})

    async def status(self, **selector: Any) -> dict[str, dict[str, Any]]:
        return (await self.request(_request("status", **selector)))["links"]

    async def set(self, *, delay_ms: float | None = None, jitter_ms: float | None = None,
                  drop_rate: float | None = None, bandwidth_bps: float | None = None,
                  direction: str | None = None, **selector: Any) -> list[str]:
        return (await self.request(_request(
            "set", delay_ms=delay_ms, jitter_ms=jitter_ms, drop_rate=drop_rate,
            bandwidth_bps=bandwidth_bps, direction=direction, **selector)))["links"]

    async def partition(self, mode: str = "blackhole", **selector: Any) -> list[str]:
        return (await self.request(_request("partition", mode=mode, **selector)))["links"]

    async def heal(self, reset: bool = False, **selector: Any) -> list[str]:
        return (await self.request(_request("heal", reset=reset, **selector)))["links"]


# -- command line --

async def _serve(config: dict[str, Any], control: str, seed: int | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = await ProxyServer.from_config(config, control=control, seed=seed).start()
    except (OSError, ValueError, TypeError) as e:
        print(json.dumps({"event": "error", "error": str(e)}), flush=True)
        log.error("proxy failed to start: %s", e)
        return 1
    print(json.dumps(server.ready_info()), flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()
    log.info("proxy stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geo.proxy",
                                     description="fault-injecting TCP proxy for WAN links")
    parser.add_argument("--config", required=True, help="links.json")
    parser.add_argument("--control", default="127.0.0.1:0",
                        help="control plane address (default 127.0.0.1:0)")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = json.loads(Path(args.config).read_text())
    except (OSError, ValueError) as e:
        print(json.dumps({"event": "error", "error": f"{args.config}: {e}"}), flush=True)
        return 1
    return asyncio.run(_serve(config, args.control, args.seed))


if __name__ == "__main__":
    sys.exit(main())
