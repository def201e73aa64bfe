"""TLS and mutual TLS with real certificates (xdc/tls.py, xdc/certs.py): the store's
client API, and every refusal: plaintext, another CA, no client certificate, unusable
files."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from geo.config import ConfigError, etcd_access, load_tls, loads
from geo.etcd_server import EtcdError, EtcdTls, bootstrap_auth
from geo.leadership import EtcdAccess, Leadership, LeadershipError
from geo.node import ClusterNode
from geo.replication.messages import Promise
from geo.transport import PeerSender, ReplicationService, encode
from store.client import AppendError, StoreClient, new_event
from store.node import StoreNode
from store.process import ServeProcess
from store.server import StoreServer
from tests.support.cli import xdc_cli as _xdc
from tests.support.cluster import LocalCluster, cluster_toml
from tests.support.etcd import EtcdCluster
from tests.support.store import run, wait_until
from xdc import certs
from xdc.tls import Identity, Tls, TlsError, aio_channel, sync_channel
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import eventstore_pb2_grpc as pb_grpc
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import replication_pb2_grpc as rpb_grpc

CLUSTER = "t"
MEMBERS = ("us-east-1", "eu-west-1", "ap-south-1")


@dataclasses.dataclass(frozen=True)
class Pki:
    """One CA per test module (key generation is the slow part), a second CA that
    nobody trusts, and the certificates each issued."""

    dir: Path
    ca: certs.Authority
    issued: dict[str, certs.Issued]
    other_ca: certs.Authority
    other: dict[str, certs.Issued]

    def tls(self, name: str, *, require_client_cert: bool = True) -> Tls:
        i = self.issued[name]
        return Tls.load(self.ca.path, i.cert, i.key, require_client_cert=require_client_cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    base = tmp_path_factory.mktemp("pki")
    issued = certs.init(base / "ca", CLUSTER, MEMBERS)
    ca = certs.Authority.open(base / "ca")
    # A valid certificate of this CA that is no member's, and a member's name on a
    # certificate of a CA the cluster does not trust.
    issued["intruder"] = ca.issue(Identity(CLUSTER, "client", "intruder"))
    issued["other-cluster"] = ca.issue(Identity("elsewhere", "member", MEMBERS[0]),
                                       file_name="other-cluster")
    other = certs.init(base / "other", CLUSTER, MEMBERS)
    yield Pki(base / "ca", ca, issued, certs.Authority.open(base / "other"), other)


def test_certs_init_writes_private_keys_0600_and_identities(pki: Pki) -> None:
    for name, issued in pki.issued.items():
        mode = stat.S_IMODE(os.stat(issued.key).st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE(os.stat(pki.dir / "ca-key.pem").st_mode) == 0o600
    tls = pki.tls("us-east-1")
    assert tls.identity == Identity(CLUSTER, "member", "us-east-1")
    assert pki.tls("gateway").identity == Identity(CLUSTER, "gateway", "gateway")
    assert Identity.parse("xdc://t/member/a") == Identity("t", "member", "a")
    for bad in ("https://t/member/a", "xdc://t/king/a", "xdc://t/member", "xdc://t//a"):
        assert Identity.parse(bad) is None, bad


def test_unusable_material_is_refused_naming_file_and_problem(pki: Pki) -> None:
    a, b = pki.issued["us-east-1"], pki.issued["eu-west-1"]
    with pytest.raises(TlsError, match="is not the key of the certificate"):
        Tls.load(pki.ca.path, a.cert, b.key)
    with pytest.raises(TlsError, match="not signed by the CA"):
        Tls.load(pki.ca.path, pki.other["us-east-1"].cert, pki.other["us-east-1"].key)
    with pytest.raises(TlsError, match=r"missing\.pem: cannot read the certificate"):
        Tls.load(pki.ca.path, pki.dir / "missing.pem", a.key)
    with pytest.raises(TlsError, match="not a PEM certificate"):
        Tls.load(pki.ca.path, a.key, a.key)
    with pytest.raises(TlsError, match="not an unencrypted PEM private key"):
        Tls.load(pki.ca.path, a.cert, a.cert)
    with pytest.raises(TlsError, match="not a PEM CA certificate"):
        Tls.load(a.key, a.cert, a.key)


def test_certs_init_refuses_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeated, reserved or not plain"):
        certs.init(tmp_path, CLUSTER, ["a", "a"])
    with pytest.raises(ValueError, match="repeated, reserved or not plain"):
        certs.init(tmp_path, CLUSTER, ["a"], others=[("admin", "a b")])
    with pytest.raises(ValueError, match="role 'king'"):
        certs.init(tmp_path, CLUSTER, ["a"], others=[("king", "k")])
    assert not (tmp_path / "ca.pem").exists()  # nothing written on refusal


async def _append(address: str, tls: Tls | None) -> pb.AppendResponse:
    async with StoreClient(address, tls=tls, timeout_s=2.0, attempt_timeout_s=1.0) as client:
        return await client.append("orders", new_event("Placed", b"x"))


async def _node_info(address: str, tls: Tls | None, **kw: str) -> pb.NodeInfoResponse:
    async with aio_channel(address, tls, **kw) as ch:
        return await pb_grpc.EventStoreStub(ch).NodeInfo(pb.NodeInfoRequest(), timeout=2)


def test_store_over_tls_and_every_refused_client(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        server = StoreServer(StoreNode(tmp_path / "n"), "127.0.0.1:0",
                             tls=pki.tls("us-east-1"))
        await server.start()
        try:
            r = await _append(server.address, pki.tls("engine"))
            assert r.first_position == 1
            # Plaintext against a TLS port: the handshake fails, nothing is written.
            with pytest.raises(grpc.aio.AioRpcError) as plain:
                await _node_info(server.address, None)
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
            # A client that trusts another CA refuses the server's certificate.
            stranger = Tls.load(pki.other_ca.path, pki.other["admin"].cert,
                                pki.other["admin"].key)
            with pytest.raises(grpc.aio.AioRpcError) as other_ca:
                await _node_info(server.address, stranger)
            assert other_ca.value.code() == grpc.StatusCode.UNAVAILABLE
            # A client presenting no certificate: the port demands one.
            anonymous = dataclasses.replace(pki.tls("admin"), cert=b"", key=b"")
            with pytest.raises(grpc.aio.AioRpcError) as no_cert:
                await _node_info(server.address, anonymous)
            assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
            # A client certificate from another CA: refused by the server.
            mixed = dataclasses.replace(stranger, ca=pki.tls("admin").ca)
            with pytest.raises(grpc.aio.AioRpcError) as foreign:
                await _node_info(server.address, mixed)
            assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE
            # A server name the certificate does not carry: hostname check fails.
            with pytest.raises(grpc.aio.AioRpcError) as wrong_name:
                await _node_info(server.address, pki.tls("admin"), server_name="eu-west-1")
            assert "Hostname Verification" in (wrong_name.value.details() or "")
            with pytest.raises(AppendError):
                await _append(server.address, None)
            info = await _node_info(server.address, pki.tls("admin"),
                                    server_name="us-east-1")
            assert info.commit_position == 1  # none of the refused appends landed
        finally:
            await server.stop(0.5)
    run(body)


def test_client_certificates_optional_on_the_client_port(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        server_tls = pki.tls("us-east-1", require_client_cert=False)
        server = StoreServer(StoreNode(tmp_path / "n"), "127.0.0.1:0", tls=server_tls)
        await server.start()
        try:
            anonymous = dataclasses.replace(pki.tls("admin"), cert=b"", key=b"")
            assert (await _node_info(server.address, anonymous)).commit_position == 0
            with pytest.raises(grpc.aio.AioRpcError):
                await _node_info(server.address, None)  # TLS all the same
        finally:
            await server.stop(0.5)
    run(body)


def test_cli_certs_init_serve_and_clients_over_tls(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    out = _xdc("certs", "init", "--dir", str(d), "--cluster", "c", "--members", "n1")
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)["certificates"]
    assert made["n1"]["identity"] == "xdc://c/member/n1" and set(made) == {
        "n1", "engine", "gateway", "admin", "etcd"}
    again = _xdc("certs", "init", "--dir", str(d), "--cluster", "c", "--members", "n1")
    assert again.returncode == 1 and "already holds a CA" in again.stderr

    def tls_args(name: str) -> list[str]:
        return ["--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / f"{name}.pem"),
                "--tls-key", str(d / f"{name}-key.pem")]

    with ServeProcess(str(tmp_path / "data"), args=tls_args("n1")) as node:
        t = ("--target", node.address)
        ok = _xdc("append", "s", "T", "x", *t, *tls_args("admin"))
        assert ok.returncode == 0, ok.stderr
        plain = _xdc("read", "s", *t)
        assert plain.returncode != 0
        half = _xdc("read", "s", *t, "--tls-ca", str(d / "ca.pem"))
        assert half.returncode == 2 and "--tls-cert, --tls-key missing" in half.stderr
        read = _xdc("read", "s", *t, *tls_args("admin"))
        assert [json.loads(line)["data"] for line in read.stdout.splitlines()] == ["x"]
    bad = _xdc("serve", "--data", str(tmp_path / "x"), "--listen", "127.0.0.1:0",
               "--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / "n1.pem"),
               "--tls-key", str(d / "admin-key.pem"))
    assert bad.returncode == 2 and "is not the key of the certificate" in bad.stderr


def _server_names(cert: Path) -> set[str]:
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName),
            *map(str, san.get_values_for_type(x509.IPAddress))}


def test_cli_certs_init_per_host_server_names(tmp_path: Path) -> None:
    """Real hosts: each certificate names its own host's address (--san), and a client
    dialling that address accepts that certificate and no other."""
    d = tmp_path / "tls"
    names = ("--cluster", "c", "--members", "n1,n2", "--engines", "e1", "--gateways", "e1-gw",
             "--etcd", "etcd-a", "--admins", "admin", "--clients", "desk-1")
    for bad, why in ((["--san", "nobody=10.0.0.1"], "no such certificate"),
                     (["--san", "n1="], "expected NAME=HOST"),
                     (["--san", "n1=10.0.0.1,bad_host!"], "neither an IP address"),
                     (["--engines", "n1-key"], "not ending in '-key'")):
        out = _xdc("certs", "init", "--dir", str(d), *names, *bad)
        assert out.returncode == 2 and why in out.stderr, (bad, out.stderr)
        assert not d.exists()  # nothing written on refusal
    def tls(name: str) -> Tls:
        return Tls.load(d / "ca.pem", d / f"{name}.pem", d / f"{name}-key.pem")

    out = _xdc("certs", "init", "--dir", str(d), *names, "--hosts", "",
               "--san", "n1=127.0.0.2,n1.xdc.internal", "--san", "n2=127.0.0.3",
               "--san", "e1=10.40.2.50", "--san", "e1-gw=10.40.2.50")
    assert out.returncode == 0, out.stderr
    assert _server_names(d / "n1.pem") == {"n1", "n1.xdc.internal", "127.0.0.2"}
    assert _server_names(d / "n2.pem") == {"n2", "127.0.0.3"}
    assert _server_names(d / "e1.pem") == {"e1", "10.40.2.50"}
    assert _server_names(d / "e1-gw.pem") == {"e1-gw", "10.40.2.50"}
    assert _server_names(d / "admin.pem") == {"admin"}  # --hosts "": no loopback names
    assert tls("desk-1").identity == Identity("c", "client", "desk-1")

    async def body() -> None:
        for holder, ok in (("n1", True), ("n2", False)):
            server = StoreServer(StoreNode(tmp_path / holder), "127.0.0.2:0", tls=tls(holder))
            await server.start()
            try:
                if ok:
                    assert (await _node_info(server.address, tls("admin"))).commit_position == 0
                else:  # n2's certificate does not name 127.0.0.2
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await _node_info(server.address, tls("admin"))
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await server.stop(0.5)
    run(body)


# ---- replication: mutual TLS between members -------------------------------------------

async def _replicate_as(address: str, tls: Tls | None, src: str, dst: str, *,
                        cluster: str = CLUSTER, server_name: str = "") -> rpb.StreamSummary:
    """Sends a Promise of a huge term (accepted, it would fence the whole cluster)."""
    batch = rpb.PeerBatch(cluster=cluster, src=src,
                          messages=[encode(Promise(src=src, dst=dst, term=10**12))])
    async with aio_channel(address, tls, server_name=server_name) as ch:
        return await rpb_grpc.ReplicationStub(ch).Stream(iter([batch]), timeout=5)


def test_tls_cluster_replicates_and_refuses_every_non_member(
        pki: Pki, etcd: EtcdCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cluster = LocalCluster.make(etcd.endpoints, tmp_path, tls_dir=pki.dir)
    admin = pki.tls("admin")

    async def body() -> None:
        await cluster.start()
        try:
            leader = await cluster.leader()
            async with StoreClient(cluster.client_targets(), tls=pki.tls("engine"),
                                   timeout_s=15) as client:
                for i in range(20):
                    await client.append("orders", new_event("Placed", str(i).encode()))
            upto = await cluster.converged()
            assert upto >= 20
            follower = next(n for n in cluster.nodes.values() if n is not leader)
            promised = follower.store.log.promised_term if follower.store.log else 0
            peer = follower.member.peer

            async def refused(tls: Tls | None, src: str, **kw: str) -> grpc.aio.AioRpcError:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _replicate_as(peer, tls, src, follower.id, **kw)
                return err.value

            # Valid certificates of the cluster's CA that are not a member's.
            for name in ("intruder", "gateway", "admin"):
                err = await refused(pki.tls(name), leader.id)
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
                assert f"replication refused: {pki.tls(name).identity}" in (err.details() or "")
            # A member of another cluster, signed by the same CA.
            err = await refused(pki.tls("other-cluster"), leader.id)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "of cluster 'elsewhere'" in (err.details() or "")
            # A member speaking as another member.
            third = next(n for n in cluster.nodes.values() if n not in (leader, follower))
            err = await refused(pki.tls(third.id), leader.id)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"cannot speak as member '{leader.id}'" in (err.details() or "")
            # A certificate of another CA, and plaintext: no handshake at all.
            stranger = dataclasses.replace(
                pki.tls(leader.id), cert=pki.other[leader.id].cert.read_bytes(),
                key=pki.other[leader.id].key.read_bytes())
            assert (await refused(stranger, leader.id)).code() == grpc.StatusCode.UNAVAILABLE
            assert (await refused(None, leader.id)).code() == grpc.StatusCode.UNAVAILABLE
            # None of it reached the follower's replication machine.
            assert follower.store.log is not None
            assert follower.store.log.promised_term == promised < 10**12
            # Tip (the pre-vote) is replication too; Status is for any holder of a
            # cluster certificate; Switchover only for operators.
            async with aio_channel(peer, pki.tls("gateway")) as ch:
                stub = rpb_grpc.ReplicationStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as tip:
                    await stub.Tip(rpb.TipRequest(cluster=CLUSTER, src=leader.id), timeout=5)
                assert tip.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert (await stub.Status(rpb.StatusRequest(), timeout=5)).node_id == follower.id
                with pytest.raises(grpc.aio.AioRpcError) as sw:
                    await stub.Switchover(rpb.SwitchoverRequest(target=follower.id), timeout=5)
                assert sw.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "Switchover refused" in (sw.value.details() or "")
            # The client port demands a certificate too: a client's one reaches only
            # what clients may call.
            async with aio_channel(leader.address, admin) as ch:
                st = await rpb_grpc.ReplicationStub(ch).Status(rpb.StatusRequest(), timeout=5)
                assert st.role == "leader" and st.commit_position >= upto

            # A leader reaching "a follower" whose certificate names another member
            # refuses it: the handshake fails, nothing is sent, the log says why.
            caplog.set_level(logging.WARNING, logger="xdc.transport")
            sender = PeerSender(CLUSTER, leader.id, "ghost", peer, pki.tls(leader.id))
            sender.start()
            try:
                sender.send(Promise(src=leader.id, dst="ghost", term=10**12))
                await wait_until(lambda: any("Hostname Verification" in r.getMessage()
                                             for r in caplog.records), 10,
                                 "the sender's refusal")
                assert sender.sent == 0 and follower.store.log.promised_term == promised
            finally:
                await sender.stop()
        finally:
            await cluster.stop()
    run(body, 90)


def test_replication_without_a_client_certificate_is_unauthenticated(
        pki: Pki, tmp_path: Path) -> None:
    """A client port with `client_certs = false` lets callers in without a certificate;
    the replication service still refuses them, naming why."""
    delivered: list[object] = []

    def tip() -> rpb.TipResponse:
        return rpb.TipResponse(node_id="us-east-1")

    async def status() -> rpb.NodeStatus:
        return rpb.NodeStatus(node_id="us-east-1")

    async def switchover(target: str, timeout_s: float) -> rpb.SwitchoverResponse:
        raise AssertionError("never reached")

    def add(server: grpc.aio.Server) -> None:
        rpb_grpc.add_ReplicationServicer_to_server(ReplicationService(
            CLUSTER, "us-east-1", set(MEMBERS), delivered.extend, tip, status, switchover,
            secure=True), server)

    async def body() -> None:
        server = StoreServer(StoreNode(tmp_path / "n"), "127.0.0.1:0", add_services=add,
                             tls=pki.tls("us-east-1", require_client_cert=False))
        await server.start()
        try:
            anonymous = dataclasses.replace(pki.tls("admin"), cert=b"", key=b"")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _replicate_as(server.address, anonymous, "eu-west-1", "us-east-1")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "without a client certificate" in (err.value.details() or "")
            async with aio_channel(server.address, anonymous) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as st:
                    await rpb_grpc.ReplicationStub(ch).Status(rpb.StatusRequest(), timeout=5)
                assert st.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert delivered == []
        finally:
            await server.stop(0.5)
    run(body)


def test_config_tls_errors_name_the_key(pki: Pki, tmp_path: Path) -> None:
    text = cluster_toml(CLUSTER, ["127.0.0.1:2379"], ["us-east"], tmp_path, tls_dir=pki.dir)
    cfg = loads(text, tmp_path)
    assert cfg.tls is not None and cfg.members[0].cert == pki.dir / "us-east-1.pem"
    assert load_tls(cfg, "us-east-1").identity == Identity(CLUSTER, "member", "us-east-1")
    with pytest.raises(ConfigError, match=r"tls\.cert: no certificate for this program"):
        load_tls(cfg)
    swapped = text.replace("us-east-1-key.pem", "admin-key.pem")
    with pytest.raises(ConfigError, match=r"member\[0\]: .*is not the key of the certificate"):
        ClusterNode(loads(swapped, tmp_path), "us-east-1")
    no_cert = text.replace(f'cert = "{pki.dir}/us-east-1.pem"\n', "")
    with pytest.raises(ConfigError, match=r"member\[0\]\.cert: is required with member\[0\]"):
        loads(no_cert, tmp_path)
    bare = "\n".join(line for line in text.splitlines()
                     if not line.startswith(("cert =", "key =")))
    with pytest.raises(ConfigError, match="member 'us-east-1' has no TLS certificate"):
        loads(bare, tmp_path)
    no_tls = text[:text.index("[tls]")]
    with pytest.raises(ConfigError, match="needs a \\[tls\\] table"):
        loads(no_tls, tmp_path)


# ---- engines, gateway and their command lines over mutual TLS --------------------------

def test_engine_gateway_and_clis_over_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    def tls_args(name: str) -> list[str]:
        i = pki.issued[name]
        return ["--tls-ca", str(pki.ca.path), "--tls-cert", str(i.cert), "--tls-key",
                str(i.key)]

    exchange = tmp_path / "exchange.toml"
    exchange.write_text(_xdc("exchange", "example").stdout)
    (tmp_path / "leases").mkdir()
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(ServeProcess(str(tmp_path / "store"),
                                                 args=tls_args("us-east-1")))
        init = _xdc("exchange", "init", "--store", store.address, "--exchange", str(exchange),
                    *tls_args("admin"))
        assert init.returncode == 0, init.stderr
        engine = stack.enter_context(ServeProcess(command=[
            "engine", "run", "--store", store.address, "--group", "crypto", "--instance", "a",
            "--lease", f"file:{tmp_path / 'leases'}", *tls_args("engine")]))
        gateway = stack.enter_context(ServeProcess(command=[
            "gateway", "--store", store.address, "--listen", "127.0.0.1:0", "--exchange",
            str(exchange), *tls_args("gateway")]))
        order = ["order", "submit", "--gateway", gateway.address, "--symbol", "BTC-USD",
                 "--account", "bob", "--client-order-id", "o-1", "--side", "sell", "--qty",
                 "1", "--price", "50000", "--wait", "--timeout-ms", "20000", "--deadline", "30"]
        plain = _xdc(*order)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
        ok = _xdc(*order, *tls_args("admin"))
        assert ok.returncode == 0, ok.stderr
        answer = json.loads(ok.stdout)
        assert answer["input_position"] > 0 and answer["reports"], answer  # the engine ran
        status = _xdc("engine", "status", "--engine", engine.address, *tls_args("admin"))
        assert status.returncode == 0, status.stdout
        assert json.loads(status.stdout)["input_position"] >= answer["input_position"]
        refused = _xdc("engine", "status", "--engine", engine.address)
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stdout
        tiers = _xdc("tiers", "status", "--target", store.address, *tls_args("admin"))
        assert tiers.returncode == 0, tiers.stderr
        # --tls-client-auth none: traders reach the gateway over TLS without a client
        # certificate (they prove who they are with tokens); the default demands one.
        open_gateway = stack.enter_context(ServeProcess(command=[
            "gateway", "--store", store.address, "--listen", "127.0.0.1:0", "--exchange",
            str(exchange), *tls_args("gateway"), "--tls-client-auth", "none"]))
        anonymous = dataclasses.replace(pki.tls("admin"), cert=b"", key=b"")
        for address, answers in ((open_gateway.address, True), (gateway.address, False)):
            with sync_channel(address, anonymous) as ch:
                check = health_pb2_grpc.HealthStub(ch).Check
                if answers:
                    assert check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                        health_pb2.HealthCheckResponse.SERVING
                else:
                    with pytest.raises(grpc.RpcError) as refused_tls:
                        check(health_pb2.HealthCheckRequest(), timeout=10)
                    assert refused_tls.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- etcd with TLS and authentication --------------------------------------------------

def test_etcd_tls_and_auth_confine_the_node_user_to_its_prefix(pki: Pki,
                                                               tmp_path: Path) -> None:
    ca = pki.ca.path
    server = EtcdTls(ca, pki.issued["etcd"].cert, pki.issued["etcd"].key)
    client = EtcdTls(ca, pki.issued["admin"].cert, pki.issued["admin"].key)
    etcd = EtcdCluster(tmp_path / "etcd", tls=server).start()

    def lead(cluster: str, access: EtcdAccess) -> Leadership:
        return Leadership(etcd.endpoints, cluster, "n1", {"id": "n1"}, 2,
                          on_lost=lambda reason: None, access=access)

    async def body() -> None:
        etcd.enable_auth(CLUSTER, "t-node", "s3cret", "r00t")
        ok = lead(CLUSTER, EtcdAccess(client, "t-node", "s3cret"))
        outside = lead("other", EtcdAccess(client, "t-node", "s3cret"))
        wrong = lead(CLUSTER, EtcdAccess(client, "t-node", "guess"))
        anonymous = lead(CLUSTER, EtcdAccess(EtcdTls(ca), "t-node", "s3cret"))
        no_user = lead(CLUSTER, EtcdAccess(client))
        try:
            term = await ok.campaign()
            assert term is not None and (await ok.current()) == ({"id": "n1"}, term)
            # Neither write nor read outside /t/.
            with pytest.raises(LeadershipError, match="permission denied"):
                await outside.campaign()
            with pytest.raises(LeadershipError, match="permission denied"):
                await outside.current()
            with pytest.raises(LeadershipError, match="authentication failed"):
                await wrong.current()
            with pytest.raises(LeadershipError):  # no client certificate: no connection
                await anonymous.current()
            # A certificate alone is no etcd user (its common name is not one).
            with pytest.raises(LeadershipError, match="permission denied"):
                await no_user.current()
            # Tokens live in etcd's memory: a restart invalidates every one; the client
            # authenticates again by itself.
            token = ok._etcd.tokens[0]
            assert token is not None
            before = token.value
            await ok.resign()
            await asyncio.to_thread(etcd.restart)

            async def answers() -> bool:
                try:
                    return await ok.current() is None
                except LeadershipError:
                    return False
            await wait_until(answers, 20, "etcd answering the node user after a restart")
            assert token.value and token.value != before
            assert etcd.members[0].healthy()  # /health over https with a certificate
        finally:
            for x in (ok, outside, wrong, anonymous, no_user):
                await x.close()
    try:
        run(body, 60)
    finally:
        etcd.stop()


def test_etcd_config_keys_and_password_file(pki: Pki, tmp_path: Path) -> None:
    base = cluster_toml(CLUSTER, ["127.0.0.1:2379"], ["us-east"], tmp_path, tls_dir=pki.dir)
    etcd_keys = (f'ca = "{pki.ca.path}"\ncert = "{pki.issued["admin"].cert}"\n'
                 f'key = "{pki.issued["admin"].key}"\nuser = "t-node"\n'
                 'password_file = "etcd.password"\n')
    text = base.replace("[[region]]", etcd_keys + "[[region]]", 1)
    (tmp_path / "etcd.password").write_text("s3cret\n")
    access = etcd_access(loads(text, tmp_path))
    assert access.user == "t-node" and access.password == "s3cret"
    assert access.tls is not None and access.tls.cert == pki.issued["admin"].cert
    assert "s3cret" not in repr(access)
    (tmp_path / "etcd.password").write_text("")
    with pytest.raises(ConfigError, match=r"etcd\.password_file: .*first line"):
        etcd_access(loads(text, tmp_path))
    (tmp_path / "etcd.password").unlink()
    with pytest.raises(ConfigError, match=r"etcd\.password_file: .*No such file"):
        etcd_access(loads(text, tmp_path))
    no_ca = text.replace(f'ca = "{pki.ca.path}"\n', "", 1)
    with pytest.raises(ConfigError, match=r"etcd\.ca: is required with etcd\.cert or etcd\.user"):
        loads(no_ca, tmp_path)
    no_password = text.replace('password_file = "etcd.password"\n', "")
    with pytest.raises(ConfigError, match=r"etcd\.user and etcd\.password_file go together"):
        loads(no_password, tmp_path)


def test_etcd_bootstrap_auth_is_idempotent_and_the_cli_runs_it(pki: Pki,
                                                               tmp_path: Path) -> None:
    """What the Terraform deployment runs at every boot of its first etcd member: the
    first run enables authentication, later runs change nothing, a rotated node password
    is set, a wrong root password changes nothing."""
    ca = pki.ca.path
    server = EtcdTls(ca, pki.issued["etcd"].cert, pki.issued["etcd"].key)
    client = EtcdTls(ca, pki.issued["admin"].cert, pki.issued["admin"].key)
    etcd = EtcdCluster(tmp_path / "etcd", tls=server).start()

    def bootstrap(password: str, root: str = "r00t") -> list[str]:
        return bootstrap_auth(etcd.endpoints, client, CLUSTER, "t-node", password, root)

    async def answers(password: str) -> bool:
        lead = Leadership(etcd.endpoints, CLUSTER, "n1", {"id": "n1"}, 2,
                          on_lost=lambda reason: None,
                          access=EtcdAccess(client, "t-node", password))
        try:
            return await lead.current() is None
        except LeadershipError as exc:
            assert "authentication failed" in str(exc)
            return False
        finally:
            await lead.close()

    try:
        first = bootstrap("s3cret")
        assert first == ["add user root", "add role root", f"add role {CLUSTER}",
                         "add user t-node", "enable authentication"]
        assert bootstrap("s3cret") == []
        assert run(lambda: answers("s3cret"), 30)
        assert bootstrap("rotated") == ["set the password of t-node"]
        assert run(lambda: answers("rotated"), 30) and not run(lambda: answers("s3cret"), 30)
        with pytest.raises(EtcdError, match="refuses the root password"):
            bootstrap("other", root="guess")
        assert run(lambda: answers("rotated"), 30)  # nothing changed

        base = cluster_toml(CLUSTER, etcd.endpoints, ["us-east"], tmp_path, tls_dir=pki.dir)
        etcd_keys = (f'ca = "{ca}"\ncert = "{pki.issued["admin"].cert}"\n'
                     f'key = "{pki.issued["admin"].key}"\nuser = "t-node"\n'
                     'password_file = "node.password"\n')
        (tmp_path / "cluster.toml").write_text(
            base.replace("[[region]]", etcd_keys + "[[region]]", 1))
        (tmp_path / "node.password").write_text("rotated\n")
        (tmp_path / "root.password").write_text("r00t\n")
        cli = ("etcd", "bootstrap-auth", "--config", str(tmp_path / "cluster.toml"),
               "--wait", "10", "--root-password-file")
        out = _xdc(*cli, str(tmp_path / "root.password"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"cluster": CLUSTER, "user": "t-node", "done": []}
        (tmp_path / "root.password").write_text("guess\n")
        out = _xdc(*cli, str(tmp_path / "root.password"))
        assert out.returncode == 1 and "refuses the root password" in out.stderr
        out = _xdc(*cli, str(tmp_path / "missing.password"))
        assert out.returncode == 2 and "--root-password-file" in out.stderr
        (tmp_path / "cluster.toml").write_text(base)  # no [etcd] user: nothing to bootstrap
        out = _xdc(*cli, str(tmp_path / "root.password"))
        assert out.returncode == 2 and "[etcd] needs ca, cert, key, user" in out.stderr
    finally:
        etcd.stop()
