from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PeerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PEER_KIND_UNSPECIFIED: _ClassVar[PeerKind]
    PROMISE: _ClassVar[PeerKind]
    PROMISE_REPLY: _ClassVar[PeerKind]
    APPEND: _ClassVar[PeerKind]
    APPEND_REPLY: _ClassVar[PeerKind]
    FETCH: _ClassVar[PeerKind]
    FETCH_REPLY: _ClassVar[PeerKind]
PEER_KIND_UNSPECIFIED: PeerKind
PROMISE: PeerKind
PROMISE_REPLY: PeerKind
APPEND: PeerKind
APPEND_REPLY: PeerKind
FETCH: PeerKind
FETCH_REPLY: PeerKind

class PeerMessage(_message.Message):
    __slots__ = ("kind", "src", "dst", "term", "ok", "prev_pos", "prev_term", "commit", "match", "rejected", "hint_pos", "hint_term", "higher_term", "tip_term", "tip_position", "max_entries", "max_bytes", "trace_context", "rejoining", "first_position", "entry_terms", "entry_payloads")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    PREV_POS_FIELD_NUMBER: _ClassVar[int]
    PREV_TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    HINT_POS_FIELD_NUMBER: _ClassVar[int]
    HINT_TERM_FIELD_NUMBER: _ClassVar[int]
    HIGHER_TERM_FIELD_NUMBER: _ClassVar[int]
    TIP_TERM_FIELD_NUMBER: _ClassVar[int]
    TIP_POSITION_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REJOINING_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    ENTRY_TERMS_FIELD_NUMBER: _ClassVar[int]
    ENTRY_PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    kind: PeerKind
    src: str
    dst: str
    term: int
    ok: bool
    prev_pos: int
    prev_term: int
    commit: int
    match: int
    rejected: int
    hint_pos: int
    hint_term: int
    higher_term: int
    tip_term: int
    tip_position: int
    max_entries: int
    max_bytes: int
    trace_context: _containers.ScalarMap[str, str]
    rejoining: bool
    first_position: int
    entry_terms: _containers.RepeatedScalarFieldContainer[int]
    entry_payloads: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, kind: _Optional[_Union[PeerKind, str]] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ..., term: _Optional[int] = ..., ok: _Optional[bool] = ..., prev_pos: _Optional[int] = ..., prev_term: _Optional[int] = ..., commit: _Optional[int] = ..., match: _Optional[int] = ..., rejected: _Optional[int] = ..., hint_pos: _Optional[int] = ..., hint_term: _Optional[int] = ..., higher_term: _Optional[int] = ..., tip_term: _Optional[int] = ..., tip_position: _Optional[int] = ..., max_entries: _Optional[int] = ..., max_bytes: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., rejoining: _Optional[bool] = ..., first_position: _Optional[int] = ..., entry_terms: _Optional[_Iterable[int]] = ..., entry_payloads: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PeerBatch(_message.Message):
    __slots__ = ("cluster", "src", "messages")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    src: str
    messages: _containers.RepeatedCompositeFieldContainer[PeerMessage]
    def __init__(self, cluster: _Optional[str] = ..., src: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[PeerMessage, _Mapping]]] = ...) -> None: ...

class StreamSummary(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class TipRequest(_message.Message):
    __slots__ = ("cluster", "src")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    src: str
    def __init__(self, cluster: _Optional[str] = ..., src: _Optional[str] = ...) -> None: ...

class TipResponse(_message.Message):
    __slots__ = ("node_id", "last_term", "last_position", "promised_term", "commit_position", "role", "rejoining")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_TERM_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    PROMISED_TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_POSITION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REJOINING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    last_term: int
    last_position: int
    promised_term: int
    commit_position: int
    role: str
    rejoining: bool
    def __init__(self, node_id: _Optional[str] = ..., last_term: _Optional[int] = ..., last_position: _Optional[int] = ..., promised_term: _Optional[int] = ..., commit_position: _Optional[int] = ..., role: _Optional[str] = ..., rejoining: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerProgress(_message.Message):
    __slots__ = ("node_id", "voter", "match", "lag", "in_sync", "connected", "rejoining")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REJOINING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    voter: bool
    match: int
    lag: int
    in_sync: bool
    connected: bool
    rejoining: bool
    def __init__(self, node_id: _Optional[str] = ..., voter: _Optional[bool] = ..., match: _Optional[int] = ..., lag: _Optional[int] = ..., in_sync: _Optional[bool] = ..., connected: _Optional[bool] = ..., rejoining: _Optional[bool] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "region", "role", "open", "term", "promised_term", "commit_position", "last_position", "durable_position", "leader", "peers", "voter", "rejoin_term", "leader_commit", "fence_needed", "fence_answered", "fence_waiting_for")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    PROMISED_TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    DURABLE_POSITION_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    REJOIN_TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_COMMIT_FIELD_NUMBER: _ClassVar[int]
    FENCE_NEEDED_FIELD_NUMBER: _ClassVar[int]
    FENCE_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    FENCE_WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    region: str
    role: str
    open: bool
    term: int
    promised_term: int
    commit_position: int
    last_position: int
    durable_position: int
    leader: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerProgress]
    voter: bool
    rejoin_term: int
    leader_commit: int
    fence_needed: int
    fence_answered: _containers.RepeatedScalarFieldContainer[str]
    fence_waiting_for: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., region: _Optional[str] = ..., role: _Optional[str] = ..., open: _Optional[bool] = ..., term: _Optional[int] = ..., promised_term: _Optional[int] = ..., commit_position: _Optional[int] = ..., last_position: _Optional[int] = ..., durable_position: _Optional[int] = ..., leader: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerProgress, _Mapping]]] = ..., voter: _Optional[bool] = ..., rejoin_term: _Optional[int] = ..., leader_commit: _Optional[int] = ..., fence_needed: _Optional[int] = ..., fence_answered: _Optional[_Iterable[str]] = ..., fence_waiting_for: _Optional[_Iterable[str]] = ...) -> None: ...

class SwitchoverRequest(_message.Message):
    __slots__ = ("target", "timeout_ms")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    target: str
    timeout_ms: int
    def __init__(self, target: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class SwitchoverResponse(_message.Message):
    __slots__ = ("new_leader", "new_term", "took_us", "handover_position")
    NEW_LEADER_FIELD_NUMBER: _ClassVar[int]
    NEW_TERM_FIELD_NUMBER: _ClassVar[int]
    TOOK_US_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_POSITION_FIELD_NUMBER: _ClassVar[int]
    new_leader: str
    new_term: int
    took_us: int
    handover_position: int
    def __init__(self, new_leader: _Optional[str] = ..., new_term: _Optional[int] = ..., took_us: _Optional[int] = ..., handover_position: _Optional[int] = ...) -> None: ...
