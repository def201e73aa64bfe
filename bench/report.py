"""How every benchmark reports: a table on the terminal and the same figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = tuple[str, str, str]  # what, value, note (ratio, target)


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
