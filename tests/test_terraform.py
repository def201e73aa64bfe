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
    """Only secret ARNs pass through: no resource may generate or hold key material."""
    forbidden = ("tls_private_key", "tls_self_signed_cert", "tls_locally_signed_cert",
                 "aws_secretsmanager_secret_version", "local_file", "local_sensitive_file")
    for path in module_dirs():
        for block in load_module(path).blocks.get("resource", []):
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


def example_context() -> dict[str, Any]:
    """The cluster_config template's context, computed from the example's defaults the
    way examples/three-region/main.tf computes it (addresses by cidrsubnet/cidrhost)."""
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

    store_ips = place(d["store_nodes"], 10)
    etcd_ips = place(d["etcd_members"], 100)
    ports = d["ports"]
    locals_ = load_module(EXAMPLE).blocks["locals"][0]
    return {
        "cluster": d["cluster_name"],
        "failover": d["failover"],
        "lease_ttl_s": d["lease_ttl_s"],
        "etcd_endpoints": [f"{ip}:{ports['etcd_client']}" for ip in etcd_ips],
        "regions": [r["name"] for r in d["regions"]],
        "members": [
            {"id": n["id"], "region": n["region"], "client": f"{ip}:{ports['client']}",
             "peer": f"{ip}:{ports['peer']}", "voter": n["voter"]}
            for n, ip in zip(d["store_nodes"], store_ips, strict=True)
        ],
        "data_dir": locals_["store_data_dir"],
        "tls": locals_["tls_dir"] != "",
        "tls_dir": locals_["tls_dir"],
    }


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
    assert cfg.tls is not None and cfg.tls.key == Path("/etc/xdc/tls/key.pem")
    assert cfg.tiers_file == tmp_path / "tiers.toml"
    # Every address lies in its region's VPC: security groups open ports to those CIDRs.
    vpc = {r["name"]: ipaddress.ip_network(r["vpc_cidr"]) for r in d["regions"]}
    for m in cfg.members:
        assert ipaddress.ip_address(config.split_hostport(m.client)[0]) in vpc[m.region]


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


def host_bootstrap(*, role: str, service_user: str, data_dir: str, data_volume: bool,
                   tls_enabled: bool, install_xdc: bool, role_script: str, units: list[str],
                   files: dict[str, str]) -> tuple[str, str]:
    """(cloud-init, setup script) the way modules/host/main.tf renders them."""
    setup = render("host", "setup.sh.tftpl", {
        "name": f"xdc-prod-use1-{role}", "role": role, "service_user": service_user,
        "data_dir": data_dir, "data_volume": data_volume, "tls_enabled": tls_enabled,
        "tls": {k: f"arn:aws:secretsmanager:us-east-1:123456789012:secret:xdc/{k}"
                for k in ("ca_secret_arn", "cert_secret_arn", "key_secret_arn")},
        "tls_dir": "/etc/xdc/tls", "install_xdc": install_xdc, "xdc_package": "xdc==0.1.0",
        "pip_index_args": "--index-url https://pypi.internal.example/simple",
        "role_script": role_script, "units": units,
    })
    cloud = render("host", "cloud-init.yaml.tftpl", {
        "name": f"xdc-prod-use1-{role}", "role": role, "files": files, "setup_script": setup,
    })
    return cloud, setup


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash
    path = tmp_path / "script.sh"
    path.write_text(script)
    proc = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_store_node_bootstrap_writes_the_config_and_starts_the_unit(tmp_path: Path) -> None:
    context = example_context()
    cluster_toml = render("cluster_config", "cluster.toml.tftpl", context)
    tiers_toml = render("cluster_config", "tiers.toml.tftpl", {"tiers": defaults()["tiers"]})
    unit = render("store_node", "xdc-store.service.tftpl", {
        "cluster_name": "xdc-prod", "member_id": "use1-a", "data_dir": "/var/lib/xdc"})
    files = {"/etc/xdc/cluster.toml": cluster_toml, "/etc/xdc/tiers.toml": tiers_toml,
             "/etc/systemd/system/xdc-store.service": unit}
    cloud, setup = host_bootstrap(
        role="store", service_user="xdc", data_dir="/var/lib/xdc", data_volume=True,
        tls_enabled=True, install_xdc=True, role_script="", units=["xdc-store.service"],
        files=files)
    written = write_files(cloud)
    assert written == {**files, "/usr/local/sbin/xdc-host-setup": setup}
    # EC2 refuses user data over 16 KiB; keep room for 5 voters and standbys.
    assert len(cloud.encode()) < 12 * 1024, len(cloud.encode())
    # What lands on the host is what the node will load.
    (tmp_path / "cluster.toml").write_text(written["/etc/xdc/cluster.toml"])
    (tmp_path / "tiers.toml").write_text(written["/etc/xdc/tiers.toml"])
    assert config.load(tmp_path / "cluster.toml").member("use1-a").data_dir == Path(
        "/var/lib/xdc")
    assert "--member use1-a" in unit and "RequiresMountsFor=/var/lib/xdc" in unit
    assert "systemctl enable --now xdc-store.service" in setup
    assert "secretsmanager get-secret-value" in setup and "mkfs.xfs" in setup
    assert "'xdc==0.1.0'" in setup
    assert "${" not in setup.replace("$${", "") and "%{" not in setup
    bash_syntax_ok(setup, tmp_path)


def test_etcd_member_bootstrap_installs_the_pinned_release(tmp_path: Path) -> None:
    d = defaults()
    version, sha = d["etcd_version"], d["etcd_sha256"]
    url = (f"{d['etcd_download_base_url']}/v{version}/etcd-v{version}-linux-amd64.tar.gz")
    install = render("etcd_member", "install-etcd.sh.tftpl", {
        "etcd_version": version, "etcd_sha256": sha, "download_url": url})
    initial = ("etcd-use1=http://10.40.1.100:2380,etcd-use2=http://10.41.1.100:2380,"
               "etcd-usw2=http://10.42.1.100:2380")
    unit = render("etcd_member", "etcd.service.tftpl", {
        "cluster_name": "xdc-prod", "member_name": "etcd-use1", "private_ip": "10.40.1.100",
        "client_port": 2379, "peer_port": 2380, "initial_cluster": initial,
        "heartbeat_ms": 100, "election_timeout_ms": 1000, "data_dir": "/var/lib/etcd"})
    cloud, setup = host_bootstrap(
        role="etcd", service_user="etcd", data_dir="/var/lib/etcd", data_volume=True,
        tls_enabled=False, install_xdc=False, role_script=install, units=["etcd.service"],
        files={"/etc/systemd/system/etcd.service": unit})
    assert set(write_files(cloud)) == {"/etc/systemd/system/etcd.service",
                                       "/usr/local/sbin/xdc-host-setup"}
    assert f"echo '{sha}  '" in install and "sha256sum --check" in install
    assert url in install
    assert f"--initial-cluster={initial}" in unit
    assert "--advertise-client-urls=http://10.40.1.100:2379" in unit
    assert "secretsmanager" not in setup and "/opt/xdc" not in setup
    bash_syntax_ok(setup, tmp_path)
