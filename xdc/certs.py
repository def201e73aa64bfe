"""`xdc certs init`: a development CA and one certificate per cluster member and client.

For the local launcher, the tests and trying TLS out; production CAs issue certificates
of the same shape (xdc/tls.py): a URI name ``xdc://<cluster>/<role>/<name>``, the name
as a DNS name (a member's id is what a leader expects its follower's certificate to
name), plus the host names and addresses the holder is reached at: loopback unless told
otherwise, and per holder its real hosts' (`init(..., sans=...)`, `xdc certs init --san
NAME=HOST,...`): a client that dials 10.40.1.10:7000 checks that the certificate names
10.40.1.10.

Files, all PEM, in one directory: ``ca.pem`` and ``ca-key.pem``, then ``<name>.pem``
and ``<name>-key.pem`` for each holder. Keys are written 0600 (created so, never
readable by others for a moment). ECDSA P-256 keys, SHA-256 signatures.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xdc.tls import HOSTNAME_RE, ROLES, Identity

DEFAULT_DAYS = 365
MAX_HOLDERS = 1000
MAX_HOSTS = 100  # server names and addresses of one certificate
LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class Issued:
    identity: Identity
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Authority:
    """A CA that can sign more certificates (tests make strays and intruders with it)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path

    @classmethod
    def create(cls, directory: str | os.PathLike[str], name: str = "xdc development CA",
               days: int = DEFAULT_DAYS) -> Authority:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        write_private(d / "ca-key.pem", _pem(key))
        (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key, d / "ca.pem")

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Authority:
        d = Path(directory)
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key, d / "ca.pem")

    def issue(self, identity: Identity, directory: str | os.PathLike[str] | None = None, *,
              file_name: str = "", hosts: Iterable[str] = LOOPBACK,
              days: int = DEFAULT_DAYS) -> Issued:
        """Signs a certificate for `identity` (server and client use), valid for its
        name and `hosts` as DNS names or IP addresses."""
        d = Path(directory) if directory is not None else self.path.parent
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        for host in dict.fromkeys([identity.name, *hosts]):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.cluster),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
                    x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        stem = file_name or identity.name
        cert_path, key_path = d / f"{stem}.pem", d / f"{stem}-key.pem"
        write_private(key_path, _pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(identity, cert_path, key_path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes a secret (a key, a password) readable by its owner only: mode 0600 from
    creation, never readable by others for a moment."""
    path = Path(path)
    path.unlink(missing_ok=True)  # O_CREAT's mode applies to new files only
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# The certificates besides the members' that init issues unless told otherwise.
DEFAULT_OTHERS = (("engine", "engine"), ("gateway", "gateway"), ("admin", "admin"),
                  ("etcd", "etcd"))


def init(directory: str | os.PathLike[str], cluster: str, members: Sequence[str], *,
         others: Sequence[tuple[str, str]] = DEFAULT_OTHERS,
         hosts: Iterable[str] = LOOPBACK, sans: Mapping[str, Sequence[str]] | None = None,
         days: int = DEFAULT_DAYS) -> dict[str, Issued]:
    """A new CA in `directory` and a certificate for each member and each (role, name) of
    `others`, valid for `hosts` and, per name in `sans`, that holder's own host names and
    addresses; returns them by name. ValueError (nothing written) for an unusable or
    repeated name, or a host that is neither an address nor a DNS name."""
    holders = [("member", m) for m in members] + list(others)
    if not members:
        raise ValueError("no member: a cluster needs at least one")
    if len(holders) > MAX_HOLDERS:
        raise ValueError(f"{len(holders)} certificates requested (limit {MAX_HOLDERS})")
    seen: set[str] = set()
    for role, name in holders:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        # etcd takes a client certificate's common name as its user when no password is
        # given: no certificate may be named after etcd's all-powerful `root`. A name
        # ending in "-key" would write its certificate over another holder's key file.
        if (name in seen or name in ("ca", "ca-key", "root") or name.endswith("-key")
                or not _plain(name)):
            raise ValueError(f"certificate name {name!r} is repeated, reserved or not plain "
                             "(letters, digits, '.', '_', '-'; not ending in '-key')")
        seen.add(name)
    sans = dict(sans or {})
    unknown = sorted(set(sans) - seen)
    if unknown:
        raise ValueError(f"server names given for {', '.join(map(repr, unknown))}: no such "
                         "certificate is being issued")
    hosts = tuple(hosts)
    per_holder = {name: (*hosts, *sans.get(name, ())) for _, name in holders}
    for name, names in per_holder.items():
        if len(names) > MAX_HOSTS:
            raise ValueError(f"{name!r}: {len(names)} host names and addresses "
                             f"(limit {MAX_HOSTS})")
        for host in names:
            if not _host(host):
                raise ValueError(f"{name!r}: {host!r} is neither an IP address nor a DNS "
                                 "host name")
    ca = Authority.create(directory, f"xdc development CA ({cluster})", days)
    return {name: ca.issue(Identity(cluster, role, name), hosts=per_holder[name], days=days)
            for role, name in holders}


def _host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(HOSTNAME_RE.match(host))
    return True


def _plain(name: str) -> bool:
    return bool(name) and len(name) <= 63 and name[0].isalnum() and all(
        c.isalnum() or c in "._-" for c in name)
