"""Fuzzing every request type against real running servers (issue 7, item 4).

Hypothesis generates well-typed but hostile requests (unicode with NUL, huge strings,
random and duplicate ids, negative and huge numbers, unknown enum values, empty and
oversized batches, random expected revisions and metadata) and raw bytes (random, and
valid requests with bytes flipped, inserted, deleted or cut), sent with identity
serializers. Servers run for real: a store (LMDB, gRPC) with small limits so that
every limit is within reach, the order gateway in front of another store, an engine
process's EngineControl, and a three-node cluster with real etcd for the replication
and tier services. For every input:

* the answer is a well-formed status: a code from the RPC's allowed set, never
  UNKNOWN or INTERNAL, with a message on every error;
* the server is alive and healthy afterwards (gRPC health; the engine: its process
  alive and a valid request answered; the cluster node: the same log and promised term);
* nothing is written in part: the log grows by exactly the events of the appends
  answered ok, at consecutive positions, and by nothing on a refusal.

Generation is derandomized (a fixed seed per test), with no example database, so a run
is reproducible; a crash found once is pinned with @example next to its test.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from engine import wire
from geo.node import ClusterNode
from store.client import StoreClient, channel_options, new_event
from store.limits import Limits
from store.process import ServeProcess
from tests.support.cluster import LocalCluster, running_cluster
from tests.support.etcd import EtcdCluster
from tests.support.exchange import lease_dir, start_engine
from tests.support.store import LoopThread, in_thread, running_store, wait_until
from tests.test_gateway import Exchange, exchange
from xdc.v1 import eventstore_pb2 as pb
from xdc.v1 import exchange_pb2 as xpb
from xdc.v1 import replication_pb2 as rpb
from xdc.v1 import tiers_pb2 as tpb

Code = grpc.StatusCode
OK, INV = Code.OK, Code.INVALID_ARGUMENT
T = 10.0  # deadline of every call: a hang fails the example instead of the run

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=150,
                suppress_health_check=list(HealthCheck))

# Small limits: every one of them is within reach of small generated requests.
LIMITS = Limits(max_event_bytes=1024, max_append_events=8, max_append_bytes=4096,
                max_appends_per_message=5, max_stream_name_bytes=32, max_type_bytes=16,
                max_metadata_entries=4, max_metadata_key_bytes=16, max_read_count=50,
                max_batch_events=7, max_batch_bytes=2048, max_read_wait_ms=50,
                max_subscribe_types=3, max_subscriptions=64, max_inflight_messages=4)


# ---- strategies -------------------------------------------------------------------------

def uint(bits: int) -> SearchStrategy[int]:
    return st.one_of(st.integers(0, 8), st.integers(0, 2**bits - 1))


def sint(bits: int) -> SearchStrategy[int]:
    return st.one_of(st.integers(-3, 8), st.integers(-(2**(bits - 1)), 2**(bits - 1) - 1))


# Any str protobuf can carry (no surrogates): NUL, control and combining characters,
# astral planes; and huge ones, built cheaply.
huge = st.builds(operator.mul, st.sampled_from(["x", "é", "\x00", "$", "\U0001f600"]),
                 st.integers(0, 70_000))


def names(*common: str) -> SearchStrategy[str]:
    return st.one_of(st.sampled_from(common), st.text(max_size=40), huge)


def valid_or_hostile(valid: SearchStrategy[Any], hostile: SearchStrategy[Any]
                     ) -> SearchStrategy[Any]:
    """Half plausible, half anything: a request has many fields, and one hostile field
    in each would leave the paths behind the first check unexplored."""
    return st.one_of(valid, hostile)


GOOD_STREAMS = ("orders", "s1", "é-ü", "a" * 32)
STREAMS = (*GOOD_STREAMS, "$all", "$term.1", "", "a" * 33, "x\x00y", "\x7f")
streams = names(*STREAMS)
POOL = tuple(uuid.UUID(int=i + 1).bytes for i in range(6))  # ids that recur: duplicates
good_ids = st.one_of(st.uuids().map(lambda u: u.bytes), st.uuids().map(lambda u: u.bytes),
                    st.sampled_from(POOL))
RETRIED = tuple(pb.ProposedEvent(id=uuid.UUID(int=1000 + i).bytes, type="T") for i in range(3))
small_map = st.dictionaries(st.text(max_size=20), st.text(max_size=30), max_size=6)
big_data = st.integers(900, 1100).map(bytes)  # around max_event_bytes, cheap to draw
good_events = st.builds(
    pb.ProposedEvent, id=good_ids, type=st.sampled_from(("T", "Placed")),
    metadata=st.dictionaries(st.sampled_from(("k", "traceparent")), st.text(max_size=8),
                             max_size=2),
    data=st.binary(max_size=32))
events = valid_or_hostile(good_events, st.builds(
    pb.ProposedEvent, id=st.one_of(good_ids, st.binary(max_size=20), st.just(bytes(16))),
    type=names("T", "Placed", "t" * 17),
    content_type=st.one_of(st.just(""), st.text(max_size=20)), metadata=small_map,
    data=st.one_of(st.binary(max_size=64), big_data)))
append_requests = valid_or_hostile(
    st.builds(pb.AppendRequest, stream=st.sampled_from(GOOD_STREAMS),
              expected=st.sampled_from((pb.EXPECTED_ANY, pb.EXPECTED_ANY, pb.EXPECTED_NO_STREAM,
                                        pb.EXPECTED_STREAM_EXISTS, pb.EXPECTED_EXACT)),
              events=st.lists(good_events, min_size=1, max_size=4)).map(
        # EXPECTED_EXACT alone takes a revision: near the streams' ends, to hit some.
        lambda r: r if r.expected != pb.EXPECTED_EXACT else pb.AppendRequest(
            stream=r.stream, expected=r.expected, events=r.events,
            expected_revision=len(r.events) % 7)),
    st.builds(pb.AppendRequest, stream=streams, expected=sint(32),
              expected_revision=uint(64), events=st.lists(events, max_size=10)))
append_stream_requests = st.builds(
    pb.AppendStreamRequest, correlation_id=uint(64),
    appends=st.lists(append_requests, max_size=7), trace_context=small_map)
read_requests = valid_or_hostile(
    st.builds(pb.ReadRequest, stream=st.sampled_from((*GOOD_STREAMS, "$all")),
              direction=st.sampled_from(pb.Direction.values()), limit=st.integers(1, 50),
              **{"from": st.integers(0, 20)}),
    st.builds(pb.ReadRequest, stream=streams, direction=sint(32),
              limit=st.one_of(st.integers(0, 60), uint(64)),
              min_position=st.one_of(st.just(0), uint(64)), **{"from": uint(64)}))
subscribe_requests = valid_or_hostile(
    st.builds(pb.SubscribeRequest, after_position=st.integers(0, 50), from_end=st.booleans(),
              stream_prefix=st.sampled_from(("", "s", "orders")),
              event_types=st.lists(st.sampled_from(("T", "Placed")), max_size=2)),
    st.builds(pb.SubscribeRequest, after_position=uint(64), from_end=st.booleans(),
              stream_prefix=names("", "s", "orders", "p" * 33),
              event_types=st.lists(names("T", "", "t" * 17), max_size=5)))
stream_info_requests = st.builds(
    pb.StreamInfoRequest, stream=valid_or_hostile(st.sampled_from(GOOD_STREAMS), streams))


@st.composite
def mutated(draw: st.DrawFn, valid: SearchStrategy[Any]) -> bytes:
    """A valid request's bytes with a few bytes flipped, inserted, deleted or cut off:
    deeper into the parser than random bytes get."""
    data = bytearray(draw(valid).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "insert", "delete", "cut")))
        i = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(i, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[i:]
    return bytes(data)


def raw(valid: SearchStrategy[Any]) -> SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), mutated(valid))


# ---- calls and checks --------------------------------------------------------------------

@dataclass
class Outcome:
    code: Code
    details: str
    value: Any = None


def outcome(call: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(OK, "", call())
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")


def check_status(got: Outcome, allowed: set[Code], what: object) -> None:
    where = f"{what!r:.300}"
    event(got.code.name)  # the spread of outcomes: pytest --hypothesis-show-statistics
    assert got.code not in (Code.UNKNOWN, Code.INTERNAL), (got.code, got.details, where)
    assert got.code in allowed, (got.code, got.details, where)
    if got.code != OK:
        assert got.details.strip(), (got.code, "error without a message", where)


def unary(channel: grpc.Channel, method: str, payload: bytes) -> Outcome:
    return outcome(lambda: channel.unary_unary(method)(payload, timeout=T))


def stream_out(channel: grpc.Channel, method: str, payload: bytes) -> Outcome:
    """A response stream read to its end (bounded by the request's limits)."""
    return outcome(lambda: list(channel.unary_stream(method)(payload, timeout=T)))


def check_healthy(channel: grpc.Channel) -> None:
    st_ = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                    timeout=T)
    assert st_.status == health_pb2.HealthCheckResponse.SERVING


# ---- the store ---------------------------------------------------------------------------

EVENTSTORE = "/xdc.v1.EventStore/"
APPEND_CODES = {OK, INV, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS}
RESULT_CODES = {c.value[0] for c in APPEND_CODES - {OK}}
READ_CODES = {OK, INV, Code.NOT_FOUND, Code.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    with in_thread(lambda: running_store(tmp_path_factory.mktemp("store"), LIMITS)) as (
            (server, _), _loop), \
            grpc.insecure_channel(server.address, options=channel_options(LIMITS)) as ch:
        yield ch


def node_info(channel: grpc.Channel) -> pb.NodeInfoResponse:
    return pb.NodeInfoResponse.FromString(
        channel.unary_unary(EVENTSTORE + "NodeInfo")(b"", timeout=T))


def read_positions(channel: grpc.Channel, first: int, last: int) -> list[pb.RecordedEvent]:
    """The records first..last of $all."""
    out: list[pb.RecordedEvent] = []
    while first + len(out) <= last:
        req = pb.ReadRequest(stream="$all", limit=min(LIMITS.max_read_count,
                                                      last - first - len(out) + 1),
                             **{"from": first + len(out)})
        got = [e for b in channel.unary_stream(EVENTSTORE + "Read")(
            req.SerializeToString(), timeout=T) for e in pb.RecordBatch.FromString(b).events]
        assert got, f"positions {first + len(out)}..{last} missing"
        out.extend(got)
    assert [e.position for e in out] == list(range(first, last + 1))
    return out


def check_writes(channel: grpc.Channel, before: int,
                 answered: list[tuple[pb.AppendRequest, pb.AppendResponse]]) -> None:
    """No partial write: what the log gained since `before` is exactly the events of the
    appends answered ok (not duplicates), each at consecutive positions, in its stream
    at consecutive revisions; a duplicate's positions hold its ids."""
    info = node_info(channel)
    assert info.commit_position == info.last_position
    written: list[int] = []
    for req, resp in answered:
        n = len(req.events)
        assert resp.last_position - resp.first_position + 1 == n, (req, resp)
        assert resp.next_revision == resp.last_revision + 1
        got = read_positions(channel, resp.first_position, resp.last_position)
        assert [e.id for e in got] == [e.id for e in req.events]
        assert [(e.type, e.data) for e in got] == [(e.type, e.data) for e in req.events]
        assert {e.stream for e in got} == {req.stream}
        assert [e.revision for e in got] == list(range(resp.last_revision - n + 1,
                                                       resp.last_revision + 1))
        if not resp.duplicate:
            written.extend(range(resp.first_position, resp.last_position + 1))
    assert sorted(written) == list(range(before + 1, info.last_position + 1)), (
        f"log went {before} -> {info.last_position}, answers cover {sorted(written)}")


@FUZZ
@given(request=append_requests)
@example(request=pb.AppendRequest(stream="x" * 70_000, events=[pb.ProposedEvent()]))
def test_fuzz_append(store: grpc.Channel, request: pb.AppendRequest) -> None:
    before = node_info(store).last_position
    got = unary(store, EVENTSTORE + "Append", request.SerializeToString())
    check_status(got, APPEND_CODES, request)
    answered = [(request, pb.AppendResponse.FromString(got.value))] if got.code == OK else []
    check_writes(store, before, answered)
    check_healthy(store)


@settings(FUZZ, max_examples=100)
@given(messages=st.lists(append_stream_requests, min_size=1, max_size=3))
# Events appended apart, then together (or in another order): were answered as a
# duplicate whose first..last were not their positions (now ALREADY_EXISTS).
@example(messages=[pb.AppendStreamRequest(appends=[
    pb.AppendRequest(stream="s1", events=[RETRIED[i]]) for i in (0, 2, 1)] + [
    pb.AppendRequest(stream="s1", events=[RETRIED[0], RETRIED[1]]),
    pb.AppendRequest(stream="s1", events=[RETRIED[2], RETRIED[0]])])])
# More appends than max_appends_per_message: was answered with one refusal per append,
# an answer larger than the request (now the call ends with INVALID_ARGUMENT).
@example(messages=[pb.AppendStreamRequest(appends=[pb.AppendRequest()] * 6)])
def test_fuzz_append_stream(store: grpc.Channel, messages: list[pb.AppendStreamRequest]
                            ) -> None:
    before = node_info(store).last_position
    call = store.stream_stream(EVENTSTORE + "AppendStream")(
        iter([m.SerializeToString() for m in messages]), timeout=T)
    answers: list[pb.AppendStreamResponse] = []
    got = outcome(lambda: answers.extend(pb.AppendStreamResponse.FromString(r) for r in call))
    check_status(got, {OK, INV}, messages)
    # Answers come in order, one per message, until the call ends (a refused message
    # ends it: INVALID_ARGUMENT naming it, after the answers to those before it).
    assert len(answers) == len(messages) if got.code == OK else len(answers) < len(messages)
    answered = []
    for msg, resp in zip(messages, answers, strict=False):
        assert resp.correlation_id == msg.correlation_id
        assert len(resp.results) == len(msg.appends)
        for req, result in zip(msg.appends, resp.results, strict=True):
            if result.HasField("ok"):
                answered.append((req, result.ok))
            else:
                assert result.error.code in RESULT_CODES and result.error.message, result
    check_writes(store, before, answered)
    check_healthy(store)


def check_read(request: pb.ReadRequest, batches: list[bytes]) -> None:
    got = [e for b in batches for e in pb.RecordBatch.FromString(b).events]
    assert len(got) <= request.limit
    step = -1 if request.direction == pb.BACKWARDS else 1
    key = operator.attrgetter("position" if request.stream == "$all" else "revision")
    assert [key(e) for e in got] == [key(got[0]) + step * i for i in range(len(got))]
    if request.stream != "$all":
        assert {e.stream for e in got} <= {request.stream}


@FUZZ
@given(request=read_requests)
def test_fuzz_read(store: grpc.Channel, request: pb.ReadRequest) -> None:
    got = stream_out(store, EVENTSTORE + "Read", request.SerializeToString())
    check_status(got, READ_CODES, request)
    if got.code == OK:
        check_read(request, got.value)
    check_healthy(store)


def subscribe_until_caught_up(channel: grpc.Channel, payload: bytes) -> Outcome:
    """Reads a subscription up to its catch-up marker, then cancels it."""
    call = channel.unary_stream(EVENTSTORE + "Subscribe")(payload, timeout=T)

    def read() -> list[pb.SubscribeResponse]:
        items = []
        for item in call:
            items.append(pb.SubscribeResponse.FromString(item))
            if items[-1].HasField("caught_up"):
                call.cancel()
                break
        return items
    return outcome(read)


@FUZZ
@given(request=subscribe_requests)
# Filters past the limits were accepted, whatever their size (now INVALID_ARGUMENT).
@example(request=pb.SubscribeRequest(stream_prefix="p" * 70_000))
@example(request=pb.SubscribeRequest(event_types=["T"] * 10_000))
def test_fuzz_subscribe(store: grpc.Channel, request: pb.SubscribeRequest) -> None:
    commit = node_info(store).commit_position
    got = subscribe_until_caught_up(store, request.SerializeToString())
    check_status(got, {OK, INV, Code.RESOURCE_EXHAUSTED}, request)
    if got.code != OK:
        return
    items = got.value
    assert items and items[-1].HasField("caught_up")
    positions = [e.position for i in items if i.HasField("events") for e in i.events.events]
    start = commit if request.from_end else request.after_position
    assert positions == sorted(set(positions)) and all(start < p <= commit for p in positions)
    if not (request.stream_prefix or request.event_types):  # no gap, no repeat
        assert positions == list(range(start + 1, start + 1 + len(positions)))
    check_healthy(store)


@FUZZ
@given(request=stream_info_requests)
def test_fuzz_stream_info(store: grpc.Channel, request: pb.StreamInfoRequest) -> None:
    got = unary(store, EVENTSTORE + "StreamInfo", request.SerializeToString())
    check_status(got, {OK, INV, Code.NOT_FOUND}, request)
    if got.code == OK:
        info = pb.StreamInfoResponse.FromString(got.value)
        assert info.stream == request.stream and info.last_revision >= 1
        assert info.first_position <= info.last_position <= node_info(store).commit_position
    check_healthy(store)


STORE_RAW: dict[str, tuple[SearchStrategy[Any], Callable[[grpc.Channel, bytes], Outcome],
                           set[Code]]] = {
    "Append": (append_requests, lambda ch, b: unary(ch, EVENTSTORE + "Append", b),
               APPEND_CODES),
    "AppendStream": (append_stream_requests, lambda ch, b: outcome(lambda: list(
        ch.stream_stream(EVENTSTORE + "AppendStream")(iter([b]), timeout=T))), {OK, INV}),
    "Read": (read_requests, lambda ch, b: stream_out(ch, EVENTSTORE + "Read", b), READ_CODES),
    "Subscribe": (subscribe_requests, subscribe_until_caught_up,
                  {OK, INV, Code.RESOURCE_EXHAUSTED}),
    "StreamInfo": (stream_info_requests,
                   lambda ch, b: unary(ch, EVENTSTORE + "StreamInfo", b),
                   {OK, INV, Code.NOT_FOUND}),
    "NodeInfo": (st.just(pb.NodeInfoRequest()),
                 lambda ch, b: unary(ch, EVENTSTORE + "NodeInfo", b), {OK, INV}),
}


raw_store_calls = st.sampled_from(sorted(STORE_RAW)).flatmap(
    lambda m: st.tuples(st.just(m), raw(STORE_RAW[m][0])))


@settings(FUZZ, max_examples=200)
@given(case=raw_store_calls)
def test_fuzz_raw_bytes_to_every_store_rpc(store: grpc.Channel, case: tuple[str, bytes]
                                           ) -> None:
    method, payload = case
    _, call, allowed = STORE_RAW[method]
    before = node_info(store).last_position
    got = call(store, payload)
    check_status(got, allowed, (method, payload))
    if method == "Append":
        check_writes(store, before, [(pb.AppendRequest.FromString(payload),
                                      pb.AppendResponse.FromString(got.value))]
                     if got.code == OK else [])
    elif method == "AppendStream" and got.code == OK:
        msg = pb.AppendStreamRequest.FromString(payload)
        (resp,) = (pb.AppendStreamResponse.FromString(r) for r in got.value)
        check_writes(store, before, [(req, r.ok) for req, r in zip(
            msg.appends, resp.results, strict=True) if r.HasField("ok")])
    else:
        assert node_info(store).last_position == before
    check_healthy(store)


# ---- the order gateway -------------------------------------------------------------------

GATEWAY = "/xdc.v1.OrderGateway/"
ORDER_CODES = {OK, INV, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED}
# OUT_OF_RANGE: an after_position past the log's end.
STREAM_CODES = {OK, INV, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED, Code.OUT_OF_RANGE}


@dataclass
class Gateway:
    x: Exchange
    thread: LoopThread
    channel: grpc.Channel  # to the gateway
    store: grpc.Channel  # to the store behind it


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with in_thread(lambda: exchange(tmp_path_factory.mktemp("exchange"))) as (x, thread), \
            grpc.insecure_channel(x.gateway.address, options=channel_options()) as ch, \
            grpc.insecure_channel(x.store.address, options=channel_options()) as store_ch:
        yield Gateway(x, thread, ch, store_ch)


def field(valid: SearchStrategy[Any], *hostile: str | SearchStrategy[Any]
          ) -> tuple[SearchStrategy[Any], SearchStrategy[Any]]:
    """(plausible values, anything): strings named in `hostile` join random text."""
    texts = [h for h in hostile if isinstance(h, str)]
    others = [h for h in hostile if not isinstance(h, str)]
    return valid, st.one_of(valid, *others, *([names(*texts)] if texts else []))


def enum(values: list[int]) -> tuple[SearchStrategy[int], SearchStrategy[int]]:
    return field(st.sampled_from(values), sint(32))


SYMBOL = field(st.sampled_from(("BTC-USD", "ETH-USD", "ACME")), "DOGE-USD", "", "btc-usd")
ACCOUNT = field(st.sampled_from(("alice", "bob", "carol")), "", "a b", "é")
ORDER_ID = field(st.sampled_from(("c1", "c2", "c3", "r1", "r2")),
                 "", "x" * 65, "tab\there", "é")
PRICE = field(st.integers(2_990, 3_010) | st.integers(49_990, 50_010), sint(64))
QTY = field(st.integers(1, 300), sint(64))
NUMBER = field(st.integers(0, 20), uint(64))


@st.composite
def waits(draw: st.DrawFn, hostile: bool) -> dict[str, Any]:
    """wait, wait_timeout_ms: no engine runs here, so a wait that is accepted lasts its
    timeout; kept short (the default, 0, is 5 s), or over the limit (refused)."""
    wait = draw(st.booleans())
    short = st.integers(1, 30)
    return {"wait": wait, "wait_timeout_ms": draw(
        (uint(32) if not wait else short | st.integers(60_001, 2**32 - 1)) if hostile
        else short)}


def requests(cls: Any, waiting: bool = True,
             **fields: tuple[SearchStrategy[Any], SearchStrategy[Any]]) -> SearchStrategy[Any]:
    """Half with every field plausible, half with any field anything."""
    def build(i: int) -> SearchStrategy[Any]:
        return st.builds(lambda w, **kw: cls(**kw, **w),
                         waits(bool(i)) if waiting else st.just({}),
                         **{k: v[i] for k, v in fields.items()})
    return valid_or_hostile(build(0), build(1))


submit_requests = requests(
    xpb.SubmitOrderRequest, symbol=SYMBOL, account=ACCOUNT, client_order_id=ORDER_ID,
    side=enum([xpb.BUY, xpb.SELL]), order_type=enum(list(xpb.OrderType.values())),
    time_in_force=enum(list(xpb.TimeInForce.values())), price=PRICE, qty=QTY,
    post_only=field(st.booleans()), stp=enum(list(xpb.SelfTradePrevention.values())))
cancel_requests = requests(
    xpb.CancelOrderRequest, symbol=SYMBOL, account=ACCOUNT, request_id=ORDER_ID,
    order_id=NUMBER, client_order_id=ORDER_ID)
replace_requests = requests(
    xpb.ReplaceOrderRequest, symbol=SYMBOL, account=ACCOUNT, request_id=ORDER_ID,
    order_id=NUMBER, client_order_id=ORDER_ID, price=PRICE, qty=QTY)
stream_executions_requests = requests(xpb.StreamExecutionsRequest, False, account=ACCOUNT,
                                      after_position=NUMBER)
stream_book_requests = requests(xpb.StreamBookRequest, False, symbol=SYMBOL,
                                depth=field(st.integers(0, 30), uint(32)))
ORDER_RPCS = {"SubmitOrder": submit_requests, "CancelOrder": cancel_requests,
              "ReplaceOrder": replace_requests}
ORDER_CLASSES = {"SubmitOrder": xpb.SubmitOrderRequest, "CancelOrder": xpb.CancelOrderRequest,
                 "ReplaceOrder": xpb.ReplaceOrderRequest}
STREAM_RPCS = {"StreamExecutions": stream_executions_requests,
               "StreamBook": stream_book_requests}


def order_call(g: Gateway, method: str, payload: bytes) -> None:
    """One order request; then: an accepted one appended exactly one input event to its
    group's input stream (none when a duplicate), a refused one appended nothing."""
    before = node_info(g.store).last_position
    got = unary(g.channel, GATEWAY + method, payload)
    check_status(got, ORDER_CODES, (method, payload))
    after = node_info(g.store).last_position
    if got.code != OK:
        assert after == before, f"refused {method} appended {after - before} events"
    elif (resp := xpb.OrderResponse.FromString(got.value)).duplicate:
        assert after == before and 0 < resp.input_position <= before
    else:
        assert after == before + 1 == resp.input_position
        (e,) = read_positions(g.store, after, after)
        symbol = ORDER_CLASSES[method].FromString(payload).symbol
        assert e.stream == wire.input_stream(g.x.config.group_of[symbol])
    check_healthy(g.channel)


def stream_call(g: Gateway, method: str, payload: bytes) -> Outcome:
    """A streaming call is either refused at once or attached to the output feed (an
    outlet; a book stream then sends its snapshot): wait for one or the other, read the
    snapshot, cancel, and wait for the outlet to close."""
    feed = g.x.gateway.service.feed
    opened = feed.outlets
    call = g.channel.unary_stream(GATEWAY + method)(payload, timeout=T)
    g.thread.call(wait_until(lambda: call.done() or feed.outlets > opened, T,
                             "the stream refused or attached"))
    if call.done():
        return outcome(lambda: list(call))
    first = xpb.BookMessage.FromString(call.next()) if method == "StreamBook" else None
    call.cancel()
    g.thread.call(wait_until(lambda: feed.outlets == opened, T, "the outlet closed"))
    return Outcome(OK, "", first)


@FUZZ
@given(case=st.sampled_from(sorted(ORDER_RPCS)).flatmap(
    lambda m: st.tuples(st.just(m), ORDER_RPCS[m])))
def test_fuzz_order_entry(gateway: Gateway, case: tuple[str, Any]) -> None:
    method, request = case
    order_call(gateway, method, request.SerializeToString())


@settings(FUZZ, max_examples=60)
@given(case=st.sampled_from(sorted(STREAM_RPCS)).flatmap(
    lambda m: st.tuples(st.just(m), STREAM_RPCS[m])))
def test_fuzz_gateway_streams(gateway: Gateway, case: tuple[str, Any]) -> None:
    method, request = case
    got = stream_call(gateway, method, request.SerializeToString())
    check_status(got, STREAM_CODES, request)
    if got.code == OK and method == "StreamBook":
        assert got.value.snapshot and got.value.symbol == request.symbol
        assert len(got.value.bids) <= (request.depth or 20)
    check_healthy(gateway.channel)


@FUZZ
@given(case=st.sampled_from(sorted({**ORDER_RPCS, **STREAM_RPCS})).flatmap(
    lambda m: st.tuples(st.just(m), raw({**ORDER_RPCS, **STREAM_RPCS}[m]))))
# Undecodable bytes on a generated servicer: were UNKNOWN (its deserializer raised).
@example(case=("SubmitOrder", b"\xff\xff\xff"))
@example(case=("StreamBook", b"\x0a\x02\xff\xfe"))
def test_fuzz_raw_bytes_to_every_gateway_rpc(gateway: Gateway, case: tuple[str, bytes]
                                             ) -> None:
    method, payload = case
    if method in STREAM_RPCS:
        check_status(stream_call(gateway, method, payload), STREAM_CODES, case)
        check_healthy(gateway.channel)
        return
    order_call(gateway, method, payload)


# ---- an engine's EngineControl -----------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess,
                                                                         grpc.Channel]]:
    tmp = tmp_path_factory.mktemp("engine")
    with ServeProcess(str(tmp / "store")) as store_proc:
        proc = start_engine(store_proc.address, "e1", lease_dir(tmp))
        try:
            with grpc.insecure_channel(proc.address, options=channel_options()) as ch:
                yield proc, ch
        finally:
            proc.kill()


@settings(FUZZ, max_examples=60)
@given(payload=raw(st.just(xpb.EngineStatusRequest())))
@example(payload=b"\xff\xff\xff")  # was UNKNOWN: the generated deserializer raised
def test_fuzz_engine_control(engine: tuple[ServeProcess, grpc.Channel], payload: bytes
                             ) -> None:
    proc, ch = engine
    got = unary(ch, "/xdc.v1.EngineControl/Status", payload)
    check_status(got, {OK, INV}, payload)
    if got.code == OK:
        assert xpb.EngineStatus.FromString(got.value).group == "sim"
    assert proc.proc is not None and proc.proc.poll() is None, "the engine process died"
    assert unary(ch, "/xdc.v1.EngineControl/Status", b"").code == OK


# ---- a cluster node: replication (peer port) and tiers ------------------------------------

REPLICATION = "/xdc.v1.Replication/"
CLUSTER = "t"  # tests/support/cluster.py names its clusters so


@dataclass
class Node:
    cluster: LocalCluster
    thread: LoopThread
    leader: ClusterNode
    follower: ClusterNode
    peer: grpc.Channel  # the follower's peer port
    client: grpc.Channel  # its client port
    term: int  # the follower's promised term when the fuzzing starts
    members: tuple[str, ...]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("cluster")
    etcd = EtcdCluster(tmp / "etcd").start()
    try:
        with in_thread(lambda: running_cluster(etcd.endpoints, tmp)) as (cluster, thread):
            leader = thread.call(cluster.leader())
            follower = next(n for n in cluster.nodes.values() if n is not leader)
            with grpc.insecure_channel(follower.member.peer, options=channel_options()) as peer, \
                    grpc.insecure_channel(follower.address, options=channel_options()) as client:
                term = tip(peer).promised_term
                assert term >= 1 and term == leader.store.role.term
                assert tuple(sorted(cluster.nodes)) == MEMBERS
                yield Node(cluster, thread, leader, follower, peer, client, term, MEMBERS)
    finally:
        etcd.stop()


def tip(channel: grpc.Channel) -> rpb.TipResponse:
    return rpb.TipResponse.FromString(channel.unary_unary(REPLICATION + "Tip")(
        rpb.TipRequest(cluster=CLUSTER).SerializeToString(), timeout=T))


MEMBERS = ("ap-south-1", "eu-west-1", "us-east-1")  # LocalCluster.make's three regions


def peer_batches() -> SearchStrategy[rpb.PeerBatch]:
    """Batches a member could have sent (half), or anyone (half), with messages of every
    kind (and unknown ones), to the node under test or misrouted, with hostile fields.
    The test maps every term below the node's promised term: a member's message at a
    live term is the protocol's own business (Byzantine peers are kept out by mutual
    TLS, not by parsing)."""
    u64 = uint(64)
    member = st.sampled_from(MEMBERS)
    messages = st.builds(
        rpb.PeerMessage, kind=valid_or_hostile(st.sampled_from(range(1, 7)), sint(32)),
        src=member, dst=valid_or_hostile(member, names("")), term=u64, ok=st.booleans(),
        prev_pos=u64, prev_term=u64,
        first_position=u64, entry_terms=st.lists(u64, max_size=4),
        entry_payloads=st.lists(st.binary(max_size=64), max_size=4),
        commit=u64, match=u64, rejected=u64, hint_pos=u64, hint_term=u64, higher_term=u64,
        tip_term=u64, tip_position=u64, max_entries=u64, max_bytes=u64,
        trace_context=small_map)

    def from_member(src: str, msgs: list[rpb.PeerMessage]) -> rpb.PeerBatch:
        for m in msgs:
            m.src = src  # a member's batch holds its own messages (others are dropped)
        return rpb.PeerBatch(cluster=CLUSTER, src=src, messages=msgs)
    return valid_or_hostile(
        st.builds(from_member, member, st.lists(messages, max_size=5)),
        st.builds(rpb.PeerBatch, cluster=names(CLUSTER, ""), src=names(*MEMBERS, ""),
                  messages=st.lists(messages, max_size=3)))


REPLICATION_RPCS: dict[str, SearchStrategy[Any]] = {
    "Stream": peer_batches(),
    "Tip": st.builds(rpb.TipRequest, cluster=valid_or_hostile(st.just(CLUSTER), names("")),
                     src=names(*MEMBERS)),
    "Status": st.just(rpb.StatusRequest()),
    "Switchover": st.builds(rpb.SwitchoverRequest, target=valid_or_hostile(
        st.sampled_from(MEMBERS), names("")), timeout_ms=uint(32)),
}
REPLICATION_CODES = {
    "Stream": {OK, INV, Code.PERMISSION_DENIED},
    "Tip": {OK, INV, Code.PERMISSION_DENIED},
    "Status": {OK, INV},
    # On a follower: a member target is FAILED_PRECONDITION (only the leader hands over).
    "Switchover": {INV, Code.FAILED_PRECONDITION},
}


def live_forgery(payload: bytes, n: Node) -> bool:
    """Bytes that decode to a member's batch carrying a message to the node under test
    at a term it has not fenced (see peer_batches): not sent."""
    try:
        batch = rpb.PeerBatch.FromString(payload)
    except Exception:  # DecodeError: not a batch at all
        return False
    return batch.cluster == CLUSTER and batch.src in n.members and any(
        m.term >= n.term and m.dst == n.follower.id for m in batch.messages)


def check_replication(n: Node, method: str, payload: bytes) -> None:
    """One request to the follower's peer port; then it holds the same log, has promised
    no term the leader does not hold, and serves."""
    before = tip(n.peer)
    if method == "Stream":
        got = outcome(lambda: n.peer.stream_unary(REPLICATION + method)(iter([payload]),
                                                                        timeout=T))
    else:
        got = unary(n.peer, REPLICATION + method, payload)
    check_status(got, REPLICATION_CODES[method], (method, payload))
    after = tip(n.peer)
    assert (after.last_term, after.last_position) == (before.last_term, before.last_position)
    assert after.promised_term == before.promised_term <= n.leader.store.role.term
    if got.code == OK and method == "Tip":
        assert rpb.TipResponse.FromString(got.value).node_id == n.follower.id
    check_healthy(n.client)


HUGE = "\U0001f600" * 70_000


@settings(FUZZ, max_examples=200)
@given(case=st.sampled_from(sorted(REPLICATION_RPCS)).flatmap(
    lambda m: st.tuples(st.just(m), REPLICATION_RPCS[m])))
# Refusals quoted these whole: a status trailer over the client's metadata limit, which
# the client saw as RESOURCE_EXHAUSTED "Stream removed" instead of the refusal.
@example(case=("Stream", rpb.PeerBatch(cluster=HUGE, src=HUGE)))
@example(case=("Tip", rpb.TipRequest(cluster=HUGE)))
@example(case=("Switchover", rpb.SwitchoverRequest(target=HUGE)))
# A member's message of an unknown kind: was UNKNOWN (ValueError decoding it).
@example(case=("Stream", rpb.PeerBatch(cluster=CLUSTER, src=MEMBERS[0], messages=[
    rpb.PeerMessage(kind=99, src=MEMBERS[0], dst=m) for m in MEMBERS])))
# A switchover waiting for 49 days: now refused (timeout_ms over MAX_SWITCHOVER_MS).
@example(case=("Switchover", rpb.SwitchoverRequest(target=MEMBERS[0], timeout_ms=2**32 - 1)))
def test_fuzz_replication(node: Node, case: tuple[str, Any]) -> None:
    method, request = case
    if method == "Stream":
        for m in request.messages:
            m.term %= node.term
    check_replication(node, method, request.SerializeToString())


@settings(FUZZ, max_examples=150)
@given(case=st.sampled_from(sorted(REPLICATION_RPCS)).flatmap(
    lambda m: st.tuples(st.just(m), raw(REPLICATION_RPCS[m]))))
# Undecodable bytes on a generated servicer: were UNKNOWN (its deserializer raised).
@example(case=("Stream", b"\x0a\x02\xff\xfe"))
@example(case=("Switchover", b"\xff\xff\xff"))
def test_fuzz_raw_bytes_to_every_replication_rpc(node: Node, case: tuple[str, bytes]
                                                 ) -> None:
    method, payload = case
    assume(not live_forgery(payload, node))
    check_replication(node, method, payload)


@settings(FUZZ, max_examples=60)
@given(payload=raw(st.just(tpb.TiersStatusRequest())))
@example(payload=b"\xff\xff\xff")  # was UNKNOWN: the generated deserializer raised
def test_fuzz_tiers_status(node: Node, payload: bytes) -> None:
    got = unary(node.client, "/xdc.v1.Tiers/Status", payload)
    check_status(got, {OK, INV}, payload)
    if got.code == OK:
        assert tpb.TiersStatus.FromString(got.value).node_id == node.follower.id
    check_healthy(node.client)


def test_the_fuzzed_cluster_kept_one_log_and_commits(node: Node) -> None:
    """After the fuzz tests above (same module, same cluster): the leader and its term
    are those of the start, every node holds the same log, and a write commits."""
    async def body() -> None:
        assert await node.cluster.leader() is node.leader
        assert node.leader.store.role.term == node.term
        last = await node.cluster.converged()
        async with StoreClient(node.leader.address) as client:
            r = await client.append("after-fuzz", new_event("T"))
        assert r.last_position == last + 1
        assert await node.cluster.converged() == last + 1
    node.thread.call(body())
