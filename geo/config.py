"""Cluster configuration: one TOML file describes the whole xdc cluster.

Every node, engine host and operator tool reads the same file, so a node can find its
peers, etcd and the tier file without any other source of truth. The file is parsed with
`tomllib` and validated completely before anything starts: every problem found is
reported at once, each naming the file, the key path and what is wrong.

Schema::

    cluster = "xdc-demo"              # name; etcd prefix is "/<cluster>/"
    failover = "manual"               # "manual" (default) or "automatic"
    lease_ttl_s = 2                   # etcd lease TTL, integer seconds >= 1
    tiers_file = "tiers.toml"         # optional; relative to the config file
    auth_file = "auth.toml"           # optional: client principals and grants (store/auth.py)
    peer_token_file = "peer.token"    # with auth_file and no [tls]: the member token
                                      #   (a principal granted "replicate") nodes present
                                      #   to each other; with [tls], certificates do

    [etcd]
    endpoints = ["127.0.0.1:2379"]    # host:port, at least one
    ca = "tls/ca.pem"                 # optional: https to etcd, this CA
    cert = "tls/node.pem"             # optional: the client certificate etcd demands
    key = "tls/node-key.pem"
    user = "xdc-demo-node"            # optional: etcd authentication (needs ca)
    password_file = "etcd.password"   # the user's password (first line), never inline

    [[region]]
    name = "us-east"

    [[member]]
    id = "use1-a"                     # unique
    region = "us-east"                # must name a declared region
    client = "10.0.1.10:7000"         # client gRPC API host:port
    peer = "10.0.1.10:7100"           # replication host:port
    voter = true                      # false = non-voting standby (async DR copy)
    data_dir = "/var/lib/xdc"         # optional
    cert = "tls/use1-a.pem"           # optional: this member's certificate and key
    key = "tls/use1-a-key.pem"        # (default: tls.cert and tls.key)

    [tls]                             # optional: paths to PEM files, relative to the file
    ca = "tls/ca.pem"                 # required in [tls]
    cert = "tls/node.pem"             # this host's certificate and key: a member's unless
    key = "tls/node-key.pem"          #   the member names its own; tools' and engines'
    client_certs = true               # client API ports demand a client certificate

Only `cluster`, `[etcd]`, at least one `[[region]]` and one `[[member]]` are required;
`failover` defaults to "manual" (new systems start manual and switch to automatic as
operators gain confidence), `lease_ttl_s` to 2.

Errors (`ConfigError`): unknown keys (a typo must not pass silently), wrong types,
malformed or out-of-range host:port, duplicate member ids, one address used twice,
a member in an undeclared region, no voter at all, etcd cert/user without ca, a user
without password_file, auth_file without [tls] and without peer_token_file (replication
would be open to anyone reaching a peer port: a forged promise stalls the cluster for
good), peer_token_file with [tls] or without auth_file, an unknown failover mode, a TTL below
one second, TLS on but a member without a certificate (neither its own nor tls.cert), a
cert without its key. Warnings (`ClusterConfig.warnings`, the file is still usable): an even number
of voters (it tolerates no more failures than one voter fewer), a region without any
member, a TTL below etcd's default-timing floor.

Files named by the config (tiers file, TLS material) are resolved to absolute paths but
not opened: rendering a config for another machine (Terraform, the launcher) must
validate where those files do not exist. `check_files` checks them on the node itself;
`check_etcd` checks that etcd answers.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from geo.etcd_server import EtcdTls, health_problem
from geo.leadership import EtcdAccess
from xdc.tls import HOSTNAME_RE, Tls, TlsError

__all__ = [
    "DEFAULT_FAILOVER",
    "DEFAULT_LEASE_TTL_S",
    "ClusterConfig",
    "ConfigError",
    "EtcdConfig",
    "Member",
    "Region",
    "TlsConfig",
    "check_etcd",
    "check_files",
    "etcd_access",
    "load",
    "load_tls",
    "loads",
    "read_password",
    "split_hostport",
]

Failover = Literal["manual", "automatic"]
FAILOVER_MODES: tuple[str, ...] = ("manual", "automatic")
DEFAULT_FAILOVER: Failover = "manual"
DEFAULT_LEASE_TTL_S = 2
# With etcd's default timing (100 ms heartbeat, 1 s election timeout) the server raises
# any shorter TTL to its minimum, about 1.5 s, so asking for 1 s silently gives more.
ETCD_DEFAULT_MIN_TTL_S = 2

# Names end up in etcd keys ("/<cluster>/leader") and file names: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ConfigError(ValueError):
    """The configuration cannot be used. Carries every problem found, in file order."""

    def __init__(self, source: str, problems: Iterable[tuple[str, str]]) -> None:
        self.source = source
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        lines = [f"{source}: {key}: {what}" if key else f"{source}: {what}" for key, what in
                 self.problems]
        super().__init__("\n".join(lines))

    @property
    def key(self) -> str:
        """Key path of the first problem, e.g. ``member[1].region``."""
        return self.problems[0][0]

    @property
    def problem(self) -> str:
        """What is wrong with the first problem's key."""
        return self.problems[0][1]


@dataclass(frozen=True)
class Region:
    name: str


@dataclass(frozen=True)
class Member:
    id: str
    region: str
    client: str  # host:port of the client gRPC API
    peer: str  # host:port of the replication service
    voter: bool
    data_dir: Path | None = None
    cert: Path | None = None  # TLS: this member's own (default: tls.cert)
    key: Path | None = None


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]  # host:port, client port of each etcd member
    ca: Path | None = None  # https with this CA
    cert: Path | None = None  # client certificate and key
    key: Path | None = None
    user: str = ""  # etcd authentication: this user, its password in password_file
    password_file: Path | None = None


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path | None = None  # this host's (any process reading the file), or None when
    key: Path | None = None   # every member names its own and tools pass --tls-*
    client_certs: bool = True  # client API ports demand a client certificate


@dataclass(frozen=True)
class ClusterConfig:
    cluster: str
    etcd: EtcdConfig
    regions: tuple[Region, ...]
    members: tuple[Member, ...]
    failover: Failover = DEFAULT_FAILOVER
    lease_ttl_s: int = DEFAULT_LEASE_TTL_S
    tiers_file: Path | None = None
    tls: TlsConfig | None = None
    # Clients authenticate and are checked against it (store/auth.py); None: open.
    auth_file: Path | None = None
    # Without TLS: the token members present on each other's replication service.
    peer_token_file: Path | None = None
    source: str = "<string>"
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def etcd_prefix(self) -> str:
        return f"/{self.cluster}/"

    @property
    def voters(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.voter)

    @property
    def standbys(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if not m.voter)

    @property
    def quorum(self) -> int:
        """Voters that must hold a record before it is committed."""
        return len(self.voters) // 2 + 1

    def member(self, member_id: str) -> Member:
        for m in self.members:
            if m.id == member_id:
                return m
        raise KeyError(f"no member {member_id!r} in cluster {self.cluster!r}")

    def members_in(self, region: str) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.region == region)


def split_hostport(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6). Raises ValueError saying why not."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty host:port string")
    if "://" in value:
        raise ValueError(f"expected host:port without a scheme, got {value!r}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {value!r}")
        if ":" in host:
            raise ValueError(f"write IPv6 addresses as [addr]:port, got {value!r}")
        if not _is_ipv4(host) and not HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} is not a valid host name or address")
    if not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return host, port


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _canonical(address: str) -> str:
    """One spelling per socket, so that "[::1]:7000" and "[0::1]:7000" collide; host names
    compare case-insensitively as DNS does."""
    host, port = split_hostport(address)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return f"{host}:{port}"


# --- loading -----------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and validate the cluster file at `path`; relative paths inside resolve
    against the file's directory."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [("", f"not UTF-8 text: {exc}")]) from exc
    return loads(text, p.resolve().parent, source=str(p))


def loads(
    text: str, base_dir: str | os.PathLike[str] = ".", *, source: str = "<string>"
) -> ClusterConfig:
    """Parse and validate cluster TOML `text`; `base_dir` anchors relative paths."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [("", f"invalid TOML: {exc}")]) from exc
    # abspath, not resolve(): the config may describe another machine's file system.
    return _Validator(source, Path(os.path.abspath(base_dir))).build(raw)


class _Validator:
    """Collects every problem of one file, so an operator fixes them in one round."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.member_index: dict[str, int] = {}  # id -> index of its [[member]] table

    def error(self, key: str, what: str) -> None:
        self.errors.append((key, what))

    def warn(self, key: str, what: str) -> None:
        self.warnings.append(f"{self.source}: {key}: {what}")

    # typed getters: each returns None (after recording an error) when unusable

    def _get(
        self,
        table: Mapping[str, Any],
        name: str,
        key: str,
        want: type | tuple[type, ...],
        label: str,
        *,
        required: bool,
    ) -> Any:
        if name not in table:
            if required:
                self.error(key, "is required")
            return None
        value = table[name]
        # bool is an int in Python; TOML's `true` must never pass as a number.
        if isinstance(value, want) and not (isinstance(value, bool) and bool not in _tuple(want)):
            return value
        self.error(key, f"expected {label}, got {_toml_type(value)} {_show(value)}")
        return None

    def string(self, table: Mapping[str, Any], name: str, key: str, *, required: bool) -> Any:
        value = self._get(table, name, key, str, "a string", required=required)
        if value == "":
            self.error(key, "must not be empty")
            return None
        return value

    def name(self, table: Mapping[str, Any], name: str, key: str) -> str | None:
        value = self.string(table, name, key, required=True)
        if value is not None and not _NAME_RE.match(value):
            self.error(key, f"{value!r} must be 1-63 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
            return None
        return value

    def address(self, table: Mapping[str, Any], name: str, key: str) -> str | None:
        return self.address_value(self.string(table, name, key, required=True), key)

    def address_value(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(key, f"expected a \"host:port\" string, got {_toml_type(value)}")
            return None
        try:
            split_hostport(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return None
        return value

    def path(self, table: Mapping[str, Any], name: str, key: str, *, required: bool) -> Any:
        value = self.string(table, name, key, required=required)
        return None if value is None else self.base_dir / value

    def table(self, raw: Mapping[str, Any], name: str, key: str, *, required: bool) -> Any:
        return self._get(raw, name, key, dict, "a table", required=required)

    def array_of_tables(self, raw: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
        value = self._get(raw, name, name, list, f"an array of tables ([[{name}]])",
                          required=True)
        if value is None:
            return []
        if not value:
            self.error(name, f"declare at least one [[{name}]]")
        good = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                good.append(item)
            else:
                self.error(f"{name}[{i}]", f"expected a table, got {_toml_type(item)}")
        return good

    def only(self, table: Mapping[str, Any], allowed: Iterable[str], key: str) -> None:
        allowed = tuple(allowed)
        for name in table:
            if name not in allowed:
                path = f"{key}.{name}" if key else name
                hint = _closest(name, allowed)
                self.error(path, "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))

    # the file

    def build(self, raw: dict[str, Any]) -> ClusterConfig:
        self.only(raw, ("cluster", "failover", "lease_ttl_s", "tiers_file", "etcd", "region",
                        "member", "tls", "auth_file", "peer_token_file"), "")
        cluster = self.name(raw, "cluster", "cluster")
        failover = self.string(raw, "failover", "failover", required=False)
        if failover is None:
            failover = DEFAULT_FAILOVER
        elif failover not in FAILOVER_MODES:
            self.error("failover", f"{failover!r} is not one of "
                                   f"{', '.join(repr(m) for m in FAILOVER_MODES)}")
        ttl = self._get(raw, "lease_ttl_s", "lease_ttl_s", int, "an integer number of seconds",
                        required=False)
        if "lease_ttl_s" not in raw:
            ttl = DEFAULT_LEASE_TTL_S
        elif ttl is not None and ttl < 1:
            self.error("lease_ttl_s", f"must be >= 1 second, got {ttl}")
        elif ttl is not None and ttl < ETCD_DEFAULT_MIN_TTL_S:
            self.warn("lease_ttl_s", f"{ttl} s is below etcd's minimum TTL with default timing "
                                     f"({ETCD_DEFAULT_MIN_TTL_S} s): run etcd with "
                                     "--election-timeout=500 or etcd will extend it")
        tiers_file = self.path(raw, "tiers_file", "tiers_file", required=False)
        auth_file = self.path(raw, "auth_file", "auth_file", required=False)
        etcd = self._etcd(raw)
        regions = self._regions(raw)
        members = self._members(raw, {r.name for r in regions})
        tls = self._tls(raw, members)
        peer_token_file = self.path(raw, "peer_token_file", "peer_token_file", required=False)
        if auth_file is not None and tls is None and peer_token_file is None:
            self.error("peer_token_file", "required with auth_file and no [tls]: members "
                       "must authenticate to each other (a principal granted 'replicate'), "
                       "or anyone reaching a peer port could forge replication messages")
        elif peer_token_file is not None and (tls is not None or auth_file is None):
            self.error("peer_token_file", "only for a cluster with auth_file and no [tls] "
                       "(with TLS, member certificates authenticate replication)")
        self._cross_checks(regions, members, etcd)
        if self.errors:
            raise ConfigError(self.source, self.errors)
        assert cluster is not None and etcd is not None  # no errors recorded
        return ClusterConfig(
            cluster=cluster,
            failover=failover,
            lease_ttl_s=ttl,
            tiers_file=tiers_file,
            etcd=etcd,
            regions=tuple(regions),
            members=tuple(members),
            tls=tls,
            auth_file=auth_file,
            peer_token_file=peer_token_file,
            source=self.source,
            warnings=tuple(self.warnings),
        )

    def _etcd(self, raw: Mapping[str, Any]) -> EtcdConfig | None:
        table = self.table(raw, "etcd", "etcd", required=True)
        if table is None:
            return None
        self.only(table, ("endpoints", "ca", "cert", "key", "user", "password_file"), "etcd")
        ca = self.path(table, "ca", "etcd.ca", required=False)
        cert, key = self.pem_pair(table, "etcd")
        user = self.string(table, "user", "etcd.user", required=False) or ""
        password_file = self.path(table, "password_file", "etcd.password_file",
                                  required=False)
        if ca is None and (cert is not None or user):
            self.error("etcd.ca", "is required with etcd.cert or etcd.user (TLS to etcd; a "
                                  "password never crosses in plaintext)")
        if bool(user) != (password_file is not None):
            self.error("etcd.password_file" if user else "etcd.user",
                       "etcd.user and etcd.password_file go together")
        endpoints = self._get(table, "endpoints", "etcd.endpoints", list,
                              'an array of "host:port" strings', required=True)
        if endpoints is None:
            return None
        if not endpoints:
            self.error("etcd.endpoints", "list at least one etcd endpoint")
        good: list[str] = []
        seen: set[str] = set()
        for i, value in enumerate(endpoints):
            ep = self.address_value(value, f"etcd.endpoints[{i}]")
            if ep is None:
                continue
            if _canonical(ep) in seen:
                self.error(f"etcd.endpoints[{i}]", f"duplicate endpoint {ep!r}")
            seen.add(_canonical(ep))
            good.append(ep)
        return EtcdConfig(endpoints=tuple(good), ca=ca, cert=cert, key=key, user=user,
                          password_file=password_file)

    def _regions(self, raw: Mapping[str, Any]) -> list[Region]:
        regions: list[Region] = []
        seen: set[str] = set()
        for i, table in enumerate(self.array_of_tables(raw, "region")):
            key = f"region[{i}]"
            self.only(table, ("name",), key)
            name = self.name(table, "name", f"{key}.name")
            if name is None:
                continue
            if name in seen:
                self.error(f"{key}.name", f"duplicate region {name!r}")
                continue
            seen.add(name)
            regions.append(Region(name=name))
        return regions

    def _members(self, raw: Mapping[str, Any], region_names: set[str]) -> list[Member]:
        members: list[Member] = []
        self.member_index.clear()
        seen_ids: dict[str, int] = {}
        for i, table in enumerate(self.array_of_tables(raw, "member")):
            key = f"member[{i}]"
            self.only(table, ("id", "region", "client", "peer", "voter", "data_dir", "cert",
                              "key"), key)
            member_id = self.name(table, "id", f"{key}.id")
            if member_id is not None:
                if member_id in seen_ids:
                    self.error(f"{key}.id", f"duplicate member id {member_id!r} "
                                            f"(also member[{seen_ids[member_id]}])")
                    member_id = None
                else:
                    seen_ids[member_id] = i
            region = self.string(table, "region", f"{key}.region", required=True)
            if region is not None and region not in region_names:
                declared = ", ".join(sorted(region_names)) or "none"
                self.error(f"{key}.region", f"unknown region {region!r} "
                                            f"(declared: {declared})")
                region = None
            client = self.address(table, "client", f"{key}.client")
            peer = self.address(table, "peer", f"{key}.peer")
            voter = self._get(table, "voter", f"{key}.voter", bool, "true or false",
                              required=True)
            data_dir = self.path(table, "data_dir", f"{key}.data_dir", required=False)
            cert, cert_key = self.pem_pair(table, key)
            if None in (member_id, region, client, peer, voter):
                continue
            members.append(Member(id=member_id, region=region, client=client, peer=peer,
                                  voter=voter, data_dir=data_dir, cert=cert, key=cert_key))
            self.member_index[member_id] = i
        return members

    def pem_pair(self, table: Mapping[str, Any], key: str) -> tuple[Path | None, Path | None]:
        """An optional `cert` with its `key`: both or neither."""
        cert = self.path(table, "cert", f"{key}.cert", required=False)
        pem_key = self.path(table, "key", f"{key}.key", required=False)
        if ("cert" in table) != ("key" in table):
            given, missing = ("cert", "key") if "cert" in table else ("key", "cert")
            self.error(f"{key}.{missing}", f"is required with {key}.{given}")
        return cert, pem_key

    def _tls(self, raw: Mapping[str, Any], members: list[Member]) -> TlsConfig | None:
        table = self.table(raw, "tls", "tls", required=False)
        if table is None:
            for m in members:
                if m.cert is not None:
                    where = f"member[{self.member_index[m.id]}].cert"
                    self.error(where, "a member certificate needs a [tls] table with the CA")
            return None
        self.only(table, ("ca", "cert", "key", "client_certs"), "tls")
        ca = self.path(table, "ca", "tls.ca", required=True)
        cert, key = self.pem_pair(table, "tls")
        client_certs = self._get(table, "client_certs", "tls.client_certs", bool,
                                 "true or false", required=False)
        if cert is None:
            for m in members:
                if m.cert is None:
                    where = f"member[{self.member_index[m.id]}]"
                    self.error(where, f"member {m.id!r} has no TLS certificate: set its cert "
                                      "and key, or tls.cert and tls.key")
        if ca is None:
            return None
        return TlsConfig(ca=ca, cert=cert, key=key,
                         client_certs=True if client_certs is None else client_certs)

    def _cross_checks(self, regions: list[Region], members: list[Member],
                      etcd: EtcdConfig | None) -> None:
        # Two services on one socket would fail to bind at best and talk to the wrong
        # peer at worst; etcd endpoints count too since they often share hosts.
        owners: dict[str, str] = {}
        if etcd is not None:
            for i, ep in enumerate(etcd.endpoints):
                owners.setdefault(_canonical(ep), f"etcd.endpoints[{i}]")
        for m in members:
            for role in ("client", "peer"):
                address = getattr(m, role)
                where = f"member[{self.member_index[m.id]}].{role}"
                other = owners.setdefault(_canonical(address), where)
                if other != where:
                    self.error(where, f"address {address} is already used by {other}")
        if not members:
            return  # every member had an error already reported
        voters = sum(1 for m in members if m.voter)
        if voters == 0:
            self.error("member", "no voter: at least one member needs voter = true")
        elif voters % 2 == 0:
            self.warn("member", f"even number of voters ({voters}): they tolerate no more "
                                f"failures than {voters - 1} would; add or remove one voter")
        used = {m.region for m in members}
        for i, r in enumerate(regions):
            if r.name not in used:
                self.warn(f"region[{i}]", f"region {r.name!r} has no member")


def _tuple(want: type | tuple[type, ...]) -> tuple[type, ...]:
    return want if isinstance(want, tuple) else (want,)


def _toml_type(value: object) -> str:
    names: dict[type, str] = {bool: "boolean", int: "integer", float: "float", str: "string",
                              list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return text if len(text) <= 40 else text[:37] + "..."


def _closest(name: str, allowed: tuple[str, ...]) -> str | None:
    found = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    return found[0] if found else None


# --- checks against the machine ------------------------------------------------------------


def check_files(config: ClusterConfig) -> None:
    """Check that the files the config names exist and are readable (on the node itself)."""
    problems = []
    named: list[tuple[str, Path | None]] = [("tiers_file", config.tiers_file),
                                            ("auth_file", config.auth_file),
                                            ("peer_token_file", config.peer_token_file)]
    if config.tls is not None:
        named += [("tls.ca", config.tls.ca), ("tls.cert", config.tls.cert),
                  ("tls.key", config.tls.key)]
    for key, path in named:
        if path is not None and not os.access(path, os.R_OK):
            what = "does not exist" if not path.exists() else "is not readable"
            problems.append((key, f"{path} {what}"))
    if problems:
        raise ConfigError(config.source, problems)


def load_tls(config: ClusterConfig, member_id: str | None = None) -> Tls | None:
    """Opens the TLS material of a member (its own cert and key, else tls.cert and
    tls.key) or, without `member_id`, of this host (tls.cert and tls.key). None when the
    cluster runs without TLS. ConfigError naming the key and the file's problem."""
    tls = config.tls
    if tls is None:
        return None
    cert, key, where = tls.cert, tls.key, "tls"
    if member_id is not None:
        m = config.member(member_id)
        if m.cert is not None:
            cert, key = m.cert, m.key
            where = f"member[{config.members.index(m)}]"
    if cert is None or key is None:
        raise ConfigError(config.source, [("tls.cert", "no certificate for this program: "
                                                       "set tls.cert and tls.key, or pass "
                                                       "--tls-ca/--tls-cert/--tls-key")])
    try:
        return Tls.load(tls.ca, cert, key, require_client_cert=tls.client_certs)
    except TlsError as exc:
        raise ConfigError(config.source, [(where, str(exc))]) from None


MAX_PASSWORD_BYTES = 4096


def etcd_access(config: ClusterConfig) -> EtcdAccess:
    """How this host reaches etcd: TLS files and user, the password read from its file
    (its first line). ConfigError naming the key when the file is unusable."""
    e = config.etcd
    tls = None
    if e.ca is not None:
        tls = EtcdTls(e.ca, e.cert, e.key)
    if not e.user:
        return EtcdAccess(tls)
    assert e.password_file is not None  # validated together
    return EtcdAccess(tls, e.user, read_password(e.password_file, config.source,
                                                 "etcd.password_file"))


def read_password(path: str | os.PathLike[str], source: str, key: str) -> str:
    """The password on the first line of `path`; ConfigError naming `key` and the file
    when it cannot be read or holds none."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, [(key, f"{path}: {exc.strerror or exc}")]) from None
    lines = raw.decode("utf-8", "replace").splitlines()
    if len(raw) > MAX_PASSWORD_BYTES or not lines or not lines[0]:
        raise ConfigError(source, [(key, f"{path}: expected the password on its first line "
                                         f"(at most {MAX_PASSWORD_BYTES} bytes)")])
    return lines[0]


def check_etcd(endpoints: Iterable[str], timeout_s: float = 2.0,
               tls: EtcdTls | None = None) -> None:
    """Raise ConfigError ("etcd unreachable at ...") unless some endpoint's ``/health``
    reports healthy within `timeout_s` seconds.

    One healthy member is enough: etcd forwards to its leader, and a 3-member cluster with
    one region down is the normal degraded case. The endpoints are polled until the
    deadline because a cluster that is electing a leader reports unhealthy for about an
    election timeout. The error lists every endpoint with its last failure, so an operator
    can tell a firewall (timeout) from a stopped etcd (connection refused)."""
    endpoints = tuple(endpoints)
    if not endpoints:
        raise ConfigError("etcd", [("etcd.endpoints", "no etcd endpoint given")])
    deadline = time.monotonic() + timeout_s
    while True:
        reasons = []
        for ep in endpoints:
            # Bounded per request so that one black-holed endpoint cannot use up the
            # whole budget before the healthy ones are asked.
            remaining = deadline - time.monotonic()
            reason = _etcd_health(ep, min(max(remaining, 0.05), 1.0), tls)
            if reason is None:
                return
            reasons.append(f"{ep}: {reason}")
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))  # poll interval
    raise ConfigError(
        "etcd", [("", f"etcd unreachable at {', '.join(endpoints)} ({'; '.join(reasons)})")]
    )


def _etcd_health(endpoint: str, timeout_s: float, tls: EtcdTls | None = None) -> str | None:
    """None when healthy, else why not (a malformed endpoint included)."""
    try:
        host, port = split_hostport(endpoint)
    except ValueError as exc:
        return str(exc)
    return health_problem(f"{'[' + host + ']' if ':' in host else host}:{port}", timeout_s, tls)
