"""`make demo`: a standalone node in a real process; append, read, subscribe, stop.

(The multi-region demo replaces this once replication lands.)"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time

from store.client import NO_STREAM, CaughtUp, StoreClient, new_event
from store.process import ServeProcess


async def _exercise(address: str) -> dict[str, object]:
    async with StoreClient(address) as client:
        placed = await client.append("orders.BTC-USD", [
            new_event("OrderPlaced", json.dumps({"side": "buy", "px": 100, "qty": 2}).encode(),
                      content_type="application/json"),
            new_event("OrderPlaced", json.dumps({"side": "sell", "px": 101, "qty": 1}).encode(),
                      content_type="application/json"),
        ], expected=NO_STREAM)
        t0 = time.perf_counter()
        n = 5000
        await asyncio.gather(*(client.append(f"orders.SYM{i % 8}", new_event("OrderPlaced",
                                                                                b"x" * 200))
                               for i in range(n)))
        dt = time.perf_counter() - t0
        events = await client.read("orders.BTC-USD")
        seen = 0
        async for item in client.subscribe(batches=True):
            if isinstance(item, CaughtUp):
                break
            seen += len(item.events)
        info = await client.node_info()
    return {"first_append": [placed.first_position, placed.last_position],
            "read_back": [(e.revision, e.type) for e in events],
            "concurrent_appends": n, "appends_per_s": round(n / dt),
            "subscribed_events": seen, "commit_position": info.commit_position}


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="xdc-demo-") as data:
        node = ServeProcess(data).start()
        print(f"xdc demo: standalone node pid {node.pid} at {node.address}, data in {data}")
        try:
            summary = asyncio.run(_exercise(node.address))
        finally:
            code = node.stop()
        for key, value in summary.items():
            print(f"  {key:20} {value}")
        print(f"xdc demo: node stopped cleanly (exit {code})")
        ok = code == 0 and summary["subscribed_events"] == summary["commit_position"]
        return 0 if ok else 1
