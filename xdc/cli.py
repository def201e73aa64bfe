"""xdc: a multi-datacenter replicated event store for trading systems."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import uuid
from typing import Any

from xdc.argtypes import INT64, UINT32, listen, target, targets
from xdc.argtypes import seconds as _seconds
from xdc.argtypes import u64 as _u64
from xdc.tls import add_cli_args as add_tls_args
from xdc.tls import cli_tls

DEFAULT_TARGET = os.environ.get("XDC_TARGET", "127.0.0.1:7000")
# ---- argparse types: a bad value is an error naming its flag (exit 2), not a traceback ----

def _expected(text: str) -> tuple[int, int]:
    """`--expected`: (kind, revision) for StoreClient.append."""
    from store.client import ANY, EXACT, NO_STREAM, STREAM_EXISTS
    named = {"any": ANY, "no_stream": NO_STREAM, "stream_exists": STREAM_EXISTS}
    if text in named:
        return named[text], 0
    try:
        return EXACT, _u64(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected any, no_stream, stream_exists or a revision "
            "0..2^64-1") from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def _route(text: str) -> tuple[str, str]:
    """`--route MEMBER=HOST:PORT` (the member is checked against the config later)."""
    from geo.config import split_hostport
    member, sep, address = text.partition("=")
    if not sep or not member:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MEMBER=HOST:PORT")
    try:
        split_hostport(address)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return member, address


def _limit(text: str) -> int:
    """`xdc read --limit N`: at most N events, N >= 1 (without it: all of them)."""
    return _u64(text, 1, " (without --limit: every event)")


def event_json(e: Any) -> dict[str, Any]:
    try:
        data: Any = e.data.decode()
    except UnicodeDecodeError:
        data = {"base64": base64.b64encode(e.data).decode()}
    return {"position": e.position, "stream": e.stream, "revision": e.revision,
            "id": str(uuid.UUID(bytes=e.id)), "type": e.type, "content_type": e.content_type,
            "metadata": dict(e.metadata), "data": data, "term": e.term,
            "timestamp_ns": e.timestamp_ns}


def _limits(args: argparse.Namespace) -> Any:
    """The store's limits from the command line; exits 2 naming a limit that cannot be."""
    from store.limits import Limits
    try:
        return Limits(max_event_bytes=args.max_event_bytes,
                      max_append_events=args.max_append_events)
    except ValueError as exc:
        print(f"xdc {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _tls(args: argparse.Namespace) -> Any:
    """The command's --tls-* material (None: plaintext); exits 2 when it is unusable."""
    return cli_tls(args, f"xdc {args.command}")


def add_client_auth_arg(p: argparse.ArgumentParser) -> None:
    """For servers: whether their clients must show a certificate (`_server_tls`)."""
    p.add_argument("--tls-client-auth", choices=["require", "none"], default="require",
                   help="with TLS: demand a client certificate signed by the CA (default) "
                        "or not (clients then prove who they are with --auth tokens)")


def _server_tls(args: argparse.Namespace) -> Any:
    """`_tls`, with --tls-client-auth applied to the port the command listens on."""
    tls = _tls(args)
    if tls is not None:
        tls = dataclasses.replace(tls, require_client_cert=args.tls_client_auth == "require")
    return tls


def load_auth(prog: str, path: str | None) -> Any:
    """The auth file of `--auth` (None without one); exits 2 naming every problem."""
    if not path:
        return None
    from store import auth
    try:
        return auth.load(path)
    except auth.AuthConfigError as exc:
        print(f"xdc {prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def add_token_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=os.environ.get("XDC_TOKEN", ""),
                   help="bearer token of a principal of the server's auth file "
                        "(default: $XDC_TOKEN)")


def cmd_serve(args: argparse.Namespace) -> int:
    from geo import tiers
    from geo.config import ConfigError
    from geo.tier_supervisor import standalone_companion
    from store.server import serve
    try:
        spec = tiers.load(args.tiers)
    except ConfigError as exc:
        print(f"xdc serve: {exc}", file=sys.stderr)
        return 2
    tls = _server_tls(args)
    return serve(args.data, args.listen, _limits(args), node_id=args.node_id,
                 companion=standalone_companion(spec), tls=tls,
                 auth=load_auth("serve", args.auth))


def cmd_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xdc import certs
    if (Path(args.dir) / "ca.pem").exists() and not args.force:
        print(f"xdc certs init: {args.dir} already holds a CA (ca.pem); --force replaces "
              "every certificate in it", file=sys.stderr)
        return 1
    if args.config:
        from geo.config import ConfigError, load
        try:
            config = load(args.config)
        except ConfigError as exc:
            print(f"xdc certs init: {exc}", file=sys.stderr)
            return 2
        cluster, members = config.cluster, [m.id for m in config.members]
    elif args.cluster and args.members:
        cluster, members = args.cluster, _store_targets(args.members)
    else:
        print("xdc certs init: give --config FILE, or --cluster NAME with --members IDS",
              file=sys.stderr)
        return 2
    others = [(role, name) for role, names in (("engine", args.engines),
                                               ("gateway", args.gateways),
                                               ("admin", args.admins),
                                               ("client", args.clients),
                                               ("etcd", args.etcd))
              for name in _store_targets(names)]
    sans: dict[str, list[str]] = {}
    for item in args.san:
        name, sep, hosts = item.partition("=")
        if not sep or not name or not _store_targets(hosts):
            print(f"xdc certs init: --san {item!r}: expected NAME=HOST[,HOST...]",
                  file=sys.stderr)
            return 2
        sans.setdefault(name, []).extend(_store_targets(hosts))
    try:
        issued = certs.init(args.dir, cluster, members, others=others,
                            hosts=_store_targets(args.hosts), sans=sans, days=args.days)
    except ValueError as exc:
        print(f"xdc certs init: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"ca": str(Path(args.dir, "ca.pem")),
                      "certificates": {name: {"identity": i.identity.uri, "cert": str(i.cert),
                                              "key": str(i.key)}
                                       for name, i in issued.items()}}, indent=2))
    return 0


def cmd_auth(args: argparse.Namespace) -> int:
    from store import auth
    if args.auth_command == "token":
        token = auth.new_token()
        print(json.dumps({"principal": args.name, "token": token,
                          "line": f'token_sha256 = "{auth.token_digest(token).hex()}"'}))
        return 0
    config = load_auth("auth check", args.file)
    for p in config.principals:
        print(json.dumps({"principal": p.name, "admin": p.admin, "token": bool(p.token_sha256),
                          "cert": p.cert, "accounts": sorted(p.accounts),
                          "grants": [{"operations": sorted(g.operations),
                                      "streams": list(g.streams), "types": list(g.types)}
                                     for g in p.grants]}))
    return 0


# How long `xdc append` tries to reach its node before it says it could not (nothing
# appended; a library client retries until its timeout, as through a failover): about
# what `xdc read` and `info` take to say so, with room for a few reconnects.
APPEND_CONNECT_TIMEOUT_S = 1.0


def cmd_append(args: argparse.Namespace) -> int:
    import grpc

    from store.client import AppendError, Client, new_event
    data = sys.stdin.buffer.read() if args.data == "-" else args.data.encode()
    event = new_event(args.type, data, metadata=dict(args.metadata),
                      content_type=args.content_type,
                      event_id=args.id.bytes if args.id else None)
    kind, revision = args.expected
    with Client(args.target, tls=_tls(args), token=args.token, timeout_s=args.timeout,
                connect_timeout_s=min(APPEND_CONNECT_TIMEOUT_S, args.timeout)) as client:
        try:
            r = client.append(args.stream, event, kind, revision)
        except AppendError as err:
            # Outcome unknown: the id to retry with, so that it is appended once.
            again = (f" (--id {uuid.UUID(bytes=event.id)})"
                     if err.code == grpc.StatusCode.DEADLINE_EXCEEDED else "")
            print(f"xdc append: {err}{again}{_tls_hint(args, err.code.name, err.message)}",
                  file=sys.stderr)
            return 1
    print(json.dumps({"first_position": r.first_position, "last_position": r.last_position,
                      "last_revision": r.last_revision, "duplicate": r.duplicate,
                      "id": str(uuid.UUID(bytes=event.id))}))
    return 0


def _rpc_error(prog: str, exc: Any) -> int:
    print(f"xdc {prog}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def _tls_hint(args: argparse.Namespace, code: str, message: str) -> str:
    """For a plaintext connection closed before its HTTP/2 handshake ended, what a TLS
    port does to it: how to speak TLS."""
    plaintext = not (args.tls_ca or args.tls_cert or args.tls_key)
    if plaintext and code == "UNAVAILABLE" and "Socket closed" in message:
        return (" (is it a TLS port? give --tls-ca, --tls-cert and --tls-key, or "
                "XDC_TLS_CA, XDC_TLS_CERT and XDC_TLS_KEY)")
    return ""


def _store_rpc_error(prog: str, args: argparse.Namespace, exc: Any) -> int:
    """`_rpc_error` of a command that talks to a store node (`--target`, `--tls-*`)."""
    details = exc.details() or ""
    print(f"xdc {prog}: {exc.code().name}: {details}"
          f"{_tls_hint(args, exc.code().name, details)}", file=sys.stderr)
    return 1


def cmd_read(args: argparse.Namespace) -> int:
    import grpc

    from store.client import StoreClient
    tls = _tls(args)

    async def run() -> None:
        # Page after page to the end (or --limit), each batch printed as it comes.
        async with StoreClient(args.target, tls=tls, token=args.token) as client:
            async for batch in client.read_batches(args.stream, start=args.start,
                                                   limit=args.limit,
                                                   backwards=args.backwards):
                sys.stdout.write("".join([json.dumps(event_json(e)) + "\n"
                                          for e in batch.events]))

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:
        return _store_rpc_error("read", args, exc)
    return 0


# How often `xdc tail` checks that its node answers (it says so when that changes), and
# how long it waits for the answer (a black-holed address never refuses).
TAIL_PROBE_S = 2.0
TAIL_PROBE_TIMEOUT_S = 5.0


async def _report_reachability(client: Any, target: str) -> None:
    """The subscription resumes by itself while its node is unreachable (a tail outlives
    a restart), silently: this says on stderr when the node stops or starts answering,
    as `tail -F`, kcat and `nats sub` do."""
    import grpc
    unreachable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    reachable: bool | None = None
    while True:
        try:
            # asyncio.timeout, not wait_for: this 3.11's wait_for can swallow the task's
            # cancellation when the call ends at the same moment (the tail then hung).
            async with asyncio.timeout(TAIL_PROBE_TIMEOUT_S):
                await client.node_info()
            now, why = True, ""
        except TimeoutError:
            now, why = False, f"no answer within {TAIL_PROBE_TIMEOUT_S:g} s"
        except grpc.aio.AioRpcError as exc:
            # Any other answer (e.g. a refused token) came from the node: it is reachable,
            # and the subscription reports the error itself.
            now = exc.code() not in unreachable
            why = f"{exc.code().name}: {exc.details()}"
        if not now and reachable is not False:
            print(f"xdc tail: {target} unreachable ({why}); retrying", file=sys.stderr,
                  flush=True)
        elif now and reachable is False:
            print(f"xdc tail: {target} reachable again", file=sys.stderr, flush=True)
        reachable = now
        await asyncio.sleep(TAIL_PROBE_S)


def cmd_tail(args: argparse.Namespace) -> int:
    import grpc

    from store.client import CaughtUp, Checkpoint, StoreClient

    tls = _tls(args)

    async def run() -> None:
        seen = 0
        async with StoreClient(args.target, tls=tls, token=args.token) as client:
            watch = asyncio.create_task(_report_reachability(client, args.target))
            try:
                async for item in client.subscribe(
                        after_position=args.after, from_end=args.from_end,
                        stream_prefix=args.prefix, event_types=args.type or ()):
                    if isinstance(item, CaughtUp):
                        print(json.dumps({"caught_up": item.position}), file=sys.stderr,
                              flush=True)
                        continue
                    if isinstance(item, Checkpoint):
                        continue
                    print(json.dumps(event_json(item)), flush=True)
                    seen += 1
                    if args.count and seen >= args.count:
                        return
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except grpc.RpcError as exc:  # e.g. UNAUTHENTICATED, PERMISSION_DENIED
        return _store_rpc_error("tail", args, exc)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import grpc

    from store.client import Client
    with Client(args.target, tls=_tls(args), token=args.token) as client:
        try:
            info = client.stream_info(args.stream) if args.stream else client.node_info()
        except grpc.RpcError as exc:
            return _store_rpc_error("info", args, exc)
    # As read and append print: snake_case keys, integers as numbers.
    print(json.dumps(message_json(info)))
    return 0


MAX_ETCD_WAIT_S = 3600


def cmd_etcd_bootstrap_auth(args: argparse.Namespace) -> int:
    from geo.config import ConfigError, check_etcd, etcd_access, load, read_password
    from geo.etcd_server import EtcdError, bootstrap_auth
    prog = "xdc etcd bootstrap-auth"
    if not 0 <= args.wait <= MAX_ETCD_WAIT_S:
        print(f"{prog}: --wait {args.wait}: between 0 and {MAX_ETCD_WAIT_S} seconds",
              file=sys.stderr)
        return 2
    try:
        config = load(args.config)
        access = etcd_access(config)
        root_password = read_password(args.root_password_file, prog, "--root-password-file")
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if access.tls is None or access.tls.cert is None or not access.user:
        print(f"{prog}: {args.config}: [etcd] needs ca, cert, key, user and password_file "
              "(authentication over TLS with a client certificate)", file=sys.stderr)
        return 2
    try:
        # At boot the other members may still be starting: wait for a quorum, bounded.
        check_etcd(config.etcd.endpoints, timeout_s=args.wait, tls=access.tls)
        done = bootstrap_auth(config.etcd.endpoints, access.tls, config.cluster, access.user,
                              access.password, root_password)
    except (ConfigError, EtcdError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"cluster": config.cluster, "user": access.user, "done": done}))
    return 0


def cmd_node_run(args: argparse.Namespace) -> int:
    import logging

    from geo.config import ConfigError, load
    from geo.node import ClusterNode
    from store.server import run_until_signalled

    level = logging.DEBUG if os.environ.get("XDC_LOG") == "debug" else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"xdc node run: {exc}", file=sys.stderr)
        return 2
    members = [m.id for m in config.members]
    for flag, member in [("--member", args.member), *(("--route", r) for r, _ in args.route)]:
        if member not in members:
            print(f"xdc node run: {flag} {member!r}: no such member in {args.config} "
                  f"(members: {', '.join(members)})", file=sys.stderr)
            return 2
    for warning in config.warnings:
        print(f"xdc node run: warning: {warning}", file=sys.stderr)
    from geo.config import check_etcd, etcd_access
    try:
        access = etcd_access(config)
    except ConfigError as exc:
        print(f"xdc node run: {exc}", file=sys.stderr)
        return 2
    try:
        check_etcd(list(config.etcd.endpoints), timeout_s=2.0, tls=access.tls)
    except ConfigError as exc:
        # A node must come up in a disaster too: it serves committed reads and joins
        # elections once etcd answers.
        print(f"xdc node run: warning: {exc}; starting as a follower until etcd answers",
              file=sys.stderr)
    routes = dict(args.route)
    try:  # the node loads and checks the tier file
        node = ClusterNode(config, args.member, args.data, limits=_limits(args), routes=routes)
    except ConfigError as exc:
        print(f"xdc node run: {exc}", file=sys.stderr)
        return 2

    async def start() -> str:
        await node.start()
        return node.address

    try:
        if asyncio.run(run_until_signalled(start, node.stop, node.wait_failed)):
            print(f"xdc node run: {node.failure!r}", file=sys.stderr)
            return 1
    except OSError as exc:
        print(f"xdc node run: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from geo import launcher

    action = args.cluster_command
    if action == "up":
        try:
            launcher.check_up_options(regions=args.regions, rtt_ms=args.rtt_ms,
                                      standbys=args.standbys, ttl_s=args.lease_ttl,
                                      jitter_ms=args.jitter_ms)
            launcher.check_same_voters(args.dir, args.regions)
        except launcher.BadOption as exc:
            print(f"xdc cluster up: {exc}", file=sys.stderr)
            return 2
    try:
        if action == "up":
            reused = launcher.earlier_data(args.dir)
            state = launcher.up(args.dir, regions=args.regions, rtt_ms=args.rtt_ms,
                                jitter_ms=args.jitter_ms, failover=args.failover,
                                standbys=args.standbys, ttl_s=args.lease_ttl,
                                tls=not args.insecure)
            try:
                leader, st = asyncio.run(launcher.wait_leader(state))
            except BaseException:
                # A cluster without a leader is a failed start: stop what it started.
                launcher.down(state.directory)
                raise
            print(f"cluster up in {state.directory}: leader {leader.id} (term {st.term})")
            if reused:
                print(f"reusing the data of an earlier run in {state.directory} (now term "
                      f"{st.term}, {st.commit_position} records); to start fresh: `xdc cluster "
                      f"down --dir {state.directory}`, `rm -r {state.directory}`, `up` again")
            if state.tls_dir:
                d = state.tls_dir
                print(f"TLS on: clients need XDC_TLS_CA={d}/ca.pem "
                      f"XDC_TLS_CERT={d}/admin.pem XDC_TLS_KEY={d}/admin-key.pem")
            if state.auth_dir:
                print(f"client tokens in {state.auth_dir} (admin, gateway, engine, trader): "
                      f"export XDC_TOKEN=$(cat {state.auth_dir}/admin.token)")
            print(launcher.format_status(state, asyncio.run(launcher.statuses(state))))
            return 0
        if getattr(args, "config", None):
            from geo.config import ConfigError
            try:
                target = cluster_reach(args)
            except ConfigError as exc:
                print(f"xdc cluster {action}: {exc}", file=sys.stderr)
                return 2
            return cluster_action(launcher, target, args)
        state = launcher.ClusterState.load(args.dir)
        if action in ("status", "switchover", "promote", "failover"):
            return cluster_action(launcher, state, args)
        if action == "down":
            launcher.down(args.dir)
            print(f"cluster in {state.directory} stopped")
        elif action == "signal":
            name = f"SIG{args.signal.upper()}"
            # Only processes still running as the launcher started them are signalled.
            stopped = [n.id for n in state.select(args.target)
                       if not launcher.alive(n.pid, state)]
            hit = [n for n in launcher.signal_node(state, args.target, getattr(signal, name))
                   if n.id not in stopped]
            for n in hit:
                print(f"sent {name} to {n.id} (pid {n.pid})")
            for node_id in stopped:
                print(f"{node_id} is not running" + ("" if hit else "; nothing signalled"),
                      file=sys.stdout if hit else sys.stderr)
            return 0 if hit else 1
        elif action == "start":
            # Like `systemctl start`: a node that runs already is left alone (exit 0).
            for n in state.select(args.target):
                try:
                    launcher.start_node(state, n)
                except launcher.AlreadyRunning as exc:
                    print(f"{exc}; nothing started")
                    continue
                print(f"started {n.id} (pid {n.pid})")
        elif action == "stop":
            for n, pid in launcher.stop_node(state, args.target):
                print(f"stopped {n.id} (pid {pid})" if pid else
                      f"{n.id} is not running; nothing stopped")
        elif action == "partition":
            links = launcher.partition(state, args.target, args.mode)
            print(f"{args.target} cut off from the other regions ({args.mode}, {len(links)} "
                  f"WAN links); `xdc cluster heal {args.target}` ends it")
        elif action == "heal":
            healed, were = launcher.heal(state, args.target, args.reset)
            of = f" of {args.target}" if args.target else ""
            print(f"healed {len(were)} partitioned WAN links{of}" if were else
                  f"no WAN link{of} was partitioned; nothing to heal")
            if args.reset:
                print(f"reset the connections of {len(healed)} WAN links")
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, TimeoutError) as exc:
        print(f"xdc cluster {action}: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    except grpc_error() as exc:
        print(f"xdc cluster {action}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def cluster_action(launcher: Any, target: Any, args: argparse.Namespace) -> int:
    """status, switchover, promote, failover: the same for a local cluster (its
    ClusterState) and a deployment (the Reach of its TOML)."""
    action = args.cluster_command
    if action == "status":
        local = isinstance(target, launcher.ClusterState)
        # A local cluster none of whose processes runs (after `down`) is stopped: said so
        # (exit 3, as `pg_ctl status` and LSB `status` do), not shown as N unreachable nodes.
        stopped = local and not target.running()
        if stopped:
            sts = {n.id: None for n in target.nodes}
            seat = wan = "the cluster is stopped"
        else:
            sts, seat, wan = asyncio.run(launcher.cluster_status(target))
        refused = [s for s in sts.values() if isinstance(s, launcher.Refused)]
        clients = {n.id: n.client for n in launcher.reach(target).nodes}
        if args.json:
            def entry(k: str, v: Any) -> Any:
                if isinstance(v, launcher.Refused):
                    return {"client": clients[k], "refused": v.code.name, "details": v.details}
                if v is None:
                    return {"client": clients[k], "unreachable": True}
                return {"client": clients[k], **message_json(v)}
            out = {k: entry(k, v) for k, v in sts.items()}
            # Member ids start with a letter or digit (geo/config.py): never "_seat".
            out["_seat"] = launcher.seat_json(seat)
            if local and target.proxy_control:
                out["_wan"] = ({"error": wan} if isinstance(wan, str) else
                               {"control": target.proxy_control, "rtt_ms": target.rtt_ms,
                                "partitioned": wan or {}})
            print(json.dumps(out))
        elif stopped:
            print(f"cluster {target.cluster} in {target.directory} is stopped (none of its "
                  f"processes runs); `xdc cluster up --dir {target.directory}` starts it again "
                  f"on its data")
        else:
            print(launcher.format_status(target, sts, seat, wan))
        for r in refused:  # the operator's credentials, most likely: not a healthy cluster
            print(f"xdc cluster status: {r}", file=sys.stderr)
        if stopped:
            return 3
        if not any(isinstance(s, launcher.rpb.NodeStatus) for s in sts.values()) and not refused:
            print("xdc cluster status: no member answers", file=sys.stderr)
            return 1
        return 1 if refused else 0
    elif action == "switchover":
        print(asyncio.run(launcher.hand_over(target, args.to, args.timeout,
                                             args.token)).message)
    elif action == "promote":
        print(asyncio.run(launcher.promote(target, args.region, force=args.force,
                                           timeout_s=args.timeout, token=args.token)).message)
    elif action == "failover":
        asyncio.run(launcher.set_failover(target, args.mode))
        print(f"failover mode: {args.mode}")
    return 0


def cluster_reach(args: argparse.Namespace) -> Any:
    """How `xdc cluster ... --config TOML` reaches a deployment: as the admin of --tls-*
    (else the TOML's [tls] certificate) and --token."""
    from geo import launcher
    from geo.config import load

    return launcher.reach_config(load(args.config), _tls(args), getattr(args, "token", "") or "")


def grpc_error() -> type[Exception]:
    import grpc
    return grpc.RpcError


def cmd_demo(args: argparse.Namespace) -> int:
    if args.standalone:
        from xdc.demo import run_demo as standalone_demo
        return standalone_demo()
    from geo.demo import run_demo
    return run_demo(args.rtt_ms)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "store":
        from bench.store import main as bench_main
    elif args.suite == "replication":
        from bench.replication import main as bench_main
    elif args.suite == "tracing":
        from bench.tracing import main as bench_main
    elif args.suite == "engine":
        from bench.match import main as match_main
        return match_main((["--quick"] if args.quick else []) +
                          (["--json", args.json] if args.json else []))
    else:
        print(f"xdc bench: unknown suite {args.suite!r}", file=sys.stderr)
        return 2
    return bench_main(quick=args.quick, json_path=args.json)


# ---------------------------------------------------------------------- exchange, gateway

DEFAULT_GATEWAY = os.environ.get("XDC_GATEWAY", "127.0.0.1:7100")


def _store_targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def message_json(msg: Any) -> dict[str, Any]:
    """A protobuf message as JSON-ready dict: every field (defaults included, so scripts
    see a stable shape), enums by name, 64-bit integers as numbers."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        if f.message_type is not None:
            v = [message_json(x) for x in v] if f.is_repeated else message_json(v)
        elif f.enum_type is not None:
            names = f.enum_type.values_by_number
            v = ([names[x].name if x in names else x for x in v] if f.is_repeated
                 else names[v].name if v in names else v)
        elif f.is_repeated:
            v = list(v)
        out[f.name] = v
    return out


def cmd_gateway(args: argparse.Namespace) -> int:
    import logging

    from engine.gateway import serve_gateway
    level = logging.DEBUG if os.environ.get("XDC_LOG") == "debug" else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    # Its certificate serves both ways (to the store, and on its port); --tls-client-auth
    # only decides whether traders must show one.
    return serve_gateway(_store_targets(args.store), args.listen, args.exchange,
                         tls=_server_tls(args), auth_config=load_auth("gateway", args.auth),
                         token=args.token, engines=_store_targets(args.engines),
                         discover_engines=args.discover_engines)


def cmd_exchange(args: argparse.Namespace) -> int:
    from engine import exchange_config, wire
    if args.exchange_command == "example":
        print(exchange_config.DEMO_CONFIG, end="")
        return 0
    from store.client import AppendError, Client
    try:
        config = exchange_config.load(args.exchange)
    except exchange_config.ExchangeConfigError as exc:
        print(f"xdc exchange init: {exc}", file=sys.stderr)
        return 2
    # One append per event, not one per group: each event's id is its own idempotency key,
    # so a file that gained a symbol or a deposit appends just the new ones.
    with Client(_store_targets(args.store), tls=_tls(args), token=args.token) as client:
        for group in config.groups:
            stream = wire.input_stream(group.name)
            appended = duplicates = last = 0
            for event in exchange_config.init_events(group):
                try:
                    r = client.append(stream, event)
                except AppendError as err:
                    print(f"xdc exchange init: group {group.name!r}, {event.type} "
                          f"{event.data!r}: {err} (the exchange file changed a setting that "
                          f"is already in the log)", file=sys.stderr)
                    return 1
                duplicates += r.duplicate
                appended += not r.duplicate
                last = max(last, r.last_position)
            print(json.dumps({"group": group.name, "stream": stream, "appended": appended,
                              "duplicates": duplicates, "last_position": last}))
    return 0


def _gateway_stub(args: argparse.Namespace) -> Any:
    from store.client import channel_options
    from xdc.tls import sync_channel
    from xdc.v1 import exchange_pb2_grpc
    return exchange_pb2_grpc.OrderGatewayStub(
        sync_channel(args.gateway, _tls(args), options=channel_options()))


def _retrying_shed(call: Any, request: Any, deadline_s: float,
                   metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """One unary gateway call; a call a degradation tier refused before it ran is sent
    again after the server's hint until `deadline_s` (orders are idempotent by their
    client order id or request id, so a repeat is harmless)."""
    import grpc

    from store.client import shed_wait_s
    end = time.monotonic() + deadline_s
    while True:
        try:
            return call(request, timeout=max(0.01, end - time.monotonic()), metadata=metadata)
        except grpc.RpcError as exc:
            wait = shed_wait_s(exc)  # type: ignore[arg-type]
            if wait is None or time.monotonic() + wait >= end:
                raise
            time.sleep(wait)


def cmd_order(args: argparse.Namespace) -> int:
    import grpc

    from store.auth import bearer
    from xdc.v1 import exchange_pb2 as xpb
    action = args.order_command
    common = {"symbol": args.symbol, "account": args.account, "wait": args.wait,
              "wait_timeout_ms": args.timeout_ms}
    stub = _gateway_stub(args)
    try:
        if action == "submit":
            tif = args.tif or ("ioc" if args.type == "market" else "gtc")
            r = _retrying_shed(stub.SubmitOrder, xpb.SubmitOrderRequest(
                client_order_id=args.client_order_id, side=xpb.Side.Value(args.side.upper()),
                order_type=xpb.OrderType.Value(args.type.upper()),
                time_in_force=xpb.TimeInForce.Value(tif.upper()), price=args.price,
                qty=args.qty, post_only=args.post_only,
                stp=xpb.SelfTradePrevention.Value("STP_" + args.stp.upper().replace("-", "_")),
                **common), args.deadline, bearer(args.token))
        elif action == "cancel":
            r = _retrying_shed(stub.CancelOrder, xpb.CancelOrderRequest(
                request_id=args.request_id, order_id=args.order_id,
                client_order_id=args.client_order_id, **common), args.deadline,
                bearer(args.token))
        else:
            r = _retrying_shed(stub.ReplaceOrder, xpb.ReplaceOrderRequest(
                request_id=args.request_id, order_id=args.order_id,
                client_order_id=args.client_order_id, price=args.price, qty=args.qty,
                **common), args.deadline, bearer(args.token))
    except grpc.RpcError as exc:
        return _rpc_error(f"order {action}", exc)
    print(json.dumps(message_json(r)))
    if r.timed_out:
        # In the log, not lost: it is processed once an engine of its group runs.
        waited = (f"{args.timeout_ms} ms" if args.timeout_ms
                  else "the gateway's default wait")
        print(f"xdc order {action}: appended at input position {r.input_position}, but no "
              f"engine output for it came within {waited}: is a matching engine running "
              f"for the engine group of {args.symbol}? (`xdc engine status --group GROUP "
              f"--store STORE`); it is processed once one runs, and a retry with the same "
              f"id appends nothing new", file=sys.stderr)
        return 1
    return 0


def cmd_book(args: argparse.Namespace) -> int:
    import grpc

    from store.auth import bearer
    from xdc.v1 import exchange_pb2 as xpb
    call = _gateway_stub(args).StreamBook(
        xpb.StreamBookRequest(symbol=args.symbol, depth=args.depth),
        metadata=bearer(args.token))
    try:
        for msg in call:
            print(json.dumps(message_json(msg)), flush=True)
            if not args.follow:
                break
    except grpc.RpcError as exc:
        return _rpc_error("book", exc)
    except KeyboardInterrupt:
        pass
    finally:
        call.cancel()
    return 0


def add_exchange_parsers(sub: Any) -> None:
    """`xdc gateway`, `xdc exchange`, `xdc order`, `xdc book`."""
    p = sub.add_parser("gateway", help="run the order gateway (gRPC OrderGateway)")
    p.add_argument("--store", default=DEFAULT_TARGET, type=targets,
                   help="store address(es), comma separated")
    p.add_argument("--listen", default="127.0.0.1:7100", type=listen,
                   help="HOST:PORT (port 0: any free)")
    p.add_argument("--exchange", required=True, help="exchange TOML (groups and symbols)")
    p.add_argument("--engines", default="",
                   help="EngineControl addresses of the engines, comma separated: orders are "
                        "admitted only while an engine primary is current (matching tier)")
    p.add_argument("--discover-engines", action="store_true",
                   help="also ask the engine instances that advertise themselves in the "
                        "exchange's groups (exchange.<group>.instances): a new release is "
                        "judged without restarting the gateway")
    add_tls_args(p)
    add_client_auth_arg(p)
    p.add_argument("--auth", help="auth file: callers authenticate and trade only for the "
                                  "accounts of their principal")
    add_token_arg(p)  # the gateway's own principal at the store
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("exchange", help="the exchange file: example, init")
    xsub = p.add_subparsers(dest="exchange_command", required=True)
    x = xsub.add_parser("init", help="append each group's symbols and deposits (idempotent)")
    x.add_argument("--store", default=DEFAULT_TARGET, type=targets,
                   help="store address(es), comma separated")
    x.add_argument("--exchange", required=True, help="exchange TOML")
    add_tls_args(x)
    add_token_arg(x)
    x.set_defaults(func=cmd_exchange)
    x = xsub.add_parser("example", help="print an example exchange file")
    x.set_defaults(func=cmd_exchange)

    p = sub.add_parser("order", help="submit, cancel or replace an order (JSON out)")
    osub = p.add_subparsers(dest="order_command", required=True)

    def order_cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        o = osub.add_parser(name, help=help_text)
        o.add_argument("--gateway", default=DEFAULT_GATEWAY, type=target)
        o.add_argument("--symbol", required=True)
        o.add_argument("--account", required=True)
        o.add_argument("--wait", action="store_true", help="answer with the engine's outputs")
        o.add_argument("--timeout-ms", type=UINT32, default=0,
                       help="how long --wait waits (0: the gateway's default)")
        o.add_argument("--deadline", type=float, default=70.0, help="RPC deadline, seconds")
        add_tls_args(o)
        add_token_arg(o)
        o.set_defaults(func=cmd_order)
        return o

    o = order_cmd("submit", "submit a new order")
    o.add_argument("--client-order-id", required=True, help="idempotency key of the order")
    o.add_argument("--side", required=True, choices=["buy", "sell"])
    o.add_argument("--qty", type=INT64, required=True)
    o.add_argument("--price", type=INT64, default=0, help="limit price (0 for market orders)")
    o.add_argument("--type", choices=["limit", "market"], default="limit")
    o.add_argument("--tif", choices=["gtc", "ioc", "fok"],
                   help="time in force (default: gtc, ioc for market orders)")
    o.add_argument("--post-only", action="store_true")
    o.add_argument("--stp", default="cancel-newest",
                   choices=["none", "cancel-newest", "cancel-oldest", "cancel-both",
                            "decrement-and-cancel"], help="self-trade prevention")
    for name, help_text in (("cancel", "cancel an order"),
                            ("replace", "new price and quantity (loses time priority)")):
        o = order_cmd(name, help_text)
        o.add_argument("--request-id", required=True, help="idempotency key of this request")
        o.add_argument("--order-id", type=_u64, default=0)
        o.add_argument("--client-order-id", default="", help="instead of --order-id")
        if name == "replace":
            o.add_argument("--price", type=INT64, required=True)
            o.add_argument("--qty", type=INT64, required=True)

    p = sub.add_parser("book", help="an L2 book from the gateway: snapshot, then updates")
    p.add_argument("symbol")
    p.add_argument("--gateway", default=DEFAULT_GATEWAY, type=target)
    p.add_argument("--depth", type=UINT32, default=0, help="levels per side (0: 20)")
    p.add_argument("--follow", action="store_true", help="keep printing updates")
    add_tls_args(p)
    add_token_arg(p)
    p.set_defaults(func=cmd_book)


def build_parser() -> argparse.ArgumentParser:
    from xdc.argtypes import ArgumentParser  # its subcommands' --help show the defaults
    parser = ArgumentParser(prog="xdc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run a standalone store node (no etcd needed)")
    p.add_argument("--data", required=True, help="data directory (created if missing)")
    p.add_argument("--listen", default="127.0.0.1:7000", type=listen,
                   help="HOST:PORT (port 0: any free)")
    p.add_argument("--node-id", default="standalone")
    p.add_argument("--max-event-bytes", type=int, default=1024 * 1024)
    p.add_argument("--max-append-events", type=int, default=10_000)
    p.add_argument("--tiers", help="tier file (default: the one shipped, geo/tiers.default.toml)")
    add_tls_args(p)
    add_client_auth_arg(p)
    p.add_argument("--auth", help="auth file: principals, tokens and grants (store/auth.py); "
                                  "without it every call is allowed")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("certs", help="development certificates (TLS)")
    csub = p.add_subparsers(dest="certs_command", required=True)
    c = csub.add_parser("init", help="a development CA and one certificate per member, "
                                     "engine, gateway, admin and etcd server")
    c.add_argument("--dir", required=True, help="where to write the PEM files")
    c.add_argument("--config", help="cluster TOML: its name and members")
    c.add_argument("--cluster", help="cluster name (without --config)")
    c.add_argument("--members", help="member ids, comma separated (without --config)")
    c.add_argument("--engines", default="engine", help="engine certificate names")
    c.add_argument("--gateways", default="gateway", help="gateway certificate names")
    c.add_argument("--admins", default="admin", help="operator tool certificate names")
    c.add_argument("--clients", default="", help="client program certificate names "
                                                  "(order-entry desks, market-data readers)")
    c.add_argument("--etcd", default="etcd", help="etcd server certificate names")
    c.add_argument("--hosts", default="localhost,127.0.0.1,::1",
                   help="host names and addresses every certificate is valid for")
    c.add_argument("--san", action="append", default=[], metavar="NAME=HOST[,HOST...]",
                   help="more host names and addresses for certificate NAME only (its "
                        "host's private IP or DNS name); repeatable")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--force", action="store_true", help="replace an existing CA")
    c.set_defaults(func=cmd_certs)

    p = sub.add_parser("auth", help="client authentication: new tokens, check an auth file")
    asub = p.add_subparsers(dest="auth_command", required=True)
    a = asub.add_parser("token", help="print a new token and the token_sha256 line to paste")
    a.add_argument("name", help="the principal's name")
    a.set_defaults(func=cmd_auth)
    a = asub.add_parser("check", help="validate an auth file; one JSON line per principal")
    a.add_argument("file")
    a.set_defaults(func=cmd_auth)

    p = sub.add_parser("node", help="run a clustered store node")
    nsub = p.add_subparsers(dest="node_command", required=True)
    p = nsub.add_parser("run", help="run one member of a cluster (etcd leadership)")
    p.add_argument("--config", required=True, help="cluster TOML")
    p.add_argument("--member", required=True, help="this node's member id")
    p.add_argument("--data", help="data directory (default: the member's data_dir)")
    p.add_argument("--route", action="append", default=[], metavar="MEMBER=HOST:PORT",
                   type=_route,
                   help="reach a peer at this address (e.g. through a WAN proxy)")
    p.add_argument("--max-event-bytes", type=int, default=1024 * 1024)
    p.add_argument("--max-append-events", type=int, default=10_000)
    p.set_defaults(func=cmd_node_run)

    p = sub.add_parser("etcd", help="etcd of a cluster")
    esub = p.add_subparsers(dest="etcd_command", required=True)
    p = esub.add_parser("bootstrap-auth",
                        help="turn on etcd authentication for the cluster (idempotent): "
                             "root, a role confined to /<cluster>/, the [etcd] user")
    p.add_argument("--config", required=True,
                   help="cluster TOML: endpoints, [etcd] TLS files, user and password_file")
    p.add_argument("--root-password-file", required=True,
                   help="etcd root's password (first line)")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for a healthy etcd first")
    p.set_defaults(func=cmd_etcd_bootstrap_auth)

    p = sub.add_parser("cluster", help="the local multi-region cluster")
    csub = p.add_subparsers(dest="cluster_command", required=True)

    def cluster_cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        c = csub.add_parser(name, help=help_text)
        c.add_argument("--dir", default="run/cluster", help="the cluster's directory")
        c.set_defaults(func=cmd_cluster)
        return c

    c = cluster_cmd("up", "start etcd, a WAN proxy and one node per region")
    c.add_argument("--regions", type=int, default=3)
    c.add_argument("--rtt-ms", type=float, default=0.0, help="injected RTT between regions")
    c.add_argument("--jitter-ms", type=float, default=0.0)
    c.add_argument("--failover", choices=["manual", "automatic"], default="automatic")
    c.add_argument("--standbys", type=int, default=0, help="non-voting DR copies")
    c.add_argument("--lease-ttl", type=int, default=2, help="etcd lease TTL, seconds")
    c.add_argument("--insecure", action="store_true",
                   help="plaintext everywhere (default: TLS with development certificates)")
    def remote(c: argparse.ArgumentParser) -> argparse.ArgumentParser:
        c.add_argument("--config", help="a deployment's cluster TOML (instead of --dir): its "
                                        "members, etcd and [tls]; act as the admin of "
                                        "--tls-* (else the TOML's [tls] cert) and --token")
        add_tls_args(c)
        return c

    c = remote(cluster_cmd("status", "roles, terms, positions, lag, etcd health"))
    c.add_argument("--json", action="store_true")
    c.add_argument("--token", default=os.environ.get("XDC_TOKEN"),
                   help="an admin's token (default: $XDC_TOKEN, else the local cluster's)")
    cluster_cmd("down", "stop every process of the cluster (by PID)")
    c = remote(cluster_cmd("switchover", "planned handover of leadership, no loss"))
    c.add_argument("--to", required=True, help="region or node id")
    c.add_argument("--timeout", type=_seconds, default=10.0, help="seconds, more than 0")
    c.add_argument("--token", default=os.environ.get("XDC_TOKEN"),
                   help="an admin's token (default: $XDC_TOKEN, else the cluster's own "
                        "admin token under DIR/auth)")
    c = remote(cluster_cmd("promote", "manual failover: let this region take the vacant seat"))
    c.add_argument("region", help="region or node id (a voter)")
    c.add_argument("--force", action="store_true",
                   help="promote it even if it lacks committed records (it fetches them "
                        "before it opens); never a target that does not answer or rejoins")
    c.add_argument("--timeout", type=_seconds, default=10.0,
                   help="seconds to wait for it to take the seat and open for writes")
    c.add_argument("--token", default=os.environ.get("XDC_TOKEN"),
                   help="an admin's token (default: $XDC_TOKEN, else the cluster's own "
                        "admin token under DIR/auth)")
    c = remote(cluster_cmd("failover", "switch between manual and automatic failover"))
    c.add_argument("mode", choices=["manual", "automatic"])
    c = cluster_cmd("signal", "send a signal to a region's (or node's) processes")
    c.add_argument("target", help="region or node id")
    c.add_argument("signal", choices=["kill", "term", "stop", "cont"])
    c = cluster_cmd("start", "(re)start a region's (or node's) processes")
    c.add_argument("target", help="region or node id")
    c = cluster_cmd("stop", "stop a region's (or node's) processes (TERM, by PID)")
    c.add_argument("target", help="region or node id")
    c = cluster_cmd("partition", "cut a region (or node) off from the other regions (WAN proxy)")
    c.add_argument("target", help="region or node id")
    c.add_argument("--mode", choices=["blackhole", "reset"], default="blackhole",
                   help="blackhole: silence, peers time out; reset: connections refused")
    c = cluster_cmd("heal", "end the partitions of a region (or node), or of every region")
    c.add_argument("target", nargs="?", help="region or node id (default: every link)")
    c.add_argument("--reset", action="store_true",
                   help="also reset the connections held through the cut")

    p = sub.add_parser("append", help="append one event")
    p.add_argument("stream")
    p.add_argument("type")
    p.add_argument("data", nargs="?", default="", help="event data ('-': read stdin)")
    p.add_argument("--expected", default="any", type=_expected,
                   help="any | no_stream | stream_exists | N (the stream's last revision)")
    p.add_argument("--metadata", "-m", action="append", default=[], metavar="KEY=VALUE",
                   type=_key_value)
    p.add_argument("--content-type", default="")
    p.add_argument("--id", type=_uuid, help="event UUID (default: a new one)")
    p.add_argument("--timeout", type=_seconds, default=10.0,
                   help="seconds until the append's outcome is given up as unknown "
                        "(default 10)")
    p.add_argument("--target", default=DEFAULT_TARGET, type=target, metavar="HOST:PORT")
    add_tls_args(p)
    add_token_arg(p)
    p.set_defaults(func=cmd_append)

    p = sub.add_parser("read", help="read a stream or $all, one JSON line per event")
    p.add_argument("stream", help='stream name, or "$all"')
    p.add_argument("--from", dest="start", type=_u64, default=0,
                   help="revision (stream) or position ($all), inclusive; 0: start/end")
    p.add_argument("--limit", type=_limit, default=None,
                   help="at most this many events (default: all, read page by page)")
    p.add_argument("--backwards", action="store_true")
    p.add_argument("--target", default=DEFAULT_TARGET, type=target, metavar="HOST:PORT")
    add_tls_args(p)
    add_token_arg(p)
    p.set_defaults(func=cmd_read)

    p = sub.add_parser("tail", help="follow a subscription (catch-up, then live)")
    p.add_argument("--after", type=_u64, default=0, help="start after this position")
    p.add_argument("--from-end", action="store_true")
    p.add_argument("--prefix", default="", help="only streams starting with this")
    p.add_argument("--type", action="append", help="only events of this type (repeatable)")
    p.add_argument("--count", type=_u64, default=0, help="stop after this many events")
    p.add_argument("--target", default=DEFAULT_TARGET, type=target, metavar="HOST:PORT")
    add_tls_args(p)
    add_token_arg(p)
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("info", help="node info, or a stream's info")
    p.add_argument("stream", nargs="?")
    p.add_argument("--target", default=DEFAULT_TARGET, type=target, metavar="HOST:PORT")
    add_tls_args(p)
    add_token_arg(p)
    p.set_defaults(func=cmd_info)

    from geo.tier_cli import add_parser as add_tiers_parser
    add_tiers_parser(sub, DEFAULT_TARGET)

    p = sub.add_parser("demo", help="run the local multi-region demo")
    p.add_argument("--rtt-ms", type=float, default=30.0)
    p.add_argument("--standalone", action="store_true", help="the single-node demo instead")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run a benchmark suite")
    p.add_argument("suite", choices=["store", "replication", "engine", "tracing"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write results here")
    p.set_defaults(func=cmd_bench)
    add_exchange_parsers(sub)

    from engine.cli import add_parser as add_engine_parser
    add_engine_parser(sub)
    from geo.drill import add_parser as add_drill_parser
    add_drill_parser(sub)
    return parser


# Commands that export traces and metrics when the OTEL_* variables ask for it
# (xdc/telemetry.py), under these service names.
TRACED_COMMANDS = {"serve": "xdc-store", "node": "xdc-node", "gateway": "xdc-gateway",
                   "engine": "xdc-engine", "drill": "xdc-drill", "tail": "xdc-cli",
                   "append": "xdc-cli", "order": "xdc-cli"}


# Long-running servers: they move large buffers all the time (xdc/malloc_tuning.py).
SERVER_COMMANDS = ("serve", "node", "gateway", "engine")
# Commands that start processes of their own and stop them in `finally` blocks: a drill's
# cluster, the demo's, a benchmark's servers; and `cluster up`, whose failure (SIGTERM
# included) stops what it started.
ORCHESTRATING_COMMANDS = ("drill", "demo", "bench")


def _orchestrates(args: argparse.Namespace) -> bool:
    return args.command in ORCHESTRATING_COMMANDS or (
        args.command == "cluster" and args.cluster_command == "up")


def _exit_on_sigterm() -> None:
    """SIGTERM ends the command as SystemExit would, so that its `finally` blocks stop
    what it started; by default it died at once and left its cluster running. A second
    SIGTERM kills at once (the default action), as a second Ctrl-C would."""
    def handler(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def resource_attributes(args: argparse.Namespace) -> dict[str, str]:
    """The telemetry resource of a traced command, besides service.name: which instance
    it is (without one the SDK makes up a random service.instance.id at every start, so
    a restarted node or engine looks like a new one) and, for a cluster node, its region
    (semantic convention `cloud.region`) from the cluster TOML."""
    attributes = {}
    if args.command == "node":
        attributes["service.instance.id"] = args.member
        from geo.config import ConfigError, load
        # A config or member that cannot be is cmd_node_run's to report (exit 2).
        with contextlib.suppress(ConfigError, KeyError):
            attributes["cloud.region"] = load(args.config).member(args.member).region
    elif args.command == "engine" and args.engine_command == "run":
        attributes["service.instance.id"] = args.instance
    elif args.command == "serve":
        attributes["service.instance.id"] = args.node_id
    return attributes


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader went away (`xdc ... | head`)."""
    import select
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    """`_main`; when stdout's reader goes away (`| head`), a quiet exit 141 (128 +
    SIGPIPE, as a Unix tool killed by SIGPIPE) instead of a BrokenPipeError traceback.
    The error unwinds the command first: what an orchestrating command started is stopped
    by its `finally` blocks, as SIGPIPE's default action would not."""
    try:
        return _main(argv)
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # another pipe or socket: a real error
        # What is still buffered for stdout goes nowhere, rather than failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in SERVER_COMMANDS:
        from xdc.malloc_tuning import keep_large_buffers
        keep_large_buffers()
    if _orchestrates(args):
        _exit_on_sigterm()
    service = TRACED_COMMANDS.get(args.command)
    if service is None:
        return int(args.func(args) or 0)
    from xdc import telemetry

    try:
        enabled = telemetry.setup_from_env(service, resource_attributes(args) or None)
    except ValueError as exc:  # an unknown exporter or protocol
        print(f"xdc {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    finally:
        if enabled and service == "xdc-cli":  # short-lived: a moment, at most one line
            telemetry.shutdown(telemetry.CLI_EXPORT_TIMEOUT_S, quiet=True)
        elif enabled:
            telemetry.shutdown()  # exports what is still buffered


if __name__ == "__main__":
    sys.exit(main())
