"""Replication protocol (DESIGN §4) as a pure state machine, plus a deterministic simulator.

``core.Node`` is the state machine, ``messages`` its inputs/outputs, ``log.LogView`` the
read-only log interface it needs, ``sim`` a seeded cluster simulator used by the tests.
"""

from geo.replication.core import Limits, Node, NodeStatus, Role, Unsafe, quorum, should_campaign
from geo.replication.log import InvariantError, LogView, MemoryLog

__all__ = [
    "InvariantError",
    "Limits",
    "LogView",
    "MemoryLog",
    "Node",
    "NodeStatus",
    "Role",
    "Unsafe",
    "quorum",
    "should_campaign",
]
