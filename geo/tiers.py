"""Degradation tiers (DESIGN §6): the tier file and the supervisor's pure state machine.

The tier file
-------------
TOML; one ``[[tier]]`` per tier, in recovery order. Tier 0 recovers first and is never
shed. A default ships with the project (``geo/tiers.default.toml``, used when the cluster
file names no ``tiers_file``)::

    [[tier]]
    name = "ledger"                 # 1-63 letters, digits, '.', '_' or '-'; unique
    services = ["leader", "replication", "append"]
    [[tier]]
    name = "matching"
    services = ["engine"]
    ...

    [supervisor]                    # optional; every key optional (defaults below)
    settle_s = 0.25                 # tier n healthy this long before tier n+1 is admitted
    interval_s = 0.1                # how often a node observes itself
    overload_from = 0.5             # load at which the top tier is shed
    restore_below = 0.8             # a tier shed for load returns once the load stays
                                    #   under this fraction of its threshold for settle_s
    max_commit_lag = 100000         # records; this lag counts as load 1.0
    retry_after_ms = 250            # hint for refusals while failing over / no quorum
    overload_retry_after_ms = 200   # least hint for refusals under overload (the hint
                                    #   is when the tier is expected back)

Validation (``load``/``loads`` raise geo.config.ConfigError listing every problem): unknown
keys, no tier, more than MAX_TIERS tiers, a tier without services, duplicate tier names,
unknown service names (with a did-you-mean), a service listed twice (naming both places),
``leader`` or ``replication`` outside tier 0 (every other tier recovers on them), values of
the wrong type or out of range. Services the file does not list are a warning: ``leader``
and ``replication`` then belong to tier 0, any other to the last tier.

Services and gRPC methods
-------------------------
SERVICES names every service xdc knows; METHOD_SERVICES maps each gRPC method of
``xdc.v1.EventStore`` and ``xdc.v1.OrderGateway`` to one (``service_of``). Methods not
mapped (health, reflection, NodeInfo, EngineControl) are never shed: operators, load
balancers and clients looking for the leader need them most while degraded. A request can
name its own criticality in the metadata key ``xdc-tier`` (a tier name or a service name),
e.g. an engine's Subscribe says ``engine`` so that it recovers with matching, not with
market data.

The machine
-----------
Pure, etcd-io/raft style: no I/O, no clock, no randomness. ``TierMachine.observe(obs)``
takes an Observation (monotonic time, wall time to record, failover, quorum, writer queue,
commit lag, services seen down) and returns the state transitions it made; queries are
``states``, ``refusal(index)``, ``transitions``. Rules, per observation, tier by tier:

* cause: ``no_quorum`` if the node sees no voter majority, else ``failover`` if no open
  leader is known (election, recovery), else none. Tier 0 is then ``degraded`` (admitted,
  not healthy) and every tier above it is ``shed`` with that reason.
* overload: load = max(queue / max_pending_events, commit lag / max_commit_lag). Tier i >= 1
  has a threshold rising from ``overload_from`` (top tier) towards 1.0 (tier 1), so tiers are
  shed from the top as load grows; a shed tier returns only after the load has stayed
  under ``restore_below`` x its threshold for ``settle_s`` (hysteresis in level and time).
* ordering: tier n+1 is admitted only once tier n has been serving (admitted and healthy)
  for ``settle_s``; it stays admitted while tier n serves. A tier below that is not serving
  sheds every tier above it (``dependency``, or the reason it was shed for).
* tier 0 is never shed: its requests always pass (and may still fail in the store, e.g.
  with the leader's address).

Refusals: ``overload`` -> RESOURCE_EXHAUSTED, anything else -> UNAVAILABLE; the message names
the tier and the reason, and carries a retry hint (an estimate while settling).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc

from geo.config import ConfigError
from store.validation import ALL

__all__ = [
    "DEFAULT_PATH",
    "METHOD_SERVICES",
    "SERVICES",
    "Observation",
    "Reason",
    "Refusal",
    "State",
    "Supervision",
    "Tier",
    "TierMachine",
    "TierSpec",
    "TierState",
    "Transition",
    "load",
    "loads",
    "service_of",
]

DEFAULT_PATH = Path(__file__).with_name("tiers.default.toml")

# Every service xdc knows, with what it covers. One place: the tier file, the method map
# and the CLI all read this.
SERVICES: Mapping[str, str] = {
    "leader": "etcd leadership: a known, open leader (no gRPC method of its own)",
    "replication": "log shipping between store nodes (xdc.v1.Replication/*)",
    "append": "writes: EventStore Append, AppendStream, StreamInfo (expected revisions)",
    "engine": "matching engines consuming and emitting (their calls say xdc-tier: engine)",
    "gateway.submit": "OrderGateway SubmitOrder, ReplaceOrder",
    "gateway.cancel": "OrderGateway CancelOrder, StreamExecutions",
    "subscribe": "EventStore Subscribe",
    "book": "OrderGateway StreamBook",
    "read-all": "EventStore Read of $all",
    "history": "EventStore Read of one stream",
    "trace-export": "exporting traces (no gRPC method; exporters ask the supervisor)",
}

_EVENTSTORE = "/xdc.v1.EventStore/"
_GATEWAY = "/xdc.v1.OrderGateway/"
# The Read method is resolved per request: "$all" is read-all, a stream is history.
READ_METHOD = _EVENTSTORE + "Read"

METHOD_SERVICES: Mapping[str, str] = {
    _EVENTSTORE + "Append": "append",
    _EVENTSTORE + "AppendStream": "append",
    _EVENTSTORE + "Subscribe": "subscribe",
    READ_METHOD: "history",  # or read-all: see service_of
    # A stream's last revision: how a writer learns the revision to expect, one key
    # lookup. It belongs to the write path: shedding it would stop writers, not load.
    _EVENTSTORE + "StreamInfo": "append",
    "/xdc.v1.Replication/Stream": "replication",
    "/xdc.v1.Replication/Tip": "replication",
    "/xdc.v1.Replication/Switchover": "replication",
    _GATEWAY + "SubmitOrder": "gateway.submit",
    _GATEWAY + "ReplaceOrder": "gateway.submit",
    _GATEWAY + "CancelOrder": "gateway.cancel",
    # A trader's fills and cancels travel together: executions are what a cancel acts
    # on, and shedding them while cancels still pass would leave traders cancelling blind.
    _GATEWAY + "StreamExecutions": "gateway.cancel",
    _GATEWAY + "StreamBook": "book",
}


def service_of(method: str, request: Any = None) -> str | None:
    """The service a call belongs to, or None for methods that are never shed. For Read,
    pass the request (a ReadRequest; anything without `stream` counts as history)."""
    if method == READ_METHOD and getattr(request, "stream", None) == ALL:
        return "read-all"
    return METHOD_SERVICES.get(method)


# ---- the tier file ------------------------------------------------------------------------

MAX_TIERS = 16
MAX_FILE_BYTES = 64 * 1024
MAX_RETRY_AFTER_MS = 60_000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Tier 0 must hold these: nothing else can recover without a leader and replication.
TIER0_SERVICES = ("leader", "replication")


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    services: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Supervision:
    """The `[supervisor]` table. Bounds are checked by the loader (and __post_init__)."""

    settle_s: float = 0.25
    interval_s: float = 0.1
    overload_from: float = 0.5
    restore_below: float = 0.8
    max_commit_lag: int = 100_000
    retry_after_ms: int = 250
    overload_retry_after_ms: int = 200

    def __post_init__(self) -> None:
        for name, (_, lo, hi) in _SUPERVISION_KEYS.items():  # the loader's bounds
            assert lo <= getattr(self, name) <= hi, name


# key -> (type, low, high); the loader checks each and the dataclass default applies
# when the key is absent.
_SUPERVISION_KEYS: Mapping[str, tuple[type, float, float]] = {
    "settle_s": (float, 0, 60),
    "interval_s": (float, 0.01, 5),
    "overload_from": (float, 1e-9, 1),
    "restore_below": (float, 1e-9, 1 - 1e-9),
    "max_commit_lag": (int, 1, 1 << 62),
    "retry_after_ms": (int, 1, MAX_RETRY_AFTER_MS),
    "overload_retry_after_ms": (int, 1, MAX_RETRY_AFTER_MS),
}


@dataclass(frozen=True)
class TierSpec:
    tiers: tuple[Tier, ...]
    supervisor: Supervision = field(default_factory=Supervision)
    source: str = "<default>"
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # Derived lookups, filled in by __post_init__.
    _service_tier: dict[str, int] = field(init=False, repr=False, compare=False)
    _tier_index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert 1 <= len(self.tiers) <= MAX_TIERS
        index: dict[str, int] = {}
        names: dict[str, int] = {}
        for i, tier in enumerate(self.tiers):
            names[tier.name] = i
            for s in tier.services:
                index[s] = i
        # A frozen dataclass sets its own derived fields through object.__setattr__.
        object.__setattr__(self, "_service_tier", index)
        object.__setattr__(self, "_tier_index", names)

    def tier_of(self, service: str) -> int:
        """The tier of a known service. Unlisted ones: see the module docstring."""
        found = self._service_tier.get(service)
        if found is not None:
            return found
        return 0 if service in TIER0_SERVICES else len(self.tiers) - 1

    def resolve(self, name: str) -> int | None:
        """A tier name or a known service name -> tier index; None if neither."""
        found = self._tier_index.get(name)
        if found is not None:
            return found
        return self.tier_of(name) if name in SERVICES else None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def with_supervisor(self, **changes: Any) -> TierSpec:
        """A copy with other supervisor settings (tests, benchmarks)."""
        return replace(self, supervisor=replace(self.supervisor, **changes))


def load(path: str | os.PathLike[str] | None = None) -> TierSpec:
    """Reads and validates a tier file; None: the default shipped with xdc."""
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror or exc}")]) from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(str(p), [("", f"larger than {MAX_FILE_BYTES} bytes")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [("", f"not UTF-8 text: {exc}")]) from exc
    return loads(text, source=str(p))


def loads(text: str, *, source: str = "<string>") -> TierSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [("", f"invalid TOML: {exc}")]) from exc
    return _Checker(source).build(raw)


def _closest(name: str, choices: Sequence[str]) -> str:
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {found[0]!r}?)" if found else ""


def _kind(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
             dict: "table"}
    return names.get(type(value), type(value).__name__)


class _Checker:
    """Collects every problem of one tier file, so it is fixed in one round."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def error(self, key: str, what: str) -> None:
        self.errors.append((key, what))

    def only(self, table: Mapping[str, Any], allowed: Sequence[str], key: str) -> None:
        for name in table:
            if name not in allowed:
                path = f"{key}.{name}" if key else name
                self.error(path, "unknown key" + _closest(name, allowed))

    def build(self, raw: Mapping[str, Any]) -> TierSpec:
        self.only(raw, ("tier", "supervisor"), "")
        tiers = self._tiers(raw.get("tier"))
        supervisor = self._supervisor(raw.get("supervisor"))
        if self.errors:
            raise ConfigError(self.source, self.errors)
        listed = {s for t in tiers for s in t.services}
        missing = [s for s in SERVICES if s not in listed]
        if missing:
            where = {s: "tier 0" if s in TIER0_SERVICES else f"the last tier ({tiers[-1].name})"
                     for s in missing}
            self.warnings.append(f"{self.source}: services in no tier: " + ", ".join(
                f"{s} (counted in {where[s]})" for s in missing))
        return TierSpec(tuple(tiers), supervisor, self.source, tuple(self.warnings))

    def _tiers(self, value: Any) -> list[Tier]:
        if value is None:
            self.error("tier", "declare at least one [[tier]]")
            return []
        if not isinstance(value, list):
            self.error("tier", f"expected an array of tables ([[tier]]), got {_kind(value)}")
            return []
        if not value:
            self.error("tier", "declare at least one [[tier]]")
        if len(value) > MAX_TIERS:
            self.error("tier", f"{len(value)} tiers, at most {MAX_TIERS}")
        tiers: list[Tier] = []
        names: dict[str, int] = {}
        seen: dict[str, str] = {}  # service -> where it was listed first
        for i, table in enumerate(value):
            key = f"tier[{i}]"
            if not isinstance(table, dict):
                self.error(key, f"expected a table, got {_kind(table)}")
                continue
            self.only(table, ("name", "services"), key)
            name = table.get("name")
            if name is None:
                self.error(f"{key}.name", "is required")
            elif not isinstance(name, str) or not _NAME_RE.match(name):
                self.error(f"{key}.name", f"{name!r} must be 1-63 letters, digits, '.', '_' "
                                          "or '-', starting with a letter or digit")
                name = None
            elif name in names:
                self.error(f"{key}.name", f"duplicate tier name {name!r} "
                                          f"(also tier[{names[name]}])")
            else:
                names[name] = i
            services = self._services(table.get("services"), f"{key}.services", i, seen)
            if isinstance(name, str) and services is not None:
                tiers.append(Tier(name, services))
        return tiers

    def _services(self, value: Any, key: str, index: int,
                  seen: dict[str, str]) -> tuple[str, ...] | None:
        if value is None:
            self.error(key, "is required (a list of service names)")
            return None
        if not isinstance(value, list):
            self.error(key, f"expected an array of service names, got {_kind(value)}")
            return None
        if not value:
            self.error(key, "empty tier: list at least one service")
            return None
        out: list[str] = []
        for j, s in enumerate(value):
            where = f"{key}[{j}]"
            if not isinstance(s, str):
                self.error(where, f"expected a service name, got {_kind(s)}")
            elif s not in SERVICES:
                self.error(where, f"unknown service {s!r}{_closest(s, tuple(SERVICES))} "
                                  f"(known: {', '.join(SERVICES)})")
            elif s in seen:
                self.error(where, f"service {s!r} listed twice (also {seen[s]})")
            else:
                seen[s] = where
                if s in TIER0_SERVICES and index != 0:
                    self.error(where, f"service {s!r} must be in tier 0: every other tier "
                                      "recovers on it")
                out.append(s)
        return tuple(out)

    def _supervisor(self, value: Any) -> Supervision:
        if value is None:
            return Supervision()
        if not isinstance(value, dict):
            self.error("supervisor", f"expected a table, got {_kind(value)}")
            return Supervision()
        self.only(value, tuple(_SUPERVISION_KEYS), "supervisor")
        kwargs: dict[str, Any] = {}
        for name, (want, low, high) in _SUPERVISION_KEYS.items():
            if name not in value:
                continue
            v = value[name]
            key = f"supervisor.{name}"
            ok = (isinstance(v, int | float) if want is float else isinstance(v, int))
            if isinstance(v, bool) or not ok:
                label = "a number" if want is float else "an integer"
                self.error(key, f"expected {label}, got {_kind(v)}")
            elif not low <= v <= high or (isinstance(v, float) and math.isnan(v)):
                self.error(key, f"{v} is out of range {low:g}..{high:g}")
            else:
                kwargs[name] = want(v)
        if self.errors:
            return Supervision()
        return Supervision(**kwargs)


# ---- the machine ---------------------------------------------------------------------------

class State(StrEnum):
    SERVING = "serving"  # admitted and healthy
    DEGRADED = "degraded"  # admitted, not healthy (tier 0 while failing over)
    RECOVERING = "recovering"  # refused until the tier below has served for settle_s
    SHED = "shed"  # refused


class Reason(StrEnum):
    NONE = ""
    STARTING = "starting"
    FAILOVER = "failover"
    NO_QUORUM = "no_quorum"
    OVERLOAD = "overload"
    DEPENDENCY = "dependency"  # the tier below is admitted but not healthy
    UNHEALTHY = "unhealthy"  # a service of this (admitted) tier is down
    SETTLING = "settling"


ADMITTED = (State.SERVING, State.DEGRADED)
MIN_RETRY_AFTER_MS = 10
MAX_TRANSITIONS = 1024


@dataclass(frozen=True, slots=True)
class Observation:
    at: float  # monotonic seconds: every duration is measured on it
    wall_ns: int  # unix time: only recorded, for reports comparing processes
    failover: bool = False  # no open leader known (election, recovery, cut off)
    quorum: bool = True  # a voter majority is reachable
    pending_events: int = 0  # appends waiting for the writer
    max_pending_events: int = 0  # the writer's queue limit (0: none)
    commit_lag: int = 0  # records appended and not yet committed
    down: frozenset[str] = frozenset()  # services observed unhealthy


@dataclass(frozen=True, slots=True)
class TierState:
    index: int
    name: str
    state: State
    reason: Reason
    why: str  # the reason in words, without the tier's name
    retry_after_ms: int
    since: float  # monotonic, last change of state or reason
    since_wall_ns: int
    serving_since: float | None  # monotonic; None unless serving
    recovered_at_ns: int = 0  # wall time of the last change to serving (0: never)
    down_at_ns: int = 0  # wall time of the last change away from serving (0: never)

    @property
    def admitted(self) -> bool:
        return self.state in ADMITTED

    @property
    def detail(self) -> str:
        head = f"tier {self.name!r} (tier {self.index}) is {self.state.value}"
        if self.state == State.SERVING:
            return head
        if self.admitted:  # degraded: requests still pass
            return f"{head}: {self.why}"
        return f"{head}: {self.why}; retry after {self.retry_after_ms} ms"


@dataclass(frozen=True, slots=True)
class Transition:
    at: float
    wall_ns: int
    index: int
    tier: str
    old: State
    new: State
    reason: Reason


@dataclass(frozen=True, slots=True)
class Refusal:
    index: int
    tier: str
    reason: Reason
    code: grpc.StatusCode
    message: str
    retry_after_ms: int


_WHY = {
    Reason.STARTING: "the node is starting (tiers are admitted in order)",
    Reason.FAILOVER: "failover in progress (no open leader)",
    Reason.NO_QUORUM: "no quorum (a majority of voters is unreachable)",
}


class TierMachine:
    """Per-region tier supervisor state. Drive it from one task; see the module doc."""

    def __init__(self, spec: TierSpec, at: float, wall_ns: int,
                 max_transitions: int = MAX_TRANSITIONS) -> None:
        self.spec = spec
        self.sup = spec.supervisor
        self._now = at
        self.cause = Reason.STARTING
        self.load = 0.0
        self.last: Observation | None = None
        self.observations = 0
        self.transitions: deque[Transition] = deque(maxlen=max_transitions)
        n = len(spec.tiers)
        # Overload threshold per tier: the top tier first, tier 1 last; tier 0 never.
        self.thresholds = [math.inf] + [
            self.sup.overload_from + (1 - self.sup.overload_from) * (n - 1 - i) / (n - 1)
            for i in range(1, n)]
        self._overloaded = [False] * n
        self._quiet_since: list[float | None] = [None] * n
        self._states = [
            TierState(i, t.name, State.DEGRADED if i == 0 else State.SHED, Reason.STARTING,
                      _WHY[Reason.STARTING], self.sup.retry_after_ms, at, wall_ns, None)
            for i, t in enumerate(spec.tiers)]
        self.all_admitted = n == 1

    @property
    def states(self) -> tuple[TierState, ...]:
        return tuple(self._states)

    def refusal(self, index: int) -> Refusal | None:
        """None when requests of tier `index` may pass; else how to refuse them."""
        st = self._states[index]
        if st.admitted:
            return None
        code = (grpc.StatusCode.RESOURCE_EXHAUSTED if st.reason == Reason.OVERLOAD
                else grpc.StatusCode.UNAVAILABLE)
        return Refusal(index, st.name, st.reason, code, st.detail, st.retry_after_ms)

    # ---- input --------------------------------------------------------------------------

    def observe(self, obs: Observation) -> list[Transition]:
        t = max(obs.at, self._now)  # a clock that went backwards must not undo a settle
        self._now = t
        self.last = obs
        self.observations += 1
        self.cause = (Reason.NO_QUORUM if not obs.quorum
                      else Reason.FAILOVER if obs.failover else Reason.NONE)
        self.load = self._load(obs)
        self._update_overload(t)
        out: list[Transition] = []
        for i, tier in enumerate(self.spec.tiers):
            down = sorted(s for s in tier.services if s in obs.down)
            state, reason, why = self._decide(i, t, down)
            retry = self._retry_ms(i, t, state, reason)
            self._set(i, state, reason, why, retry, t, obs.wall_ns, out)
        self.transitions.extend(out)
        self.all_admitted = all(s.admitted for s in self._states)
        return out

    # ---- rules ------------------------------------------------------------------------

    def _load(self, obs: Observation) -> float:
        queue = (obs.pending_events / obs.max_pending_events
                 if obs.max_pending_events > 0 else 0.0)
        return max(queue, obs.commit_lag / self.sup.max_commit_lag)

    def _update_overload(self, t: float) -> None:
        for i in range(1, len(self._states)):
            threshold = self.thresholds[i]
            if self.load >= threshold:
                self._overloaded[i] = True
                self._quiet_since[i] = None
            elif self._overloaded[i]:
                if self.load >= threshold * self.sup.restore_below:
                    self._quiet_since[i] = None  # not quiet enough: the clock restarts
                    continue
                since = self._quiet_since[i]
                if since is None:
                    self._quiet_since[i] = since = t
                if t - since >= self.sup.settle_s:
                    self._overloaded[i] = False
                    self._quiet_since[i] = None

    def _decide(self, i: int, t: float, down: list[str]) -> tuple[State, Reason, str]:
        unhealthy = f"{', '.join(down)} down"
        if i == 0:
            if self.cause != Reason.NONE:
                return State.DEGRADED, self.cause, _WHY[self.cause]
            if down:
                return State.DEGRADED, Reason.UNHEALTHY, unhealthy
            return State.SERVING, Reason.NONE, ""
        if self.cause != Reason.NONE:
            return State.SHED, self.cause, _WHY[self.cause]
        if self._overloaded[i]:
            return State.SHED, Reason.OVERLOAD, self._overload_why(i)
        below = self._states[i - 1]  # already decided in this observation
        if below.state == State.SHED:
            return State.SHED, below.reason, f"tier {below.name!r} is shed ({below.why})"
        if below.state == State.RECOVERING:
            return (State.RECOVERING, Reason.SETTLING,
                    f"tier {below.name!r} is still recovering")
        if below.state == State.DEGRADED:
            return State.SHED, Reason.DEPENDENCY, f"tier {below.name!r} is not healthy " \
                                                  f"({below.why})"
        assert below.serving_since is not None
        if self._states[i].admitted or t - below.serving_since >= self.sup.settle_s:
            if down:
                return State.DEGRADED, Reason.UNHEALTHY, unhealthy
            return State.SERVING, Reason.NONE, ""
        return (State.RECOVERING, Reason.SETTLING,
                f"recovering: admitted once tier {below.name!r} has served for "
                f"{self.sup.settle_s:g} s")

    def _overload_why(self, i: int) -> str:
        obs = self.last
        assert obs is not None
        queue = (f"writer queue {obs.pending_events}/{obs.max_pending_events}"
                 if obs.max_pending_events else f"writer queue {obs.pending_events}")
        return (f"overload (load {self.load:.0%}: {queue}, commit lag {obs.commit_lag}/"
                f"{self.sup.max_commit_lag}; this tier is shed from "
                f"{self.thresholds[i]:.0%} until under "
                f"{self.thresholds[i] * self.sup.restore_below:.0%} for "
                f"{self.sup.settle_s:g} s)")

    def _retry_ms(self, i: int, t: float, state: State, reason: Reason) -> int:
        """The refusal's hint: when tier i is expected back, so that a client following
        it is not refused again. Each step of a recovery ends at an observation, so it
        takes up to one interval more than its settle time."""
        if state in ADMITTED:
            return 0
        settle, interval = self.sup.settle_s, self.sup.interval_s
        if reason == Reason.OVERLOAD:
            # The lowest tier j shed for load comes back once the load has been quiet
            # for a settle time (assumed from now if it is not quiet yet); every tier
            # from j up to i then takes one more settle time. Before, the hint was the
            # constant overload_retry_after_ms, and clients came back far too early.
            j = i
            while j > 1 and self._overloaded[j - 1]:
                j -= 1
            since = self._quiet_since[j]
            quiet = max(0.0, settle - (t - since)) if since is not None else settle
            estimate = quiet + interval + (settle + interval) * (i - j)
            return max(self.sup.overload_retry_after_ms,
                       min(MAX_RETRY_AFTER_MS, math.ceil(estimate * 1000)))
        if reason != Reason.SETTLING:
            return self.sup.retry_after_ms
        # Settling: the lowest recovering tier j waits for tier j-1 to finish settling,
        # then every tier from j up to i takes one more settle time.
        j = i
        while j > 1 and self._states[j - 1].state == State.RECOVERING:
            j -= 1
        below = self._states[j - 1]
        first = (max(0.0, below.serving_since + settle - t)
                 if below.serving_since is not None else settle)
        estimate = first + interval + (settle + interval) * (i - j)
        return max(MIN_RETRY_AFTER_MS, min(MAX_RETRY_AFTER_MS, math.ceil(estimate * 1000)))

    def _set(self, i: int, state: State, reason: Reason, why: str, retry: int, t: float,
             wall_ns: int, out: list[Transition]) -> None:
        old = self._states[i]
        if (old.state, old.reason) == (state, reason):
            if (old.why, old.retry_after_ms) != (why, retry):
                self._states[i] = replace(old, why=why, retry_after_ms=retry)
            return
        new = replace(old, state=state, reason=reason, why=why, retry_after_ms=retry, since=t,
                      since_wall_ns=wall_ns)
        if state == State.SERVING and old.state != State.SERVING:
            new = replace(new, serving_since=t, recovered_at_ns=wall_ns)
        elif state != State.SERVING and old.state == State.SERVING:
            new = replace(new, serving_since=None, down_at_ns=wall_ns)
        self._states[i] = new
        out.append(Transition(t, wall_ns, i, old.name, old.state, state, reason))
