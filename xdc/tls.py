"""Transport security: TLS on every xdc port, mutual TLS between its processes.

One `Tls` value holds a process's CA, certificate and key (PEM bytes, checked when
loaded so that a wrong file is a clear error at start, never a handshake failure later)
and whether the ports it serves to clients demand a client certificate. Every channel
xdc opens goes through `aio_channel` / `sync_channel`, every port it binds through
`server_credentials` (store/server.py `listen_on`): `None` means plaintext, kept for a
single `xdc serve` without certificates and for tests that do not test security.

Identity: each certificate names who holds it in a URI subject alternative name
``xdc://<cluster>/<role>/<name>`` (`Identity`), e.g. ``xdc://xdc-local/member/us-east-1``.
Roles: a store node is a `member`; engines, gateways, operators' tools and other
programs are `engine`, `gateway`, `admin`, `client`; an etcd server is `etcd`. A server
reads the caller's identity from the handshake (`peer_identity`), so replication
accepts a peer only when its certificate, signed by the cluster's CA, names a member of
the same cluster. A member's certificate also carries its id as a DNS name: a leader
reaching a follower sets the expected server name to the follower's id (`server_name`),
so the handshake fails unless the certificate is that member's (a proxy or a re-pointed
address cannot stand in for it).

gRPC's Python API either demands a client certificate or never asks for one; it cannot
ask and accept an answer without one. So a port is one or the other: peer ports always
demand one; client-facing ports (store API, gateway, engine control) demand one when
`require_client_cert` (the default; `[tls] client_certs = false` turns it off for
clients that authenticate with tokens instead).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

__all__ = [
    "HOSTNAME_RE",
    "ROLES",
    "Identity",
    "Tls",
    "TlsError",
    "add_cli_args",
    "aio_channel",
    "cli_tls",
    "from_cli_args",
    "peer_identity",
    "server_credentials",
    "sync_channel",
]

ROLES = ("member", "engine", "gateway", "admin", "client", "etcd")
# A DNS host name (RFC 1123 labels): what a certificate may name as a server besides
# addresses, and what a host:port may use.
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
SCHEME = "xdc"
# PEM files larger than this are not certificates or keys (a wrong path to a log, a
# data file): refuse before reading them whole.
MAX_PEM_BYTES = 1 << 20
# Environment defaults of the --tls-* options of every command (like XDC_TARGET).
ENV_CA, ENV_CERT, ENV_KEY = "XDC_TLS_CA", "XDC_TLS_CERT", "XDC_TLS_KEY"


class TlsError(ValueError):
    """TLS material that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Identity:
    cluster: str
    role: str
    name: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}://{self.cluster}/{self.role}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> Identity | None:
        """The identity a URI names, or None when it is not an xdc identity."""
        prefix = f"{SCHEME}://"
        if not uri.startswith(prefix):
            return None
        parts = uri[len(prefix):].split("/")
        if len(parts) != 3 or not all(parts) or parts[1] not in ROLES:
            return None
        return cls(*parts)

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class Tls:
    """A process's TLS material (PEM) and policy. Build it with `Tls.load`."""

    ca: bytes
    cert: bytes
    key: bytes
    identity: Identity | None = None
    # Client-facing ports demand a client certificate (see the module docstring).
    require_client_cert: bool = True

    @classmethod
    def load(cls, ca: str | os.PathLike[str], cert: str | os.PathLike[str],
             key: str | os.PathLike[str], *, require_client_cert: bool = True) -> Tls:
        """Reads and checks the three PEM files: each parses, the key is the
        certificate's, the CA signed the certificate and it is valid now. TlsError
        names the file and what is wrong."""
        ca_pem, cert_pem, key_pem = _read(ca, "CA"), _read(cert, "certificate"), _read(key, "key")
        try:
            ca_certs = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise TlsError(f"{ca}: not a PEM CA certificate ({exc})") from None
        try:
            leaf = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise TlsError(f"{cert}: not a PEM certificate ({exc})") from None
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsError(f"{key}: not an unencrypted PEM private key ({exc})") from None
        if private.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
            raise TlsError(f"{key}: is not the key of the certificate {cert}")
        if not any(_issued_by(leaf, c) for c in ca_certs):
            raise TlsError(f"{cert}: not signed by the CA in {ca} "
                           f"(issuer {leaf.issuer.rfc4514_string()})")
        now = datetime.datetime.now(datetime.UTC)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise TlsError(f"{cert}: not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%d} "
                           f"to {leaf.not_valid_after_utc:%Y-%m-%d})")
        return cls(ca_pem, cert_pem, key_pem, certificate_identity(leaf),
                   require_client_cert)


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_PEM_BYTES:
            raise TlsError(f"{p}: {size} bytes is too large for a {what} "
                           f"(limit {MAX_PEM_BYTES})")
        return p.read_bytes()
    except OSError as exc:
        raise TlsError(f"{p}: cannot read the {what}: {exc.strerror or exc}") from None


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def certificate_identity(cert: x509.Certificate) -> Identity | None:
    """The xdc identity a certificate's URI names carry, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        found = Identity.parse(uri)
        if found is not None:
            return found
    return None


# ---- credentials and channels -----------------------------------------------------------

def server_credentials(tls: Tls, *, require_client_cert: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                       require_client_auth=require_client_cert)


def _channel_args(tls: Tls, options: Sequence[tuple[str, Any]] | None,
                  server_name: str) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    opts = list(options or ())
    if server_name:
        # The certificate must name this member: verified in the handshake.
        opts.append(("grpc.ssl_target_name_override", server_name))
    # Without a certificate (empty), a client that authenticates otherwise (tokens).
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key or None,
                                         certificate_chain=tls.cert or None)
    return creds, opts


def aio_channel(target: str, tls: Tls | None, *,
                options: Sequence[tuple[str, Any]] | None = None,
                interceptors: Sequence[Any] | None = None,
                server_name: str = "") -> grpc.aio.Channel:
    """The one way xdc opens an asyncio channel: TLS with this process's certificate
    when `tls` is set (`server_name`: the member id the server's certificate must
    name), plaintext when it is None."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    creds, opts = _channel_args(tls, options, server_name)
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)


def sync_channel(target: str, tls: Tls | None, *,
                 options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
    """`aio_channel` for blocking callers (command-line tools)."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    creds, opts = _channel_args(tls, options, "")
    return grpc.secure_channel(target, creds, options=opts)


def peer_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """The caller's identity from its verified client certificate; None on a plaintext
    port, without a client certificate, or when the certificate names no xdc identity.
    (gRPC has verified the chain to the CA before the call reaches a handler.)"""
    for uri in context.auth_context().get("peer_uri", ()):
        found = Identity.parse(uri.decode("utf-8", "replace"))
        if found is not None:
            return found
    return None


def describe_peer(context: grpc.aio.ServicerContext) -> str:
    """Who called, for refusal messages: the identity, else what the handshake showed."""
    found = peer_identity(context)
    if found is not None:
        return found.uri
    auth = context.auth_context()
    if not auth.get("transport_security_type"):
        return f"plaintext caller {context.peer()}"
    names = b", ".join(auth.get("x509_subject_alternative_name", ())).decode(errors="replace")
    if not names:
        return f"caller {context.peer()} without a client certificate"
    return f"certificate without an xdc identity ({names})"


# ---- command-line options -------------------------------------------------------------

def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """--tls-ca/--tls-cert/--tls-key (defaults: XDC_TLS_CA, XDC_TLS_CERT, XDC_TLS_KEY)."""
    g = parser.add_argument_group("TLS (all three, or none for plaintext)")
    g.add_argument("--tls-ca", default=os.environ.get(ENV_CA), metavar="PEM",
                   help=f"CA certificate (default ${ENV_CA})")
    g.add_argument("--tls-cert", default=os.environ.get(ENV_CERT), metavar="PEM",
                   help=f"this program's certificate (default ${ENV_CERT})")
    g.add_argument("--tls-key", default=os.environ.get(ENV_KEY), metavar="PEM",
                   help=f"its private key (default ${ENV_KEY})")


def from_cli_args(args: argparse.Namespace) -> Tls | None:
    """The Tls of --tls-* (None when none is given). TlsError when only some are given
    or a file is unusable."""
    given = {"--tls-ca": args.tls_ca, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key}
    if not any(given.values()):
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise TlsError(f"{', '.join(missing)} missing: give --tls-ca, --tls-cert and "
                       "--tls-key together (or set XDC_TLS_CA, XDC_TLS_CERT, XDC_TLS_KEY)")
    return Tls.load(args.tls_ca, args.tls_cert, args.tls_key)


def cli_tls(args: argparse.Namespace, prog: str) -> Tls | None:
    """`from_cli_args` for a command: an unusable option prints why and exits 2."""
    try:
        return from_cli_args(args)
    except TlsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
