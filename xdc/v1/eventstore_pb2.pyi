from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpectedKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPECTED_ANY: _ClassVar[ExpectedKind]
    EXPECTED_NO_STREAM: _ClassVar[ExpectedKind]
    EXPECTED_STREAM_EXISTS: _ClassVar[ExpectedKind]
    EXPECTED_EXACT: _ClassVar[ExpectedKind]

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORWARDS: _ClassVar[Direction]
    BACKWARDS: _ClassVar[Direction]
EXPECTED_ANY: ExpectedKind
EXPECTED_NO_STREAM: ExpectedKind
EXPECTED_STREAM_EXISTS: ExpectedKind
EXPECTED_EXACT: ExpectedKind
FORWARDS: Direction
BACKWARDS: Direction

class ProposedEvent(_message.Message):
    __slots__ = ("id", "type", "content_type", "metadata", "data")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    type: str
    content_type: str
    metadata: _containers.ScalarMap[str, str]
    data: bytes
    def __init__(self, id: _Optional[bytes] = ..., type: _Optional[str] = ..., content_type: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RecordedEvent(_message.Message):
    __slots__ = ("id", "type", "content_type", "metadata", "data", "stream", "revision", "position", "term", "timestamp_ns")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    type: str
    content_type: str
    metadata: _containers.ScalarMap[str, str]
    data: bytes
    stream: str
    revision: int
    position: int
    term: int
    timestamp_ns: int
    def __init__(self, id: _Optional[bytes] = ..., type: _Optional[str] = ..., content_type: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., data: _Optional[bytes] = ..., stream: _Optional[str] = ..., revision: _Optional[int] = ..., position: _Optional[int] = ..., term: _Optional[int] = ..., timestamp_ns: _Optional[int] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("stream", "expected", "expected_revision", "events")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    stream: str
    expected: ExpectedKind
    expected_revision: int
    events: _containers.RepeatedCompositeFieldContainer[ProposedEvent]
    def __init__(self, stream: _Optional[str] = ..., expected: _Optional[_Union[ExpectedKind, str]] = ..., expected_revision: _Optional[int] = ..., events: _Optional[_Iterable[_Union[ProposedEvent, _Mapping]]] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("first_position", "last_position", "last_revision", "next_revision", "duplicate")
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_REVISION_FIELD_NUMBER: _ClassVar[int]
    NEXT_REVISION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    first_position: int
    last_position: int
    last_revision: int
    next_revision: int
    duplicate: bool
    def __init__(self, first_position: _Optional[int] = ..., last_position: _Optional[int] = ..., last_revision: _Optional[int] = ..., next_revision: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class AppendError(_message.Message):
    __slots__ = ("code", "message", "actual_last_revision", "leader", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_LAST_REVISION_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    actual_last_revision: int
    leader: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., actual_last_revision: _Optional[int] = ..., leader: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class AppendResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: AppendResponse
    error: AppendError
    def __init__(self, ok: _Optional[_Union[AppendResponse, _Mapping]] = ..., error: _Optional[_Union[AppendError, _Mapping]] = ...) -> None: ...

class AppendStreamRequest(_message.Message):
    __slots__ = ("correlation_id", "appends", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    APPENDS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    correlation_id: int
    appends: _containers.RepeatedCompositeFieldContainer[AppendRequest]
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, correlation_id: _Optional[int] = ..., appends: _Optional[_Iterable[_Union[AppendRequest, _Mapping]]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AppendStreamResponse(_message.Message):
    __slots__ = ("correlation_id", "results")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    correlation_id: int
    results: _containers.RepeatedCompositeFieldContainer[AppendResult]
    def __init__(self, correlation_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[AppendResult, _Mapping]]] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("stream", "direction", "limit", "min_position")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MIN_POSITION_FIELD_NUMBER: _ClassVar[int]
    stream: str
    direction: Direction
    limit: int
    min_position: int
    def __init__(self, stream: _Optional[str] = ..., direction: _Optional[_Union[Direction, str]] = ..., limit: _Optional[int] = ..., min_position: _Optional[int] = ..., **kwargs) -> None: ...

class RecordBatch(_message.Message):
    __slots__ = ("events", "first_position", "last_position")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RecordedEvent]
    first_position: int
    last_position: int
    def __init__(self, events: _Optional[_Iterable[_Union[RecordedEvent, _Mapping]]] = ..., first_position: _Optional[int] = ..., last_position: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("after_position", "from_end", "stream_prefix", "event_types")
    AFTER_POSITION_FIELD_NUMBER: _ClassVar[int]
    FROM_END_FIELD_NUMBER: _ClassVar[int]
    STREAM_PREFIX_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    after_position: int
    from_end: bool
    stream_prefix: str
    event_types: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, after_position: _Optional[int] = ..., from_end: _Optional[bool] = ..., stream_prefix: _Optional[str] = ..., event_types: _Optional[_Iterable[str]] = ...) -> None: ...

class CaughtUp(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("events", "caught_up", "checkpoint")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    events: RecordBatch
    caught_up: CaughtUp
    checkpoint: Checkpoint
    def __init__(self, events: _Optional[_Union[RecordBatch, _Mapping]] = ..., caught_up: _Optional[_Union[CaughtUp, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ...) -> None: ...

class StreamInfoRequest(_message.Message):
    __slots__ = ("stream",)
    STREAM_FIELD_NUMBER: _ClassVar[int]
    stream: str
    def __init__(self, stream: _Optional[str] = ...) -> None: ...

class StreamInfoResponse(_message.Message):
    __slots__ = ("stream", "last_revision", "count", "first_position", "last_position")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    LAST_REVISION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    stream: str
    last_revision: int
    count: int
    first_position: int
    last_position: int
    def __init__(self, stream: _Optional[str] = ..., last_revision: _Optional[int] = ..., count: _Optional[int] = ..., first_position: _Optional[int] = ..., last_position: _Optional[int] = ...) -> None: ...

class NodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfoResponse(_message.Message):
    __slots__ = ("cluster_id", "node_id", "role", "term", "commit_position", "last_position", "leader", "stream_count", "limits")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    STREAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    node_id: str
    role: str
    term: int
    commit_position: int
    last_position: int
    leader: str
    stream_count: int
    limits: StoreLimits
    def __init__(self, cluster_id: _Optional[str] = ..., node_id: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., commit_position: _Optional[int] = ..., last_position: _Optional[int] = ..., leader: _Optional[str] = ..., stream_count: _Optional[int] = ..., limits: _Optional[_Union[StoreLimits, _Mapping]] = ...) -> None: ...

class StoreLimits(_message.Message):
    __slots__ = ("max_event_bytes", "max_append_events", "max_append_bytes", "max_appends_per_message", "max_stream_name_bytes", "max_batch_events", "max_batch_bytes")
    MAX_EVENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_APPEND_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_APPEND_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_APPENDS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_NAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_event_bytes: int
    max_append_events: int
    max_append_bytes: int
    max_appends_per_message: int
    max_stream_name_bytes: int
    max_batch_events: int
    max_batch_bytes: int
    def __init__(self, max_event_bytes: _Optional[int] = ..., max_append_events: _Optional[int] = ..., max_append_bytes: _Optional[int] = ..., max_appends_per_message: _Optional[int] = ..., max_stream_name_bytes: _Optional[int] = ..., max_batch_events: _Optional[int] = ..., max_batch_bytes: _Optional[int] = ...) -> None: ...
