"""The `xdc` command line against a real `xdc serve` process."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
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


# ---- bad values: exit 2 naming the flag, never a traceback --------------------------------

@pytest.mark.parametrize(("argv", "named"), [
    (["append", "s", "T", "-m", "foo"], "argument --metadata/-m: 'foo': expected KEY=VALUE"),
    (["append", "s", "T", "--expected", "abc"], "argument --expected: 'abc': expected any, "
     "no_stream, stream_exists or a revision 0..2^64-1"),
    (["append", "s", "T", "--expected", str(2**64)], "argument --expected"),
    (["append", "s", "T", "--id", "notauuid"], "argument --id: 'notauuid' is not a UUID"),
    (["read", "s", "--limit", "-1"], "argument --limit: -1 is out of range 0..2^64-1"),
    (["read", "s", "--from", "1e23"], "argument --from: '1e23' is not an integer"),
    (["read", "s", "--from", str(10**23)], f"argument --from: {10**23} is out of range"),
    (["tail", "--after", "-1"], "argument --after: -1 is out of range 0..2^64-1"),
    (["node", "run", "--config", "c.toml", "--member", "a", "--route", "foo"],
     "argument --route: 'foo': expected MEMBER=HOST:PORT"),
    (["node", "run", "--config", "c.toml", "--member", "a", "--route", "b=h:0"],
     "argument --route: 'b=h:0': port 0 is out of range 1-65535"),
    (["serve", "--data", "d", "--listen", "127.0.0.1:99999"],
     "argument --listen: '127.0.0.1:99999': port 99999 is out of range 1-65535"),
    (["gateway", "--exchange", "x.toml", "--listen", "127.0.0.1:-1"], "argument --listen"),
])
def test_bad_values_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str],
                                           argv: list[str], named: str) -> None:
    from xdc.cli import build_parser
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_good_values_parse() -> None:
    from store.client import ANY, EXACT
    from xdc.cli import build_parser
    args = build_parser().parse_args(["append", "s", "T", "-m", "a=b=c", "-m", "e=",
                                      "--id", "12345678-1234-5678-1234-567812345678"])
    assert args.metadata == [("a", "b=c"), ("e", "")] and args.expected == (ANY, 0)
    assert args.id.hex == "12345678123456781234567812345678"
    assert build_parser().parse_args(["append", "s", "T", "--expected", str(2**64 - 1)]
                                     ).expected == (EXACT, 2**64 - 1)
    assert build_parser().parse_args(["serve", "--data", "d", "--listen", "[::1]:0"]
                                     ).listen == "[::1]:0"


def test_bad_values_in_real_processes_exit_2_without_binding(tmp_path: Path) -> None:
    r = xdc("append", "s", "T", "-m", "foo", "--target", "127.0.0.1:1")
    assert r.returncode == 2 and "'foo': expected KEY=VALUE" in r.stderr
    assert "Traceback" not in r.stderr
    # gRPC would take 99999 and listen on 34463 (the port modulo 65536).
    r = xdc("serve", "--data", str(tmp_path / "d"), "--listen", "127.0.0.1:99999")
    assert r.returncode == 2 and "port 99999 is out of range" in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()


def test_node_run_names_an_unknown_member(tmp_path: Path) -> None:
    from tests.support.cluster import cluster_toml
    toml = tmp_path / "cluster.toml"
    toml.write_text(cluster_toml("t", ["127.0.0.1:1"], ["us-east", "eu-west"], tmp_path))
    for flags, named in ((["--member", "nobody"], "--member 'nobody'"),
                         (["--member", "us-east-1", "--route", "nobody=127.0.0.1:5"],
                          "--route 'nobody'")):
        r = xdc("node", "run", "--config", str(toml), *flags)
        assert r.returncode == 2, r.stderr
        assert f"xdc node run: {named}: no such member in {toml} (members: us-east-1, " \
            "eu-west-1)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_cluster_config_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("cluster = 5\n")
    for argv in (["status", "--config", str(bad)],
                 ["switchover", "--to", "x", "--config", str(tmp_path / "missing.toml")],
                 ["promote", "x", "--config", str(bad)]):
        r = xdc("cluster", *argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert f"xdc cluster {argv[0]}: " in r.stderr and "Traceback" not in r.stderr


# ---- xdc tail: refusals and an unreachable node ---------------------------------------------

def test_tail_reports_refused_credentials(tmp_path: Path) -> None:
    from store import auth
    tokens = {"admin": auth.new_token(), "reader": auth.new_token()}
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(auth.render([
        {"name": "admin", "token": tokens["admin"],
         "grants": [{"operations": ["append", "read", "subscribe", "admin"], "streams": ["*"]}]},
        {"name": "reader", "token": tokens["reader"],
         "grants": [{"operations": ["read"], "streams": ["orders.*"]}]}]))
    with ServeProcess(str(tmp_path / "n"), args=["--auth", str(auth_file)]) as node:
        t = ("--target", node.address, "--count", "1")
        r = xdc("tail", *t, token="")
        assert r.returncode == 1, r.stderr
        assert "xdc tail: UNAUTHENTICATED: " in r.stderr and "no credentials" in r.stderr
        assert "Traceback" not in r.stderr
        r = xdc("tail", "--prefix", "orders.", *t, token=tokens["reader"])
        assert r.returncode == 1, r.stderr
        assert "xdc tail: PERMISSION_DENIED: " in r.stderr and "'reader'" in r.stderr
        assert "Traceback" not in r.stderr


def test_tail_says_when_its_node_is_unreachable(tmp_path: Path) -> None:
    from tests.support.etcd import free_ports
    closed = f"127.0.0.1:{free_ports(1)[0]}"
    tail = subprocess.Popen([sys.executable, "-m", "xdc.cli", "tail", "--target", closed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert tail.stderr is not None
        fd = tail.stderr.fileno()
        seen = b""
        deadline = time.monotonic() + 15
        while b"unreachable" not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing said about {closed} within 15 s: {seen!r}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                assert chunk, f"tail exited: {seen!r}"
                seen += chunk
        assert f"xdc tail: {closed} unreachable (UNAVAILABLE: ".encode() in seen, seen
        assert b"retrying" in seen and tail.poll() is None  # it keeps trying, as tail -F
    finally:
        tail.kill()
        tail.wait()


# ---- telemetry resource ----------------------------------------------------------------------

def test_resource_names_the_instance_and_the_nodes_region(tmp_path: Path) -> None:
    from tests.support.cluster import cluster_toml
    from xdc.cli import build_parser, resource_attributes
    toml = tmp_path / "cluster.toml"
    toml.write_text(cluster_toml("t", ["127.0.0.1:1"], ["us-east", "eu-west"], tmp_path))

    def resource(*argv: str) -> dict[str, str]:
        return resource_attributes(build_parser().parse_args(argv))

    assert resource("engine", "run", "--store", "127.0.0.1:1", "--instance", "b",
                    "--lease", "file:/tmp/x") == {"service.instance.id": "b"}
    assert resource("node", "run", "--config", str(toml), "--member", "eu-west-1") == {
        "service.instance.id": "eu-west-1", "cloud.region": "eu-west"}
    # What cmd_node_run refuses (exit 2) is not guessed at here.
    assert resource("node", "run", "--config", str(toml), "--member", "nobody") == {
        "service.instance.id": "nobody"}
    assert resource("serve", "--data", "d", "--node-id", "n1") == {"service.instance.id": "n1"}
    assert resource("tail") == {}
