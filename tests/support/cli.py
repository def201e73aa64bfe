"""The `xdc` command line as a child process, for tests."""

from __future__ import annotations

import os
import subprocess
import sys


def xdc_cli(*args: str, token: str | None = None, env: dict[str, str] | None = None,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`xdc ARGS`; `token`: its XDC_TOKEN; `env`: more variables; `stdin`: bytes to feed
    it (the output is then bytes too)."""
    extra = dict(env or {})
    if token is not None:
        extra["XDC_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "xdc.cli", *args], capture_output=True,
                          text=stdin is None, input=stdin, timeout=60,
                          env={**os.environ, **extra})
