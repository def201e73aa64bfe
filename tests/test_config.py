"""geo.config: the cluster TOML file, its validation, and the etcd reachability check."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from geo import config
from geo.config import ClusterConfig, ConfigError, check_etcd, check_files, load, loads
from tests.support.etcd import EtcdCluster

VALID = """\
cluster = "xdc-demo"
failover = "automatic"
lease_ttl_s = 3
tiers_file = "tiers.toml"

[etcd]
endpoints = ["10.0.0.5:2379", "10.1.0.5:2379", "10.2.0.5:2379"]

[[region]]
name = "us-east"
[[region]]
name = "us-west"
[[region]]
name = "eu-west"

[[member]]
id = "use1-a"
region = "us-east"
client = "10.0.1.10:7000"
peer = "10.0.1.10:7100"
voter = true
data_dir = "/var/lib/xdc"

[[member]]
id = "usw2-a"
region = "us-west"
client = "10.1.1.10:7000"
peer = "10.1.1.10:7100"
voter = true

[[member]]
id = "euw1-a"
region = "eu-west"
client = "10.2.1.10:7000"
peer = "10.2.1.10:7100"
voter = true

[[member]]
id = "use1-dr"
region = "us-east"
client = "10.0.2.10:7000"
peer = "10.0.2.10:7100"
voter = false

[tls]
ca = "tls/ca.pem"
cert = "tls/node.pem"
key = "/etc/xdc/tls/node-key.pem"
"""

MINIMAL = """\
cluster = "c"
[etcd]
endpoints = ["127.0.0.1:2379"]
[[region]]
name = "r"
[[member]]
id = "m"
region = "r"
client = "127.0.0.1:7000"
peer = "127.0.0.1:7100"
voter = true
"""


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        loads(text, "/etc/xdc", source="cluster.toml")
    assert str(info.value).startswith("cluster.toml: ")  # every line names the file
    return list(info.value.problems)


def assert_problem(text: str, key: str, *words: str) -> None:
    found = problems(text)
    for k, what in found:
        if k == key and all(w in what for w in words):
            return
    pytest.fail(f"no problem at {key!r} mentioning {words}; got {found}")


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# --- a valid file ---------------------------------------------------------------------------


def test_valid_file_loads_into_frozen_dataclasses(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(VALID)
    cfg = load(path)
    assert isinstance(cfg, ClusterConfig)
    assert cfg.cluster == "xdc-demo"
    assert cfg.etcd_prefix == "/xdc-demo/"
    assert cfg.failover == "automatic"
    assert cfg.lease_ttl_s == 3
    assert cfg.tiers_file == tmp_path / "tiers.toml"  # relative to the config file
    assert cfg.etcd.endpoints == ("10.0.0.5:2379", "10.1.0.5:2379", "10.2.0.5:2379")
    assert [r.name for r in cfg.regions] == ["us-east", "us-west", "eu-west"]
    assert [m.id for m in cfg.voters] == ["use1-a", "usw2-a", "euw1-a"]
    assert [m.id for m in cfg.standbys] == ["use1-dr"]
    assert cfg.quorum == 2
    east = cfg.member("use1-a")
    assert (east.region, east.client, east.peer, east.voter) == (
        "us-east", "10.0.1.10:7000", "10.0.1.10:7100", True)
    assert east.data_dir == Path("/var/lib/xdc")
    assert cfg.member("usw2-a").data_dir is None
    assert [m.id for m in cfg.members_in("us-east")] == ["use1-a", "use1-dr"]
    assert cfg.tls is not None
    assert cfg.tls.ca == tmp_path / "tls" / "ca.pem"
    assert cfg.tls.key == Path("/etc/xdc/tls/node-key.pem")  # absolute stays absolute
    assert cfg.source == str(path)
    assert cfg.warnings == ()
    with pytest.raises(AttributeError):
        cfg.cluster = "other"  # type: ignore[misc]
    with pytest.raises(KeyError):
        cfg.member("nobody")


def test_defaults_for_optional_keys() -> None:
    cfg = loads(MINIMAL)
    assert cfg.failover == "manual"  # new systems start manual
    assert cfg.lease_ttl_s == 2
    assert cfg.tiers_file is None
    assert cfg.tls is None


def test_ipv6_and_hostnames_are_accepted() -> None:
    text = edit(MINIMAL, '"127.0.0.1:7000"', '"[::1]:7000"')
    text = edit(text, '"127.0.0.1:7100"', '"node-1.internal.example:7100"')
    cfg = loads(text)
    assert cfg.members[0].client == "[::1]:7000"
    assert config.split_hostport("[::1]:7000") == ("::1", 7000)


# --- errors ---------------------------------------------------------------------------------


def test_unreadable_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    assert_problem("cluster = \n", "", "invalid TOML")


@pytest.mark.parametrize(
    ("old", "new", "key", "hint"),
    [
        ('failover = "automatic"', 'failovr = "automatic"', "failovr", "'failover'"),
        ('endpoints = [', 'endpoint = [', "etcd.endpoint", "'endpoints'"),
        ('name = "us-west"', 'name = "us-west"\nzone = "a"', "region[1].zone", ""),
        ('voter = false', 'voter = false\nvoting = false', "member[3].voting", ""),
        ('ca = "tls/ca.pem"', 'cacert = "tls/ca.pem"', "tls.cacert", ""),
    ],
)
def test_unknown_keys_are_rejected(old: str, new: str, key: str, hint: str) -> None:
    assert_problem(edit(VALID, old, new), key, "unknown key", hint)


def test_duplicate_member_id() -> None:
    text = edit(VALID, 'id = "use1-dr"', 'id = "use1-a"')
    assert_problem(text, "member[3].id", "duplicate member id 'use1-a'", "member[0]")


@pytest.mark.parametrize(
    ("old", "new", "key", "other"),
    [
        ('client = "10.1.1.10:7000"', 'client = "10.0.1.10:7000"', "member[1].client",
         "member[0].client"),
        ('peer = "10.2.1.10:7100"', 'peer = "10.0.1.10:7000"', "member[2].peer",
         "member[0].client"),
        ('peer = "10.0.1.10:7100"', 'peer = "10.0.1.10:7000"', "member[0].peer",
         "member[0].client"),
        ('client = "10.2.1.10:7000"', 'client = "10.0.0.5:2379"', "member[2].client",
         "etcd.endpoints[0]"),
    ],
)
def test_duplicate_addresses(old: str, new: str, key: str, other: str) -> None:
    assert_problem(edit(VALID, old, new), key, "already used by", other)


def test_duplicate_etcd_endpoint_and_region() -> None:
    assert_problem(edit(VALID, '"10.1.0.5:2379"', '"10.0.0.5:2379"'), "etcd.endpoints[1]",
                   "duplicate endpoint")
    assert_problem(edit(VALID, 'name = "eu-west"', 'name = "us-east"'), "region[2].name",
                   "duplicate region")


def test_unknown_region() -> None:
    text = edit(VALID, 'region = "eu-west"', 'region = "eu-central"')
    assert_problem(text, "member[2].region", "unknown region 'eu-central'", "us-east")


def test_zero_voters_is_an_error() -> None:
    text = MINIMAL.replace("voter = true", "voter = false")
    assert_problem(text, "member", "no voter")


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("10.0.1.10:0", ("out of range",)),
        ("10.0.1.10:65536", ("out of range",)),
        ("10.0.1.10:http", ("not a number",)),
        ("10.0.1.10", ("host:port",)),
        (":7000", ("host:port",)),
        ("http://10.0.1.10:7000", ("without a scheme",)),
        ("::1:7000", ("[addr]:port",)),
        ("[zz]:7000", ("IPv6",)),
        ("bad_host!:7000", ("not a valid host",)),
    ],
)
def test_bad_addresses(address: str, words: tuple[str, ...]) -> None:
    text = edit(VALID, 'client = "10.0.1.10:7000"', f'client = "{address}"')
    assert_problem(text, "member[0].client", *words)


def test_bad_etcd_endpoints() -> None:
    assert_problem(edit(VALID, '"10.1.0.5:2379"', '"10.1.0.5:99999"'), "etcd.endpoints[1]",
                   "out of range")
    assert_problem(edit(VALID, '["10.0.0.5:2379", "10.1.0.5:2379", "10.2.0.5:2379"]', "[]"),
                   "etcd.endpoints", "at least one")
    assert_problem(VALID.replace("[etcd]\n", "").replace(
        'endpoints = ["10.0.0.5:2379", "10.1.0.5:2379", "10.2.0.5:2379"]\n', ""),
        "etcd", "required")


@pytest.mark.parametrize("value", ['"auto"', '"Manual"', "true"])
def test_bad_failover(value: str) -> None:
    found = problems(edit(VALID, 'failover = "automatic"', f"failover = {value}"))
    assert [k for k, _ in found] == ["failover"]


@pytest.mark.parametrize(
    ("value", "words"),
    [("0", (">= 1",)), ("-2", (">= 1",)), ("1.5", ("integer",)), ('"2"', ("integer",)),
     ("true", ("integer", "boolean"))],
)
def test_bad_lease_ttl(value: str, words: tuple[str, ...]) -> None:
    assert_problem(edit(VALID, "lease_ttl_s = 3", f"lease_ttl_s = {value}"), "lease_ttl_s",
                   *words)


def test_types_and_required_keys() -> None:
    assert_problem(edit(VALID, "voter = false", 'voter = "no"'), "member[3].voter",
                   "true or false")
    assert_problem(edit(VALID, 'peer = "10.1.1.10:7100"\n', ""), "member[1].peer", "required")
    assert_problem(edit(VALID, 'cluster = "xdc-demo"', 'cluster = "xdc/demo"'), "cluster",
                   "letters")
    assert_problem(edit(VALID, 'ca = "tls/ca.pem"\n', ""), "tls.ca", "required")
    assert_problem(MINIMAL.replace('[[region]]\nname = "r"\n', ""), "region", "required")
    assert_problem(MINIMAL.replace("[[member]]", "[member]"), "member", "array of tables")


def test_every_problem_is_reported_at_once() -> None:
    text = edit(VALID, 'failover = "automatic"', 'failover = "sometimes"')
    text = edit(text, "lease_ttl_s = 3", "lease_ttl_s = 0")
    text = edit(text, 'region = "eu-west"', 'region = "mars"')
    keys = [k for k, _ in problems(text)]
    assert keys == ["failover", "lease_ttl_s", "member[2].region"]


# --- warnings -------------------------------------------------------------------------------


def test_auth_without_tls_needs_a_member_token() -> None:
    """With client auth but no TLS, members must authenticate to each other
    (peer_token_file): else anyone reaching a peer port could forge replication
    messages (a promise of a huge term stalls every write for good). With TLS the member
    certificates do, and a member token is refused as meaningless."""
    auth = MINIMAL.replace('cluster = "c"', 'cluster = "c"\nauth_file = "auth.toml"')
    assert_problem(auth, "peer_token_file", "required with auth_file and no [tls]")
    ok = loads(auth.replace('auth_file = "auth.toml"',
                            'auth_file = "auth.toml"\npeer_token_file = "peer.token"'), "/etc/xdc")
    assert ok.peer_token_file == Path("/etc/xdc/peer.token")
    assert_problem(VALID.replace('tiers_file = "tiers.toml"',
                                 'tiers_file = "tiers.toml"\nauth_file = "auth.toml"\n'
                                 'peer_token_file = "peer.token"'),
                   "peer_token_file", "only for a cluster with auth_file and no [tls]")
    assert_problem(MINIMAL.replace('cluster = "c"', 'cluster = "c"\npeer_token_file = "p"'),
                   "peer_token_file", "only for a cluster with auth_file and no [tls]")


def test_even_number_of_voters_is_a_warning() -> None:
    cfg = loads(edit(VALID, "voter = false", "voter = true"))
    assert len(cfg.voters) == 4
    assert any("even number of voters (4)" in w for w in cfg.warnings)


def test_region_without_member_is_a_warning() -> None:
    cfg = loads(VALID + '\n[[region]]\nname = "ap-south"\n', source="c.toml")
    assert cfg.warnings == ("c.toml: region[3]: region 'ap-south' has no member",)


def test_short_lease_ttl_is_a_warning() -> None:
    cfg = loads(edit(VALID, "lease_ttl_s = 3", "lease_ttl_s = 1"))
    assert len(cfg.warnings) == 1
    assert "election-timeout" in cfg.warnings[0]


# --- files named by the config ---------------------------------------------------------------


def test_check_files(tmp_path: Path) -> None:
    (tmp_path / "cluster.toml").write_text(VALID)
    cfg = load(tmp_path / "cluster.toml")
    with pytest.raises(ConfigError) as info:
        check_files(cfg)
    assert [k for k, _ in info.value.problems] == ["tiers_file", "tls.ca", "tls.cert",
                                                     "tls.key"]
    (tmp_path / "tiers.toml").write_text("")
    check_files(loads('tiers_file = "tiers.toml"\n' + MINIMAL, tmp_path))


# --- etcd reachability ------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it during
    the test) but never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_check_etcd_against_a_real_etcd(etcd: EtcdCluster) -> None:
    check_etcd(etcd.endpoints, timeout_s=2.0)


def test_check_etcd_against_a_closed_port(closed_port: int) -> None:
    endpoint = f"127.0.0.1:{closed_port}"
    with pytest.raises(ConfigError) as info:
        check_etcd([endpoint], timeout_s=0.3)
    assert f"etcd unreachable at {endpoint}" in str(info.value)
    assert "refused" in str(info.value)


def test_check_etcd_needs_one_healthy_endpoint(etcd: EtcdCluster, closed_port: int) -> None:
    check_etcd([f"127.0.0.1:{closed_port}", *etcd.endpoints], timeout_s=2.0)


def test_check_etcd_after_etcd_restart(etcd: EtcdCluster) -> None:
    pid = etcd.members[0].pid
    etcd.members[0].stop()
    with pytest.raises(ConfigError, match="etcd unreachable"):
        check_etcd(etcd.endpoints, timeout_s=0.2)
    etcd.restart()
    assert etcd.members[0].pid != pid
    check_etcd(etcd.endpoints, timeout_s=2.0)


def test_check_etcd_with_a_three_member_cluster(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, n=3).start()
    try:
        assert len(set(cluster.endpoints)) == 3
        check_etcd(cluster.endpoints, timeout_s=2.0)
        # One member lost (one region down): the survivors keep quorum and elect a leader
        # if needed, which is what the generous timeout covers.
        cluster.members[0].kill()
        check_etcd(cluster.endpoints, timeout_s=10.0)
        cluster.members[0].start()
        cluster.wait_healthy()
        for m in cluster.members:
            m.stop()
        with pytest.raises(ConfigError, match="etcd unreachable"):
            check_etcd(cluster.endpoints, timeout_s=0.2)
    finally:
        cluster.stop()
    assert not any(m.running for m in cluster.members)


def test_etcd_binary_honours_the_override(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    from tests.support import etcd as support

    monkeypatch.setenv("XDC_ETCD_BIN", str(tmp_path / "no-such-etcd"))
    with pytest.raises(support.EtcdError, match="XDC_ETCD_BIN"):
        support.etcd_binary()
    monkeypatch.delenv("XDC_ETCD_BIN")
    assert Path(support.etcd_binary()).name == "etcd"
