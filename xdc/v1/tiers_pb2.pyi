from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TiersStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStatus(_message.Message):
    __slots__ = ("name", "index", "services", "state", "reason", "detail", "retry_after_ms", "since_unix_ns", "recovered_at_unix_ns", "down_at_unix_ns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    DOWN_AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    services: _containers.RepeatedScalarFieldContainer[str]
    state: str
    reason: str
    detail: str
    retry_after_ms: int
    since_unix_ns: int
    recovered_at_unix_ns: int
    down_at_unix_ns: int
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., services: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., since_unix_ns: _Optional[int] = ..., recovered_at_unix_ns: _Optional[int] = ..., down_at_unix_ns: _Optional[int] = ...) -> None: ...

class TierTransition(_message.Message):
    __slots__ = ("at_unix_ns", "tier", "index", "from_state", "to_state", "reason")
    AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    at_unix_ns: int
    tier: str
    index: int
    from_state: str
    to_state: str
    reason: str
    def __init__(self, at_unix_ns: _Optional[int] = ..., tier: _Optional[str] = ..., index: _Optional[int] = ..., from_state: _Optional[str] = ..., to_state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TiersStatus(_message.Message):
    __slots__ = ("node_id", "tiers", "transitions", "cause", "observed_at_unix_ns", "pending_events", "max_pending_events", "commit_lag", "max_commit_lag", "observations", "term", "commit_position", "term_began")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PENDING_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_EVENTS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_LAG_FIELD_NUMBER: _ClassVar[int]
    MAX_COMMIT_LAG_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_POSITION_FIELD_NUMBER: _ClassVar[int]
    TERM_BEGAN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierStatus]
    transitions: _containers.RepeatedCompositeFieldContainer[TierTransition]
    cause: str
    observed_at_unix_ns: int
    pending_events: int
    max_pending_events: int
    commit_lag: int
    max_commit_lag: int
    observations: int
    term: int
    commit_position: int
    term_began: str
    def __init__(self, node_id: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierStatus, _Mapping]]] = ..., transitions: _Optional[_Iterable[_Union[TierTransition, _Mapping]]] = ..., cause: _Optional[str] = ..., observed_at_unix_ns: _Optional[int] = ..., pending_events: _Optional[int] = ..., max_pending_events: _Optional[int] = ..., commit_lag: _Optional[int] = ..., max_commit_lag: _Optional[int] = ..., observations: _Optional[int] = ..., term: _Optional[int] = ..., commit_position: _Optional[int] = ..., term_began: _Optional[str] = ...) -> None: ...
