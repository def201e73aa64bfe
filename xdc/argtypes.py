"""argparse types shared by the command lines (xdc/cli.py, engine/cli.py, geo/drill.py):
a bad value is an error naming its flag (exit 2), not a traceback."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

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
