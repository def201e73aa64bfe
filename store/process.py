"""Runs `xdc serve` as a child process: the demo, the crash tests and the benchmarks
use real processes, killed with real signals."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field


@dataclass
class ServeProcess:
    """`xdc serve --data DATA_DIR --listen LISTEN ARGS...`, or, with `command`, any other
    long-running `xdc COMMAND...` that prints the same JSON ready line (engines,
    gateways)."""

    data_dir: str = ""
    listen: str = "127.0.0.1:0"
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    command: list[str] | None = None

    def start(self, timeout_s: float = 20.0) -> ServeProcess:
        xdc = [sys.executable, "-m", "xdc.cli"]
        cmd = ([*xdc, *self.command] if self.command is not None else
               [*xdc, "serve", "--data", self.data_dir, "--listen", self.listen, *self.args])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None,
                                     env={**os.environ, **(self.env or {})})
        self.address = self._await_ready(timeout_s)
        return self

    def _await_ready(self, timeout_s: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            line += chunk
            if b"\n" in line:
                msg = json.loads(line.split(b"\n", 1)[0])
                assert msg["event"] == "ready", msg
                return msg["listen"]
        self.kill()
        what = " ".join((self.command or ["serve"])[:2])
        raise RuntimeError(f"xdc {what} did not become ready within {timeout_s}s "
                           f"(exit code {self.proc.poll()})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, by PID, and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM and wait for a clean exit (SIGKILL after the timeout)."""
        if self.proc is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def __enter__(self) -> ServeProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill()
