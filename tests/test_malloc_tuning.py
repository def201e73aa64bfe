"""xdc/malloc_tuning.py, checked in fresh interpreters (glibc reads its settings once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Allocates 4 MiB buffers, kept alive, before and after the call: each one glibc maps on
# its own shows in mallinfo2's count of mapped chunks (hblks).
CHILD = """
import ctypes, json, sys
from xdc import malloc_tuning
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
a = bytearray(4 << 20)
before = libc.mallinfo2().hblks
applied = malloc_tuning.keep_large_buffers() if sys.argv[1] == "tune" else False
b = bytearray(4 << 20)
print(json.dumps([before, applied, libc.mallinfo2().hblks]))
"""


def _child(mode: str, env: dict[str, str] | None = None) -> list[int]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         timeout=30, env={**base, **(env or {})}, check=True)
    return json.loads(out.stdout)


def test_large_buffers_come_from_the_heap_once_tuned() -> None:
    before, applied, after = _child("plain")
    assert not applied and after == before + 1, "untuned: a 4 MiB buffer is mapped alone"
    before, applied, after = _child("tune")
    assert applied and after == before, "tuned: the next 4 MiB buffer comes from the heap"


def test_the_operators_malloc_variables_win() -> None:
    before, applied, after = _child("tune", {"MALLOC_TRIM_THRESHOLD_": "1048576"})
    assert not applied and after == before + 1
