"""Rules about the source that a bug taught us, checked on every product module."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("store", "geo", "engine", "xdc", "bench")


def _sources() -> list[Path]:
    return sorted(p for d in PRODUCT for p in (ROOT / d).rglob("*.py")
                  if "_pb2" not in p.name)


def test_no_asyncio_wait_for() -> None:
    """Python 3.11's `asyncio.wait_for` loses a cancel that lands while the awaited call
    is finishing: it returns the result and the cancelled task goes on. In a polling loop
    that task never ends, and `asyncio.run` waits for it forever at exit (a quick drill
    in CI hung that way after its run). `async with asyncio.timeout(...)` keeps the
    cancel."""
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in _sources()
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\basyncio\.wait_for\(", line)]
    assert not hits, "use `async with asyncio.timeout(s)` instead: " + ", ".join(hits)


def test_rule_sees_the_sources() -> None:
    names = {p.name for p in _sources()}
    assert {"drill.py", "leadership.py", "runner.py", "service.py"} <= names
