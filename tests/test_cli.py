"""The `xdc` command line against a real `xdc serve` process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from store.process import ServeProcess
from tests.support.cli import xdc_cli as xdc


def test_append_read_info_tail_and_clean_sigterm(tmp_path: Path) -> None:
    with ServeProcess(str(tmp_path / "n")) as node:
        t = ("--target", node.address)
        out = xdc("append", "orders", "OrderPlaced", '{"px": 100}', "-m", "trace=abc",
                  "--content-type", "application/json", "--expected", "no_stream", *t)
        assert out.returncode == 0, out.stderr
        first = json.loads(out.stdout)
        assert (first["first_position"], first["last_revision"], first["duplicate"]) == (1, 1,
                                                                                          False)
        again = xdc("append", "orders", "OrderPlaced", '{"px": 100}', "-m", "trace=abc",
                    "--content-type", "application/json", "--id", first["id"], *t)
        assert json.loads(again.stdout)["duplicate"] is True
        bad = xdc("append", "orders", "X", "--expected", "5", *t)
        assert bad.returncode == 1
        assert "FAILED_PRECONDITION" in bad.stderr and "actual last revision 1" in bad.stderr
        assert xdc("append", "orders", "X", "--expected", "1", *t).returncode == 0

        read = xdc("read", "orders", *t)
        lines = [json.loads(line) for line in read.stdout.splitlines()]
        assert [(e["revision"], e["type"]) for e in lines] == [(1, "OrderPlaced"), (2, "X")]
        assert lines[0]["data"] == '{"px": 100}' and lines[0]["metadata"] == {"trace": "abc"}
        missing = xdc("read", "nope", *t)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

        info = json.loads(xdc("info", *t).stdout)
        assert info["commitPosition"] == "2" and info["role"] == "standalone"
        stream = json.loads(xdc("info", "orders", *t).stdout)
        assert stream["lastRevision"] == "2"

        tail = xdc("tail", "--count", "2", *t)
        assert [json.loads(line)["position"] for line in tail.stdout.splitlines()] == [1, 2]
        assert '"caught_up"' not in tail.stdout  # markers go to stderr

        node.signal(signal.SIGTERM)
        assert node.proc is not None and node.proc.wait(20) == 0
        assert node.proc.stdout is not None
        assert b'"stopped"' in node.proc.stdout.read()


def test_serve_refuses_a_busy_port(tmp_path: Path) -> None:
    with ServeProcess(str(tmp_path / "a")) as first:
        busy = subprocess.run([sys.executable, "-m", "xdc.cli", "serve", "--data",
                               str(tmp_path / "b"), "--listen", first.address],
                              capture_output=True, text=True, timeout=30)
        assert busy.returncode == 1
        assert "cannot listen" in busy.stderr or "address" in busy.stderr.lower()


@pytest.mark.parametrize(("flags", "named"), [
    (["--max-event-bytes", "0"], "max_event_bytes must be positive"),
    (["--max-event-bytes", str(64 * 1024 * 1024)], "max_event_bytes (67108864) must not "
     "exceed max_append_bytes"),
    (["--max-append-events", "60000"], "max_append_events (60000) must not exceed "
     "max_group_events"),
])
def test_serve_refuses_limits_that_cannot_be_naming_them(
        tmp_path: Path, flags: list[str], named: str) -> None:
    """Exit 2 with the limit named (before: an AssertionError traceback, and under
    `python -O` no check at all), and nothing served."""
    bad = subprocess.run([sys.executable, "-m", "xdc.cli", "serve", "--data",
                          str(tmp_path / "a"), "--listen", "127.0.0.1:0", *flags],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2, bad.stderr
    assert f"xdc serve: {named}" in bad.stderr
    assert "Traceback" not in bad.stderr
