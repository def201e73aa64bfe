"""Client authentication and stream ACLs.

An auth file (TOML) lists principals. A call authenticates as one of them with the
metadata ``authorization: Bearer <token>`` (the file holds only the token's sha256), or,
on a mutual-TLS connection, with a verified client certificate whose xdc identity
(xdc/tls.py: the URI ``xdc://<cluster>/<role>/<name>``) is a principal's ``cert``. A
token, when sent, decides::

    [[principal]]
    name = "gateway"
    token_sha256 = "9f86d0..."                # 64 hex digits: `xdc auth token gateway`
    cert = "xdc://xdc-local/gateway/gateway"  # optional: client-certificate identity
    accounts = ["A1", "A2"]                   # optional: accounts it may trade for ("*": any)

    [[principal.grant]]
    operations = ["append"]                   # append, read, subscribe, admin
    streams = ["exchange.*.input"]
    types = ["NewOrder", "CancelOrder", "ReplaceOrder"]   # optional, appends only

    [[principal.grant]]
    operations = ["read", "subscribe"]
    streams = ["exchange.*"]

Patterns: ``*`` at the end of a pattern matches any rest (``orders.*`` is every stream
starting with ``orders.``; ``*`` alone is every stream); elsewhere it matches within one
dot-separated segment (``exchange.*.input``). Reading ``$all`` or subscribing without a
prefix needs ``*``; a subscription with a prefix needs one grant whose pattern matches
every stream starting with that prefix (a pattern ending in ``*`` that matches the prefix
itself). ``types`` restricts which event types a grant lets a principal append (same
patterns); reads and subscriptions are by stream only. ``admin`` covers the operator's
calls (cluster switchover); ``replicate`` lets a member speak on the replication service
of a cluster without TLS (with TLS, member certificates do); neither takes streams.

Servers enforce with `Guard` (one per server, built from the file and the server's
`Rules`): a call without credentials or with an unknown token gets UNAUTHENTICATED; a
call its principal may not make gets PERMISSION_DENIED naming the principal, the
operation and the stream (or account, or method). Checks run before the handler, so a
refused call writes nothing (AppendStream authenticates in its handler and checks each
append of a message on its own). gRPC health and reflection stay open; a method no rule
names needs admin. Without an auth file no Guard is installed and every call is allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import secrets
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from store.errors import StoreError
from xdc.tls import peer_identity

APPEND, READ, SUBSCRIBE, ADMIN = "append", "read", "subscribe", "admin"
# Speaking as a member of the cluster on its replication service (geo/transport.py): what
# a cluster without TLS authenticates its members with (a member token); with TLS,
# member certificates do and this operation is not needed.
REPLICATE = "replicate"
OPERATIONS = (APPEND, READ, SUBSCRIBE, ADMIN, REPLICATE)
# Operations on the whole node, not on streams: their grants name no streams.
NODE_OPERATIONS = frozenset({ADMIN, REPLICATE})
MD_AUTHORIZATION = "authorization"
TOKEN_ENV = "XDC_TOKEN"
# Services every caller may use: load balancers and tools probe them without credentials.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")

MAX_FILE_BYTES = 1024 * 1024
MAX_PRINCIPALS = 10_000
MAX_GRANTS = 64  # per principal
MAX_PATTERNS = 256  # per grant and list
MAX_ACCOUNTS = 100_000  # per principal
MAX_PATTERN_BYTES = 255
MAX_TOKEN_BYTES = 4096
# Decisions remembered per principal ((operation, stream, type) -> allowed); cleared when
# full, so a client cycling through stream names cannot grow it without bound.
MAX_CACHED_DECISIONS = 4096
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_BAD_PATTERN_RE = re.compile(r"[\x00-\x1f\x7f?\[\]]")

class AuthConfigError(ValueError):
    """Every problem of an auth file, each naming where it is."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


# ---- patterns ------------------------------------------------------------------------------

def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    parts = []
    for p in patterns:
        if p.endswith("*"):
            head, tail = p[:-1], ".*"
        else:
            head, tail = p, ""
        parts.append("[^.]*".join(re.escape(s) for s in head.split("*")) + tail)
    return re.compile("|".join(f"(?:{p})" for p in parts) or "(?!)", re.DOTALL)


def pattern_problem(pattern: Any) -> str | None:
    """Why `pattern` is not a valid stream or type pattern, or None."""
    if not isinstance(pattern, str):
        return f"expected a string, got {type(pattern).__name__}"
    if not pattern:
        return "empty pattern"
    if len(pattern.encode()) > MAX_PATTERN_BYTES:
        return f"longer than {MAX_PATTERN_BYTES} bytes"
    if "**" in pattern:
        return f"{pattern!r}: '**' means nothing more than '*'"
    if _BAD_PATTERN_RE.search(pattern):
        return f"{pattern!r}: only '*' is a wildcard ('?', '[', ']' and control characters " \
               "are not allowed)"
    if pattern.startswith("$"):
        return f"{pattern!r}: streams starting with '$' are the store's own"
    return None


# ---- principals ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Grant:
    operations: frozenset[str]
    streams: tuple[str, ...] = ()
    types: tuple[str, ...] = ()  # empty: any type
    _streams: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _types: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _prefixes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_streams", _compile(self.streams))
        object.__setattr__(self, "_types", _compile(self.types) if self.types else None)
        object.__setattr__(self, "_prefixes", tuple(
            _compile((p,)) for p in self.streams if p.endswith("*")))

    def matches(self, op: str, stream: str, event_type: str | None) -> bool:
        return (op in self.operations and self._streams.fullmatch(stream) is not None
                and (event_type is None or self._types is None
                     or self._types.fullmatch(event_type) is not None))

    def covers_prefix(self, op: str, prefix: str) -> bool:
        """Every stream starting with `prefix` matches: a pattern ending in '*' whose
        head matches a prefix of `prefix` (that is, it matches `prefix` itself)."""
        return op in self.operations and any(
            r.fullmatch(prefix) is not None for r in self._prefixes)


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    token_sha256: bytes = b""
    cert: str = ""
    accounts: frozenset[str] = frozenset()
    grants: tuple[Grant, ...] = ()
    _decisions: dict[tuple[str, str, str | None], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    # Some append grant names event types: appends are checked per type.
    _typed: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_typed", any(
            g.types for g in self.grants if APPEND in g.operations))

    @property
    def admin(self) -> bool:
        return any(ADMIN in g.operations for g in self.grants)

    def may(self, op: str, stream: str, event_type: str | None = None) -> bool:
        key = (op, stream, event_type)
        decided = self._decisions.get(key)
        if decided is None:
            decided = any(g.matches(op, stream, event_type) for g in self.grants)
            if len(self._decisions) >= MAX_CACHED_DECISIONS:
                self._decisions.clear()
            self._decisions[key] = decided
        return decided

    def covers(self, op: str, prefix: str) -> bool:
        return any(g.covers_prefix(op, prefix) for g in self.grants)

    def may_trade(self, account: str) -> bool:
        return account in self.accounts or "*" in self.accounts

    # -- refusals (StoreError PERMISSION_DENIED), raised by the checks below

    def require(self, op: str, stream: str) -> None:
        if not self.may(op, stream):
            raise denied(f"principal {self.name!r} may not {op} stream {stream!r}")

    def require_prefix(self, op: str, prefix: str) -> None:
        if not self.covers(op, prefix):
            what = (f"streams starting with {prefix!r}" if prefix
                    else "every stream (no prefix)")
            raise denied(f"principal {self.name!r} may not {op} {what}: no {op} grant "
                         f"covers them all (needs a pattern ending in '*' that matches "
                         f"{prefix!r})")

    def require_append(self, stream: str, types: Iterable[str]) -> None:
        if not self.may(APPEND, stream):
            raise denied(f"principal {self.name!r} may not append to stream {stream!r}")
        if not self._typed:
            return  # this runs for every append: no pass over the events unless needed
        for t in set(types):
            if not self.may(APPEND, stream, t):
                raise denied(f"principal {self.name!r} may not append events of type {t!r} "
                             f"to stream {stream!r}")

    def require_admin(self, what: str) -> None:
        if not self.admin:
            raise denied(f"principal {self.name!r} may not {what}: it needs the admin "
                         "operation")

    def require_replicate(self, what: str) -> None:
        if not any(REPLICATE in g.operations for g in self.grants):
            raise denied(f"principal {self.name!r} may not {what}: it needs the "
                         f"{REPLICATE} operation (a member token)")

    def require_account(self, account: str) -> None:
        if not self.may_trade(account):
            mine = ", ".join(sorted(self.accounts)[:10]) or "none"
            raise denied(f"principal {self.name!r} may not trade for account {account!r} "
                         f"(its accounts: {mine})")


def denied(message: str) -> StoreError:
    return StoreError(grpc.StatusCode.PERMISSION_DENIED, message)


def unauthenticated(message: str) -> StoreError:
    return StoreError(grpc.StatusCode.UNAUTHENTICATED, message)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


TOKEN_PREFIX = "xdc_"


def new_token() -> str:
    """A random bearer token (256 bits). The prefix keeps it from starting with "-",
    which a command line would take for an option (`--token -abc...`: about 1 token in
    64 did), and lets secret scanners recognise it."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates with `token` (none for an empty token)."""
    return ((MD_AUTHORIZATION, f"Bearer {token}"),) if token else ()


def env_token() -> str:
    return os.environ.get(TOKEN_ENV, "")


# ---- the file ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AuthConfig:
    principals: tuple[Principal, ...]
    source: str = "<string>"
    by_token: Mapping[bytes, Principal] = field(default_factory=dict, repr=False)
    by_cert: Mapping[str, Principal] = field(default_factory=dict, repr=False)

    def principal(self, name: str) -> Principal:
        for p in self.principals:
            if p.name == name:
                return p
        raise KeyError(f"{self.source}: no principal {name!r}")


def render(principals: Iterable[Mapping[str, Any]]) -> str:
    """The TOML of an auth file. Each principal: name, token (stored as its sha256) or
    token_sha256, optional cert and accounts, grants (dicts of operations, streams,
    types)."""
    def strings(values: Iterable[str]) -> str:
        return "[" + ", ".join(_quote(v) for v in values) + "]"

    lines: list[str] = []
    for p in principals:
        digest = p.get("token_sha256") or (token_digest(p["token"]).hex() if p.get("token")
                                           else "")
        lines += ["[[principal]]", f"name = {_quote(p['name'])}"]
        if digest:
            lines.append(f'token_sha256 = "{digest}"')
        if p.get("cert"):
            lines.append(f"cert = {_quote(p['cert'])}")
        if p.get("accounts"):
            lines.append(f"accounts = {strings(p['accounts'])}")
        for g in p.get("grants", ()):
            lines += ["[[principal.grant]]", f"operations = {strings(g['operations'])}"]
            if g.get("streams"):
                lines.append(f"streams = {strings(g['streams'])}")
            if g.get("types"):
                lines.append(f"types = {strings(g['types'])}")
        lines.append("")
    return "\n".join(lines)


def _quote(value: str) -> str:
    # A TOML basic string: JSON's escapes are TOML's for the names and patterns allowed.
    return json.dumps(value)


def load(path: str | os.PathLike[str]) -> AuthConfig:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AuthConfigError(str(p), [f"cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise AuthConfigError(str(p), [f"larger than {MAX_FILE_BYTES} bytes"])
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise AuthConfigError(str(p), [f"not UTF-8 text: {exc}"]) from None
    return loads(text, str(p))


def loads(text: str, source: str = "<string>") -> AuthConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuthConfigError(source, [f"invalid TOML: {exc}"]) from None
    problems: list[str] = []
    principals = _principals(raw, problems)
    by_token: dict[bytes, Principal] = {}
    by_cert: dict[str, Principal] = {}
    names: set[str] = set()
    for i, p in enumerate(principals):
        where = f"principal[{i}] ({p.name!r})"
        if p.name in names:
            problems.append(f"{where}: duplicate principal name")
        names.add(p.name)
        if p.token_sha256:
            if p.token_sha256 in by_token:
                problems.append(f"{where}: token_sha256 is also principal "
                                f"{by_token[p.token_sha256].name!r}'s (one token, one principal)")
            by_token[p.token_sha256] = p
        if p.cert:
            if p.cert in by_cert:
                problems.append(f"{where}: cert {p.cert!r} is also principal "
                                f"{by_cert[p.cert].name!r}'s")
            by_cert[p.cert] = p
    if problems:
        raise AuthConfigError(source, problems)
    return AuthConfig(tuple(principals), source, by_token, by_cert)


def _principals(raw: dict[str, Any], problems: list[str]) -> list[Principal]:
    unknown = sorted(set(raw) - {"principal"})
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)} (only [[principal]] tables)")
    items = raw.get("principal")
    if not isinstance(items, list) or not items:
        problems.append("declare at least one [[principal]]")
        return []
    if len(items) > MAX_PRINCIPALS:
        problems.append(f"{len(items)} principals exceeds the limit of {MAX_PRINCIPALS}")
        return []
    out = []
    for i, item in enumerate(items):
        where = f"principal[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a table")
            continue
        p = _principal_of(item, where, problems)
        if p is not None:
            out.append(p)
    return out


def _strings(value: Any, where: str, problems: list[str], *, patterns: bool = False,
             limit: int = MAX_PATTERNS) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{where}: expected an array of strings")
        return ()
    if len(value) > limit:
        problems.append(f"{where}: {len(value)} entries exceeds the limit of {limit}")
        return ()
    if patterns:
        for v in value:
            why = pattern_problem(v)
            if why is not None:
                problems.append(f"{where}: bad pattern: {why}")
    return tuple(value)


def _principal_of(item: dict[str, Any], where: str, problems: list[str]) -> Principal | None:
    unknown = sorted(set(item) - {"name", "token_sha256", "cert", "accounts", "grant"})
    before = len(problems)
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)} (known: name, "
                        "token_sha256, cert, accounts, grant)")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"{where}: name: required, 1-128 of A-Z a-z 0-9 . _ @ -, got "
                        f"{name!r}")
        name = "?"
    where = f"{where} ({name!r})"
    token = item.get("token_sha256", "")
    digest = b""
    if not isinstance(token, str) or (token and not _HEX64_RE.match(token)):
        problems.append(f"{where}: token_sha256: 64 lower-case hex digits (the sha256 of the "
                        "token, never the token itself; `xdc auth token NAME` prints one)")
    elif token:
        digest = bytes.fromhex(token)
    cert = item.get("cert", "")
    if not isinstance(cert, str) or len(cert) > MAX_PATTERN_BYTES:
        problems.append(f"{where}: cert: the client certificate's identity, a string")
        cert = ""
    if not digest and not cert:
        problems.append(f"{where}: neither token_sha256 nor cert: it could never "
                        "authenticate")
    accounts = _strings(item.get("accounts", []), f"{where}: accounts", problems,
                        limit=MAX_ACCOUNTS)
    grants_raw = item.get("grant", [])
    grants = []
    if not isinstance(grants_raw, list) or not all(isinstance(g, dict) for g in grants_raw):
        problems.append(f"{where}: grant: expected [[principal.grant]] tables")
        grants_raw = []
    if len(grants_raw) > MAX_GRANTS:
        problems.append(f"{where}: {len(grants_raw)} grants exceeds the limit of {MAX_GRANTS}")
        grants_raw = []
    for j, g in enumerate(grants_raw):
        grant = _grant_of(g, f"{where}: grant[{j}]", problems)
        if grant is not None:
            grants.append(grant)
    if len(problems) > before:
        return None
    return Principal(name, digest, cert, frozenset(accounts), tuple(grants))


def _grant_of(g: dict[str, Any], where: str, problems: list[str]) -> Grant | None:
    before = len(problems)
    unknown = sorted(set(g) - {"operations", "streams", "types"})
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)} (known: operations, "
                        "streams, types)")
    ops = _strings(g.get("operations"), f"{where}: operations", problems)
    for op in ops:
        if op not in OPERATIONS:
            problems.append(f"{where}: operations: unknown operation {op!r} (operations: "
                            f"{', '.join(OPERATIONS)})")
    if not ops:
        problems.append(f"{where}: operations: at least one of {', '.join(OPERATIONS)}")
    stream_ops = set(ops) - NODE_OPERATIONS
    streams = _strings(g.get("streams", []), f"{where}: streams", problems, patterns=True)
    if stream_ops and not streams:
        problems.append(f"{where}: streams: required for {', '.join(sorted(stream_ops))} "
                        "(patterns such as \"orders.*\"; \"*\" is every stream)")
    if not stream_ops and streams:
        problems.append(f"{where}: streams: {' and '.join(sorted(set(ops)))} take(s) no "
                        "streams; grant stream operations in a grant of their own")
    types = _strings(g.get("types", []), f"{where}: types", problems, patterns=True)
    if types and APPEND not in ops:
        problems.append(f"{where}: types: only restricts append, which this grant lacks")
    if len(problems) > before:
        return None
    return Grant(frozenset(ops), streams, types)


# ---- enforcement ---------------------------------------------------------------------------

# A rule sees the principal and the request (None for a streaming request) and raises a
# StoreError to refuse.
Rule = Callable[[Principal, Any], None]
# Full method name -> rule. None: the Guard lets every call through, for methods open to
# all and for handlers that authenticate themselves (Guard.authenticate).
Rules = Mapping[str, Rule | None]


def authenticated(principal: Principal, request: Any) -> None:
    """Any principal."""


def admin_rule(what: str) -> Rule:
    def rule(principal: Principal, request: Any) -> None:
        principal.require_admin(what)
    return rule


def replicate_rule(what: str) -> Rule:
    def rule(principal: Principal, request: Any) -> None:
        principal.require_replicate(what)
    return rule


class Guard(grpc.aio.ServerInterceptor):
    """The server interceptor: authenticates every call its rules do not let through and
    applies its method's rule, before the handler runs."""

    def __init__(self, config: AuthConfig, rules: Rules) -> None:
        self.config = config
        self.rules = dict(rules)

    def authenticate(self, context: grpc.aio.ServicerContext, method: str) -> Principal:
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == MD_AUTHORIZATION:
                token = value.decode() if isinstance(value, bytes) else value
                break
        if token is not None:
            scheme, _, credential = token.strip().partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or not credential or len(token) > MAX_TOKEN_BYTES:
                raise unauthenticated(f"{method}: malformed authorization metadata: expected "
                                      "'Bearer <token>'")
            principal = self.config.by_token.get(token_digest(credential))
            if principal is None:
                raise unauthenticated(f"{method}: unknown bearer token (it is no principal's "
                                      "in the server's auth file)")
            return principal
        identity = peer_identity(context)
        if identity is not None:
            principal = self.config.by_cert.get(identity.uri)
            if principal is not None:
                return principal
            raise unauthenticated(f"{method}: certificate {identity.uri} is no principal's "
                                  "in the server's auth file, and no bearer token was sent")
        raise unauthenticated(f"{method}: no credentials: this server requires the metadata "
                              "'authorization: Bearer <token>' (xdc: --token or XDC_TOKEN)")

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        if method in self.rules:
            rule = self.rules[method]
            if rule is None:
                return handler
        else:
            rule = admin_rule(f"call {method} (a method no rule names needs admin)")

        async def before(request: Any, context: grpc.aio.ServicerContext) -> None:
            try:
                principal = self.authenticate(context, method)
                rule(principal, request)
            except StoreError as err:
                await context.abort(err.code, err.message)

        return guarded(handler, before)


Before = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def guarded(handler: grpc.RpcMethodHandler, before: Before) -> grpc.RpcMethodHandler:
    """`handler` with `before(request, context)` awaited first (request None when the
    request streams): a refusal aborts the call before the handler runs."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        inner = handler.stream_stream
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        inner = handler.stream_unary
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        inner = handler.unary_stream
        make = grpc.unary_stream_rpc_method_handler
    else:
        inner = handler.unary_unary
        make = grpc.unary_unary_rpc_method_handler
    streams_in = handler.request_streaming

    if inspect.isasyncgenfunction(inner):
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await before(None if streams_in else request, context)
            async with contextlib.aclosing(inner(request, context)) as items:
                async for item in items:
                    yield item
        return make(streaming, des, ser)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await before(None if streams_in else request, context)
        return await inner(request, context)
    return make(unary, des, ser)
