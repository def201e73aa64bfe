"""`xdc engine ...`: run an engine instance, ask its status, hand over, snapshot, verify."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

import grpc

from engine import wire
from engine.book import gc_paused
from engine.codec import state_hash
from engine.consumer import MAX_PENDING_INPUTS, Consumer
from engine.exchange_config import ExchangeConfigError, load
from engine.lease import make_lease
from engine.runner import (
    ENGINE_VERSION,
    VERIFY_WINDOW,
    RunnerConfig,
    fetch_status,
    run_engine,
)
from store.client import AppendError, CaughtUp, StoreClient
from xdc.tls import Tls, add_cli_args, cli_tls
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb


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
    from xdc.cli import load_auth
    group = _group(args)
    auth_config = load_auth("engine run", args.auth)
    config = RunnerConfig(group=group, instance=args.instance, store=tuple(args.store.split(",")),
                          role=args.role, snapshot_every=args.snapshot_every,
                          verify_window=args.verify_window,
                          max_pending_inputs=args.max_pending_inputs,
                          tls=cli_tls(args, "xdc engine"), token=args.token)
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
    lease = make_lease(spec, group, args.instance, cluster, args.lease_ttl, access)
    return asyncio.run(run_engine(config, lease, args.control, auth_config))


async def _status(addresses: list[str], tls: Tls | None,
                  token: str) -> list[xpb.EngineStatus | str]:
    out: list[xpb.EngineStatus | str] = []
    for a in addresses:
        try:
            out.append(await fetch_status(a, tls=tls, token=token))
        except grpc.aio.AioRpcError as exc:
            out.append(f"{a}: {exc.code().name} {exc.details()}")
    return out


async def _advertised(store: str, group: str, tls: Tls | None, token: str) -> list[str]:
    from engine.matching_health import EngineDirectory
    client = StoreClient(store.split(","), tls=tls, token=token)
    try:
        return await EngineDirectory(client, [group]).addresses()
    finally:
        await client.close()


def cmd_status(args: argparse.Namespace) -> int:
    from xdc.cli import message_json
    tls = cli_tls(args, "xdc engine")
    addresses = [a for a in args.engine.split(",") if a]
    if args.group or args.store:
        if not (args.group and args.store):
            print("xdc engine status: --group and --store go together", file=sys.stderr)
            return 2
        found = asyncio.run(_advertised(args.store, wire.check_group(args.group), tls,
                                        args.token))
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
            print(json.dumps(message_json(s)))
    return bad


async def _control(store: str, group: str, kind: str, body: dict[str, str],
                   tls: Tls | None, token: str) -> int:
    """Appends a control event to the group's input stream: the store lets only
    principals whose grants cover its type (admins) do it."""
    client = StoreClient(store.split(","), tls=tls, token=token)
    try:
        r = await client.append(wire.input_stream(group), [
            wire.control_event(group, kind, body, uuid.uuid4().hex)])
        return r.last_position
    finally:
        await client.close()


def _control_cmd(args: argparse.Namespace, kind: str, body: dict[str, str]) -> int | None:
    """The marker's position, or None after printing why the store refused it."""
    try:
        return asyncio.run(_control(args.store, wire.check_group(args.group), kind, body,
                                    cli_tls(args, "xdc engine"), args.token))
    except AppendError as err:
        print(f"xdc engine {args.engine_command}: {err}", file=sys.stderr)
        return None


def cmd_switchover(args: argparse.Namespace) -> int:
    position = _control_cmd(args, wire.SWITCHOVER_TYPE, {"to": args.to})
    if position is None:
        return 1
    print(json.dumps({"group": args.group, "to": args.to, "marker_position": position}))
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    position = _control_cmd(args, wire.SNAPSHOT_REQUEST_TYPE, {})
    if position is None:
        return 1
    print(json.dumps({"group": args.group, "requested_at": position}))
    return 0


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
                                               event_types=wire.CONSUMED_TYPES, batches=True):
                if isinstance(item, CaughtUp):
                    break
                if not isinstance(item, pb.RecordBatch):
                    continue
                events = item.events
                if events and not any(events[0].position <= p <= events[-1].position
                                      for p in snaps):
                    c.on_records(events)  # no snapshot to check inside: the whole batch
                    continue
                for e in events:
                    c.on_record(e)
                    if e.stream == inp and e.position in snaps:
                        checked += 1
                        if state_hash(c.engine).hex() != snaps[e.position]:
                            mismatched.append(e.position)
        return {"group": group, "engine_version": ENGINE_VERSION, "inputs": c.inputs,
                "input_position": c.position, "outputs_verified_through": c.committed_input,
                "unverified_pending_inputs": c.backlog, "chain_hash": c.chain.hex(),
                "state_hash": state_hash(c.engine).hex(), "snapshots_checked": checked,
                "snapshot_mismatches": mismatched, "alarm": c.alarm,
                "ok": not c.alarm and not mismatched}
    finally:
        await client.close()


def cmd_verify(args: argparse.Namespace) -> int:
    result = asyncio.run(verify(args.store.split(","), wire.check_group(args.group),
                                cli_tls(args, "xdc engine"), args.token))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    from xdc.cli import add_token_arg
    p = sub.add_parser("engine", help="matching engines (deterministic consumers)")
    esub = p.add_subparsers(dest="engine_command", required=True)

    r = esub.add_parser("run", help="run one engine instance of a group")
    r.add_argument("--store", required=True, help="store address(es), comma-separated")
    r.add_argument("--group", help="engine group (or --exchange with --symbols)")
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
    r.add_argument("--lease-ttl", type=int, default=2, help="etcd lease TTL, seconds")
    r.add_argument("--snapshot-every", type=int, default=100_000,
                   help="inputs between snapshots (0: on request only)")
    r.add_argument("--verify-window", type=int, default=VERIFY_WINDOW,
                   help="catching up, check the committed outputs of at least this many "
                        "last inputs; replay those before for the state alone (0: check "
                        "every committed output)")
    r.add_argument("--max-pending-inputs", type=int, default=MAX_PENDING_INPUTS,
                   help="inputs whose outputs are not seen committed, at most: past it a "
                        "warm instance stops checking them, a primary exits (its service "
                        "manager restarts it from the latest snapshot)")
    r.add_argument("--control", default="127.0.0.1:0", help="EngineControl listen address")
    add_cli_args(r)
    r.add_argument("--auth", help="auth file: EngineControl callers must authenticate")
    add_token_arg(r)
    r.set_defaults(func=cmd_run)

    s = esub.add_parser("status", help="role, input position, lag, hashes of instances")
    s.add_argument("--engine", default="", help="control address(es), comma-separated")
    s.add_argument("--group", default="",
                   help="with --store: every instance the group's engines advertised")
    s.add_argument("--store", default="", help="store address(es), comma separated")
    add_cli_args(s)
    add_token_arg(s)
    s.set_defaults(func=cmd_status)

    w = esub.add_parser("switchover", help="hand the group over at an exact input position")
    w.add_argument("group")
    w.add_argument("--to", required=True, help="target instance id")
    w.add_argument("--store", required=True)
    add_cli_args(w)
    add_token_arg(w)
    w.set_defaults(func=cmd_switchover)

    n = esub.add_parser("snapshot", help="ask the primary for a snapshot at this position")
    n.add_argument("group")
    n.add_argument("--store", required=True)
    add_cli_args(n)
    add_token_arg(n)
    n.set_defaults(func=cmd_snapshot)

    v = esub.add_parser("verify", help="replay the log into this engine version and compare "
                                       "outputs and snapshot state hashes")
    v.add_argument("group")
    v.add_argument("--store", required=True)
    add_cli_args(v)
    add_token_arg(v)
    v.set_defaults(func=cmd_verify)


def main() -> None:  # pragma: no cover - convenience for `python -m engine.cli`
    parser = argparse.ArgumentParser(prog="xdc")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(args.func(args))
