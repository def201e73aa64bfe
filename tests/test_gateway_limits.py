"""The gateway's own limits: GatewayLimits refuses values that cannot work with a
ValueError naming the field and the rule, and the engine directory the gateway discovers
engines with (engine/matching_health.py) remembers a bounded number of instances, against
a real store."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest

from engine import wire
from engine.gateway import GatewayLimits
from engine.matching_health import DISCOVER_EVERY_S, MAX_ENGINES, EngineDirectory
from tests.support.store import run, running_store

POSITIVE = "must be an integer > 0"
SECONDS = "must be a finite number of seconds > 0"
LIMIT_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"default_wait_ms": 0}, f"GatewayLimits.default_wait_ms (0) {POSITIVE}"),
    ({"default_wait_ms": -1}, f"GatewayLimits.default_wait_ms (-1) {POSITIVE}"),
    ({"max_wait_ms": 10}, "GatewayLimits.max_wait_ms (10) must be >= default_wait_ms (5000)"),
    ({"max_wait_ms": 0}, f"GatewayLimits.max_wait_ms (0) {POSITIVE}"),
    ({"max_waiters": 0}, f"GatewayLimits.max_waiters (0) {POSITIVE}"),
    ({"recent_inputs": -5}, f"GatewayLimits.recent_inputs (-5) {POSITIVE}"),
    ({"stream_queue": 0}, f"GatewayLimits.stream_queue (0) {POSITIVE}"),
    ({"stream_queue": True}, f"GatewayLimits.stream_queue (True) {POSITIVE}"),
    ({"max_streams": 0}, f"GatewayLimits.max_streams (0) {POSITIVE}"),
    ({"max_streams": 1.5}, f"GatewayLimits.max_streams (1.5) {POSITIVE}"),
    ({"default_book_depth": 0}, f"GatewayLimits.default_book_depth (0) {POSITIVE}"),
    ({"max_book_depth": 5},
     "GatewayLimits.max_book_depth (5) must be >= default_book_depth (20)"),
    ({"max_book_depth": "9"}, f"GatewayLimits.max_book_depth ('9') {POSITIVE}"),
    ({"catch_up_wait_s": 0}, f"GatewayLimits.catch_up_wait_s (0) {SECONDS}"),
    ({"catch_up_wait_s": -0.5}, f"GatewayLimits.catch_up_wait_s (-0.5) {SECONDS}"),
    ({"catch_up_wait_s": math.nan}, f"GatewayLimits.catch_up_wait_s (nan) {SECONDS}"),
    ({"catch_up_wait_s": math.inf}, f"GatewayLimits.catch_up_wait_s (inf) {SECONDS}"),
]


@pytest.mark.parametrize(("kw", "message"), LIMIT_REFUSALS)
def test_gateway_limits_refuse_a_bad_value_naming_field_and_rule(kw: dict[str, Any],
                                                                 message: str) -> None:
    """A ValueError naming the field and the rule (before, a bare assert: an
    AssertionError without a word, and nothing at all under python -O)."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GatewayLimits(**kw)


def test_every_gateway_limit_is_checked() -> None:
    """Each field refuses 0, also one added later; the defaults and the edges of the
    rules (equal defaults and maxima, fractions of seconds) are accepted."""
    for f in dataclasses.fields(GatewayLimits):
        with pytest.raises(ValueError, match=f"^GatewayLimits.{f.name} "):
            GatewayLimits(**{f.name: 0})
    GatewayLimits()
    GatewayLimits(default_wait_ms=1, max_wait_ms=1, max_waiters=1, recent_inputs=1,
                  stream_queue=1, max_streams=1, default_book_depth=1, max_book_depth=1,
                  catch_up_wait_s=0.001)


def _reference(adverts: list[tuple[str, str, str]]) -> list[str]:
    """What the directory returned before it forgot anything: the latest address per
    (group, instance), most recently advertised first, at most MAX_ENGINES distinct."""
    latest: dict[tuple[str, str], str] = {}
    for group, instance, address in adverts:
        latest.pop((group, instance), None)
        latest[(group, instance)] = address
    return list(dict.fromkeys(reversed(latest.values())))[:MAX_ENGINES]


def test_engine_directory_remembers_at_most_max_engines_instances(tmp_path: Path) -> None:
    """Instances that restart under new ids, many at one address, and more addresses
    than MAX_ENGINES: the directory keeps at most MAX_ENGINES instances (before, every
    instance ever advertised) and returns what it returned before, look after look."""
    async def body() -> None:
        async with running_store(tmp_path / "store") as (_, client):
            now = [0.0]
            directory = EngineDirectory(client, ["g1", "g2"], clock=lambda: now[0])
            adverts: list[tuple[str, str, str]] = []

            async def advertise(group: str, instance: str, address: str) -> None:
                await client.append(wire.instances_stream(group), [
                    wire.instance_event(group, instance, address, "1.0.0")])
                adverts.append((group, instance, address))

            async def look() -> list[str]:
                now[0] += DISCOVER_EVERY_S  # the directory reads the store again
                found = await directory.addresses()
                assert directory.known <= MAX_ENGINES
                return found

            assert await look() == []
            # A long-running primary of g2, advertised once. (Looks come between groups'
            # adverts: a look reads g1, then g2, which then counts as the more recent.)
            await advertise("g2", "primary", "10.1.0.1:7200")
            assert await look() == ["10.1.0.1:7200"]
            # Restarts of one host, each under a new instance id, at one address.
            for i in range(3 * MAX_ENGINES):
                await advertise("g1", f"restart-{i}", "10.0.0.1:7200")
            assert await look() == ["10.0.0.1:7200", "10.1.0.1:7200"] == _reference(adverts)
            assert directory.known == 2
            # Instances at ever new addresses: the oldest go, as they did from the answer.
            for i in range(2 * MAX_ENGINES):
                await advertise("g1", f"e{i}", f"10.2.{i // 200}.{i % 200}:7200")
            found = await look()
            assert found == _reference(adverts) and len(found) == MAX_ENGINES
            assert "10.1.0.1:7200" not in found and directory.known == MAX_ENGINES
            # The primary advertises again (a new release): first, and the rest shifts.
            await advertise("g2", "primary", "10.1.0.2:7200")
            assert (await look())[0] == "10.1.0.2:7200"
            # An instance that moves leaves its old address.
            await advertise("g1", f"e{2 * MAX_ENGINES - 1}", "10.3.0.1:7200")
            found = await look()
            assert found[:2] == ["10.3.0.1:7200", "10.1.0.2:7200"]
            assert found == _reference(adverts) and directory.known == MAX_ENGINES
    run(body)
