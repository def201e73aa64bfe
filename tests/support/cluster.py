"""A multi-node cluster in one event loop, for replication tests: real etcd, real LMDB
files, real gRPC servers on loopback ports, one replicator thread per node."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from geo.config import ClusterConfig, loads
from geo.node import ClusterNode
from store import records
from store.limits import Limits
from tests.support.etcd import free_ports


def cluster_toml(name: str, etcd_endpoints: list[str], regions: list[str], base: Path,
                 *, standbys: int = 0, failover: str = "automatic", ttl_s: int = 2,
                 tls_dir: Path | None = None, auth_file: Path | None = None,
                 peer_token_file: Path | None = None) -> str:
    """`tls_dir`: TLS on, with `xdc certs init`'s files there (ca.pem, <id>.pem);
    `auth_file`, `peer_token_file`: client auth, and the members' token without TLS."""
    ports = free_ports(2 * (len(regions) + standbys))
    lines = [f'cluster = "{name}"', f'failover = "{failover}"', f"lease_ttl_s = {ttl_s}"]
    if auth_file is not None:
        lines.append(f'auth_file = "{auth_file}"')
    if peer_token_file is not None:
        lines.append(f'peer_token_file = "{peer_token_file}"')
    lines += ["[etcd]", f"endpoints = {etcd_endpoints!r}".replace("'", '"')]
    for r in regions:
        lines += ["[[region]]", f'name = "{r}"']
    members = [(f"{r}-1", r, True) for r in regions]
    members += [(f"{regions[i % len(regions)]}-dr{i}", regions[i % len(regions)], False)
                for i in range(standbys)]
    for i, (mid, region, voter) in enumerate(members):
        lines += ["[[member]]", f'id = "{mid}"', f'region = "{region}"',
                  f'client = "127.0.0.1:{ports[2 * i]}"', f'peer = "127.0.0.1:{ports[2 * i + 1]}"',
                  f"voter = {'true' if voter else 'false'}", f'data_dir = "{base / mid}"']
        if tls_dir is not None:
            lines += [f'cert = "{tls_dir / mid}.pem"', f'key = "{tls_dir / mid}-key.pem"']
    if tls_dir is not None:
        lines += ["[tls]", f'ca = "{tls_dir / "ca.pem"}"']
    return "\n".join(lines) + "\n"


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.nodes: dict[str, ClusterNode] = {}

    @classmethod
    def make(cls, etcd_endpoints: list[str], base: Path, regions: int = 3,
             **kw: object) -> LocalCluster:
        names = ["us-east", "eu-west", "ap-south", "us-west", "sa-east"][:regions]
        return cls(loads(cluster_toml("t", etcd_endpoints, names, base, **kw), base))

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, etcd_endpoints: list[str], base: Path, *,
                      limits: Limits | None = None, **kw: object) -> AsyncIterator[LocalCluster]:
        """`make(...)` with every node started, and every node left stopped on the way
        out."""
        cluster = cls.make(etcd_endpoints, base, **kw)
        await cluster.start(limits=limits)
        try:
            yield cluster
        finally:
            await cluster.stop()

    async def start(self, *ids: str, limits: Limits | None = None) -> None:
        for m in self.config.members:
            if ids and m.id not in ids:
                continue
            node = ClusterNode(self.config, m.id, tick_s=0.05, limits=limits)
            await node.start()
            self.nodes[m.id] = node

    async def stop(self, *ids: str) -> None:
        for mid in list(ids or self.nodes):
            node = self.nodes.pop(mid)
            await node.stop()

    async def leader(self, timeout_s: float = 15.0, exclude: tuple[str, ...] = ()) -> ClusterNode:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            for mid, node in self.nodes.items():
                if mid not in exclude and node.store.role.name == "leader":
                    return node
            await asyncio.sleep(0.02)
        raise AssertionError(f"no open leader within {timeout_s}s: "
                             f"{ {m: n.store.role.name for m, n in self.nodes.items()} }")

    def client_targets(self) -> list[str]:
        return [m.client for m in self.config.members]

    async def converged(self, timeout_s: float = 15.0) -> int:
        """Waits until every running node has the same commit position and identical log
        bytes up to it; returns that position."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            commits = {mid: n.store.commit.position for mid, n in self.nodes.items()
                       if n.store.commit is not None}
            lasts = {mid: n.store.log.last_position for mid, n in self.nodes.items()
                     if n.store.log is not None}
            if len(set(commits.values())) == 1 and set(lasts.values()) == set(commits.values()):
                upto = next(iter(commits.values()))
                hashes = {mid: log_hash(n, upto) for mid, n in self.nodes.items()}
                assert len(set(hashes.values())) == 1, f"logs differ up to {upto}: {hashes}"
                return upto
            if loop.time() > deadline:
                raise AssertionError(f"not converged: commits {commits}, last {lasts}")
            await asyncio.sleep(0.05)


def log_hash(node: ClusterNode, upto: int) -> str:
    """sha256 of the stored records 1..upto: equal hashes, byte-identical logs."""
    h = hashlib.sha256()
    assert node.store.log is not None
    for value in node.store.log.read_all(1, upto, upto):
        h.update(value)
    assert upto == 0 or records.position_of(value) == upto
    return h.hexdigest()


@contextlib.asynccontextmanager
async def running_cluster(etcd_endpoints: list[str], base: Path, regions: int = 3,
                          **kw: object) -> AsyncIterator[LocalCluster]:
    """A started LocalCluster, stopped on the way out."""
    cluster = LocalCluster.make(etcd_endpoints, base, regions, **kw)
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()
