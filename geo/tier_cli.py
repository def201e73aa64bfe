"""`xdc tiers check [FILE]` and `xdc tiers status`: the tier file and a node's tiers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xdc.tls import add_cli_args, cli_tls, sync_channel


def cmd_check(args: argparse.Namespace) -> int:
    from geo import tiers
    from geo.config import ConfigError

    if args.services:
        for name, what in tiers.SERVICES.items():
            print(f"{name:16} {what}")
        return 0
    try:
        spec = tiers.load(args.file)
    except ConfigError as exc:
        print(f"xdc tiers check: {exc}", file=sys.stderr)
        return 2
    for warning in spec.warnings:
        print(f"xdc tiers check: warning: {warning}", file=sys.stderr)
    print(f"{spec.source}: {len(spec.tiers)} tiers, in recovery order (tier 0 never shed)")
    for i, t in enumerate(spec.tiers):
        print(f"  {i}  {t.name:16} {', '.join(t.services)}")
    sup = spec.supervisor
    print(f"supervisor: settle {sup.settle_s:g} s, observe every {sup.interval_s:g} s, "
          f"shed from load {sup.overload_from:g}, max commit lag {sup.max_commit_lag}, "
          f"retry hints {sup.retry_after_ms} ms / {sup.overload_retry_after_ms} ms (overload)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from store.auth import bearer
    from store.client import channel_options
    from xdc.v1 import tiers_pb2 as tpb
    from xdc.v1 import tiers_pb2_grpc as tpb_grpc

    try:
        with sync_channel(args.target, cli_tls(args, "xdc tiers status"),
                          options=channel_options()) as channel:
            st = tpb_grpc.TiersStub(channel).Status(tpb.TiersStatusRequest(), timeout=5,
                                                    metadata=bearer(args.token))
    except grpc.RpcError as exc:
        print(f"xdc tiers status: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        # As `xdc info` prints: snake_case keys, integers as numbers, every field.
        from xdc.cli import message_json
        print(json.dumps(message_json(st)))
        return 0
    print(format_status(st))
    return 0


def format_status(st: Any) -> str:
    cause = st.cause or "none"
    lines = [f"{st.node_id}: degraded by {cause}; writer queue {st.pending_events}/"
             f"{st.max_pending_events}, commit lag {st.commit_lag}/{st.max_commit_lag}"]
    for t in st.tiers:
        why = f" ({t.reason})" if t.reason else ""
        lines.append(f"  {t.index}  {t.name:16} {t.state}{why}")
    return "\n".join(lines)


def add_parser(sub: Any, default_target: str) -> None:
    p = sub.add_parser("tiers", help="degradation tiers: check a tier file, a node's tiers")
    tsub = p.add_subparsers(dest="tiers_command", required=True)
    c = tsub.add_parser("check", help="validate a tier file (default: the one shipped)")
    c.add_argument("file", nargs="?", help="tier TOML (default: geo/tiers.default.toml)")
    c.add_argument("--services", action="store_true", help="list the known services")
    c.set_defaults(func=cmd_check)
    c = tsub.add_parser("status", help="a node's tier states (xdc.v1.Tiers/Status)")
    c.add_argument("--target", default=default_target)
    c.add_argument("--json", action="store_true")
    add_cli_args(c)
    from xdc.cli import add_token_arg
    add_token_arg(c)
    c.set_defaults(func=cmd_status)
