"""Load on ``/v1/stream`` of a running app: N concurrent sessions, each sending one feature step every 1/rate s.

    .venv/bin/python benchmarks/_stream_load.py --url http://127.0.0.1:8000 --sessions 4 --seconds 20
    .venv/bin/python benchmarks/_stream_load.py --url http://127.0.0.1:8000 --search --seconds 15 [--features x.npy]

A step is sent as one binary ``.npy`` message; its send time is recorded. The delay of an event is its arrival
minus the send time of the step that caused it (``event.step``; the end events of ``close()`` are not counted:
no step caused them). Every step's ``scores`` message is asked for too: its delay (arrival - send) is the
per-step latency, which exists whether or not the features make events. ``--search`` runs N = 1, 2, 4, 8, ...
and reports the largest N whose event p99 (the step p99 when a run had no events) is at most ``--target-p99``
(a run with errors counts as over: beyond ``stream_max_sessions`` per replica, sessions are refused).
Features: ``--features`` ([T, C] ``.npy``, cycled) or standard normal noise of the model's width.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time

import numpy as np
from websockets.asyncio.client import connect


def _url(url: str) -> str:
    url = url.rstrip("/")
    url = "ws" + url[4:] if url.startswith("http") else url
    return url if url.endswith("/v1/stream") else url + "/v1/stream"


def _npy(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(row, np.float32))
    return buf.getvalue()


async def one_session(url: str, features: np.ndarray | None, rate: float, seconds: float, seed: int) -> dict:
    """One session for ``seconds``: its event and step delays (s), steps sent, and the errors it got."""
    async with connect(_url(url), max_size=None, open_timeout=60) as ws:
        await ws.send(json.dumps({"type": "open", "options": {"scores": True}}))
        opened = json.loads(await ws.recv())
        if opened.get("type") != "opened":
            return {"event_delays": [], "step_delays": [], "steps": 0, "errors": [opened.get("code", str(opened))]}
        if features is None:
            features = np.random.default_rng(seed).standard_normal((256, opened["input_dim"])).astype(np.float32)
        sent: dict[int, float] = {}
        out = {"event_delays": [], "step_delays": [], "steps": 0, "errors": []}

        async def receive():
            async for raw in ws:
                message = json.loads(raw)
                now = time.perf_counter()
                kind = message["type"]
                if kind == "scores":
                    out["step_delays"].append(now - sent[message["step"]])
                elif kind == "event" and message["step"] in sent and not closing:
                    out["event_delays"].append(now - sent[message["step"]])
                elif kind == "error":
                    out["errors"].append(message["code"])
                elif kind == "closed":
                    return

        closing = False
        receiver = asyncio.create_task(receive())
        start = time.perf_counter()
        step = 0
        while time.perf_counter() - start < seconds:
            await asyncio.sleep(max(0.0, start + step / rate - time.perf_counter()))
            sent[step] = time.perf_counter()
            await ws.send(_npy(features[step % len(features)]))
            step += 1
        await asyncio.sleep(min(2.0, 4.0 / rate))  # the last steps' answers
        closing = True
        await ws.send(json.dumps({"type": "close"}))
        await asyncio.wait_for(receiver, timeout=60)
        out["steps"] = step
        return out


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "count": 0}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "count": len(values)}


async def load(url: str, sessions: int, seconds: float, rate: float = 4.0, features: np.ndarray | None = None) -> dict:
    """``sessions`` concurrent sessions at ``rate`` steps/s for ``seconds``: p50/p99 event and step delays (s)."""
    results = await asyncio.gather(*[one_session(url, features, rate, seconds, seed) for seed in range(sessions)], return_exceptions=True)
    failed = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    return {
        "sessions": sessions,
        "rate": rate,
        "seconds": seconds,
        "steps": sum(r["steps"] for r in ok),
        "event_delay_s": _percentiles([d for r in ok for d in r["event_delays"]]),
        "step_delay_s": _percentiles([d for r in ok for d in r["step_delays"]]),
        "errors": sorted({e for r in ok for e in r["errors"]}) + failed,
    }


def _p99(result: dict) -> float:
    delays = result["event_delay_s"] if result["event_delay_s"]["count"] else result["step_delay_s"]
    return float("inf") if result["errors"] or delays["p99"] is None else delays["p99"]


async def search(url: str, seconds: float, rate: float = 4.0, features=None, target_p99: float = 1.0, max_sessions: int = 64) -> dict:
    """N = 1, 2, 4, ... up to ``max_sessions``; stops at the first N over ``target_p99`` (or with errors)."""
    runs, best = [], 0
    n = 1
    while n <= max_sessions:
        result = await load(url, n, seconds, rate, features)
        runs.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
        if _p99(result) > target_p99:
            break
        best = n
        n *= 2
    return {"max_sessions_within_target": best, "target_p99_s": target_p99, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the app's base URL (http://HOST:PORT) or its ws://.../v1/stream")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0, help="how long each session sends")
    p.add_argument("--rate", type=float, default=4.0, help="steps per second per session")
    p.add_argument("--features", help="[T, C] .npy to send (cycled); default: noise of the model's width")
    p.add_argument("--search", action="store_true", help="N = 1, 2, 4, ...: the largest N with p99 <= --target-p99")
    p.add_argument("--target-p99", type=float, default=1.0)
    p.add_argument("--max-sessions", type=int, default=64)
    args = p.parse_args(argv)
    features = None if args.features is None else np.load(args.features, allow_pickle=False).astype(np.float32)
    if args.search:
        result = asyncio.run(search(args.url, args.seconds, args.rate, features, args.target_p99, args.max_sessions))
    else:
        result = asyncio.run(load(args.url, args.sessions, args.seconds, args.rate, features))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
