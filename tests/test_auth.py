"""Client authentication and stream ACLs (store/auth.py) against real servers: a real
LMDB store behind a real gRPC server, `xdc serve --auth` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tomllib
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import wire
from store import auth
from store.auth import AuthConfig, AuthConfigError
from store.client import NO_STREAM, AppendError, CaughtUp, StoreClient, new_event
from store.node import StoreNode
from store.process import ServeProcess
from store.server import StoreServer
from tests.support.cli import xdc_cli as _xdc
from tests.support.store import run, running_store, wait_until
from xdc.v1 import eventstore_pb2 as pb

TOKENS = {"admin": "tok-admin-7f3a", "gateway": "tok-gw-5d10", "engine": "tok-engine-e4b8",
          "trader": "tok-trader-91c2", "auditor": "tok-audit-2a6f"}
# The local cluster's roles (what `xdc cluster up` writes), and a read-only auditor.
PRINCIPALS: list[dict[str, Any]] = [
    *wire.exchange_principals({r: TOKENS[r] for r in ("admin", "gateway", "engine", "trader")},
                              trader_accounts=("alice",)),
    {"name": "auditor", "token": TOKENS["auditor"],
     "grants": [{"operations": ["read"], "streams": ["*"]}]},
]


def config() -> AuthConfig:
    return auth.loads(auth.render(PRINCIPALS), "test-auth.toml")


def ev(etype: str = "T", n: int = 0) -> pb.ProposedEvent:
    return new_event(etype, f"e{n}".encode())


def denied_message(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, AppendError):
        return exc.code, exc.message
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    return exc.code(), exc.details() or ""


# ---- the file -------------------------------------------------------------------------------

def test_auth_file_round_trip_and_patterns() -> None:
    c = config()
    assert [p.name for p in c.principals] == list(TOKENS)
    assert c.by_token[auth.token_digest(TOKENS["gateway"])].name == "gateway"
    admin, trader, gw = (c.principal(n) for n in ("admin", "trader", "gateway"))
    assert admin.admin and not trader.admin and not gw.admin
    assert trader.may("append", "orders.BTC-USD") and trader.may("append", "orders.a.b")
    assert not trader.may("append", "orders") and not trader.may("append", "ordersX")
    assert not trader.may("read", "exchange.g1.output")
    # A star inside a pattern stays within one segment; a final star takes any rest.
    assert gw.may("append", "exchange.g1.input", "NewOrder")
    assert not gw.may("append", "exchange.g1.input", "xdc.Switchover")
    assert not gw.may("append", "exchange.a.b.input", "NewOrder")
    assert not gw.may("append", "exchange.g1.output", "NewOrder")
    assert gw.covers("subscribe", "exchange.") and gw.covers("subscribe", "exchange.g1.")
    assert not gw.covers("subscribe", "exchange") and not gw.covers("subscribe", "")
    assert admin.covers("read", "") and c.principal("auditor").covers("read", "")
    assert not c.principal("auditor").covers("subscribe", "")
    assert trader.may_trade("alice") and not trader.may_trade("bob") and admin.may_trade("Z")


@pytest.mark.parametrize(("text", "expected"), [
    ("", "declare at least one [[principal]]"),
    ('[[principal]]\nname = "a"\n', "neither token_sha256 nor cert"),
    ('[[principal]]\nname = "a"\ntoken_sha256 = "abc"\n', "64 lower-case hex digits"),
    ('[[principal]]\nname = "a"\ncert = "a"\n[[principal.grant]]\noperations = ["write"]\n'
     'streams = ["x.*"]\n', "unknown operation 'write'"),
    ('[[principal]]\nname = "a"\ncert = "a"\n[[principal.grant]]\noperations = ["read"]\n'
     'streams = ["x.[ab]"]\n', "only '*' is a wildcard"),
    ('[[principal]]\nname = "a"\ncert = "a"\n[[principal.grant]]\noperations = ["read"]\n',
     "streams: required for read"),
    ('[[principal]]\nname = "a"\ncert = "a"\n[[principal]]\nname = "a"\ncert = "b"\n',
     "duplicate principal name"),
    ('[[principal]]\nname = "a"\ncert = "c"\n[[principal]]\nname = "b"\ncert = "c"\n',
     "cert 'c' is also principal 'a'"),
    ('[[principal]]\nname = "a"\ncert = "a"\nrole = "x"\n', "unknown key(s) role"),
    ('[[principal]]\nname = "a"\ncert = "a"\n[[principal.grant]]\noperations = ["read"]\n'
     'streams = ["x"]\ntypes = ["T"]\n', "types: only restricts append"),
])
def test_auth_file_refused_with_clear_errors(text: str, expected: str) -> None:
    with pytest.raises(AuthConfigError) as info:
        auth.loads(text, "bad.toml")
    assert expected in str(info.value) and str(info.value).startswith("bad.toml: ")


def test_new_tokens_are_safe_on_a_command_line() -> None:
    """A token is passed as `--token TOKEN`: one starting with "-" would be taken for an
    option (it broke `xdc cluster switchover --token ...` about once in 64 tokens)."""
    tokens = {auth.new_token() for _ in range(4000)}
    assert len(tokens) == 4000
    assert all(t.startswith(auth.TOKEN_PREFIX) and len(t) > 40 for t in tokens)


def test_auth_file_same_token_twice_is_refused() -> None:
    twice = [{"name": "a", "token": "same"}, {"name": "b", "token": "same"}]
    with pytest.raises(AuthConfigError, match="also principal 'a'"):
        auth.loads(auth.render(twice))


# ---- the store --------------------------------------------------------------------------------

def _state(server: Any) -> tuple[int, dict[str, int]]:
    """The log's last position and each stream's last revision, straight from LMDB."""
    log = server.node.log
    streams = {}
    for name in ("orders.1", "exchange.g1.input", "exchange.g1.output", "other"):
        st = log.stream_state(name.encode())
        streams[name] = st.last_revision if st is not None else 0
    return log.last_position, streams


def test_unauthenticated_calls_are_refused_and_write_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path, auth=config(),
                                 token=TOKENS["admin"]) as (server, admin):
            await admin.append("orders.1", ev(), NO_STREAM)
            before = _state(server)
            for token, why in (("", "no credentials"), ("not-a-token", "unknown bearer token")):
                async with StoreClient(server.address, token=token, timeout_s=5) as c:
                    with pytest.raises(AppendError) as info:
                        await c.append("orders.1", ev())
                    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                    assert why in info.value.message
                    calls = [c.read("orders.1"), c.read("$all"), c.stream_info("orders.1"),
                             c.node_info()]
                    for call in calls:
                        with pytest.raises(grpc.aio.AioRpcError) as rpc:
                            await call
                        assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                        assert why in (rpc.value.details() or "")
                    with pytest.raises(grpc.aio.AioRpcError) as rpc:
                        async for _ in c.subscribe(stream_prefix="orders."):
                            pass
                    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    # The unary Append, straight on the stub.
                    with pytest.raises(grpc.aio.AioRpcError) as rpc:
                        await c.stub.Append(pb.AppendRequest(stream="orders.1", events=[ev()]),
                                            metadata=auth.bearer(token))
                    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with StoreClient(server.address, timeout_s=5) as c:
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await c.stub.NodeInfo(pb.NodeInfoRequest(),
                                          metadata=(("authorization", "Basic abc"),))
                assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "malformed authorization" in (rpc.value.details() or "")
                # Health checking stays open.
                got = await health_pb2_grpc.HealthStub(c._channel).Check(
                    health_pb2.HealthCheckRequest(service=""))
                assert got.status == health_pb2.HealthCheckResponse.SERVING
            assert _state(server) == before
    run(body)


def test_permission_denied_names_principal_operation_and_stream(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_store(tmp_path, auth=config(),
                                 token=TOKENS["admin"]) as (server, admin):
            await admin.append("orders.1", ev(), NO_STREAM)
            await admin.append("exchange.g1.input", ev("NewOrder"), NO_STREAM)
            await admin.append("exchange.g1.output", ev("xdc.Outputs"), NO_STREAM)
            await admin.append("other", ev(), NO_STREAM)
            before = _state(server)
            clients = {n: StoreClient(server.address, token=TOKENS[n], timeout_s=5)
                       for n in ("trader", "gateway", "engine", "auditor")}
            try:
                refusals = [
                    # wrong stream prefix
                    (clients["trader"].append("exchange.g1.input", ev("NewOrder")),
                     "principal 'trader' may not append to stream 'exchange.g1.input'"),
                    (clients["gateway"].append("exchange.g1.output", ev("xdc.Outputs")),
                     "principal 'gateway' may not append to stream 'exchange.g1.output'"),
                    # an event type its grant does not list (an engine control event)
                    (clients["gateway"].append("exchange.g1.input", [ev("NewOrder"),
                                                                     ev("xdc.Switchover")]),
                     "may not append events of type 'xdc.Switchover' to stream "
                     "'exchange.g1.input'"),
                    (clients["engine"].append("exchange.g1.input", ev("NewOrder")),
                     "principal 'engine' may not append to stream 'exchange.g1.input'"),
                    # wrong operation: read only
                    (clients["auditor"].append("other", ev()),
                     "principal 'auditor' may not append to stream 'other'"),
                    (clients["trader"].read("other"),
                     "principal 'trader' may not read stream 'other'"),
                    (clients["trader"].read("$all"), "may not read '$all'"),
                    (clients["gateway"].read("$all"), "needs a read grant on '*'"),
                    (clients["trader"].stream_info("exchange.g1.input"),
                     "principal 'trader' may not read stream 'exchange.g1.input'"),
                ]
                for call, message in refusals:
                    with pytest.raises((AppendError, grpc.aio.AioRpcError)) as info:
                        await call
                    code, details = denied_message(info.value)
                    assert code == grpc.StatusCode.PERMISSION_DENIED, details
                    assert message in details
                subscriptions = [
                    (clients["auditor"], "", "principal 'auditor' may not subscribe every"),
                    (clients["gateway"], "", "may not subscribe every stream"),
                    (clients["trader"], "orders", "streams starting with 'orders'"),
                    (clients["gateway"], "exchange", "streams starting with 'exchange'"),
                ]
                for client, prefix, message in subscriptions:
                    with pytest.raises(grpc.aio.AioRpcError) as rpc:
                        async for _ in client.subscribe(stream_prefix=prefix):
                            pass
                    assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert message in (rpc.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await clients["gateway"].stub.Append(
                        pb.AppendRequest(stream="exchange.g1.input",
                                         events=[ev("xdc.Switchover")]),
                        metadata=auth.bearer(TOKENS["gateway"]))
                assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert _state(server) == before

                # The allowed paths.
                r = await clients["trader"].append("orders.1", ev("T", 2))
                assert r.last_revision == 2
                assert [e.revision for e in await clients["trader"].read("orders.1")] == [1, 2]
                r = await clients["gateway"].append("exchange.g1.input", ev("CancelOrder"))
                assert r.last_revision == 2
                r = await clients["engine"].append("exchange.g1.output", ev("xdc.Outputs"))
                assert r.last_revision == 2
                assert len(await clients["auditor"].read("$all")) == r.last_position
                info = await clients["auditor"].stream_info("other")
                assert info.last_revision == 1
                assert (await clients["trader"].node_info()).last_position == r.last_position
                for client, prefix in ((clients["gateway"], "exchange.g1."),
                                       (clients["engine"], "exchange."),
                                       (clients["trader"], "orders.")):
                    seen = []
                    async for item in client.subscribe(stream_prefix=prefix):
                        if isinstance(item, CaughtUp):
                            break
                        seen.append(item.stream)
                    assert seen and all(s.startswith(prefix) for s in seen)
            finally:
                for c in clients.values():
                    await c.close()
    run(body)


def test_append_stream_refuses_forbidden_appends_and_writes_nothing_of_them(
        tmp_path: Path) -> None:
    """One AppendStream call: a first message that is allowed, a later message whose
    second append is for a forbidden stream. Only the forbidden append is refused; the log
    holds exactly the allowed ones."""
    async def body() -> None:
        async with running_store(tmp_path, auth=config(),
                                 token=TOKENS["trader"]) as (server, trader):
            call = trader.stub.AppendStream(metadata=auth.bearer(TOKENS["trader"]))
            ok = pb.AppendRequest(stream="orders.1", events=[ev("T", 1)])
            await call.write(pb.AppendStreamRequest(correlation_id=1, appends=[ok]))
            first = await call.read()
            assert first.results[0].ok.last_position == 1
            before = _state(server)
            forbidden = pb.AppendRequest(stream="exchange.g1.input", events=[ev("NewOrder", 2)])
            also_ok = pb.AppendRequest(stream="orders.1", events=[ev("T", 3)])
            await call.write(pb.AppendStreamRequest(correlation_id=2,
                                                    appends=[forbidden, also_ok]))
            second = await call.read()
            await call.done_writing()
            assert second.correlation_id == 2
            err = second.results[0].error
            assert err.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
            assert "principal 'trader' may not append to stream 'exchange.g1.input'" \
                in err.message
            assert second.results[1].ok.last_position == 2
            position, streams = _state(server)
            assert position == before[0] + 1
            assert streams == {**before[1], "orders.1": 2}
            assert server.node.log.stream_state(b"exchange.g1.input") is None
            # A forbidden-only message: nothing written at all.
            with pytest.raises(AppendError) as info:
                await trader.append("exchange.g1.output", [ev("xdc.Outputs", 4)])
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert _state(server) == (position, streams)
    run(body)


# ---- the CLI against `xdc serve --auth` -------------------------------------------------------

def test_cli_tokens_against_serve_with_auth_file(tmp_path: Path) -> None:
    made = _xdc("auth", "token", "ops")
    assert made.returncode == 0, made.stderr
    new = json.loads(made.stdout)
    assert new["line"] == f'token_sha256 = "{auth.token_digest(new["token"]).hex()}"'
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(auth.render(PRINCIPALS) + f'[[principal]]\nname = "ops"\n'
                         f'{new["line"]}\n[[principal.grant]]\noperations = ["read"]\n'
                         'streams = ["*"]\n')
    checked = _xdc("auth", "check", str(auth_file))
    assert checked.returncode == 0, checked.stderr
    assert [json.loads(line)["principal"] for line in checked.stdout.splitlines()] == [
        *TOKENS, "ops"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[principal]]\nname = "x"\n')
    refused = _xdc("serve", "--data", str(tmp_path / "never"), "--auth", str(bad))
    assert refused.returncode == 2 and "neither token_sha256 nor cert" in refused.stderr
    assert not (tmp_path / "never").exists()

    with ServeProcess(str(tmp_path / "data"), args=["--auth", str(auth_file)]) as server:
        target = ["--target", server.address]
        r = _xdc("append", "orders.1", "T", "x", *target)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
        r = _xdc("append", "orders.1", "T", "x", *target, "--token", "wrong")
        assert r.returncode == 1 and "unknown bearer token" in r.stderr
        r = _xdc("append", "other", "T", "x", *target, token=TOKENS["trader"])
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
        assert "principal 'trader' may not append to stream 'other'" in r.stderr
        r = _xdc("append", "orders.1", "T", "x", *target, token=TOKENS["trader"])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["last_revision"] == 1
        r = _xdc("read", "$all", *target, "--token", new["token"])
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["stream"] for line in r.stdout.splitlines()] == ["orders.1"]
        r = _xdc("read", "$all", *target, token=TOKENS["trader"])
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
        r = _xdc("info", *target, token=TOKENS["trader"])
        assert r.returncode == 0 and json.loads(r.stdout)["last_position"] == 1
        r = _xdc("tail", "--prefix", "orders.", "--count", "1", *target,
                 token=TOKENS["trader"])
        assert r.returncode == 0 and json.loads(r.stdout)["stream"] == "orders.1"
        server.stop()


# ---- the order gateway ----------------------------------------------------------------------

def test_gateway_trades_only_for_the_principals_accounts(tmp_path: Path) -> None:
    from engine.exchange_config import init_events, parse
    from engine.gateway import GatewayServer
    from tests.test_gateway import EXCHANGE
    from xdc.v1 import exchange_pb2 as xpb
    from xdc.v1 import exchange_pb2_grpc as xpb_grpc

    def submit(account: str, cid: str) -> xpb.SubmitOrderRequest:
        return xpb.SubmitOrderRequest(symbol="BTC-USD", account=account, client_order_id=cid,
                                      side=xpb.BUY, qty=1, price=50_000)

    async def body() -> None:
        exchange = parse(tomllib.loads(EXCHANGE))
        async with running_store(tmp_path, auth=config(),
                                 token=TOKENS["admin"]) as (server, admin):
            for g in exchange.groups:
                await admin.append(wire.input_stream(g.name), init_events(g))
            gateway = GatewayServer(exchange, server.address, auth_config=config(),
                                    token=TOKENS["gateway"])
            await gateway.start()
            try:
                async with grpc.aio.insecure_channel(gateway.address) as ch:
                    stub = xpb_grpc.OrderGatewayStub(ch)
                    as_trader = auth.bearer(TOKENS["trader"])
                    inputs = server.node.log.stream_state(b"exchange.g1.input").last_revision
                    refused = [
                        (stub.SubmitOrder(submit("alice", "c1"), timeout=10),
                         grpc.StatusCode.UNAUTHENTICATED, "no credentials"),
                        (stub.SubmitOrder(submit("alice", "c1"), timeout=10,
                                          metadata=auth.bearer("stolen?")),
                         grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token"),
                        (stub.SubmitOrder(submit("bob", "c1"), timeout=10, metadata=as_trader),
                         grpc.StatusCode.PERMISSION_DENIED,
                         "principal 'trader' may not trade for account 'bob' (its accounts: "
                         "alice)"),
                        (stub.CancelOrder(xpb.CancelOrderRequest(
                            symbol="BTC-USD", account="bob", request_id="r1", order_id=1),
                            timeout=10, metadata=as_trader),
                         grpc.StatusCode.PERMISSION_DENIED, "account 'bob'"),
                        (stub.ReplaceOrder(xpb.ReplaceOrderRequest(
                            symbol="BTC-USD", account="bob", request_id="r2", order_id=1,
                            price=50_001, qty=1), timeout=10, metadata=as_trader),
                         grpc.StatusCode.PERMISSION_DENIED, "account 'bob'"),
                    ]
                    for call, code, message in refused:
                        with pytest.raises(grpc.aio.AioRpcError) as rpc:
                            await call
                        assert rpc.value.code() == code
                        assert message in (rpc.value.details() or "")
                    for call in (stub.StreamExecutions(xpb.StreamExecutionsRequest(
                                     account="bob"), timeout=10, metadata=as_trader),
                                 stub.StreamBook(xpb.StreamBookRequest(symbol="BTC-USD"),
                                                 timeout=10)):
                        with pytest.raises(grpc.aio.AioRpcError) as rpc:
                            await call.read()
                        assert rpc.value.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                                    grpc.StatusCode.UNAUTHENTICATED)
                    # (The refusals above come first whether or not the gateway's tiers
                    # admit orders yet; the rest needs them admitted.)
                    await gateway.wait_admitted()
                    # Bytes that do not parse: authenticated first, then INVALID_ARGUMENT.
                    raw = ch.unary_unary("/xdc.v1.OrderGateway/SubmitOrder")
                    for md, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                     (as_trader, grpc.StatusCode.INVALID_ARGUMENT)):
                        with pytest.raises(grpc.aio.AioRpcError) as rpc:
                            await raw(b"\xff\xff\xff", timeout=10, metadata=md)
                        assert rpc.value.code() == code, rpc.value.details()
                    assert server.node.log.stream_state(
                        b"exchange.g1.input").last_revision == inputs

                    # Allowed: the trader's own account (appended by the gateway's own
                    # principal) and the public book.
                    r = await stub.SubmitOrder(submit("alice", "c1"), timeout=10,
                                               metadata=as_trader)
                    assert r.input_position > 0 and not r.duplicate
                    assert server.node.log.stream_state(
                        b"exchange.g1.input").last_revision == inputs + 1
                    book = stub.StreamBook(xpb.StreamBookRequest(symbol="BTC-USD"), timeout=10,
                                           metadata=as_trader)
                    first = await book.read()
                    assert first.snapshot and first.symbol == "BTC-USD"
                    book.cancel()
            finally:
                await gateway.stop(grace_s=0.5)
    run(body)


# ---- engines: EngineControl and engine switchover -------------------------------------------

def test_engine_control_and_engine_switchover_need_admin(tmp_path: Path) -> None:
    from engine.runner import fetch_status
    from tests.support.exchange import GROUP, lease_dir, wait_outputs_through, workload

    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(auth.render(PRINCIPALS))

    async def body() -> None:
        async with running_store(tmp_path / "store", auth=config(),
                                 token=TOKENS["admin"]) as (server, admin):
            r = await admin.append(wire.input_stream(GROUP), workload(7, 60))
            engine = ServeProcess(command=[
                "engine", "run", "--store", server.address, "--group", GROUP,
                "--instance", "a", "--lease", lease_dir(tmp_path), "--auth", str(auth_file)],
                env={"XDC_TOKEN": TOKENS["engine"], "PYTHONHASHSEED": "7"})
            await asyncio.to_thread(engine.start)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await fetch_status(engine.address)
                assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # The engine reads, subscribes and appends its outputs as its own principal.
                await wait_outputs_through(admin, r.last_position, 30)
                status = await fetch_status(engine.address, token=TOKENS["trader"])
                assert status.role == "primary" and status.input_position == r.last_position
                # ... and advertises where it answers EngineControl (gateways discover it).
                async def advertised() -> bool:
                    with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND: not yet
                        events = await admin.read(wire.instances_stream(GROUP))
                        return [wire.parse_instance(e.data) for e in events] == [
                            ("a", engine.address)]
                    return False
                await wait_until(advertised, 30, "the engine's instance event")

                stream = wire.input_stream(GROUP).encode()
                before = server.node.log.stream_state(stream).last_revision
                for who, message in (
                        ("gateway", "principal 'gateway' may not append events of type "
                                    "'xdc.Switchover' to stream 'exchange.sim.input'"),
                        ("engine", "principal 'engine' may not append to stream "
                                   "'exchange.sim.input'"),
                        ("", "no credentials")):
                    # --force: 'b' is no instance, which the CLI refuses before any
                    # append otherwise; here the store's permission check is under test.
                    cli = await asyncio.to_thread(
                        _xdc, "engine", "switchover", GROUP, "--to", "b", "--force",
                        "--store", server.address, token=TOKENS.get(who, ""))
                    assert cli.returncode == 1 and message in cli.stderr, cli.stderr
                assert server.node.log.stream_state(stream).last_revision == before
                cli = await asyncio.to_thread(_xdc, "engine", "snapshot", GROUP, "--store",
                                              server.address, token=TOKENS["trader"])
                assert cli.returncode == 1 and "PERMISSION_DENIED" in cli.stderr
                cli = await asyncio.to_thread(
                    _xdc, "engine", "switchover", GROUP, "--to", "b", "--force", "--store",
                    server.address, token=TOKENS["admin"])
                assert cli.returncode == 0, cli.stderr
                marker = json.loads(cli.stdout)["marker_position"]
                assert server.node.log.stream_state(stream).last_revision == before + 1
                cli = await asyncio.to_thread(_xdc, "engine", "status", "--engine",
                                              engine.address, token=TOKENS["gateway"])
                assert cli.returncode == 0 and json.loads(cli.stdout)["instance"] == "a"
                assert marker > r.last_position
            finally:
                await asyncio.to_thread(engine.stop)
    run(body)


# ---- client certificates as principals (mutual TLS) ------------------------------------------

def test_client_certificate_identities_are_principals(tmp_path: Path) -> None:
    """Real certificates of one CA: one mapped to the admin principal, one to the trader,
    one to no principal. A token, when sent, decides over the certificate."""
    from xdc import certs
    from xdc.tls import Tls

    issued = certs.init(tmp_path / "tls", "t", ["n1"],
                        others=(("admin", "ops"), ("client", "trader"), ("client", "stranger")))
    principals = [
        {**PRINCIPALS[0], "cert": issued["ops"].identity.uri},   # admin
        {**PRINCIPALS[3], "cert": issued["trader"].identity.uri},  # trader
    ]
    cfg = auth.loads(auth.render(principals))

    def tls(name: str) -> Tls:
        return Tls.load(tmp_path / "tls" / "ca.pem", issued[name].cert, issued[name].key)

    async def body() -> None:
        server = StoreServer(StoreNode(tmp_path / "data"), "127.0.0.1:0", tls=tls("n1"),
                             auth=cfg)
        await server.start()
        try:
            async with StoreClient(server.address, tls=tls("ops"), timeout_s=5) as admin:
                r = await admin.append("exchange.g1.input", ev("AddSymbol"))  # admin's grant
                assert r.last_revision == 1
                assert len(await admin.read("$all")) == 1
            before = _state(server)
            async with StoreClient(server.address, tls=tls("trader"), timeout_s=5) as trader:
                assert (await trader.append("orders.1", ev())).last_revision == 1
                with pytest.raises(AppendError) as info:
                    await trader.append("other", ev())
                assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert "principal 'trader' may not append to stream 'other'" in info.value.message
            async with StoreClient(server.address, tls=tls("stranger"), timeout_s=5) as c:
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await c.read("orders.1")
                assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "certificate xdc://t/client/stranger is no principal's" in (
                    rpc.value.details() or "")
                with pytest.raises(AppendError) as info:
                    await c.append("orders.1", ev())
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            # The stranger's connection with the trader's token is the trader; the admin's
            # certificate with the trader's token is the trader too.
            for holder in ("stranger", "ops"):
                async with StoreClient(server.address, tls=tls(holder), timeout_s=5,
                                       token=TOKENS["trader"]) as c:
                    assert [e.stream for e in await c.read("orders.1")] == ["orders.1"]
                    with pytest.raises(grpc.aio.AioRpcError) as rpc:
                        await c.read("$all")
                    assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            position, streams = _state(server)
            assert position == before[0] + 1 and streams["orders.1"] == 1
        finally:
            await server.stop(grace_s=0.5)
    run(body)


# ---- the local cluster: auth on by default ---------------------------------------------------

def _tls_env(state: Any, name: str) -> dict[str, str]:
    d = Path(state.tls_dir)
    return {"XDC_TLS_CA": str(d / "ca.pem"), "XDC_TLS_CERT": str(d / f"{name}.pem"),
            "XDC_TLS_KEY": str(d / f"{name}-key.pem")}


def test_local_cluster_runs_with_auth_and_only_admins_switch_over(tmp_path: Path) -> None:
    """`xdc cluster up` defaults: TLS and an auth file whose principals are also the
    holders of the cluster's certificates."""
    from geo import launcher

    d = str(tmp_path / "cluster")
    state = launcher.up(d, regions=3, ttl_s=2)
    try:
        tokens = {r: state.token(r) for r in ("admin", "gateway", "engine", "trader")}
        assert all(tokens.values()) and len(set(tokens.values())) == 4
        for role in tokens:
            assert (Path(state.auth_dir, f"{role}.token").stat().st_mode & 0o777) == 0o600
        written = auth.load(state.auth_file)
        assert [(p.name, p.cert) for p in written.principals] == [
            ("admin", "xdc://xdc-local/admin/admin"), ("gateway", "xdc://xdc-local/gateway/gateway"),
            ("engine", "xdc://xdc-local/engine/engine"), ("trader", "xdc://xdc-local/client/trader")]
        assert tokens["admin"] not in Path(state.auth_file).read_text()  # hashes only

        leader, _ = asyncio.run(launcher.wait_leader(state))
        other = next(n for n in state.nodes if n.id != leader.id)
        status = _xdc("cluster", "status", "--dir", d)  # the launcher's admin certificate
        assert status.returncode == 0 and "leader (open)" in status.stdout, status.stderr
        assert f"client auth: on (principals in {state.auth_file}" in status.stdout
        r = _xdc("cluster", "switchover", "--dir", d, "--to", other.id,
                 "--token", tokens["trader"])  # the token decides: not an admin
        assert r.returncode == 1, r.stderr
        assert "PERMISSION_DENIED: principal 'trader' may not switch the cluster's leader " \
               "over" in r.stderr
        assert asyncio.run(launcher.wait_leader(state))[0].id == leader.id
        r = _xdc("cluster", "switchover", "--dir", d, "--to", other.id)
        assert r.returncode == 0, r.stderr
        assert asyncio.run(launcher.wait_leader(state))[0].id == other.id

        # The trader by its client certificate alone.
        target = ["--target", other.client]
        as_trader = _tls_env(state, "trader")
        r = _xdc("append", "exchange.g1.output", "T", "x", *target, token="", env=as_trader)
        assert r.returncode == 1 and "principal 'trader' may not append to stream " \
            "'exchange.g1.output'" in r.stderr, r.stderr
        r = _xdc("append", "orders.7", "T", "x", *target, token="", env=as_trader)
        assert r.returncode == 0, r.stderr
        r = _xdc("read", "$all", *target, token="", env=as_trader)
        assert r.returncode == 1 and "may not read '$all'" in r.stderr
        r = _xdc("tiers", "status", *target, "--json", token="",
                 env=_tls_env(state, "gateway"))
        assert r.returncode == 0 and json.loads(r.stdout)["node_id"] == other.id
    finally:
        launcher.down(d)


def test_insecure_local_cluster_authenticates_by_token(tmp_path: Path) -> None:
    """Without TLS, clients and the members themselves authenticate by token: the
    replication service refuses a caller without the member token (before, it took a
    forged promise of a huge term from anyone, which stalled every write for good)."""
    from geo import launcher
    from geo.replication.messages import Promise
    from geo.transport import encode
    from xdc.v1 import replication_pb2 as rpb
    from xdc.v1 import replication_pb2_grpc as rpb_grpc

    d = str(tmp_path / "cluster")
    state = launcher.up(d, regions=2, ttl_s=2, tls=False)
    try:
        assert not state.tls_dir and "cert" not in Path(state.auth_file).read_text()
        leader, _ = asyncio.run(launcher.wait_leader(state))  # with the admin token
        follower = next(n for n in state.nodes if n.id != leader.id)

        async def replicate(token: str) -> tuple[grpc.StatusCode, str]:
            """A Tip, then a forged Promise of a huge term, as `token`'s holder."""
            md = auth.bearer(token)
            async with grpc.aio.insecure_channel(follower.peer) as ch:
                stub = rpb_grpc.ReplicationStub(ch)
                try:
                    await stub.Tip(rpb.TipRequest(cluster=state.cluster, src=leader.id),
                                   timeout=5, metadata=md)
                    if token == state.token("peer"):
                        return grpc.StatusCode.OK, ""  # no forging with the real token
                    batch = rpb.PeerBatch(cluster=state.cluster, src=leader.id, messages=[
                        encode(Promise(src=leader.id, dst=follower.id, term=10**12))])
                    await stub.Stream(iter([batch]), timeout=5, metadata=md)
                    return grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or ""
        code, why = asyncio.run(replicate(""))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "no credentials" in why, why
        code, why = asyncio.run(replicate(state.token("trader")))
        assert code == grpc.StatusCode.PERMISSION_DENIED, why
        assert "principal 'trader' may not Tip: it needs the replicate operation" in why, why
        assert asyncio.run(replicate(state.token("peer")))[0] == grpc.StatusCode.OK
        status = _xdc("cluster", "status", "--dir", d)
        assert status.returncode == 0 and "leader (open)" in status.stdout, status.stderr
        target = ["--target", leader.client]
        r = _xdc("append", "orders.7", "T", "x", *target, token="")
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
        r = _xdc("append", "orders.7", "T", "x", *target, token=state.token("trader"))
        assert r.returncode == 0, r.stderr
        r = _xdc("tiers", "status", *target, token="")
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
        r = _xdc("cluster", "switchover", "--dir", d, "--to", follower.id, "--token",
                 state.token("gateway"))
        assert r.returncode == 1 and "principal 'gateway' may not switch" in r.stderr
        # The members replicate with their token: the append reaches the follower, and
        # the leader still leads (no forged term got through).
        asyncio.run(launcher.wait_converged(state, 15))
        assert asyncio.run(launcher.wait_leader(state))[0].id == leader.id
    finally:
        launcher.down(d)
