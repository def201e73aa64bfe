"""Whether matching works, as a server in front of the store sees it (the order gateway).

The order-entry tier depends on the matching tier (DESIGN §6): an order accepted while no
engine processes the group's inputs only queues, for an unknown time. A store node cannot
tell whether an engine is current (the primary may read from another region's replica), so
the gateway asks the engines themselves (EngineControl/Status, brief) and reports the
service ``engine`` down to its tier supervisor unless:

* exactly one instance is primary (two during a takeover: neither is trusted yet). A
  planned engine switchover (EngineStatus.handover_to) leaves the group without a primary
  for a moment: matching that was current stays so for at most `max_lag_s` while the
  target takes over;
* the primary has been delivered every input up to the store's commit position observed
  when the current state began (first observation after a failover, a new term or a new
  primary): it is current in *this* term, not in a term the store has left. A primary
  that was current when the term changed without a failover in between (a planned
  switchover) keeps serving while it catches up, for at most TERM_CHANGE_GRACE_S, unless
  the store says the term began with an election (its start record: a failover the
  readings missed);
* and it keeps up: it has been delivered what the store had committed `max_lag_s` ago (a
  primary reading a replica cut off from the leader falls behind without any term change
  that the gateway could see).

``MatchingWatch(inner, engines)`` wraps the gateway's store reader
(geo.tier_supervisor.RemoteReader) and adds ``engine`` to what it reports down.

The instances to ask are the configured addresses and, with an ``EngineDirectory``,
those the engines advertise in their groups' instances streams (engine/wire.py) when
they start: a new release started elsewhere is judged as soon as it has advertised,
without reconfiguring the gateway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import grpc

from engine import wire
from geo.replicator import ELECTION
from geo.tier_supervisor import Reader, Reading
from store import auth
from store.client import StoreClient, channel_options
from xdc.tls import Tls, aio_channel
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import exchange_pb2_grpc as xpb_grpc

log = logging.getLogger("xdc.matching_health")

ENGINE_SERVICE = "engine"  # the matching tier's service (geo/tiers.default.toml)
PROBE_TIMEOUT_S = 0.5
# The directory's read of the instances streams, before the probes: with them and the
# store's reading (REMOTE_TIMEOUT_S) an observation stays under the supervisor's 1 s even
# when a store target hangs (a slow read keeps the addresses known).
DIRECTORY_TIMEOUT_S = 0.25
MAX_LAG_S = 1.0
# How long a primary that was current keeps serving, short of the reference, after a new
# store term it did not see coming through a failover (a planned switchover: the writes
# pause ~150 ms here, and the primary's store member is delivered the new term's first
# commit within that). Not max_lag_s: a primary reading from a region cut off by a
# partition was trusted for a second while orders were admitted (drill leader-partition:
# order entry back before matching). The grace ends as soon as the store's reading says
# the term began with an election (Reading.term_began: a failover the readings missed,
# the seat vacant for less than one observation); it applies only while the gateway's
# store member has not yet got the term's start record.
TERM_CHANGE_GRACE_S = 0.4
MAX_ENGINES = 64
MAX_HISTORY = 1024  # commit positions remembered (one per observation)
DISCOVER_EVERY_S = 1.0  # how often the instances streams are read again
MAX_INSTANCE_EVENTS = 256  # read per stream and look


class EngineDirectory:
    """Where the instances of some engine groups answer EngineControl, as they advertise
    it (wire.instances_stream): the latest address per instance, read from the store at
    most every DISCOVER_EVERY_S. At most MAX_ENGINES addresses, the most recently
    advertised first; no more instances are remembered (``_forget``)."""

    def __init__(self, client: StoreClient, groups: Sequence[str],
                 clock: Callable[[], float] = time.monotonic,
                 timeout_s: float = DIRECTORY_TIMEOUT_S) -> None:
        self.client = client
        self.groups = list(groups)
        self._clock = clock
        self.timeout_s = timeout_s  # per read (an operator's command waits longer)
        self._next_revision = {g: 0 for g in self.groups}
        self._addresses: dict[tuple[str, str], str] = {}  # (group, instance) -> address
        self._read_at = -DISCOVER_EVERY_S

    async def addresses(self) -> list[str]:
        now = self._clock()
        if now - self._read_at >= DISCOVER_EVERY_S:
            self._read_at = now
            for group in self.groups:
                await self._read(group)
            self._forget()
        return list(reversed(self._addresses.values()))  # distinct after _forget

    async def instances(self) -> dict[tuple[str, str], str]:
        """(group, instance) -> address of each instance remembered, the most recently
        advertised last (read again as ``addresses`` does): who `xdc engine switchover`
        may hand over to."""
        await self.addresses()
        return dict(self._addresses)

    @property
    def known(self) -> int:
        """Instances remembered (at most MAX_ENGINES)."""
        return len(self._addresses)

    def _forget(self) -> None:
        """Keeps what ``addresses`` returns and nothing more: for each of the MAX_ENGINES
        addresses advertised last, the instance that advertised it last. Every instance
        that ever started (each restart under a new id) was kept before. An earlier
        instance at an address was replaced there (one address, one listener). Not by
        age: an instance advertises once per start, so a primary that has run for weeks
        holds the oldest advertisement of all."""
        holders: dict[str, tuple[str, str]] = {}  # address -> (group, instance), newest first
        for key, address in reversed(self._addresses.items()):
            if address not in holders:
                holders[address] = key
                if len(holders) == MAX_ENGINES:
                    break
        if len(holders) < len(self._addresses):
            self._addresses = {key: address for address, key in reversed(holders.items())}

    async def _read(self, group: str) -> None:
        try:
            events = await self.client.read(wire.instances_stream(group),
                                            start=self._next_revision[group],
                                            limit=MAX_INSTANCE_EVENTS,
                                            timeout_s=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: none advertised yet
                log.debug("instances of %s not read: %s", group, exc.code().name)
            return
        for e in events:
            self._next_revision[group] = e.revision + 1
            parsed = wire.parse_instance(e.data) if e.type == wire.INSTANCE_TYPE else None
            if parsed is not None:
                key = (group, parsed[0])
                self._addresses.pop(key, None)  # re-inserted: the most recent last
                self._addresses[key] = parsed[1]


class MatchingWatch:
    """A tier Reader: `inner`'s reading, with ``engine`` down while matching is not
    current (module docstring). `engines`: EngineControl addresses of the group(s)."""

    def __init__(self, inner: Reader, engines: Sequence[str], tls: Tls | None = None,
                 token: str = "", max_lag_s: float = MAX_LAG_S,
                 clock: Callable[[], float] = time.monotonic,
                 directory: EngineDirectory | None = None) -> None:
        if not engines and directory is None:
            raise ValueError("MatchingWatch needs engine addresses or a directory")
        if len(engines) > MAX_ENGINES:
            raise ValueError(f"engines: {len(engines)} addresses, max {MAX_ENGINES}")
        self.inner = inner
        self.configured = list(engines)
        self.engines = list(engines)  # asked at the last observation
        self.directory = directory
        self.tls = tls
        self.metadata = auth.bearer(token)
        self.max_lag_s = max_lag_s
        self._clock = clock
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._state: tuple[int, str] | None = None  # (term, primary) the reference is for
        self._reference: int | None = None  # commit position the primary must pass
        self._grace_until = 0.0  # until then, a primary short of the reference is current
        self._grace_term = 0  # the new store term the grace was given for (0: none)
        self._handover_to = ""  # the target of the last engine switchover seen
        self._handover_until = 0.0
        self._history: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=MAX_HISTORY)  # (time, commit position) since the reference was set
        self._seen = (0, 0)  # the highest (term, commit position) any reading showed
        self.why = "not observed yet"  # why matching is down ("" when current)
        self.answered = 0  # instances that answered at the last observation

    async def _status(self, address: str) -> xpb.EngineStatus | None:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self.tls,
                                                            options=channel_options())
        try:
            return await xpb_grpc.EngineControlStub(channel).Status(
                xpb.EngineStatusRequest(brief=True), timeout=PROBE_TIMEOUT_S,
                metadata=self.metadata)
        except grpc.aio.AioRpcError:
            return None

    async def __call__(self) -> Reading:
        if self.directory is not None:
            found = await self.directory.addresses()
            self.engines = list(dict.fromkeys([*self.configured, *found]))[:MAX_ENGINES]
            for gone in [a for a in self._channels if a not in self.engines]:
                await self._channels.pop(gone).close()
        reading, statuses = await asyncio.gather(
            self.inner(), asyncio.gather(*(self._status(a) for a in self.engines)))
        answered = [s for s in statuses if s is not None]
        self.answered = len(answered)
        why = self._judge(reading, answered)
        if why != self.why:
            log.info("matching %s", f"down: {why}" if why else "current")
            self.why = why
        if not why:
            return reading
        return replace(reading, down=reading.down | {ENGINE_SERVICE})

    def _judge(self, reading: Reading, statuses: list[xpb.EngineStatus]) -> str:
        """Why matching is not current ("" when it is); keeps the reference."""
        primaries = [s for s in statuses if s.role == "primary"]
        now = self._clock()
        if reading.failover:
            self._state = None
            return reading.unreachable or "the store is failing over"
        if not primaries and not self.why and self._state is not None:
            # A planned engine switchover under way to an instance that answers: the
            # target takes over at the marker, within the grace.
            target = next((s.handover_to for s in statuses if s.handover_to), "")
            if target and any(s.instance == target for s in statuses):
                if self._handover_to != target:
                    self._handover_to, self._handover_until = target, now + self.max_lag_s
                if now < self._handover_until:
                    return ""
        if len(primaries) != 1:
            self._state = None
            return (f"no engine primary answers ({len(statuses)} of {len(self.engines)} "
                    f"instances answer)" if not primaries else
                    f"{len(primaries)} instances claim primary (a takeover in progress)")
        p = primaries[0]
        state = (reading.term, p.instance)
        if state != self._state:
            # Current until now and no failover seen since: a new term under the same
            # primary (a store switchover), or the target of an engine switchover taking
            # over, gets TERM_CHANGE_GRACE_S to pass the reference; a new term the store
            # says began with an election (a failover the readings missed) gets none.
            new_term = self._state is not None and reading.term != self._state[0]
            handover = (self._state is not None and not self.why
                        and p.instance in (self._state[1], self._handover_to)
                        and not (new_term and reading.term_began == ELECTION))
            self._grace_until = (now + min(self.max_lag_s, TERM_CHANGE_GRACE_S)
                                 if handover else 0.0)
            self._grace_term = reading.term if handover and new_term else 0
            self._state, self._reference = state, reading.commit_position
            if reading.term > self._seen[0] > 0:
                # A new store term: the reference is a position of that term, at least the
                # one after what was committed before it (its term-start record). A
                # reading from a member that has not yet learnt the new term's first
                # commit would otherwise let a primary pass that still reads a replica
                # the old term left behind (cut off by a partition).
                self._reference = max(self._reference, self._seen[1] + 1)
            self._history.clear()
        if self._grace_term == reading.term and reading.term_began == ELECTION:
            # The store member learnt the term's start record during the grace: the term
            # began with an election, not a handover.
            self._grace_until = 0.0
        self._seen = (max(self._seen[0], reading.term), max(self._seen[1],
                                                            reading.commit_position))
        self._history.append((now, reading.commit_position))
        assert self._reference is not None
        if p.delivered_position < self._reference and now >= self._grace_until:
            return (f"primary {p.instance} has been delivered inputs up to position "
                    f"{p.delivered_position}, not yet {self._reference} (term {reading.term})")
        # What was committed max_lag_s ago must have reached the primary by now.
        while len(self._history) > 1 and self._history[1][0] <= now - self.max_lag_s:
            self._history.popleft()
        t, old = self._history[0]
        if t <= now - self.max_lag_s and p.delivered_position < old:
            return (f"primary {p.instance} lags: delivered up to {p.delivered_position}, "
                    f"the store had committed {old} {now - t:.1f} s ago")
        return ""

    async def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if closer is not None:
            await closer()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
