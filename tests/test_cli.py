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
from typing import Any

import pytest

from store.process import ServeProcess
from tests.support.cli import xdc_cli as xdc
from tests.support.store import refusing_port


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

        # As read and append: snake_case keys, integers (before: "commitPosition": "2").
        info = json.loads(xdc("info", *t).stdout)
        assert info["commit_position"] == 2 and info["role"] == "standalone"
        assert info["limits"]["max_append_events"] == 10_000
        stream = json.loads(xdc("info", "orders", *t).stdout)
        assert (stream["last_revision"], stream["count"]) == (2, 2)

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
    (["read", "s", "--limit", "-1"], "argument --limit: -1 is out of range 1..2^64-1"),
    (["read", "s", "--limit", "0"], "argument --limit: 0 is out of range 1..2^64-1"),
    # gRPC dialled a bare host at port 443 (and said only "Connection refused").
    (["info", "--target", "localhost"], "argument --target: 'localhost' has no port: give "
     "HOST:PORT (e.g. localhost:7000)"),
    (["append", "s", "T", "--target", "127.0.0.1:0"], "argument --target: '127.0.0.1:0': "
     "port 0 is out of range"),
    (["read", "s", "--target", "http://127.0.0.1:7000"], "argument --target"),
    (["tail", "--target", "h:99999"], "argument --target: 'h:99999': port 99999"),
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
    # Timeouts are seconds above 0: -1 failed late as "Value out of range: -1000".
    *((["cluster", command, *args, "--timeout", timeout], f"argument --timeout: '{timeout}'")
      for command, args in (("switchover", ["--to", "b"]), ("promote", ["b"]))
      for timeout in ("-1", "0", "nan", "soon")),
    # Before: taken, so -1 appended the marker and returned at once like 0 did.
    *((["engine", "switchover", "g", "--to", "b", "--store", "127.0.0.1:7000", "--timeout",
        timeout], f"argument --timeout: '{timeout}'") for timeout in ("-1", "0", "nan", "inf")),
    (["append", "s", "T", "--timeout", "0"], "argument --timeout: '0'"),
    # Plain ints before, refused only when the request was built (a traceback, exit 1)
    # or by an assert of the engine runner (helper-85's review).
    (["book", "BTC-USD", "--depth", "-3"], "argument --depth: -3 is out of range"),
    (["book", "BTC-USD", "--depth", "99999999999"], "argument --depth: 99999999999 is out"),
    (["order", "submit", "--symbol", "S", "--account", "a", "--client-order-id", "c",
      "--side", "buy", "--qty", "1", "--price", str(10**23)], "argument --price: "),
    (["order", "submit", "--symbol", "S", "--account", "a", "--client-order-id", "c",
      "--side", "buy", "--qty", str(-2**63 - 1)], "argument --qty: "),
    (["order", "submit", "--symbol", "S", "--account", "a", "--client-order-id", "c",
      "--side", "buy", "--qty", "1", "--wait", "--timeout-ms", "-1"],
     "argument --timeout-ms: -1 is out of range 0..4294967295"),
    (["order", "cancel", "--symbol", "S", "--account", "a", "--request-id", "r",
      "--order-id", "-4"], "argument --order-id: -4 is out of range 0..2^64-1"),
    *((["engine", "run", "--store", "127.0.0.1:1", "--group", "g", "--instance", "i",
        "--lease", "file:/nonexistent", flag, value], f"argument {flag}: {value}: at least")
      for flag, value in (("--snapshot-every", "-1"), ("--verify-window", "-1"),
                          ("--max-pending-inputs", "0"), ("--lease-ttl", "0"))),
    # gRPC dialled a bare host at port 443, where nothing of ours listens.
    (["order", "submit", "--gateway", "localhost", "--symbol", "S", "--account", "a",
      "--client-order-id", "c", "--side", "buy", "--qty", "1"],
     "argument --gateway: 'localhost' has no port"),
    (["book", "S", "--gateway", "h:99999"], "argument --gateway: 'h:99999'"),
    (["engine", "run", "--store", "127.0.0.1:7000,localhost", "--group", "g", "--instance",
      "i", "--lease", "file:/nonexistent"], "argument --store: 'localhost' has no port"),
    (["engine", "status", "--group", "g", "--store", "nohost"], "argument --store"),
    (["gateway", "--exchange", "x.toml", "--store", "a:1,b"], "argument --store: 'b'"),
    # gRPC would listen on 34463, a port nobody asked for.
    (["engine", "run", "--store", "127.0.0.1:1", "--group", "g", "--instance", "i",
      "--lease", "file:/nonexistent", "--control", "127.0.0.1:99999"],
     "argument --control: '127.0.0.1:99999': port 99999 is out of range"),
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
    switchover = ["engine", "switchover", "g", "--to", "b", "--store", "127.0.0.1:7000"]
    args = build_parser().parse_args(switchover)
    assert (args.timeout, args.no_wait) == (10.0, False)
    args = build_parser().parse_args([*switchover, "--timeout", "0.5", "--no-wait"])
    assert (args.timeout, args.no_wait) == (0.5, True)


def _parsers(parser: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """`parser` and every subcommand's parser under it, with their command words."""
    import argparse
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, (*path, name))
    return found


def test_help_shows_the_defaults_of_every_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--help` states each option's default, with or without a help text (before: none
    of them did: `engine switchover --timeout` said only "seconds to wait"), through one
    formatter every subcommand's parser has; an option whose default comes from the
    environment names its variable, never the value (a token)."""
    from xdc.argtypes import DefaultsHelpFormatter
    from xdc.cli import DEFAULT_TARGET, build_parser
    monkeypatch.setenv("XDC_TOKEN", "tok-sekrit-123")
    parsers = dict(_parsers(build_parser()))
    assert len(parsers) > 40
    for path, parser in parsers.items():
        assert parser.formatter_class is DefaultsHelpFormatter, path
        assert "tok-sekrit-123" not in parser.format_help(), path

    def help_of(*path: str) -> str:
        return " ".join(parsers[path].format_help().split())  # lines joined

    assert "take over, more than 0 (default: 10.0)" in help_of("engine", "switchover")
    assert "--timeout TIMEOUT seconds, more than 0 (default: 10.0)" in help_of(
        "cluster", "switchover")
    run_help = help_of("engine", "run")
    assert "(default: 200000)" in run_help and "then exit 1 (default: 60.0)" in run_help
    assert "--max-event-bytes MAX_EVENT_BYTES default: 1048576" in help_of("serve")
    assert "--regions REGIONS default: 3" in help_of("cluster", "up")
    assert "RPC deadline, seconds (default: 70.0)" in help_of("order", "submit")
    # Said by the help text already: not twice.
    assert "given up as unknown (default 10) --target" in help_of("append")
    assert f"--target HOST:PORT default: {DEFAULT_TARGET}" in help_of("append")
    assert "(default: $XDC_TOKEN)" in help_of("read") and "None" not in help_of("read")


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


def test_cluster_status_exits_1_when_no_member_answers(tmp_path: Path) -> None:
    """A deployment none of whose members answers is no healthy cluster (as `patronictl
    list` of a dead cluster fails): the table, then exit 1 saying so."""
    from tests.support.cluster import cluster_toml
    toml = tmp_path / "cluster.toml"
    toml.write_text(cluster_toml("t", ["127.0.0.1:1"], ["us-east", "eu-west"], tmp_path))
    r = xdc("cluster", "status", "--config", str(toml))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr == "xdc cluster status: no member answers\n"
    assert r.stdout.count("unreachable") == 2


def xdc_reader_gone(*args: str, token: str = "") -> subprocess.CompletedProcess[str]:
    """`xdc ARGS | head -0`, decided in advance: stdout is a pipe whose reader is closed
    before the command writes anything."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "xdc.cli", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env={**os.environ, "XDC_TOKEN": token})
    finally:
        os.close(write)


UP_FAILING_ONCE = """
import sys
from geo import launcher
from xdc import cli

start_node = launcher.start_node
failed = []

def start_failing_once(state, n):
    if not failed:  # as when another process took the node's port in between
        failed.append(n.id)
        raise RuntimeError(f"{n.id} exited with 1 before ready (injected)")
    return start_node(state, n)

launcher.start_node = start_failing_once
sys.exit(cli.main(sys.argv[1:]))
"""


def test_cluster_stopped_restarted_on_its_data_and_output_into_a_closed_pipe(
        tmp_path: Path) -> None:
    """`up | head` and `status | head` exit quietly (141, as SIGPIPE would) and `up` still
    leaves its cluster running; after `down`, status says the cluster is stopped (exit 3)
    instead of listing unreachable nodes and a proxy; `up` again says it continues from
    the earlier data, which survives even a start retried after a failed attempt."""
    from geo import launcher
    d = tmp_path / "cluster"
    dd = ("--dir", str(d))
    try:
        r = xdc_reader_gone("cluster", "up", "--insecure", "--regions", "2", *dd)
        assert r.returncode == 141, r.stderr
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
        state = launcher.ClusterState.load(d)
        assert len(state.running()) == 4  # etcd, the proxy, two nodes: it is up
        r = xdc_reader_gone("cluster", "status", *dd)
        assert (r.returncode, r.stderr) == (141, "")

        def leader_client() -> str:
            sts = json.loads(xdc("cluster", "status", "--json", *dd).stdout)
            return next(s["client"] for k, s in sts.items()
                        if not k.startswith("_") and s.get("role") == "leader")

        leader = leader_client()
        token = state.token()
        r = xdc("append", "kept", "T", "x", "--target", leader, token=token)
        assert r.returncode == 0, r.stderr
        r = xdc_reader_gone("read", "kept", "--target", leader, token=token)
        assert (r.returncode, r.stderr) == (141, "")

        assert xdc("cluster", "down", *dd).returncode == 0
        r = xdc("cluster", "status", *dd)
        assert (r.returncode, r.stderr) == (3, ""), (r.stdout, r.stderr)
        assert r.stdout == (f"cluster xdc-local in {d} is stopped (none of its processes "
                            f"runs); `xdc cluster up --dir {d}` starts it again on its data\n")
        r = xdc("cluster", "status", "--json", *dd)
        assert r.returncode == 3
        assert json.loads(r.stdout) == {
            **{n.id: {"client": n.client, "unreachable": True} for n in state.nodes},
            "_seat": {"error": "the cluster is stopped"},
            "_wan": {"error": "the cluster is stopped"}}

        def up_again(*command: str) -> None:
            r = subprocess.run([*command, "cluster", "up", "--insecure", "--regions", "2",
                                *dd], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (r.stdout, r.stderr)
            notice = r.stdout.splitlines()[1]
            assert notice.startswith(f"reusing the data of an earlier run in {d} (now term "), \
                r.stdout
            assert f"`xdc cluster down --dir {d}`, `rm -r {d}`, `up` again" in notice
            r = xdc("read", "kept", "--target", leader_client(),
                    token=launcher.ClusterState.load(d).token())
            assert r.returncode == 0, r.stderr
            assert [json.loads(line)["type"] for line in r.stdout.splitlines()] == ["T"]
            assert xdc("cluster", "down", *dd).returncode == 0

        up_again(sys.executable, "-m", "xdc.cli")
        up_again(sys.executable, "-c", UP_FAILING_ONCE)
    finally:
        if (d / "state.json").exists():
            launcher.down(str(d))


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


# ---- store commands against a node they cannot reach, or one that never answers --------------

def test_append_to_a_closed_port_fails_fast_saying_nothing_was_appended() -> None:
    """Nothing listens: the append never left the process, so its outcome is known. Before,
    after 10.4 s: "DEADLINE_EXCEEDED: ... its outcome is unknown: retry with the same event
    ids", while `xdc read` said UNAVAILABLE Connection refused in 0.5 s."""
    with refusing_port() as closed:
        start = time.monotonic()
        r = xdc("append", "s", "T", "x", "--target", closed)
        took = time.monotonic() - start
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"xdc append: UNAVAILABLE: append not sent: no connection to "
                               f"{closed} (failed to connect to all addresses"), r.stderr
    assert "Connection refused" in r.stderr and "this call appended nothing" in r.stderr, \
        r.stderr
    assert "DEADLINE_EXCEEDED" not in r.stderr and "--tls" not in r.stderr
    # The CLI gives up after APPEND_CONNECT_TIMEOUT_S (1 s) of failed connects; the rest is
    # the interpreter starting (a loaded machine's margin).
    assert took < 6.0, took


def test_append_in_plaintext_to_a_tls_node_says_so_and_names_the_tls_flags(
        tmp_path: Path) -> None:
    """A TLS port closes a plaintext connection before HTTP/2 starts: nothing was sent,
    and the message says how to speak TLS. Before: DEADLINE_EXCEEDED outcome unknown after
    10.4 s."""
    from xdc import certs
    issued = certs.init(tmp_path / "tls", "c", ["n1"])
    ca = str(tmp_path / "tls" / "ca.pem")
    tls = ["--tls-ca", ca, "--tls-cert", str(issued["n1"].cert),
           "--tls-key", str(issued["n1"].key)]
    with ServeProcess(str(tmp_path / "n"), args=tls) as node:
        start = time.monotonic()
        r = xdc("append", "s", "T", "x", "--target", node.address)
        took = time.monotonic() - start
        assert r.returncode == 1, r.stderr
        assert f"xdc append: UNAVAILABLE: append not sent: no connection to {node.address} " \
            in r.stderr, r.stderr
        assert "Socket closed" in r.stderr and "this call appended nothing" in r.stderr
        assert "(is it a TLS port? give --tls-ca, --tls-cert and --tls-key" in r.stderr
        assert took < 6.0, took
        # read and info name the flags alike; with them, the append goes through.
        r = xdc("info", "--target", node.address)
        assert r.returncode == 1 and "is it a TLS port? give --tls-ca" in r.stderr, r.stderr
        admin = ["--tls-ca", ca, "--tls-cert", str(issued["admin"].cert),
                 "--tls-key", str(issued["admin"].key)]
        assert xdc("append", "s", "T", "x", "--target", node.address, *admin).returncode == 0


def test_append_sent_and_never_answered_prints_the_id_to_retry_with() -> None:
    """A node that takes the append and never answers: its outcome is unknown (it may be
    written), so the CLI says which id to append again. Before, the id it had made up was
    not printed: a retry could only append a second event."""
    import uuid as uuid_module

    from store.server import listen_on, new_server
    from tests.support.store import LoopThread
    from xdc.v1 import eventstore_pb2 as pb
    from xdc.v1 import eventstore_pb2_grpc as pb_grpc

    received: list[bytes] = []

    class Silent(pb_grpc.EventStoreServicer):
        async def NodeInfo(self, request, context):  # type: ignore[no-untyped-def]
            return pb.NodeInfoResponse()

        async def AppendStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
            async for msg in request_iterator:
                received.extend(e.id for a in msg.appends for e in a.events)
            if False:  # an async generator that yields nothing
                yield

    loop = LoopThread()
    try:
        async def start() -> tuple[Any, int]:
            server = new_server()
            pb_grpc.add_EventStoreServicer_to_server(Silent(), server)
            port = listen_on(server, "127.0.0.1:0", None)
            await server.start()
            return server, port

        server, port = loop.call(start())
        try:
            r = xdc("append", "s", "T", "x", "--timeout", "2", "--target",
                    f"127.0.0.1:{port}")
        finally:
            loop.call(server.stop(0))
    finally:
        loop.close()
    assert r.returncode == 1, r.stderr
    assert "xdc append: DEADLINE_EXCEEDED: append not confirmed before the timeout; its " \
        "outcome is unknown: retry with the same event ids (--id " in r.stderr, r.stderr
    printed = uuid_module.UUID(r.stderr.split("(--id ", 1)[1].split(")", 1)[0])
    assert received and set(received) == {printed.bytes}  # the id the node was sent


def test_read_prints_the_whole_stream_and_limit_caps_it(tmp_path: Path) -> None:
    """`xdc read` pages through the whole stream (before: the first 1000 of 2500 events,
    exit 0, nothing said); `--limit N` takes the first N."""
    from store.client import StoreClient, new_event
    from tests.support.store import run

    with ServeProcess(str(tmp_path / "n")) as node:
        async def fill() -> None:
            async with StoreClient(node.address) as c:
                for i in range(5):
                    await c.append("big", [new_event("T", str(i * 500 + k).encode())
                                           for k in range(500)])
        run(fill)
        t = ("--target", node.address)
        every = xdc("read", "big", *t)
        assert every.returncode == 0, every.stderr
        assert [json.loads(line)["revision"] for line in every.stdout.splitlines()] == \
            list(range(1, 2501))
        first = xdc("read", "big", "--limit", "1200", *t)
        assert len(first.stdout.splitlines()) == 1200
        back = xdc("read", "big", "--backwards", "--limit", "3", "--from", "2000", *t)
        assert [json.loads(line)["revision"] for line in back.stdout.splitlines()] == [
            2000, 1999, 1998]
        assert len(xdc("read", "$all", *t).stdout.splitlines()) == 2500


def test_short_lived_commands_exit_without_task_warnings(tmp_path: Path) -> None:
    """`xdc append` 10 times (the in-process test in test_store_api is the deterministic
    guard): stderr stays empty. Before, about 1 in 7 printed "Task was
    destroyed but it is pending! ... _AioCall._handle_status_once_received()": the blocking
    client closed its event loop with the cancelled append stream's status still to come."""
    with ServeProcess(str(tmp_path / "n")) as node:
        for i in range(10):
            r = xdc("append", "s", "T", str(i), "--target", node.address)
            assert r.returncode == 0, r.stderr
            assert r.stderr == "", (i, r.stderr)
        for argv in (["read", "s"], ["info"], ["info", "s"]):
            r = xdc(*argv, "--target", node.address)
            assert r.returncode == 0 and r.stderr == "", (argv, r.stderr)


def test_a_target_without_a_port_exits_2_without_dialling() -> None:
    """Before, `--target localhost` dialled 127.0.0.1:443 and said "Connection refused"."""
    for argv in (["info"], ["read", "s"], ["append", "s", "T"], ["tail"]):
        r = xdc(*argv, "--target", "localhost")
        assert r.returncode == 2, (argv, r.stderr)
        assert "argument --target: 'localhost' has no port" in r.stderr, r.stderr
    r = xdc("info", env={"XDC_TARGET": "localhost"})
    assert r.returncode == 2 and "'localhost' has no port" in r.stderr, r.stderr


def test_the_readme_quick_start_says_where_xdc_is() -> None:
    """`make demo` installs `xdc` in .venv/bin, not on the PATH: the quick start says so."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    quick = text[text.index("\n## Quick start\n"):text.index("\n## Using the store\n")]
    assert "`.venv/bin/xdc`" in quick and "`. .venv/bin/activate`" in quick, quick
    assert (Path(sys.executable).parent / "xdc").exists()  # where the venv puts it


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


# ---- the README's order gateway walkthrough, verbatim ---------------------------------------

def _readme_block(heading: str) -> list[list[str]]:
    """The commands of the first ```sh block under `heading` in README.md: continuation
    lines joined, comments dropped, each split as a shell would."""
    import shlex
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n"):]
    block = section[section.index("```sh\n") + 6:]
    block = block[:block.index("```")]
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    return [c for c in commands if c]


def test_readme_gateway_walkthrough_works_as_written(tmp_path: Path) -> None:
    """The "Order gateway" commands of the README, run as written (only the addresses,
    the store's directory and the files moved under the test's directory): the first
    order is ACCEPTED (before: the example exchange had no deposits, so UNKNOWN_ACCOUNT),
    the replace and the cancel that follow find the order (before: a replace after the
    cancel, UNKNOWN_ORDER). Then an order of a group no engine runs for: `xdc order
    --wait` says it was appended and no engine output came, and exits 1 (before: exit 0
    and nothing said)."""
    from engine.runner import status_or_none
    from tests.support.store import run, wait_until

    store_address = gateway_address = ""
    procs: list[ServeProcess] = []
    answers: list[dict] = []  # type: ignore[type-arg]

    def local(argv: list[str]) -> list[str]:
        out = []
        for a in argv:
            a = a.replace("127.0.0.1:7000", store_address)
            a = a.replace("file:/tmp/leases", f"file:{tmp_path / 'leases'}")
            if a == "exchange.toml":
                a = str(tmp_path / "exchange.toml")
            out.append(a)
        return out

    commands = _readme_block("## Order gateway")
    assert [c[:3] for c in commands if c[1] == "order"] == [
        ["xdc", "order", "submit"], ["xdc", "order", "replace"], ["xdc", "order", "cancel"]]
    try:
        for argv in commands:
            assert argv[0] == "xdc", argv
            verb = argv[1]
            if verb == "serve":
                store = ServeProcess(str(tmp_path / "store")).start()
                procs.append(store)
                store_address = store.address
            elif verb == "exchange" and argv[2] == "example":
                assert argv[3:] == [">", "exchange.toml"], argv
                r = xdc(*argv[1:3])
                assert r.returncode == 0, r.stderr
                (tmp_path / "exchange.toml").write_text(r.stdout)
            elif verb == "engine":
                engine = ServeProcess(command=local(argv[1:])).start()
                procs.append(engine)

                async def primary(address: str = engine.address) -> bool:
                    s = await status_or_none(address, 1.0)
                    return s is not None and s.role == "primary"
                run(lambda: wait_until(primary, 20, "the engine primary"))
            elif verb == "gateway":
                args = local(argv[1:])
                args[args.index("--listen") + 1] = "127.0.0.1:0"
                gateway = ServeProcess(command=args).start()
                procs.append(gateway)
                gateway_address = gateway.address
            else:
                args = [a.replace("127.0.0.1:7100", gateway_address) for a in local(argv[1:])]
                r = xdc(*args, env={"XDC_GATEWAY": gateway_address})
                assert r.returncode == 0, (argv, r.stdout, r.stderr)
                if verb in ("order", "book"):
                    answers.append(json.loads(r.stdout.splitlines()[0]))
        submit, replace, book, cancel = answers
        assert [x["kind"] for x in submit["reports"]][:1] == ["ACCEPTED"], submit
        accepted = submit["reports"][0]
        assert (accepted["order_id"], accepted["account"], accepted["qty"]) == (1, "alice", 5)
        assert replace["reports"][0]["kind"] == "REPLACED", replace
        assert (book["asks"], book["bids"]) == ([{"price": 50010, "qty": 2}], []), book
        assert (cancel["reports"][0]["kind"], cancel["reports"][0]["qty"]) == ("CANCELLED", 2)

        # No engine runs for the equities group: the order lands, nobody answers it.
        r = xdc("order", "submit", "--gateway", gateway_address, "--symbol", "ACME",
                "--account", "alice", "--client-order-id", "e-1", "--side", "buy", "--qty",
                "100", "--price", "10000", "--wait", "--timeout-ms", "300")
        assert r.returncode == 1, (r.stdout, r.stderr)
        late = json.loads(r.stdout)
        assert late["timed_out"] is True and late["input_position"] > 0, late
        assert f"xdc order submit: appended at input position {late['input_position']}, " \
               "but no engine output for it came within 300 ms: is a matching engine " \
               "running for the engine group of ACME?" in r.stderr, r.stderr
    finally:
        for p in reversed(procs):
            p.kill()
