"""How every benchmark reports: a table on the terminal and the same figures as JSON; and
how it runs its asynchronous parts (`run`)."""

from __future__ import annotations

import asyncio
import atexit
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

Row = tuple[str, str, str]  # what, value, note (ratio, target)
T = TypeVar("T")
_runner: asyncio.Runner | None = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs `coro` on the suite's one event loop. grpc.aio binds its completion queue to
    the first loop it serves: a fresh loop per measurement (asyncio.run) leaves it calling
    into a closed one ("Event loop is closed" on stderr)."""
    global _runner
    if _runner is None:
        _runner = asyncio.Runner()
        atexit.register(_runner.close)
    return _runner.run(coro)


def print_table(suite: str, out: dict[str, Any], rows: list[Row]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\nxdc bench {suite} ({'quick' if out['quick'] else 'full'}, medians of "
          f"{out['runs']} runs)")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>18}  {note}")


def write_json(path: str | None, out: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")
