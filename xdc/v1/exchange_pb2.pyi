from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Side(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIDE_UNSPECIFIED: _ClassVar[Side]
    BUY: _ClassVar[Side]
    SELL: _ClassVar[Side]

class OrderType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORDER_TYPE_UNSPECIFIED: _ClassVar[OrderType]
    LIMIT: _ClassVar[OrderType]
    MARKET: _ClassVar[OrderType]

class TimeInForce(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIF_UNSPECIFIED: _ClassVar[TimeInForce]
    GTC: _ClassVar[TimeInForce]
    IOC: _ClassVar[TimeInForce]
    FOK: _ClassVar[TimeInForce]

class SelfTradePrevention(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STP_UNSPECIFIED: _ClassVar[SelfTradePrevention]
    STP_NONE: _ClassVar[SelfTradePrevention]
    STP_CANCEL_NEWEST: _ClassVar[SelfTradePrevention]
    STP_CANCEL_OLDEST: _ClassVar[SelfTradePrevention]
    STP_CANCEL_BOTH: _ClassVar[SelfTradePrevention]
    STP_DECREMENT_AND_CANCEL: _ClassVar[SelfTradePrevention]
SIDE_UNSPECIFIED: Side
BUY: Side
SELL: Side
ORDER_TYPE_UNSPECIFIED: OrderType
LIMIT: OrderType
MARKET: OrderType
TIF_UNSPECIFIED: TimeInForce
GTC: TimeInForce
IOC: TimeInForce
FOK: TimeInForce
STP_UNSPECIFIED: SelfTradePrevention
STP_NONE: SelfTradePrevention
STP_CANCEL_NEWEST: SelfTradePrevention
STP_CANCEL_OLDEST: SelfTradePrevention
STP_CANCEL_BOTH: SelfTradePrevention
STP_DECREMENT_AND_CANCEL: SelfTradePrevention

class SubmitOrderRequest(_message.Message):
    __slots__ = ("symbol", "account", "client_order_id", "side", "order_type", "time_in_force", "price", "qty", "post_only", "stp", "wait", "wait_timeout_ms")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    ORDER_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIME_IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    QTY_FIELD_NUMBER: _ClassVar[int]
    POST_ONLY_FIELD_NUMBER: _ClassVar[int]
    STP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    account: str
    client_order_id: str
    side: Side
    order_type: OrderType
    time_in_force: TimeInForce
    price: int
    qty: int
    post_only: bool
    stp: SelfTradePrevention
    wait: bool
    wait_timeout_ms: int
    def __init__(self, symbol: _Optional[str] = ..., account: _Optional[str] = ..., client_order_id: _Optional[str] = ..., side: _Optional[_Union[Side, str]] = ..., order_type: _Optional[_Union[OrderType, str]] = ..., time_in_force: _Optional[_Union[TimeInForce, str]] = ..., price: _Optional[int] = ..., qty: _Optional[int] = ..., post_only: _Optional[bool] = ..., stp: _Optional[_Union[SelfTradePrevention, str]] = ..., wait: _Optional[bool] = ..., wait_timeout_ms: _Optional[int] = ...) -> None: ...

class CancelOrderRequest(_message.Message):
    __slots__ = ("symbol", "account", "request_id", "order_id", "client_order_id", "wait", "wait_timeout_ms")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    account: str
    request_id: str
    order_id: int
    client_order_id: str
    wait: bool
    wait_timeout_ms: int
    def __init__(self, symbol: _Optional[str] = ..., account: _Optional[str] = ..., request_id: _Optional[str] = ..., order_id: _Optional[int] = ..., client_order_id: _Optional[str] = ..., wait: _Optional[bool] = ..., wait_timeout_ms: _Optional[int] = ...) -> None: ...

class ReplaceOrderRequest(_message.Message):
    __slots__ = ("symbol", "account", "request_id", "order_id", "client_order_id", "price", "qty", "wait", "wait_timeout_ms")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    QTY_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    account: str
    request_id: str
    order_id: int
    client_order_id: str
    price: int
    qty: int
    wait: bool
    wait_timeout_ms: int
    def __init__(self, symbol: _Optional[str] = ..., account: _Optional[str] = ..., request_id: _Optional[str] = ..., order_id: _Optional[int] = ..., client_order_id: _Optional[str] = ..., price: _Optional[int] = ..., qty: _Optional[int] = ..., wait: _Optional[bool] = ..., wait_timeout_ms: _Optional[int] = ...) -> None: ...

class ExecutionReport(_message.Message):
    __slots__ = ("kind", "symbol", "order_id", "account", "client_order_id", "side", "price", "qty", "reason", "detail", "maker_order_id", "taker_order_id", "maker_account", "taker_account", "input_position", "output_index", "ts_ns", "group")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    QTY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    MAKER_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    TAKER_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    MAKER_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TAKER_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    INPUT_POSITION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    TS_NS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    kind: str
    symbol: str
    order_id: int
    account: str
    client_order_id: str
    side: Side
    price: int
    qty: int
    reason: str
    detail: str
    maker_order_id: int
    taker_order_id: int
    maker_account: str
    taker_account: str
    input_position: int
    output_index: int
    ts_ns: int
    group: str
    def __init__(self, kind: _Optional[str] = ..., symbol: _Optional[str] = ..., order_id: _Optional[int] = ..., account: _Optional[str] = ..., client_order_id: _Optional[str] = ..., side: _Optional[_Union[Side, str]] = ..., price: _Optional[int] = ..., qty: _Optional[int] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., maker_order_id: _Optional[int] = ..., taker_order_id: _Optional[int] = ..., maker_account: _Optional[str] = ..., taker_account: _Optional[str] = ..., input_position: _Optional[int] = ..., output_index: _Optional[int] = ..., ts_ns: _Optional[int] = ..., group: _Optional[str] = ...) -> None: ...

class OrderResponse(_message.Message):
    __slots__ = ("input_position", "duplicate", "reports", "timed_out")
    INPUT_POSITION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    input_position: int
    duplicate: bool
    reports: _containers.RepeatedCompositeFieldContainer[ExecutionReport]
    timed_out: bool
    def __init__(self, input_position: _Optional[int] = ..., duplicate: _Optional[bool] = ..., reports: _Optional[_Iterable[_Union[ExecutionReport, _Mapping]]] = ..., timed_out: _Optional[bool] = ...) -> None: ...

class StreamExecutionsRequest(_message.Message):
    __slots__ = ("account", "after_position")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AFTER_POSITION_FIELD_NUMBER: _ClassVar[int]
    account: str
    after_position: int
    def __init__(self, account: _Optional[str] = ..., after_position: _Optional[int] = ...) -> None: ...

class ExecutionBatch(_message.Message):
    __slots__ = ("reports", "position")
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[ExecutionReport]
    position: int
    def __init__(self, reports: _Optional[_Iterable[_Union[ExecutionReport, _Mapping]]] = ..., position: _Optional[int] = ...) -> None: ...

class StreamBookRequest(_message.Message):
    __slots__ = ("symbol", "depth")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    depth: int
    def __init__(self, symbol: _Optional[str] = ..., depth: _Optional[int] = ...) -> None: ...

class BookLevel(_message.Message):
    __slots__ = ("price", "qty")
    PRICE_FIELD_NUMBER: _ClassVar[int]
    QTY_FIELD_NUMBER: _ClassVar[int]
    price: int
    qty: int
    def __init__(self, price: _Optional[int] = ..., qty: _Optional[int] = ...) -> None: ...

class BookMessage(_message.Message):
    __slots__ = ("symbol", "snapshot", "bids", "asks", "input_position")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BIDS_FIELD_NUMBER: _ClassVar[int]
    ASKS_FIELD_NUMBER: _ClassVar[int]
    INPUT_POSITION_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    snapshot: bool
    bids: _containers.RepeatedCompositeFieldContainer[BookLevel]
    asks: _containers.RepeatedCompositeFieldContainer[BookLevel]
    input_position: int
    def __init__(self, symbol: _Optional[str] = ..., snapshot: _Optional[bool] = ..., bids: _Optional[_Iterable[_Union[BookLevel, _Mapping]]] = ..., asks: _Optional[_Iterable[_Union[BookLevel, _Mapping]]] = ..., input_position: _Optional[int] = ...) -> None: ...

class EngineStatusRequest(_message.Message):
    __slots__ = ("brief",)
    BRIEF_FIELD_NUMBER: _ClassVar[int]
    brief: bool
    def __init__(self, brief: _Optional[bool] = ...) -> None: ...

class EngineStatus(_message.Message):
    __slots__ = ("group", "instance", "role", "input_position", "committed_input_position", "store_position", "lag", "chain_hash", "state_hash", "engine_version", "alarm", "snapshot_position", "inputs_processed", "delivered_position", "handover_to", "campaign_blocked", "emit_blocked", "trusted_through", "output_event_bytes", "output_append_events", "limit_refusals", "gc_frozen_objects", "output_version", "supported_output_versions", "gc_thaws", "gc_thaw_collected", "gc_thaw_ms")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INPUT_POSITION_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_INPUT_POSITION_FIELD_NUMBER: _ClassVar[int]
    STORE_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALARM_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_POSITION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_POSITION_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_TO_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    EMIT_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_EVENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_APPEND_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    GC_FROZEN_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_OUTPUT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    GC_THAWS_FIELD_NUMBER: _ClassVar[int]
    GC_THAW_COLLECTED_FIELD_NUMBER: _ClassVar[int]
    GC_THAW_MS_FIELD_NUMBER: _ClassVar[int]
    group: str
    instance: str
    role: str
    input_position: int
    committed_input_position: int
    store_position: int
    lag: int
    chain_hash: str
    state_hash: str
    engine_version: str
    alarm: str
    snapshot_position: int
    inputs_processed: int
    delivered_position: int
    handover_to: str
    campaign_blocked: str
    emit_blocked: str
    trusted_through: int
    output_event_bytes: int
    output_append_events: int
    limit_refusals: int
    gc_frozen_objects: int
    output_version: int
    supported_output_versions: _containers.RepeatedScalarFieldContainer[int]
    gc_thaws: int
    gc_thaw_collected: int
    gc_thaw_ms: float
    def __init__(self, group: _Optional[str] = ..., instance: _Optional[str] = ..., role: _Optional[str] = ..., input_position: _Optional[int] = ..., committed_input_position: _Optional[int] = ..., store_position: _Optional[int] = ..., lag: _Optional[int] = ..., chain_hash: _Optional[str] = ..., state_hash: _Optional[str] = ..., engine_version: _Optional[str] = ..., alarm: _Optional[str] = ..., snapshot_position: _Optional[int] = ..., inputs_processed: _Optional[int] = ..., delivered_position: _Optional[int] = ..., handover_to: _Optional[str] = ..., campaign_blocked: _Optional[str] = ..., emit_blocked: _Optional[str] = ..., trusted_through: _Optional[int] = ..., output_event_bytes: _Optional[int] = ..., output_append_events: _Optional[int] = ..., limit_refusals: _Optional[int] = ..., gc_frozen_objects: _Optional[int] = ..., output_version: _Optional[int] = ..., supported_output_versions: _Optional[_Iterable[int]] = ..., gc_thaws: _Optional[int] = ..., gc_thaw_collected: _Optional[int] = ..., gc_thaw_ms: _Optional[float] = ...) -> None: ...
