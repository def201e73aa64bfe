"""Static checks of deploy/terraform (the terraform binary cannot be installed here).

Every .tf file is parsed with python-hcl2; variables, module calls, providers and
security groups are checked structurally; the cluster TOML template is rendered with the
example's default values by a small renderer of the `templatefile` syntax the templates
use, and loaded with the project's own config loader. checkov runs separately
(scripts/lint-infra) because it needs its own virtualenv.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from geo import config

hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is a dev dependency")
from hcl2.utils import SerializationOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "terraform"
EXAMPLE = ROOT / "examples" / "three-region"
MODULES = ROOT / "modules"
META_ARGS = {"source", "version", "providers", "count", "for_each", "depends_on"}
OPEN_WORLD = {"0.0.0.0/0", "::/0"}

# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    path: Path
    blocks: dict[str, list[dict[str, Any]]]  # block type -> parsed blocks, all files merged

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def labelled(self, kind: str) -> dict[str, dict[str, Any]]:
        """Blocks with one label (variable, module, output): label -> body."""
        return {label: body for block in self.blocks.get(kind, []) for label, body in
                block.items()}

    def resources(self, rtype: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for block in self.blocks.get("resource", []):
            for t, named in block.items():
                if t == rtype:
                    found.update(named)
        return found

    @property
    def variables(self) -> dict[str, dict[str, Any]]:
        return self.labelled("variable")


def parse(path: Path) -> dict[str, Any]:
    return hcl2.loads(path.read_text(),
                      serialization_options=SerializationOptions(strip_string_quotes=True))


@functools.cache
def load_module(path: Path) -> Module:
    blocks: dict[str, list[dict[str, Any]]] = {}
    for tf in sorted(path.glob("*.tf")):
        for kind, items in parse(tf).items():
            blocks.setdefault(kind, []).extend(items)
    return Module(path, blocks)


def module_dirs() -> list[Path]:
    return sorted({p.parent for p in ROOT.rglob("*.tf")})


def strings(node: Any, *, skip_keys: frozenset[str] = frozenset()) -> Iterator[str]:
    """Every expression string in a parsed tree (keys too: `(var.x) = ...` map keys)."""
    if isinstance(node, str):
        if "${" in node:  # literal strings (descriptions) are not expressions
            yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            if k.startswith("__") or k in skip_keys:
                continue
            yield from strings(k)
            yield from strings(v, skip_keys=skip_keys)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item, skip_keys=skip_keys)


VAR_RE = re.compile(r"\bvar\.([A-Za-z_][A-Za-z0-9_-]*)")


def var_refs(node: Any) -> set[str]:
    return {m for s in strings(node) for m in VAR_RE.findall(s)}


def bare(expr: str) -> str:
    """`${aws.r0}` -> `aws.r0`: the parser wraps traversals used as keys or values."""
    return expr[2:-1] if expr.startswith("${") and expr.endswith("}") else expr


def test_every_tf_file_parses() -> None:
    files = sorted(ROOT.rglob("*.tf"))
    assert len(files) >= 20, "deploy/terraform looks empty"
    for tf in files:
        try:
            parse(tf)
        except Exception as exc:  # the parser's own exception types vary by version
            pytest.fail(f"{tf.relative_to(ROOT)} does not parse: {exc}")


# --- variables ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", module_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_variables_declared_and_used(path: Path) -> None:
    mod = load_module(path)
    declared = set(mod.variables)
    # Uses outside variable blocks: a variable read only by validations is still unused.
    outside = {k: v for k, v in mod.blocks.items() if k != "variable"}
    used = var_refs(outside)
    referenced = used | var_refs(mod.blocks.get("variable", []))
    assert not referenced - declared, f"{mod.name}: undeclared {sorted(referenced - declared)}"
    assert not declared - used, f"{mod.name}: declared but unused {sorted(declared - used)}"


@pytest.mark.parametrize("path", module_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_variables_have_description_and_type(path: Path) -> None:
    mod = load_module(path)
    for name, body in mod.variables.items():
        assert body.get("description", "").strip(), f"{mod.name}: var.{name} has no description"
        assert "type" in body, f"{mod.name}: var.{name} has no type"


def test_outputs_have_descriptions() -> None:
    for path in module_dirs():
        for name, body in load_module(path).labelled("output").items():
            assert body.get("description", "").strip(), f"{path}: output {name}"


# --- module calls ------------------------------------------------------------------------------


def module_calls() -> Iterator[tuple[Module, str, dict[str, Any], Module]]:
    for path in module_dirs():
        caller = load_module(path)
        for name, body in caller.labelled("module").items():
            source = body["source"]
            assert source.startswith("./") or source.startswith("../"), (
                f"{caller.name}: module {name} must use a local source, got {source}")
            target = (path / source).resolve()
            assert (target / "variables.tf").exists() or list(target.glob("*.tf")), (
                f"{caller.name}: module {name}: {source} has no .tf files")
            yield caller, name, body, load_module(target)


def test_module_inputs_match_module_variables() -> None:
    calls = list(module_calls())
    assert len(calls) >= 10
    for caller, name, body, target in calls:
        inputs = {k for k in body if k not in META_ARGS and not k.startswith("__")}
        declared = set(target.variables)
        required = {v for v, spec in target.variables.items() if "default" not in spec}
        where = f"{caller.name}: module {name} -> {target.name}"
        assert not inputs - declared, f"{where}: unknown inputs {sorted(inputs - declared)}"
        assert not required - inputs, f"{where}: missing inputs {sorted(required - inputs)}"


def uses_aws(mod: Module, seen: frozenset[Path] = frozenset()) -> bool:
    if "resource" in mod.blocks or "data" in mod.blocks:
        return True
    return any(uses_aws(load_module((mod.path / body["source"]).resolve()), seen | {mod.path})
               for body in mod.labelled("module").values())


def configuration_aliases(mod: Module) -> set[str]:
    aliases: set[str] = set()
    for block in mod.blocks.get("terraform", []):
        for req in block.get("required_providers", []):
            for spec in req.values():
                if isinstance(spec, dict):
                    for a in spec.get("configuration_aliases", []):
                        aliases.add(bare(a))
    return aliases


def test_providers_are_aliased_per_region_and_passed_explicitly() -> None:
    root = load_module(EXAMPLE)
    providers = [body for block in root.blocks["provider"] for body in block.values()]
    aliases = sorted(p["alias"] for p in providers)
    assert aliases == ["r0", "r1", "r2"], "one aliased provider per region, no default one"
    regions = {p["region"] for p in providers}
    assert regions == {"${var.regions[0].aws_region}", "${var.regions[1].aws_region}",
                       "${var.regions[2].aws_region}"}
    for caller, name, body, target in module_calls():
        needed = configuration_aliases(target)
        passed = {bare(k): bare(v) for k, v in body.get("providers", {}).items()}
        if needed:
            assert set(passed) == needed, f"{caller.name}: module {name} needs {needed}"
        elif caller.path == EXAMPLE and uses_aws(target):
            # No default provider exists in the root: an implicit one would be unconfigured.
            assert set(passed) == {"aws"}, f"root module {name} must pass providers"


# --- the example's defaults ----------------------------------------------------------------------


def defaults() -> dict[str, Any]:
    """The example's variable defaults, `optional(type, default)` attributes filled in."""
    values: dict[str, Any] = {}
    for name, spec in load_module(EXAMPLE).variables.items():
        if "default" not in spec:
            continue
        value = spec["default"]
        optional = dict(re.findall(r"(\w+)\s*=\s*optional\(\w+,\s*([^)]+)\)", spec["type"]))
        fill = {k: json.loads(v) if not v.startswith('"') else v.strip('"')
                for k, v in optional.items()}
        if isinstance(value, dict) and fill:
            value = {**fill, **value}
        elif isinstance(value, list) and fill:
            value = [{**fill, **item} for item in value]
        values[name] = value
    return values


def test_voters_odd_and_no_region_holds_a_majority() -> None:
    d = defaults()
    voters = [n for n in d["store_nodes"] if n["voter"]]
    assert len(voters) % 2 == 1, "default voter count must be odd"
    assert any(not n["voter"] for n in d["store_nodes"]), "the example shows a standby"
    for region in d["regions"]:
        in_region = [n for n in voters if n["region"] == region["name"]]
        assert 2 * len(in_region) < len(voters), f"{region['name']} holds a voter majority"
    etcd = d["etcd_members"]
    assert len(etcd) in (3, 5)
    for region in d["regions"]:
        assert 2 * sum(m["region"] == region["name"] for m in etcd) < len(etcd)
    names = [r["name"] for r in d["regions"]]
    aws = [r["aws_region"] for r in d["regions"]]
    assert len(set(names)) == len(set(aws)) == 3, "regions must be distinct"


def test_validations_guard_the_invariants() -> None:
    variables = load_module(EXAMPLE).variables

    def conditions(name: str) -> str:
        return " ".join(v["condition"] for v in variables[name].get("validation", []))

    assert "% 2 == 1" in conditions("store_nodes")  # odd voters
    assert "distinct" in conditions("regions")
    assert "0.0.0.0/0" in conditions("client_cidrs")
    assert "contains([3, 5]" in conditions("etcd_members")


def _arithmetic(condition: str, values: dict[str, float]) -> bool:
    """An HCL condition of numbers, `var.` references, + * and >=, evaluated."""
    expr = VAR_RE.sub(lambda m: repr(values[m.group(1)]), bare(condition))
    assert re.fullmatch(r"[0-9.\s+*>=]+", expr), f"not plain arithmetic: {expr}"
    return bool(eval(expr))  # checked above: digits and operators only


def test_the_default_lease_outlasts_an_etcd_election_and_the_plan_warns_otherwise() -> None:
    """The store leader's lease must outlast etcd's own election (about 4 election
    timeouts plus a few heartbeats: an election, another after a split vote), or every
    loss of etcd's leader fails the store over (measured on the local cluster: README).
    The example's defaults keep that rule; a shorter lease is a choice the plan warns of
    with a check block (a warning, not an error)."""
    module = load_module(EXAMPLE)
    [check] = [c["lease_outlasts_an_etcd_election"] for c in module.blocks.get("check", [])
               if "lease_outlasts_an_etcd_election" in c]
    condition = check["assert"][0]["condition"]
    defaults = {name: spec["default"] for name, spec in module.variables.items()
                if isinstance(spec.get("default"), int | float)}
    assert _arithmetic(condition, defaults)
    # Session 14's drills: 2 s under etcd's 100/1000 ms lost the term to elections.
    assert not _arithmetic(condition, defaults | {"lease_ttl_s": 2})
    # A shorter etcd election timeout lets a shorter lease keep the rule.
    assert _arithmetic(condition, defaults | {"lease_ttl_s": 3, "etcd_heartbeat_ms": 60,
                                              "etcd_election_timeout_ms": 600})


def hcl_regex(condition: str) -> re.Pattern[str]:
    literal = re.search(r'regex\("((?:[^"\\]|\\.)*)"', condition)
    assert literal, condition
    return re.compile(re.sub(r"\\(.)", r"\1", literal.group(1)))


@pytest.mark.parametrize(
    ("version", "ok"),
    [("3.5.6", True), ("3.5.33", True), ("3.6.0", True), ("3.10.2", True), ("3.5.5", False),
     ("3.5.2", False), ("3.4.23", False), ("3.5", False), ("v3.5.17", False)],
)
def test_etcd_version_validation_requires_3_5_6_or_newer(version: str, ok: bool) -> None:
    spec = load_module(EXAMPLE).variables["etcd_version"]
    pattern = hcl_regex(spec["validation"][0]["condition"])
    assert bool(pattern.fullmatch(version)) is ok
    assert pattern.fullmatch(spec["default"])
    assert re.fullmatch(r"[0-9a-f]{64}", load_module(EXAMPLE).variables["etcd_sha256"]["default"])


def test_tls_material_never_enters_terraform() -> None:
    """Only secret names and ARNs pass through: no resource may generate or hold key
    material, no data source may read a secret's value."""
    forbidden = ("tls_private_key", "tls_self_signed_cert", "tls_locally_signed_cert",
                 "aws_secretsmanager_secret_version", "local_file", "local_sensitive_file")
    for path in module_dirs():
        for kind in ("resource", "data"):
            for block in load_module(path).blocks.get(kind, []):
                for rtype in block:
                    assert rtype not in forbidden, f"{path}: {rtype} would put secrets in state"
        text = "\n".join(p.read_text() for p in path.glob("*.tf"))
        assert "BEGIN " not in text and "PRIVATE KEY" not in text


# --- security groups ---------------------------------------------------------------------------


def security_rules() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path in module_dirs():
        mod = load_module(path)
        for name, sg in mod.resources("aws_security_group").items():
            for direction in ("ingress", "egress"):
                for rule in sg.get(direction, []):
                    yield f"{mod.name}:{name}", direction, rule
        for rtype, direction in (("aws_security_group_rule", None),
                                 ("aws_vpc_security_group_ingress_rule", "ingress"),
                                 ("aws_vpc_security_group_egress_rule", "egress")):
            for name, rule in mod.resources(rtype).items():
                yield f"{mod.name}:{name}", direction or rule["type"], rule


def cidrs_of(rule: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("cidr_blocks", "ipv6_cidr_blocks", "cidr_ipv4", "cidr_ipv6"):
        value = rule.get(key)
        out += value if isinstance(value, list) else [value] if value else []
    return out


def test_no_ingress_from_the_open_internet() -> None:
    rules = list(security_rules())
    assert sum(d == "ingress" for _, d, _ in rules) >= 7
    for where, direction, rule in rules:
        if direction != "ingress":
            continue
        for cidr in cidrs_of(rule):
            assert cidr not in OPEN_WORLD, f"{where}: ingress from {cidr}"


def test_internal_ports_only_from_cluster_cidrs() -> None:
    client_facing = {"${var.ports.client}", "${var.ports.gateway}"}
    internal = {"${var.ports.peer}", "${var.ports.engine}", "${var.ports.etcd_client}",
                "${var.ports.etcd_peer}"}
    seen = set()
    for where, direction, rule in security_rules():
        if direction != "ingress":
            continue
        port = rule["from_port"]
        assert rule["to_port"] == port, f"{where}: ingress must open one port, not a range"
        seen.add(port)
        allowed = ({"${var.client_cidrs}", "${var.cluster_cidrs}"} if port in client_facing
                   else {"${var.cluster_cidrs}"})
        assert port in client_facing | internal, f"{where}: unexpected ingress port {port}"
        assert set(cidrs_of(rule)) <= allowed, f"{where}: port {port} from {cidrs_of(rule)}"
        assert rule.get("description"), f"{where}: every rule says why it exists"
    assert seen == client_facing | internal


def test_open_egress_is_http_and_https_only() -> None:
    for where, direction, rule in security_rules():
        if direction == "egress" and set(cidrs_of(rule)) & OPEN_WORLD:
            assert (rule["from_port"], rule["to_port"]) in {(80, 80), (443, 443)}, where


def test_cluster_and_client_cidrs_given_to_security_groups_are_not_open() -> None:
    d = defaults()
    assert not set(d["client_cidrs"]) & OPEN_WORLD
    vpcs = [ipaddress.ip_network(r["vpc_cidr"]) for r in d["regions"]]
    for i, a in enumerate(vpcs):
        assert 8 <= a.prefixlen <= 16, "subnets are /8 smaller and need host .100"
        for b in vpcs[i + 1:]:
            assert not a.overlaps(b), "peered VPCs must not overlap"
    region = load_module(MODULES / "region").labelled("module")["security"]
    assert region["cluster_cidrs"] == "${var.cluster_cidrs}"
    example = load_module(EXAMPLE)
    assert {example.labelled("module")[f"region_{i}"]["cluster_cidrs"] for i in range(3)} == {
        "${local.cluster_cidrs}"}
    assert example.blocks["locals"][0]["cluster_cidrs"] == "${[for r in var.regions : r.vpc_cidr]}"


# --- templates ------------------------------------------------------------------------------


class Template:
    """The subset of Terraform's template language (`templatefile`) our templates use:
    `${expr}` and `%{ for x in expr }`, `%{ for k, v in expr }`, `%{ if expr }`,
    `%{ else }`, `%{ endfor }`, `%{ endif }`, with `~` strip markers; expressions are
    names, `.attr`, `[index]` and the functions below. Anything else is an error, so a
    template can only grow beyond what this checks on purpose."""

    TOKEN = re.compile(r"(?<![$%])([$%])\{(~?)\s*(.*?)\s*(~?)\}", re.S)
    FUNCS = {
        "jsonencode": lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"),
        "base64encode": lambda v: base64.b64encode(v.encode()).decode(),
    }

    def __init__(self, text: str) -> None:
        parts: list[tuple[str, str]] = []
        pos = 0
        strip_next = False
        for m in self.TOKEN.finditer(text):
            literal = text[pos:m.start()]
            if strip_next:
                literal = literal.lstrip()
            if m.group(2):
                literal = literal.rstrip()
            parts.append(("text", literal))
            parts.append(("interp" if m.group(1) == "$" else "directive", m.group(3)))
            strip_next = bool(m.group(4))
            pos = m.end()
        tail = text[pos:]
        parts.append(("text", tail.lstrip() if strip_next else tail))
        parts = [(k, v.replace("$${", "${").replace("%%{", "%{") if k == "text" else v)
                 for k, v in parts]
        self.tree, rest = self._nest(parts, 0, ())
        assert rest == len(parts)

    def _nest(self, parts: list[tuple[str, str]], i: int, until: tuple[str, ...]
              ) -> tuple[list[Any], int]:
        out: list[Any] = []
        while i < len(parts):
            kind, body = parts[i]
            if kind != "directive":
                out.append((kind, body))
                i += 1
                continue
            word = body.split()[0]
            if word in until:
                return out, i
            if word == "for":
                m = re.fullmatch(r"for\s+(\w+)(?:\s*,\s*(\w+))?\s+in\s+(.+)", body)
                if not m:
                    raise ValueError(f"unsupported directive %{{{body}}}")
                inner, i = self._nest(parts, i + 1, ("endfor",))
                out.append(("for", m.group(1), m.group(2), m.group(3), inner))
            elif word == "if":
                then, i = self._nest(parts, i + 1, ("else", "endif"))
                other: list[Any] = []
                if parts[i][1].split()[0] == "else":
                    other, i = self._nest(parts, i + 1, ("endif",))
                out.append(("if", body[2:].strip(), then, other))
            else:
                raise ValueError(f"unsupported directive %{{{body}}}")
            i += 1  # past endfor / endif
        if until:
            raise ValueError(f"missing %{{{until[-1]}}}")
        return out, i

    def render(self, context: dict[str, Any]) -> str:
        return self._render(self.tree, context)

    def _render(self, nodes: list[Any], ctx: dict[str, Any]) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "interp":
                out.append(self._format(self._eval(node[1], ctx)))
            elif node[0] == "for":
                _, a, b, expr, inner = node
                seq = self._eval(expr, ctx)
                # Terraform iterates maps in lexical key order; lists give (index, value).
                items = sorted(seq.items()) if isinstance(seq, dict) else list(enumerate(seq))
                for k, v in items:
                    scope = {**ctx, a: v} if b is None else {**ctx, a: k, b: v}
                    out.append(self._render(inner, scope))
            else:
                _, expr, then, other = node
                cond = self._eval(expr, ctx)
                if not isinstance(cond, bool):
                    raise TypeError(f"%{{if {expr}}} needs a bool, got {cond!r}")
                out.append(self._render(then if cond else other, ctx))
        return "".join(out)

    def _eval(self, expr: str, ctx: dict[str, Any]) -> Any:
        call = re.fullmatch(r"(\w+)\((.*)\)", expr)
        if call:
            return self.FUNCS[call.group(1)](self._eval(call.group(2), ctx))
        m = re.fullmatch(r"(\w+)((?:\.\w+|\[\d+\])*)", expr)
        if not m:
            raise ValueError(f"unsupported expression {expr!r}")
        value = ctx[m.group(1)]
        for step in re.findall(r"\.\w+|\[\d+\]", m.group(2)):
            value = value[step[1:]] if step.startswith(".") else value[int(step[1:-1])]
        return value

    @staticmethod
    def _format(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | str):
            return str(value)
        raise TypeError(f"cannot interpolate {type(value).__name__} {value!r}")

    def free_names(self) -> set[str]:
        """Names the template reads from its context."""
        return self._free(self.tree, frozenset())

    def _free(self, nodes: list[Any], bound: frozenset[str]) -> set[str]:
        names: set[str] = set()

        def roots(expr: str) -> set[str]:
            found = set(re.findall(r"(?<![.\w])([A-Za-z_]\w*)\b(?!\s*\()", expr))
            return found - bound

        for node in nodes:
            if node[0] == "interp":
                names |= roots(node[1])
            elif node[0] == "for":
                _, a, b, expr, inner = node
                names |= roots(expr) | self._free(inner, bound | {a} | ({b} if b else set()))
            elif node[0] == "if":
                names |= roots(node[1]) | self._free(node[2], bound) | self._free(node[3], bound)
        return names


def templatefile_calls() -> Iterator[tuple[Path, Path, set[str]]]:
    """(module dir, template path, keys passed) for every templatefile() call."""
    call = re.compile(r'templatefile\("\$\{path\.module\}/([^"]+)",\s*\{')
    for path in module_dirs():
        for expr in strings(load_module(path).blocks):
            for m in call.finditer(expr):
                yield path, path / m.group(1), top_level_keys(expr, m.end() - 1)


def top_level_keys(expr: str, brace: int) -> set[str]:
    """Keys of the HCL object literal starting at expr[brace] == "{"."""
    depth, i, keys, quoted = 0, brace, set(), False
    segment_start = brace + 1
    while i < len(expr):
        c = expr[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
            if depth == 0:
                break
        elif c == "," and depth == 1:
            segment_start = i + 1
        elif c == "=" and depth == 1 and expr[i + 1] not in "=>" and expr[i - 1] not in "!<>=":
            keys.add(expr[segment_start:i].strip())
        i += 1
    return keys


def test_every_template_gets_exactly_the_variables_it_reads() -> None:
    calls = list(templatefile_calls())
    templates = {t for _, t, _ in calls}
    on_disk = set(ROOT.rglob("*.tftpl"))
    assert templates == on_disk, f"unused templates: {sorted(on_disk - templates)}"
    for module, template, keys in calls:
        names = Template(template.read_text()).free_names()
        where = template.relative_to(ROOT)
        assert names <= keys, f"{where} reads {sorted(names - keys)} that {module} never passes"
        assert keys <= names, f"{module} passes {sorted(keys - names)} that {where} never reads"


def example_ips() -> dict[str, list[str]]:
    """Private IPs of the example's store nodes, engine hosts and etcd members, computed
    from its defaults the way examples/three-region/main.tf does (cidrsubnet/cidrhost)."""
    d = defaults()
    index = {r["name"]: i for i, r in enumerate(d["regions"])}
    private = [
        list(ipaddress.ip_network(r["vpc_cidr"]).subnets(prefixlen_diff=8))[1:1 + len(r[
            "availability_zones"])]
        for r in d["regions"]
    ]

    def place(items: list[dict[str, Any]], base: int) -> list[str]:
        ips = []
        for i, item in enumerate(items):
            before = sum(1 for o in items[:i] if (o["region"], o["az_index"]) ==
                         (item["region"], item["az_index"]))
            subnet = private[index[item["region"]]][item["az_index"]]
            ips.append(str(subnet.network_address + base + before))
        return ips

    return {"store": place(d["store_nodes"], 10), "engine": place(d["engine_hosts"], 50),
            "etcd": place(d["etcd_members"], 100)}


def example_locals() -> dict[str, Any]:
    return load_module(EXAMPLE).blocks["locals"][0]


def example_context() -> dict[str, Any]:
    """The cluster_config template's context for the example's defaults, as
    modules/cluster_config/main.tf builds it."""
    d = defaults()
    ips = example_ips()
    ports = d["ports"]
    locals_ = example_locals()
    tls_dir = locals_["tls_dir"]
    return {
        "cluster": d["cluster_name"],
        "failover": d["failover"],
        "lease_ttl_s": d["lease_ttl_s"],
        "etcd_endpoints": [f"{ip}:{ports['etcd_client']}" for ip in ips["etcd"]],
        "regions": [r["name"] for r in d["regions"]],
        "members": [
            {"id": n["id"], "region": n["region"], "client": f"{ip}:{ports['client']}",
             "peer": f"{ip}:{ports['peer']}", "voter": n["voter"],
             "cert": f"{tls_dir}/{n['id']}.pem", "key": f"{tls_dir}/{n['id']}-key.pem"}
            for n, ip in zip(d["store_nodes"], ips["store"], strict=True)
        ],
        "data_dir": locals_["store_data_dir"],
        "tls": tls_dir != "",
        "tls_dir": tls_dir,
        "client_certs": d["client_certs"],
        "etcd_user": f"{d['cluster_name']}-node",
        "etcd_password_file": locals_["etcd_password_file"],
        "auth": d["client_auth"],
        "auth_file": AUTH_FILE if d["client_auth"] else "",
    }


AUTH_FILE = "/etc/xdc/auth.toml"


def test_cluster_toml_inputs_are_what_the_example_passes() -> None:
    """example_context mirrors these expressions: keep them in step."""
    locals_ = example_locals()
    assert locals_["etcd_user"] == "${var.cluster_name}-node"
    assert locals_["auth_file"] == f'${{var.client_auth ? "{AUTH_FILE}" : ""}}'
    call = load_module(EXAMPLE).labelled("module")["cluster_config"]
    assert call["etcd_user"] == "${local.etcd_user}"
    assert call["auth_file"] == "${local.auth_file}"
    assert call["client_certs"] == "${var.client_certs}"
    members = load_module(MODULES / "cluster_config").blocks["locals"][0]["members"]
    assert '"${var.tls_dir}/${m.id}.pem"' in members
    assert '"${var.tls_dir}/${m.id}-key.pem"' in members


def test_rendered_cluster_toml_passes_the_config_loader(tmp_path: Path) -> None:
    template = Template((MODULES / "cluster_config" / "cluster.toml.tftpl").read_text())
    context = example_context()
    assert template.free_names() <= set(context)
    text = template.render(context)
    (tmp_path / "cluster.toml").write_text(text)
    cfg = config.load(tmp_path / "cluster.toml")
    d = defaults()
    assert cfg.cluster == d["cluster_name"]
    assert cfg.failover == "manual"
    assert cfg.lease_ttl_s == d["lease_ttl_s"]
    assert cfg.warnings == (), cfg.warnings
    assert [m.id for m in cfg.members] == [n["id"] for n in d["store_nodes"]]
    assert len(cfg.voters) % 2 == 1
    assert [m.id for m in cfg.standbys] == ["use1-dr"]
    assert len(cfg.etcd.endpoints) == 3
    assert cfg.member("use1-a").client == "10.40.1.10:7000"
    assert cfg.member("use1-dr").peer == "10.40.2.10:7100"  # second AZ's subnet
    # Each member names its own certificate; no host-wide one for members to fall back on.
    for m in cfg.members:
        assert (m.cert, m.key) == (Path(f"/etc/xdc/tls/{m.id}.pem"),
                                   Path(f"/etc/xdc/tls/{m.id}-key.pem"))
    assert cfg.tls == config.TlsConfig(ca=Path("/etc/xdc/tls/ca.pem"), client_certs=True)
    # etcd over TLS with the host's own certificate, and the node user's password file.
    assert cfg.etcd.ca == Path("/etc/xdc/tls/ca.pem")
    assert (cfg.etcd.cert, cfg.etcd.key) == (Path("/etc/xdc/tls/host.pem"),
                                             Path("/etc/xdc/tls/host-key.pem"))
    assert cfg.etcd.user == "xdc-prod-node"
    assert cfg.etcd.password_file == Path("/etc/xdc/etcd-node.password")
    assert cfg.auth_file == Path(AUTH_FILE)
    assert cfg.tiers_file == tmp_path / "tiers.toml"
    # Every address lies in its region's VPC: security groups open ports to those CIDRs.
    vpc = {r["name"]: ipaddress.ip_network(r["vpc_cidr"]) for r in d["regions"]}
    for m in cfg.members:
        assert ipaddress.ip_address(config.split_hostport(m.client)[0]) in vpc[m.region]
    # Without client auth and with server-only TLS on the client API.
    plain = config.loads(template.render({**context, "auth": False, "auth_file": "",
                                          "client_certs": False}))
    assert plain.auth_file is None and plain.tls is not None and not plain.tls.client_certs


def test_rendered_cluster_toml_escapes_strings() -> None:
    template = Template((MODULES / "cluster_config" / "cluster.toml.tftpl").read_text())
    context = {**example_context(), "tls": False}
    context["members"] = [{**context["members"][0], "id": 'a"b'}]
    with pytest.raises(config.ConfigError) as info:
        config.loads(template.render(context))
    assert "member[0].id" in str(info.value)  # rejected by the loader, not a TOML syntax error


def test_rendered_tier_file_matches_the_variable() -> None:
    template = Template((MODULES / "cluster_config" / "tiers.toml.tftpl").read_text())
    tiers = defaults()["tiers"]
    parsed = tomllib.loads(template.render({"tiers": tiers}))
    assert parsed == {"tier": tiers}
    assert parsed["tier"][0]["services"] == ["leader", "replication", "append"]


def test_template_renderer_follows_terraform_whitespace_rules() -> None:
    t = Template("a\n%{ for x in xs ~}\n- ${x}\n%{ endfor ~}\nb $${literal} ${jsonencode(m)}")
    assert t.render({"xs": [1, True], "m": {"k": "<v>"}}) == (
        'a\n- 1\n- true\nb ${literal} {"k":"\\u003cv\\u003e"}')
    assert t.free_names() == {"xs", "m"}
    with pytest.raises(ValueError, match="unsupported"):
        Template("${a + b}").render({"a": 1, "b": 2})


# --- bootstrap (cloud-init) -------------------------------------------------------------------


def render(module: str, template: str, context: dict[str, Any]) -> str:
    return Template((MODULES / module / template).read_text()).render(context)


def write_files(cloud_init: str) -> dict[str, str]:
    """path -> decoded content of the write_files entries, checking the YAML layout the
    template promises (no PyYAML here): top-level keys, column-0 list items, 2-space
    indented item keys."""
    lines = cloud_init.splitlines()
    assert lines[0] == "#cloud-config"
    files: dict[str, str] = {}
    section = None
    path = None
    for line in lines[1:]:
        if not line or line.startswith("#"):
            continue
        if re.fullmatch(r"[a-z_]+:( .+)?", line):
            section = line.split(":")[0]
        elif line.startswith("- "):
            if section == "write_files":
                m = re.fullmatch(r"- path: (/\S+)", line)
                assert m, line
                path = m.group(1)
        elif line.startswith("  ") and not line.startswith("   "):
            key, _, value = line.strip().partition(": ")
            if section == "write_files" and key == "content":
                assert path is not None
                files[path] = base64.b64decode(value, validate=True).decode()
        else:
            pytest.fail(f"unexpected cloud-init line {line!r}")
    return files


SECRETS = {"region": "us-east-1", "prefix": "xdc-prod/",
           "arn_prefix": "arn:aws:secretsmanager:us-east-1:123456789012:secret:xdc-prod/",
           "kms_key_arns": []}


@dataclass(frozen=True)
class Host:
    """One host of the example, with what modules/region gives it: the certificates it
    holds (its own first) and the other secrets it fetches (path => secret name)."""

    name: str
    role: str  # store, engine, etcd
    ip: str
    certificates: tuple[str, ...]
    secret_files: dict[str, str]
    bootstrap_auth: bool = False


def example_hosts() -> list[Host]:
    """Mirrors examples/three-region (node_secret_files, etcd_bootstrap_secret_files, the
    first etcd member bootstraps), modules/region and the host modules' `certificates`;
    test_each_host_gets_only_its_own_certificates checks those expressions."""
    d = defaults()
    ips = example_ips()
    locals_ = example_locals()
    node_password, root_password = (locals_["etcd_password_file"],
                                    locals_["etcd_root_password_file"])
    node_files = {node_password: "etcd-node.password"}
    if d["client_auth"]:
        node_files[AUTH_FILE] = "auth.toml"
    bootstrap_files = {node_password: "etcd-node.password",
                       root_password: "etcd-root.password"}
    hosts = [Host(n["id"], "store", ip, (n["id"],), node_files)
             for n, ip in zip(d["store_nodes"], ips["store"], strict=True)]
    hosts += [Host(e["id"], "engine", ip, (e["id"], f"{e['id']}-gw"), node_files)
              for e, ip in zip(d["engine_hosts"], ips["engine"], strict=True)]
    hosts += [Host(m["name"], "etcd", ip, (m["name"],), bootstrap_files if i == 0 else {}, i == 0)
              for i, (m, ip) in enumerate(zip(d["etcd_members"], ips["etcd"], strict=True))]
    return hosts


def host_secret_files(tls_dir: str, host: Host) -> dict[str, str]:
    """modules/host `local.secret_files`: path on the host => secret name after the prefix."""
    files = {}
    if host.certificates:
        own = host.certificates[0]
        files = {f"{tls_dir}/ca.pem": "ca.pem", f"{tls_dir}/host.pem": f"{own}.pem",
                 f"{tls_dir}/host-key.pem": f"{own}-key.pem"}
        files |= {f"{tls_dir}/{c}.pem": f"{c}.pem" for c in host.certificates}
        files |= {f"{tls_dir}/{c}-key.pem": f"{c}-key.pem" for c in host.certificates}
    return files | host.secret_files


def test_each_host_gets_only_its_own_certificates() -> None:
    """The expressions example_hosts and host_secret_files mirror, and the one source of
    both what a host fetches and what its role may read: `local.secret_files`."""
    host = load_module(MODULES / "host")
    locals_ = host.blocks["locals"][0]
    assert locals_["secret_files"] == "${merge(local.tls_files, var.secret_files)}"
    for piece in ('"${var.tls_dir}/ca.pem" = "ca.pem"',
                  '"${var.tls_dir}/host.pem" = "${var.certificates[0]}.pem"',
                  '"${var.tls_dir}/host-key.pem" = "${var.certificates[0]}-key.pem"',
                  '{for c in var.certificates : "${var.tls_dir}/${c}.pem" => "${c}.pem"}',
                  '{for c in var.certificates : "${var.tls_dir}/${c}-key.pem" => "${c}-key.pem"}'):
        assert piece in locals_["tls_files"], piece
    assert "secret_files = local.secret_files" in locals_["setup_script"]
    iam = host.labelled("module")["iam"]
    assert iam["source"] == "../iam"
    assert iam["secret_arns"] == (
        '${[for s in sort(distinct(values(local.secret_files))) : '
        '"${var.secrets.arn_prefix}${s}-??????"]}')
    instance = host.resources("aws_instance")["this"]
    assert instance["iam_instance_profile"] == "${module.iam.instance_profile_name}"
    # Instance profiles come from the iam module only (one per host), whose policy grants
    # reading exactly var.secret_arns, and no other secret statement exists.
    for path in module_dirs():
        if path != MODULES / "iam":
            assert not load_module(path).resources("aws_iam_instance_profile"), path
    policies = [body for path in module_dirs() for block in load_module(path).blocks.get(
        "data", []) for body in block.get("aws_iam_policy_document", {}).values()]
    reads = [st for body in policies for st in body.get("statement", [])
             if any("secretsmanager" in a for a in st.get("actions", []))]
    assert len(reads) == 1 and reads[0]["resources"] == "${var.secret_arns}"
    assert set(reads[0]["actions"]) == {"secretsmanager:GetSecretValue",
                                        "secretsmanager:DescribeSecret"}
    # Which certificates each kind of host holds.
    calls = {name: load_module(MODULES / name).labelled("module")["host"]
             for name in ("store_node", "engine_host", "etcd_member")}
    assert calls["store_node"]["certificates"] == ["${var.member_id}"]
    assert calls["engine_host"]["certificates"] == ["${var.engine_id}", "${local.gateway}"]
    assert load_module(MODULES / "engine_host").blocks["locals"][0]["gateway"] == (
        "${var.engine_id}-gw")
    assert calls["etcd_member"]["certificates"] == ["${var.member_name}"]
    region = load_module(MODULES / "region").labelled("module")
    assert region["store"]["member_id"] == region["engine"]["engine_id"] == "${each.key}"
    assert region["etcd"]["member_name"] == "${each.key}"
    assert region["store"]["secret_files"] == region["engine"]["secret_files"] == (
        "${var.node_secret_files}")
    assert region["etcd"]["secret_files"] == (
        "${each.value.bootstrap_auth ? var.etcd_bootstrap_secret_files : {}}")
    root = example_locals()
    assert "bootstrap_auth = i == 0" in root["region_etcd"]
    assert root["node_secret_files"] == (
        '${merge({(local.etcd_password_file) = "etcd-node.password"}, var.client_auth ? '
        '{(local.auth_file) = "auth.toml"} : {})}')


def iam_matches(pattern: str, arn: str) -> bool:
    """IAM's ARN wildcards: `*` any run of characters, `?` exactly one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, arn) is not None


def test_each_role_reads_exactly_its_hosts_secrets() -> None:
    """Secret ARNs end in '-' and 6 random characters; a host's patterns must match its
    own secrets and no other holder's (e.g. use1-a's never use1-a-x's or use1-dr's)."""
    hosts = example_hosts()
    tls_dir = example_locals()["tls_dir"]
    every = {name for h in hosts for name in host_secret_files(tls_dir, h).values()}
    assert "ca-key.pem" not in every  # the CA's key never leaves the operator
    arns = {name: f"{SECRETS['arn_prefix']}{name}-AbC12z" for name in every}
    for h in hosts:
        own = set(host_secret_files(tls_dir, h).values())
        patterns = [f"{SECRETS['arn_prefix']}{s}-??????" for s in sorted(own)]
        readable = {name for name, arn in arns.items() if any(iam_matches(p, arn)
                                                                for p in patterns)}
        assert readable == own, (h.name, sorted(readable ^ own))
        keys = {n for n in own if n.endswith("-key.pem")}
        assert keys == {f"{c}-key.pem" for c in h.certificates}, h.name
        assert ("etcd-root.password" in own) == h.bootstrap_auth


def test_certificates_for_every_host_and_what_each_host_loads(tmp_path: Path) -> None:
    """The whole chain on each host: `xdc certs init` with every host's IP (as the output
    certs_init_command runs it), the secrets made from its files, each host's setup
    script fetching its own (rendered template), and then what that host runs loading
    them: a store node its member certificate (and no other member's), etcd access and
    the auth file; an engine host its engine and gateway certificates; an etcd member its
    server certificate, naming its IP."""
    from store import auth
    from xdc import cli
    from xdc.tls import Identity, Tls

    d = defaults()
    cluster = d["cluster_name"]
    hosts = example_hosts()
    by_role = {role: [h for h in hosts if h.role == role] for role in ("store", "engine", "etcd")}
    # The shape of certs_init_command (its expression is checked below).
    issued = tmp_path / "tls"
    argv = ["certs", "init", "--dir", str(issued), "--cluster", cluster,
            "--members", ",".join(h.name for h in by_role["store"]),
            "--engines", ",".join(h.name for h in by_role["engine"]),
            "--gateways", ",".join(f"{h.name}-gw" for h in by_role["engine"]),
            "--etcd", ",".join(h.name for h in by_role["etcd"]), "--admins", "admin",
            *[f"--san={c}={h.ip}" for h in hosts for c in h.certificates]]
    assert cli.main(argv) == 0
    command, flags = example_locals()["certs_init_command"], example_locals()["role_flags"]
    for piece in ("--admins admin", "--san ${name}=${c.ip}",
                  "xdc certs init --dir tls --cluster ${var.cluster_name}"):
        assert piece in command, piece
    assert flags == {"member": "--members", "engine": "--engines", "gateway": "--gateways",
                     "etcd": "--etcd"}
    store = {f"xdc-prod/{p.name}": p.read_text() for p in issued.glob("*.pem")
             if p.name != "ca-key.pem"}
    store["xdc-prod/etcd-node.password"] = "n0de-secret\n"
    store["xdc-prod/etcd-root.password"] = "r00t-secret\n"
    store["xdc-prod/auth.toml"] = (EXAMPLE / "auth.toml.example").read_text()
    cluster_toml = render("cluster_config", "cluster.toml.tftpl", example_context())
    tls_dir = example_locals()["tls_dir"]

    for h in hosts:
        root = tmp_path / "hosts" / h.name
        _, setup = host_bootstrap(h, files={})
        fetched = re.findall(r"^fetch_secret '([^']+)' (/\S+)$", setup, re.M)
        assert dict((p, n.removeprefix("xdc-prod/")) for n, p in fetched) == host_secret_files(
            tls_dir, h)
        for name, path in fetched:
            (root / path[1:]).parent.mkdir(parents=True, exist_ok=True)
            (root / path[1:]).write_text(store[name])
        on_host = cluster_toml.replace("/etc/xdc/", f"{root}/etc/xdc/")
        cfg = config.loads(on_host, root / "etc/xdc", source=f"{h.name}:cluster.toml")

        def tls_of(cert: str, key: str, root: Path = root) -> Tls:
            return Tls.load(root / "etc/xdc/tls/ca.pem", root / cert[1:], root / key[1:])

        if h.role == "store":
            assert config.load_tls(cfg, h.name).identity == Identity(cluster, "member", h.name)
            for other in by_role["store"]:
                if other is not h:
                    with pytest.raises(config.ConfigError, match="cannot read"):
                        config.load_tls(cfg, other.name)
            access = config.etcd_access(cfg)
            assert access.password == "n0de-secret" and access.user == "xdc-prod-node"
            assert access.tls is not None and access.tls.cert is not None
            assert tls_of(str(access.tls.cert).removeprefix(str(root)),
                          str(access.tls.key).removeprefix(str(root))).identity.name == h.name
            assert cfg.auth_file is not None and {p.cert for p in auth.load(
                cfg.auth_file).principals} >= {f"xdc://{cluster}/engine/{e.name}"
                                               for e in by_role["engine"]}
        elif h.role == "engine":
            for unit, holder, role in (("xdc-engine.service.tftpl", h.name, "engine"),
                                       ("xdc-gateway.service.tftpl", f"{h.name}-gw",
                                        "gateway")):
                text = render("engine_host", unit, engine_unit_context(h))
                cert = re.search(r"--tls-cert (\S+)", text).group(1)  # type: ignore[union-attr]
                key = re.search(r"--tls-key (\S+)", text).group(1)  # type: ignore[union-attr]
                assert tls_of(cert, key).identity == Identity(cluster, role, holder)
                assert f"--auth {AUTH_FILE}" in text and (root / AUTH_FILE[1:]).exists()
                assert ",".join(m["client"] for m in example_context()["members"]) in text
            assert config.etcd_access(cfg).password == "n0de-secret"
        else:
            unit = render("etcd_member", "etcd.service.tftpl", etcd_unit_context(h))
            cert = re.search(r"--cert-file=(\S+)", unit).group(1)  # type: ignore[union-attr]
            key = re.search(r"--key-file=(\S+)", unit).group(1)  # type: ignore[union-attr]
            server = tls_of(cert, key)
            assert server.identity == Identity(cluster, "etcd", h.name)
            assert h.ip in server_names(root / cert[1:])  # clients and peers dial the IP
            if h.bootstrap_auth:  # what `xdc etcd bootstrap-auth --config` reads
                assert config.etcd_access(cfg).password == "n0de-secret"
                assert (root / "etc/xdc/etcd-root.password").read_text() == "r00t-secret\n"
            else:
                assert not (root / "etc/xdc/etcd-node.password").exists()
    # A member's certificate names its IP (clients dial it) and its id (peers expect it).
    assert server_names(issued / "use1-a.pem") >= {"use1-a", "10.40.1.10"}
    assert "10.40.1.10" not in server_names(issued / "use2-a.pem")


def server_names(cert: Path) -> set[str]:
    from cryptography import x509
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName),
            *map(str, san.get_values_for_type(x509.IPAddress))}


def engine_unit_context(h: Host) -> dict[str, Any]:
    d = defaults()
    e = next(e for e in d["engine_hosts"] if e["id"] == h.name)
    return {"cluster_name": d["cluster_name"], "engine_id": h.name, "engine_group": e["group"],
            "engine_port": d["ports"]["engine"], "gateway": f"{h.name}-gw",
            "gateway_port": d["ports"]["gateway"],
            "store_endpoints": ",".join(m["client"] for m in example_context()["members"]),
            "tls_dir": example_locals()["tls_dir"], "auth": True, "auth_file": AUTH_FILE}


def etcd_unit_context(h: Host) -> dict[str, Any]:
    d = defaults()
    ips = dict(zip([m["name"] for m in d["etcd_members"]], example_ips()["etcd"], strict=True))
    initial = ",".join(f"{n}=https://{ip}:{d['ports']['etcd_peer']}" for n, ip in ips.items())
    return {"cluster_name": d["cluster_name"], "member_name": h.name, "private_ip": h.ip,
            "client_port": d["ports"]["etcd_client"], "peer_port": d["ports"]["etcd_peer"],
            "initial_cluster": initial, "heartbeat_ms": d["etcd_heartbeat_ms"],
            "election_timeout_ms": d["etcd_election_timeout_ms"], "data_dir": "/var/lib/etcd",
            "tls_dir": example_locals()["tls_dir"]}


def host_bootstrap(host: Host, *, files: dict[str, str], units: tuple[str, ...] = (),
                   role_script: str = "") -> tuple[str, str]:
    """(cloud-init, setup script) the way modules/host/main.tf renders them."""
    service_user, data_dir, data_volume = {
        "store": ("xdc", "/var/lib/xdc", True), "engine": ("xdc", "/var/lib/xdc-engine", False),
        "etcd": ("etcd", "/var/lib/etcd", True)}[host.role]
    secret_files = host_secret_files(example_locals()["tls_dir"], host)
    setup = render("host", "setup.sh.tftpl", {
        "name": f"xdc-prod-use1-{host.role}-{host.name}", "role": host.role,
        "service_user": service_user, "data_dir": data_dir, "data_volume": data_volume,
        "fetch_secrets": bool(secret_files), "secret_files": secret_files, "secrets": SECRETS,
        "install_xdc": host.role != "etcd" or host.bootstrap_auth, "xdc_package": "xdc==0.1.0",
        "pip_index_args": "--index-url https://pypi.internal.example/simple",
        "role_script": role_script, "units": list(units),
    })
    cloud = render("host", "cloud-init.yaml.tftpl", {
        "name": f"xdc-prod-use1-{host.role}", "role": host.role, "files": files,
        "setup_script": setup,
    })
    return cloud, setup


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash
    path = tmp_path / "script.sh"
    path.write_text(script)
    proc = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# EC2 refuses user data over 16 KiB; keep room for 5 voters and standbys.
MAX_USER_DATA = 12 * 1024


def test_store_node_bootstrap_writes_the_config_and_starts_the_unit(tmp_path: Path) -> None:
    from xdc import cli

    host = example_hosts()[0]
    cluster_toml = render("cluster_config", "cluster.toml.tftpl", example_context())
    tiers_toml = render("cluster_config", "tiers.toml.tftpl", {"tiers": defaults()["tiers"]})
    unit = render("store_node", "xdc-store.service.tftpl", {
        "cluster_name": "xdc-prod", "member_id": host.name, "data_dir": "/var/lib/xdc"})
    files = {"/etc/xdc/cluster.toml": cluster_toml, "/etc/xdc/tiers.toml": tiers_toml,
             "/etc/systemd/system/xdc-store.service": unit}
    cloud, setup = host_bootstrap(host, files=files, units=("xdc-store.service",))
    written = write_files(cloud)
    assert written == {**files, "/usr/local/sbin/xdc-host-setup": setup}
    assert len(cloud.encode()) < MAX_USER_DATA, len(cloud.encode())
    # What lands on the host is what the node will load.
    (tmp_path / "cluster.toml").write_text(written["/etc/xdc/cluster.toml"])
    (tmp_path / "tiers.toml").write_text(written["/etc/xdc/tiers.toml"])
    assert config.load(tmp_path / "cluster.toml").member("use1-a").data_dir == Path(
        "/var/lib/xdc")
    assert "--member use1-a" in unit and "RequiresMountsFor=/var/lib/xdc" in unit
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    args = cli.build_parser().parse_args(line.removeprefix("ExecStart=/opt/xdc/bin/xdc ").split())
    assert (args.func, args.config, args.member) == (cli.cmd_node_run, "/etc/xdc/cluster.toml",
                                                     "use1-a")
    assert "systemctl enable --now --no-block xdc-store.service" in setup
    assert "secretsmanager get-secret-value --region 'us-east-1'" in setup
    assert "fetch_secret 'xdc-prod/use1-a-key.pem' /etc/xdc/tls/use1-a-key.pem" in setup
    assert "umask 077" in setup and "mkfs.xfs" in setup
    assert "'xdc==0.1.0'" in setup
    assert "${" not in setup.replace("$${", "") and "%{" not in setup
    bash_syntax_ok(setup, tmp_path)


def test_engine_host_bootstrap_runs_the_engine_and_the_gateway(tmp_path: Path) -> None:
    """The units run the real CLI: every option they pass is one `xdc engine run` and
    `xdc gateway` accept, with the files the host fetched."""
    from xdc import cli

    host = next(h for h in example_hosts() if h.role == "engine")
    context = engine_unit_context(host)
    engine = render("engine_host", "xdc-engine.service.tftpl", context)
    gateway = render("engine_host", "xdc-gateway.service.tftpl", context)
    exchange = (EXAMPLE / "exchange.toml").read_text()
    files = {"/etc/xdc/cluster.toml": render("cluster_config", "cluster.toml.tftpl",
                                             example_context()),
             "/etc/xdc/tiers.toml": render("cluster_config", "tiers.toml.tftpl",
                                           {"tiers": defaults()["tiers"]}),
             "/etc/xdc/exchange.toml": exchange,
             "/etc/systemd/system/xdc-engine.service": engine,
             "/etc/systemd/system/xdc-gateway.service": gateway}
    cloud, setup = host_bootstrap(host, files=files,
                                  units=("xdc-engine.service", "xdc-gateway.service"))
    assert write_files(cloud) == {**files, "/usr/local/sbin/xdc-host-setup": setup}
    assert len(cloud.encode()) < MAX_USER_DATA, len(cloud.encode())
    parser = cli.build_parser()
    for unit, command in ((engine, ["engine", "run"]), (gateway, ["gateway"])):
        line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
        argv = line.removeprefix("ExecStart=/opt/xdc/bin/xdc ").split()
        assert argv[:len(command)] == command
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown option
        assert args.tls_cert.startswith("/etc/xdc/tls/") and args.auth == AUTH_FILE
    args = parser.parse_args(next(x for x in engine.splitlines() if x.startswith(
        "ExecStart=")).removeprefix("ExecStart=/opt/xdc/bin/xdc ").split())
    assert (args.group, args.instance, args.lease) == ("equities", host.name, "etcd")
    assert args.config == "/etc/xdc/cluster.toml" and args.control == "0.0.0.0:7200"
    assert "systemctl enable --now --no-block xdc-gateway.service" in setup
    bash_syntax_ok(setup, tmp_path)


def test_example_exchange_and_auth_files_fit_the_hosts() -> None:
    from engine.exchange_config import load as load_exchange
    from store import auth

    groups = {g.name for g in load_exchange(EXAMPLE / "exchange.toml").groups}
    assert {e["group"] for e in defaults()["engine_hosts"]} <= groups
    principals = auth.load(EXAMPLE / "auth.toml.example").principals
    certs_named = {p.cert for p in principals}
    for h in example_hosts():
        if h.role == "engine":
            assert f"xdc://xdc-prod/engine/{h.name}" in certs_named
            assert f"xdc://xdc-prod/gateway/{h.name}-gw" in certs_named
    assert "xdc://xdc-prod/admin/admin" in certs_named


def test_etcd_member_bootstrap_runs_tls_and_the_first_turns_auth_on(tmp_path: Path) -> None:
    from geo.etcd_server import EtcdMember, EtcdTls
    from xdc import cli

    d = defaults()
    version, sha = d["etcd_version"], d["etcd_sha256"]
    url = (f"{d['etcd_download_base_url']}/v{version}/etcd-v{version}-linux-amd64.tar.gz")
    install = render("etcd_member", "install-etcd.sh.tftpl", {
        "etcd_version": version, "etcd_sha256": sha, "download_url": url})
    first, second = [h for h in example_hosts() if h.role == "etcd"][:2]
    unit = render("etcd_member", "etcd.service.tftpl", etcd_unit_context(first))
    auth_unit = render("etcd_member", "xdc-etcd-auth.service.tftpl", {
        "cluster_name": "xdc-prod", "root_password_file": "/etc/xdc/etcd-root.password"})
    files = {"/etc/systemd/system/etcd.service": unit,
             "/etc/xdc/cluster.toml": render("cluster_config", "cluster.toml.tftpl",
                                             example_context()),
             "/etc/systemd/system/xdc-etcd-auth.service": auth_unit}
    cloud, setup = host_bootstrap(first, files=files, role_script=install,
                                  units=("etcd.service", "xdc-etcd-auth.service"))
    assert set(write_files(cloud)) == {*files, "/usr/local/sbin/xdc-host-setup"}
    assert f"echo '{sha}  '" in install and "sha256sum --check" in install
    assert url in install
    assert etcd_unit_context(first)["initial_cluster"].startswith("etcd-use1=https://")
    assert f"--initial-cluster={etcd_unit_context(first)['initial_cluster']}" in unit
    assert "--advertise-client-urls=https://10.40.1.100:2379" in unit
    assert "http://" not in unit
    # The same TLS flags as the etcd the launcher and the tests run (geo/etcd_server.py).
    tls = EtcdTls(Path("/etc/xdc/tls/ca.pem"), Path("/etc/xdc/tls/etcd-use1.pem"),
                  Path("/etc/xdc/tls/etcd-use1-key.pem"))
    member = EtcdMember("etcd-use1", tmp_path, 2379, 2380, "", "etcd", (), tls)
    flags = [a for line in unit.splitlines() for a in line.strip(" \\").split()
             if a.startswith("--")]
    assert set(member._tls_args()) <= set(flags)
    # The first member runs `xdc etcd bootstrap-auth` with the cluster TOML's [etcd].
    line = next(x for x in auth_unit.splitlines() if x.startswith("ExecStart="))
    args = cli.build_parser().parse_args(line.removeprefix("ExecStart=/opt/xdc/bin/xdc ").split())
    assert args.func is cli.cmd_etcd_bootstrap_auth and args.config == "/etc/xdc/cluster.toml"
    assert args.root_password_file == "/etc/xdc/etcd-root.password"
    assert "Restart=on-failure" in auth_unit and "StartLimitIntervalSec=0" in auth_unit
    assert "/opt/xdc" in setup and "etcd-root.password" in setup
    bash_syntax_ok(setup, tmp_path)
    # The others install no xdc and hold no password.
    _, other = host_bootstrap(second, files={}, role_script=install, units=("etcd.service",))
    assert "/opt/xdc" not in other and ".password" not in other
    assert "fetch_secret 'xdc-prod/etcd-use2-key.pem'" in other
