"""`xdc engine ...`: run an engine instance, ask its status, hand over, snapshot, verify,
activate an output format version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from engine import wire
from engine.book import gc_paused
from engine.codec import state_hash
from engine.constants import MAX_OUTPUT_VERSION, OUTPUT_VERSIONS
from engine.consumer import MAX_PENDING_INPUTS, Consumer
from engine.exchange_config import ExchangeConfigError, load
from engine.lease import make_lease
from engine.runner import (
    ENGINE_VERSION,
    STARTUP_TIMEOUT_S,
    VERIFY_WINDOW,
    RunnerConfig,
    StoreUnreachable,
    batch_positions,
    feed,
    fetch_status,
    run_engine,
)
from store.client import AppendError, CaughtUp, Checkpoint, RawBatch, StoreClient
from xdc.argtypes import at_least, listen, seconds, targets
from xdc.tls import Tls, add_cli_args, cli_tls
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb

_T = TypeVar("_T")
# `engine switchover` waits this long for its target to take over (--timeout); a status
# call of an instance gets STATUS_TIMEOUT_S.
SWITCHOVER_TIMEOUT_S = 10.0
STATUS_TIMEOUT_S = 2.0
# A read of the whole log (active_output_version) fails after this long with nothing
# from the store, however long the read as a whole takes.
SCAN_IDLE_S = 10.0
# What `engine status --group`, `switchover` and `activate` read of a group's instances
# stream (all of it, newest first, up to this many events: an instance advertises once
# per start and address) and how many instances they ask, the most recently advertised,
# at most STATUS_CONCURRENCY at a time.
MAX_ADVERTISEMENTS = 100_000
MAX_INSTANCES_ASKED = 256
STATUS_CONCURRENCY = 32


def group_name(text: str) -> str:
    """An engine group argument (argparse type): a bad one exits 2 naming the rule, not a
    traceback (wire.check_group raised ValueError out of every engine command)."""
    try:
        return wire.check_group(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _group(args: argparse.Namespace) -> str:
    if args.group:
        return wire.check_group(args.group)
    if not (args.exchange and args.symbols):
        raise SystemExit("give --group, or --exchange FILE with --symbols")
    try:
        config = load(args.exchange)
    except ExchangeConfigError as exc:
        raise SystemExit(str(exc)) from None
    groups = {config.group_of.get(s) for s in args.symbols.split(",")}
    if None in groups or len(groups) != 1:
        raise SystemExit(f"--symbols {args.symbols}: all must be symbols of one group in "
                         f"{args.exchange}")
    return groups.pop()  # type: ignore[return-value]


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    import os

    from xdc.cli import load_auth
    # Its log (role changes, a store or lease it cannot reach) on stderr, as the gateway's;
    # a no-op when the caller configured logging already (drills).
    logging.basicConfig(level=logging.DEBUG if os.environ.get("XDC_LOG") == "debug"
                        else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    group = _group(args)
    if args.max_output_version > max(OUTPUT_VERSIONS):
        print(f"xdc engine run: --max-output-version {args.max_output_version}: this release "
              f"emits output versions {', '.join(map(str, OUTPUT_VERSIONS))}, at most "
              f"{max(OUTPUT_VERSIONS)}", file=sys.stderr)
        return 2
    auth_config = load_auth("engine run", args.auth)
    config = RunnerConfig(group=group, instance=args.instance, store=tuple(args.store.split(",")),
                          role=args.role, snapshot_every=args.snapshot_every,
                          verify_window=args.verify_window,
                          max_pending_inputs=args.max_pending_inputs,
                          startup_timeout_s=args.startup_timeout,
                          tls=cli_tls(args, "xdc engine"), token=args.token,
                          output_versions=tuple(v for v in OUTPUT_VERSIONS
                                                if v <= args.max_output_version))
    spec, cluster, access = args.lease, args.cluster, None
    if args.config:
        from geo.config import ConfigError, etcd_access
        from geo.config import load as load_cluster
        try:
            cfg = load_cluster(args.config)
            access = etcd_access(cfg)
        except ConfigError as exc:
            raise SystemExit(f"xdc engine run: {exc}") from None
        cluster = cfg.cluster
        if spec == "etcd":
            spec = "etcd:" + ",".join(cfg.etcd.endpoints)
    try:
        lease = make_lease(spec, group, args.instance, cluster, args.lease_ttl, access)
    except ValueError as exc:
        print(f"xdc engine run: --lease: {exc} (--lease etcd takes its endpoints from "
              f"--config)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_engine(config, lease, args.control, auth_config))
    except StoreUnreachable as exc:
        print(f"xdc engine run: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:  # refused at start: a permission, TLS, a limit
        print(f"xdc engine run: the store ({args.store}) refused the start: "
              f"{exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


async def _status(addresses: list[str], tls: Tls | None,
                  token: str) -> list[xpb.EngineStatus | str]:
    """Each address's status (or why none), in order; STATUS_CONCURRENCY asked at a time:
    one after the other, every instance advertised and gone cost its timeout."""
    asking = asyncio.Semaphore(STATUS_CONCURRENCY)

    async def ask(a: str) -> xpb.EngineStatus | str:
        async with asking:
            try:
                return await fetch_status(a, tls=tls, token=token)
            except grpc.aio.AioRpcError as exc:
                return f"{a}: {exc.code().name} {exc.details()}"
    return list(await asyncio.gather(*(ask(a) for a in addresses)))


async def advertised_instances(client: StoreClient, group: str) -> dict[str, str]:
    """instance -> the address it advertised last, from the group's whole instances stream
    (the most recently advertised last; at most MAX_INSTANCES_ASKED of them). An address
    belongs to the instance that advertised it last (one address, one listener).

    Not a gateway's EngineDirectory: its first look reads the stream's first 256 events
    only (it reads on at each look), so an operator's command, which looks once, missed
    every instance advertised after them (an instance restarted on a new port each time
    makes one advertisement per start), and `engine activate` appended an activation
    that an instance it never asked does not support."""
    newest_first: dict[str, str] = {}
    claimed: set[str] = set()
    try:
        async for batch in client.read_batches(wire.instances_stream(group), backwards=True,
                                               limit=MAX_ADVERTISEMENTS):
            for e in batch.events:
                parsed = wire.parse_instance(e.data) if e.type == wire.INSTANCE_TYPE else None
                if parsed is None:
                    continue
                name, address = parsed
                if name not in newest_first and address not in claimed:
                    newest_first[name] = address
                claimed.add(address)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: none advertised yet
            raise
    return dict(reversed(list(newest_first.items())[:MAX_INSTANCES_ASKED]))


async def _advertised(store: str, group: str, tls: Tls | None, token: str) -> list[str]:
    client = StoreClient(store.split(","), tls=tls, token=token)
    try:
        return list(reversed((await advertised_instances(client, group)).values()))
    finally:
        await client.close()


class StoreSilent(Exception):
    """The store stopped answering a read the command needs; the message says which."""


async def active_output_version(client: StoreClient, group: str,
                                idle_s: float = SCAN_IDLE_S) -> tuple[int, int]:
    """(the output version in force after the group's last input, the position of the
    activation that put it in force: 0 for version 1): the activations in its input
    stream, read as the engines read them (versions only move forward), after what the
    newest snapshot says was in force at its input (wire.snapshot_in_force); from the
    start of the log when it says nothing (none, or one of an older release). The read
    is filtered by the store, however long it takes while it makes progress (a
    checkpoint every 10k records skipped); nothing for ``idle_s`` raises StoreSilent
    (the client's subscription would wait for a store that went away for good: the
    command hung)."""
    stream = wire.input_stream(group)
    version, at, seen = 1, 0, 0
    try:
        async with asyncio.timeout(idle_s):
            newest = await client.read(wire.snapshot_stream(group), backwards=True, limit=1)
    except grpc.aio.AioRpcError as exc:
        # No snapshot yet, or a principal that may read the inputs and not the
        # snapshots: the whole log then.
        if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
            raise
        newest = []
    except TimeoutError:
        raise StoreSilent(f"the store sent nothing for {idle_s:g} s while the newest "
                          f"snapshot of group {group!r} was read") from None
    in_force = wire.snapshot_in_force(newest[0].metadata) if newest else None
    if in_force is not None:
        (version, at), seen = in_force, int(newest[0].metadata["input_position"])
    async with contextlib.aclosing(client.subscribe(
            after_position=seen, stream_prefix=stream, event_types=[wire.ACTIVATE_TYPE],
            batches=True)) as items:
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    item = await anext(items)
            except TimeoutError:
                raise StoreSilent(
                    f"the store sent nothing for {idle_s:g} s while the activations of "
                    f"group {group!r} were read (read through position {seen})") from None
            except StopAsyncIteration:
                break
            if isinstance(item, CaughtUp):
                break
            if isinstance(item, Checkpoint):
                seen = item.position
            if not isinstance(item, pb.RecordBatch) or not item.events:
                continue
            seen = item.events[-1].position
            for e in item.events:
                found = wire.parse_activation(e.data) if e.stream == stream else None
                if found is not None and found > version:
                    version, at = found, e.position
    return version, at


async def _group_output_version(store: str, group: str, tls: Tls | None, token: str) -> int:
    client = StoreClient(store.split(","), tls=tls, token=token)
    try:
        return (await active_output_version(client, group))[0]
    finally:
        await client.close()


def cmd_status(args: argparse.Namespace) -> int:
    from xdc.cli import message_json
    tls = cli_tls(args, "xdc engine")
    addresses = [a for a in args.engine.split(",") if a]
    extra: dict[str, object] = {}
    if args.group or args.store:
        if not (args.group and args.store):
            print("xdc engine status: --group and --store go together", file=sys.stderr)
            return 2
        group = args.group
        try:
            found = asyncio.run(_advertised(args.store, group, tls, args.token))
            # What the log has put in force: an instance shows the version after its own
            # input position (older while it catches up; 0 in a release before versions).
            extra["group_output_version"] = asyncio.run(
                _group_output_version(args.store, group, tls, args.token))
        except grpc.aio.AioRpcError as exc:
            print(f"xdc engine status: the store ({args.store}): {exc.code().name}: "
                  f"{exc.details()}", file=sys.stderr)
            return 1
        except StoreSilent as exc:
            print(f"xdc engine status: the store ({args.store}): {exc}", file=sys.stderr)
            return 1
        addresses = list(dict.fromkeys([*addresses, *found]))
    if not addresses:
        print("xdc engine status: no instance to ask (--engine, or --group with --store: "
              "none advertised)", file=sys.stderr)
        return 2
    bad = 0
    for s in asyncio.run(_status(addresses, tls, args.token)):
        if isinstance(s, str):
            bad = 1
            print(json.dumps({"error": s}))
        else:
            bad |= bool(s.alarm)
            print(json.dumps({**message_json(s), **extra}))
    return bad


class _Refused(Exception):
    """An engine control refused before anything was appended; the message says why."""


async def _known_group(client: StoreClient, group: str) -> None:
    """Raises _Refused when the store holds no input stream for `group` (a typo): a
    control event appended there would make the group up, for good."""
    try:
        await client.stream_info(wire.input_stream(group))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        raise _Refused(f"no engine group {group!r} in this store: its input stream "
                       f"{wire.input_stream(group)} does not exist (`xdc exchange init` "
                       f"creates a group's streams)") from None


@dataclass(frozen=True)
class _Instance:
    """An instance a group's instances stream advertises, and what it answers."""

    name: str
    address: str
    status: xpb.EngineStatus | None
    error: str = ""  # why it did not answer

    def describe(self) -> str:
        st = self.status
        if st is None:
            return f"{self.name} at {self.address}: no answer ({self.error})"
        extra = "".join(f", {k} {v}" for k, v in (
            ("alarm", st.alarm), ("campaign_blocked", st.campaign_blocked),
            ("handover_to", st.handover_to)) if v)
        return f"{self.name}: {st.role}, input {st.input_position}{extra}"


def _unable(st: xpb.EngineStatus) -> str:
    """Why an instance that answers cannot take the group over ("" if it can)."""
    if st.alarm:
        return f"it diverged ({st.alarm})"
    if st.role != "warm":
        return f"it is {st.role}" + (" (not caught up with the log)"
                                     if st.role == "starting" else "")
    return st.campaign_blocked


async def _instances(client: StoreClient, group: str, tls: Tls | None,
                     token: str) -> list[_Instance]:
    """Every instance the group advertised (``advertised_instances``) with its answer."""
    found = await advertised_instances(client, group)
    asking = asyncio.Semaphore(STATUS_CONCURRENCY)

    async def ask(name: str, address: str) -> _Instance:
        async with asking:
            try:
                return _Instance(name, address, await fetch_status(
                    address, STATUS_TIMEOUT_S, tls=tls, token=token, brief=True))
            except grpc.aio.AioRpcError as exc:
                return _Instance(name, address, None, f"{exc.code().name} {exc.details()}")
    return list(await asyncio.gather(*(ask(name, address)
                                       for name, address in found.items())))


def _handover_check(group: str, to: str, instances: list[_Instance]) -> _Instance | None:
    """The primary that hands over to `to`, or None when `to` is the primary already;
    raises _Refused when `to` could not take over (so matching would stop until the
    designation lapses), naming the instances that could."""
    able = ", ".join(i.name for i in instances if i.name != to and i.status is not None
                     and not _unable(i.status)) or "none"
    target = next((i for i in instances if i.name == to), None)
    if target is None:
        known = "; ".join(i.describe() for i in instances) or "none advertised"
        raise _Refused(f"{to!r} is not an instance of engine group {group!r} (instances: "
                       f"{known}); instances that could take over: {able}")
    if target.status is None:
        raise _Refused(f"instance {to!r} at {target.address} does not answer "
                       f"({target.error}); instances that could take over: {able}")
    if target.status.role == "primary":
        return None
    primaries = [i for i in instances if i.status is not None and i.status.role == "primary"]
    if len(primaries) != 1:
        states = "; ".join(i.describe() for i in instances)
        raise _Refused(f"no primary of engine group {group!r} answers ({states}): "
                       f"nothing to hand over (a warm instance takes a free lease by "
                       f"itself)" if not primaries else
                       f"{len(primaries)} instances of engine group {group!r} claim primary "
                       f"({states}): a takeover is under way; try again")
    why = _unable(target.status)
    if why:
        raise _Refused(f"instance {to!r} cannot take over: {why}; instances that could: "
                       f"{able}")
    return primaries[0]


async def _switchover(args: argparse.Namespace, group: str,
                      tls: Tls | None) -> tuple[dict[str, object], str]:
    """(the JSON answer, an error for stderr: "" on success)."""
    to = args.to
    client = StoreClient(args.store.split(","), tls=tls, token=args.token)
    try:
        await _known_group(client, group)
        instances = await _instances(client, group, tls, args.token)
        try:
            primary = _handover_check(group, to, instances)
        except _Refused:
            if not args.force:
                raise
            primary = next((i for i in instances if i.status is not None
                            and i.status.role == "primary" and i.name != to), None)
        else:
            if primary is None:  # a switchover repeated after it succeeded
                return ({"group": group, "to": to, "from": to, "marker_position": 0,
                         "took_over": True, "took_s": 0.0, "already_primary": True}, "")
        r = await client.append(wire.input_stream(group), [
            wire.control_event(group, wire.SWITCHOVER_TYPE, {"to": to}, uuid.uuid4().hex)])
    finally:
        await client.close()
    answer: dict[str, object] = {"group": group, "to": to,
                                 "from": primary.name if primary is not None else "",
                                 "marker_position": r.last_position}
    target = next((i for i in instances if i.name == to), None)
    if args.no_wait or target is None:
        return answer, ""
    # Wait for the takeover, as `xdc cluster switchover` does: the old primary hands
    # over once its outputs up to the marker are committed, then the target takes the
    # lease (a fraction of a second).
    loop = asyncio.get_running_loop()
    began = loop.time()
    seen = "no answer"
    while True:
        try:
            st = await fetch_status(target.address, STATUS_TIMEOUT_S, tls=tls,
                                    token=args.token, brief=True)
            if st.role == "primary":
                answer.update(took_over=True, took_s=round(loop.time() - began, 3))
                return answer, ""
            seen = _Instance(to, target.address, st).describe()
        except grpc.aio.AioRpcError as exc:
            seen = f"no answer ({exc.code().name} {exc.details()})"
        if loop.time() - began >= args.timeout:
            answer.update(took_over=False, took_s=round(loop.time() - began, 3))
            return answer, (f"the marker is at position {r.last_position}, but {to!r} is not "
                            f"primary {args.timeout:g} s later (it answers: {seen}); the old "
                            f"primary hands over once its outputs up to the marker are "
                            f"committed (`xdc engine status --group {group} --store "
                            f"{args.store}`)")
        await asyncio.sleep(0.05)


def _run_control(args: argparse.Namespace, work: Callable[..., Awaitable[_T]],
                 *rest: object, raise_refused: bool = False) -> _T | None:
    """asyncio.run(work(args, group, tls, *rest)); None after printing why it was refused
    (nothing appended; with ``raise_refused``, _Refused is raised instead) or why the
    store refused it."""
    prog = f"xdc engine {args.engine_command}"
    try:
        return asyncio.run(work(args, wire.check_group(args.group),
                                cli_tls(args, "xdc engine"), *rest))
    except _Refused as exc:
        if raise_refused:
            raise
        appends = args.engine_command != "verify"
        print(f"{prog}: {exc}{'; nothing appended' if appends else ''}", file=sys.stderr)
    except (AppendError, StoreSilent) as err:
        print(f"{prog}: {err}", file=sys.stderr)
    except grpc.aio.AioRpcError as exc:
        print(f"{prog}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return None


def cmd_switchover(args: argparse.Namespace) -> int:
    done = _run_control(args, _switchover)
    if done is None:
        return 1
    answer, error = done
    print(json.dumps(answer))
    if error:
        print(f"xdc engine switchover: {error}", file=sys.stderr)
        return 1
    return 0


async def _snapshot(args: argparse.Namespace, group: str, tls: Tls | None) -> int:
    """Appends a snapshot request (a control event: the store lets only principals whose
    grants cover its type, admins, do it); its position."""
    client = StoreClient(args.store.split(","), tls=tls, token=args.token)
    try:
        await _known_group(client, group)
        r = await client.append(wire.input_stream(group), [
            wire.control_event(group, wire.SNAPSHOT_REQUEST_TYPE, {}, uuid.uuid4().hex)])
        return r.last_position
    finally:
        await client.close()


def cmd_snapshot(args: argparse.Namespace) -> int:
    position = _run_control(args, _snapshot)
    if position is None:
        return 1
    print(json.dumps({"group": args.group, "requested_at": position}))
    return 0


def _supported(st: xpb.EngineStatus) -> tuple[int, ...]:
    """The output versions an instance supports: a release before output versions
    reports none and emits version 1 only."""
    return tuple(st.supported_output_versions) or (1,)


def _activation_check(group: str, version: int, instances: list[_Instance]) -> None:
    """Raises _Refused unless every instance that answers supports ``version`` (and one
    at least answers): one that does not would alarm at the activation, and one of a
    release before output versions would not even see it and emit version 1 on."""
    answering = [i for i in instances if i.status is not None]
    if not answering:
        known = "; ".join(i.describe() for i in instances) or "none advertised"
        raise _Refused(f"no instance of engine group {group!r} answers ({known}): none says "
                       f"it supports output version {version} (--force appends anyway)")
    unable = [i for i in answering if version not in _supported(i.status)]  # type: ignore[arg-type]
    if unable:
        raise _Refused(
            f"instances of engine group {group!r} that do not support output version "
            f"{version}: " + ", ".join(
                f"{i.name} at {i.address} (engine {i.status.engine_version or '?'}, output "  # type: ignore[union-attr]
                f"versions {', '.join(map(str, _supported(i.status)))})"  # type: ignore[arg-type]
                for i in unable)
            + "; stop them (or replace them by a release that supports it) first")


async def _activate(args: argparse.Namespace, group: str,
                    tls: Tls | None) -> tuple[dict[str, object], str]:
    """(the JSON answer, an error for stderr: "" on success). Appends the activation of
    ``--output-version`` once every instance that answers supports it, then waits for
    them to process it."""
    version = args.output_version
    client = StoreClient(args.store.split(","), tls=tls, token=args.token)
    try:
        await _known_group(client, group)
        active, at = await active_output_version(client, group)
        if version < active:
            raise _Refused(f"output version {active} is in force in engine group {group!r} "
                           f"since input {at}: versions only move forward")
        if version == active:
            return ({"group": group, "output_version": version, "position": at,
                     "already_active": True}, "")
        instances = await _instances(client, group, tls, args.token)
        if not args.force:
            _activation_check(group, version, instances)
        r = await client.append(wire.input_stream(group),
                                [wire.activation_event(group, version)])
    finally:
        await client.close()
    answering = [i for i in instances if i.status is not None]
    answer: dict[str, object] = {
        "group": group, "output_version": version, "position": r.last_position,
        "not_answering": [i.name for i in instances if i.status is None]}
    if args.no_wait:
        return answer, ""
    # Wait for the instances to process it: what each then emits (or its alarm).
    loop = asyncio.get_running_loop()
    began = loop.time()
    applied: dict[str, int] = {}  # instance -> its output version once past the activation
    alarms: dict[str, str] = {}
    while True:
        for i in answering:
            if i.name in applied:
                continue
            with contextlib.suppress(grpc.aio.AioRpcError):
                st = await fetch_status(i.address, STATUS_TIMEOUT_S, tls=tls,
                                        token=args.token, brief=True)
                if st.input_position >= r.last_position:
                    applied[i.name] = st.output_version
                    if st.alarm:
                        alarms[i.name] = st.alarm
        if len(applied) == len(answering):
            answer.update(applied=applied, took_s=round(loop.time() - began, 3))
            return answer, "; ".join(f"instance {k} alarmed: {v}" for k, v in alarms.items())
        if loop.time() - began >= args.timeout:
            answer.update(applied=applied, took_s=round(loop.time() - began, 3))
            late = [i.name for i in answering if i.name not in applied]
            return answer, (f"the activation is at position {r.last_position}, but "
                            f"{', '.join(late)} had not processed it {args.timeout:g} s "
                            f"later (`xdc engine status --group {group} --store "
                            f"{args.store}`)")
        await asyncio.sleep(0.05)


def cmd_activate(args: argparse.Namespace) -> int:
    try:
        done = _run_control(args, _activate, raise_refused=True)
    except _Refused as exc:
        print(f"xdc engine activate: {exc}; nothing appended", file=sys.stderr)
        return 2
    if done is None:
        return 1
    answer, error = done
    print(json.dumps(answer))
    if error:
        print(f"xdc engine activate: {error}", file=sys.stderr)
        return 1
    return 0


def _output_version(text: str) -> int:
    try:
        version = int(text)
    except ValueError:
        version = 0
    if not 1 <= version <= MAX_OUTPUT_VERSION:
        raise argparse.ArgumentTypeError(f"an integer 1..{MAX_OUTPUT_VERSION}, not {text!r}")
    return version


async def verify(store: list[str], group: str, tls: Tls | None = None,
                 token: str = "") -> dict[str, object]:
    """Replay the group's whole log into this engine code and compare: every committed
    output batch (bytes and chain) and the state hash of every stored snapshot."""
    client = StoreClient(store, timeout_s=60, tls=tls, token=token)
    try:
        snaps: dict[int, str] = {}
        try:
            for e in await client.read(wire.snapshot_stream(group), limit=100_000):
                snaps[int(e.metadata["input_position"])] = e.metadata["state_hash"]
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        c = Consumer(group)
        checked = 0
        mismatched: list[int] = []
        inp = wire.input_stream(group)
        # The cyclic GC stays off for the whole replay, not per batch: re-enabled after
        # each batch, a collection came due at once and re-scanned what the batch had
        # added to the book (2-7% of a quick bench replay), while the replay leaves next
        # to no cyclic garbage (that replay's collections found 0-4 objects in all).
        # Nothing else runs on this event loop during the pause.
        with gc_paused():
            async for item in client.subscribe(stream_prefix=wire.group_prefix(group),
                                               event_types=wire.CONSUMED_TYPES, batches=True,
                                               raw=True):
                if isinstance(item, CaughtUp):
                    break
                span = batch_positions(item)
                if span is None:
                    continue
                if not any(span[0] <= p <= span[1] for p in snaps):
                    feed(c, item)  # no snapshot to check inside: the whole batch
                    continue
                for e in (item.parsed() if isinstance(item, RawBatch) else item).events:
                    c.on_record(e)
                    if e.stream == inp and e.position in snaps:
                        checked += 1
                        if state_hash(c.engine).hex() != snaps[e.position]:
                            mismatched.append(e.position)
        return {"group": group, "engine_version": ENGINE_VERSION, "inputs": c.inputs,
                "input_position": c.position, "outputs_verified_through": c.committed_input,
                "unverified_pending_inputs": c.backlog, "chain_hash": c.chain.hex(),
                "state_hash": state_hash(c.engine).hex(), "snapshots_checked": checked,
                "output_version": c.engine.output_version,
                "snapshot_mismatches": mismatched, "alarm": c.alarm,
                "ok": not c.alarm and not mismatched}
    finally:
        await client.close()


async def _verify(args: argparse.Namespace, group: str,
                  tls: Tls | None) -> dict[str, object]:
    client = StoreClient(args.store.split(","), tls=tls, token=args.token)
    try:
        await _known_group(client, group)  # else: "inputs 0, ok" for a typo
    finally:
        await client.close()
    return await verify(args.store.split(","), group, tls, args.token)


def cmd_verify(args: argparse.Namespace) -> int:
    result = _run_control(args, _verify)
    if result is None:
        return 1
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    from xdc.cli import add_token_arg
    p = sub.add_parser("engine", help="matching engines (deterministic consumers)")
    esub = p.add_subparsers(dest="engine_command", required=True)

    r = esub.add_parser("run", help="run one engine instance of a group")
    r.add_argument("--store", required=True, type=targets,
                   help="store address(es), comma-separated")
    r.add_argument("--group", type=group_name,
                   help="engine group (or --exchange with --symbols)")
    r.add_argument("--exchange", help="exchange TOML (symbol -> group)")
    r.add_argument("--symbols", help="symbols of the group, comma-separated")
    r.add_argument("--instance", required=True, help="this instance's id")
    r.add_argument("--role", choices=("auto", "warm"), default="auto",
                   help="auto: take over when the primary is gone; warm: verify only")
    r.add_argument("--lease", required=True,
                   help="file:DIR or etcd:HOST:PORT[,...] (with --config: etcd)")
    r.add_argument("--cluster", default="xdc", help="etcd key prefix (etcd leases)")
    r.add_argument("--config", help="cluster TOML: etcd endpoints, TLS and user, and the "
                                    "cluster name for an etcd lease")
    r.add_argument("--lease-ttl", type=at_least(1), default=2, help="etcd lease TTL, seconds")
    r.add_argument("--snapshot-every", type=at_least(0), default=100_000,
                   help="inputs between snapshots (0: on request only)")
    r.add_argument("--verify-window", type=at_least(0), default=VERIFY_WINDOW,
                   help="catching up, check the committed outputs of at least this many "
                        "last inputs; replay those before for the state alone (0: check "
                        "every committed output)")
    r.add_argument("--max-pending-inputs", type=at_least(1), default=MAX_PENDING_INPUTS,
                   help="inputs whose outputs are not seen committed, at most: past it a "
                        "warm instance stops checking them, a primary exits (its service "
                        "manager restarts it from the latest snapshot)")
    r.add_argument("--max-output-version", type=_output_version, default=max(OUTPUT_VERSIONS),
                   help="the newest output format version this instance may be activated to "
                        f"(default and at most {max(OUTPUT_VERSIONS)}): at an activation of a "
                        "newer one it alarms, and `xdc engine activate` refuses while it is "
                        "up (a staged roll-out: the new release runs, its format held back)")
    r.add_argument("--control", default="127.0.0.1:0", type=listen,
                   help="EngineControl listen address")
    r.add_argument("--startup-timeout", type=seconds, default=STARTUP_TIMEOUT_S,
                   help="seconds to wait at start for the store to answer (it says so at "
                        "once and retries); then exit 1")
    add_cli_args(r)
    r.add_argument("--auth", help="auth file: EngineControl callers must authenticate")
    add_token_arg(r)
    r.set_defaults(func=cmd_run)

    s = esub.add_parser("status", help="role, input position, lag, hashes of instances")
    s.add_argument("--engine", default="", help="control address(es), comma-separated")
    s.add_argument("--group", type=group_name,
                   help="with --store: every instance the group's engines advertised")
    s.add_argument("--store", default="", type=targets,
                   help="store address(es), comma separated")
    add_cli_args(s)
    add_token_arg(s)
    s.set_defaults(func=cmd_status)

    w = esub.add_parser("switchover", help="hand the group over at an exact input position")
    w.add_argument("group", type=group_name)
    w.add_argument("--to", required=True, help="target instance id")
    _add_marker_args(w, cmd_switchover, "the marker",
                     "for the target to take over",
                     "even if the target does not look able to take over (not advertised, "
                     "not answering, not warm)")

    n = esub.add_parser("snapshot", help="ask the primary for a snapshot at this position")
    n.add_argument("group", type=group_name)
    n.add_argument("--store", required=True, type=targets)
    add_cli_args(n)
    add_token_arg(n)
    n.set_defaults(func=cmd_snapshot)

    a = esub.add_parser(
        "activate", help="switch the group's outputs to a format version at an exact input "
                         "position, once every live instance supports it")
    a.add_argument("group", type=group_name)
    a.add_argument("--output-version", type=_output_version, required=True,
                   help="the output format version to emit after the activation")
    _add_marker_args(a, cmd_activate, "the activation",
                     "for the instances to process it",
                     "whatever the instances answer (none answers, or one does not support "
                     "it: that one alarms when it reads it)")

    v = esub.add_parser("verify", help="replay the log into this engine version and compare "
                                       "outputs and snapshot state hashes")
    v.add_argument("group", type=group_name)
    v.add_argument("--store", required=True, type=targets)
    add_cli_args(v)
    add_token_arg(v)
    v.set_defaults(func=cmd_verify)


def _add_marker_args(p: argparse.ArgumentParser, func: Callable[..., Any], marker: str,
                     wait_for: str, force: str) -> None:
    """The options of a command that appends a control input and waits for the group to
    act on it (switchover, activate), then the store's connection options."""
    from xdc.cli import add_token_arg  # (as in add_parser: xdc.cli imports this module)

    p.add_argument("--store", required=True, type=targets)
    p.add_argument("--timeout", type=seconds, default=SWITCHOVER_TIMEOUT_S,
                   help=f"seconds to wait {wait_for}, more than 0")
    p.add_argument("--no-wait", action="store_true",
                   help=f"return once {marker} is appended, without waiting")
    p.add_argument("--force", action="store_true", help=f"append {marker} {force}")
    add_cli_args(p)
    add_token_arg(p)
    p.set_defaults(func=func)


def main() -> None:  # pragma: no cover - convenience for `python -m engine.cli`
    from xdc.argtypes import ArgumentParser
    parser = ArgumentParser(prog="xdc")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(args.func(args))
