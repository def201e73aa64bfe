"""The real etcd of the tests: geo/etcd_server.py (the local launcher runs the same)."""

from geo.etcd_server import (
    HOST,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EtcdCluster,
    EtcdError,
    EtcdMember,
    etcd_binary,
    free_ports,
    health,
)

__all__ = ["HOST", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "EtcdCluster", "EtcdError",
           "EtcdMember", "etcd_binary", "free_ports", "health"]
