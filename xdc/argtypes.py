"""argparse types shared by the command lines (xdc/cli.py, engine/cli.py, geo/drill.py):
a bad value is an error naming its flag (exit 2), not a traceback; and their parser class,
whose `--help` shows every option's default."""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from typing import Any

# Positions, revisions and limits are uint64 in the protocol.
U64_MAX = 2**64 - 1


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def u64(text: str, low: int = 0, hint: str = "") -> int:
    value = _integer(text)
    if not low <= value <= U64_MAX:
        raise argparse.ArgumentTypeError(f"{value} is out of range {low}..2^64-1{hint}")
    return value


def int_range(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """An integer in low..high: a protocol field's range (int64, uint32), which the
    request would otherwise refuse only once built (a traceback)."""
    def parse(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}"
                                             + (f" ({what})" if what else ""))
        return value
    return parse


INT64 = int_range(-(2**63), 2**63 - 1, "int64")
UINT32 = int_range(0, 2**32 - 1, "uint32")


def listen(text: str) -> str:
    """HOST:PORT to listen on, port 1..65535 or 0 (any free port). gRPC takes any number
    and binds it modulo 65536 (99999 listened on 34463)."""
    from geo.config import split_hostport
    host, sep, port = text.rpartition(":")
    try:
        # Port 0 is fine here; the host part is checked as split_hostport checks it.
        split_hostport(f"{host}:1" if sep and port == "0" else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc} (0: any free port)") from None
    return text


def target(text: str) -> str:
    """HOST:PORT to dial (a store node, a gateway). gRPC would dial a bare host at port
    443, where nothing of ours listens, and say only that it could not connect."""
    from geo.config import split_hostport
    if text and ":" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} has no port: give HOST:PORT (e.g. "
                                         f"{text}:7000)")
    try:
        split_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text


def targets(text: str) -> str:
    """Comma-separated `target`s (a store's members); "" stays "" (none given)."""
    for one in text.split(",") if text else ():
        target(one)
    return text


def at_least(low: int) -> Callable[[str], int]:
    """An integer of at least `low` (a count: runs, producers)."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: at least {low}")
        return value
    return parse


def seconds(text: str) -> float:
    """A timeout: a finite number of seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and value != math.inf):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, more than 0")
    return value


def _shows_default(action: argparse.Action) -> bool:
    """Whether `--help` states `action`'s default: one it has (not None, not a flag's
    False, not empty), of an option or an optional positional."""
    default = action.default
    if default is None or default is argparse.SUPPRESS or isinstance(default, bool):
        return False
    if isinstance(default, str | list | tuple | dict) and not default:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL,
                                                            argparse.ZERO_OR_MORE)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` with each option's default (timeouts, limits), as argparse's
    ArgumentDefaultsHelpFormatter but also for options without a help text, and never
    for one whose help already says its default: those taken from the environment
    (`--token`, `--tls-*`) say which variable, never the value (a token's)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if _shows_default(action) and "default" not in text.lower():
            text = f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            # argparse writes no help column for an option without help text.
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """The parser of `xdc` and of every subcommand: subparsers are made of the class of
    their parent (argparse's add_subparsers), so every `--help` shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
