"""A small client of ``/v1/stream`` (protocol: ``jobs.stream_api``), to use as it is or to copy: it needs only
``numpy`` and ``websockets``.

    from jobs.stream_client import StreamClient

    with StreamClient("ws://127.0.0.1:8000/v1/stream", out="events.jsonl") as client:
        client.open(scores=False)
        for step in features:                  # [T, C] float32, e.g. as a live featurizer makes them
            client.send_features(step)
            for event in client.poll():        # whatever arrived meanwhile
                print(event["kind"], event["label_name"], event["start"], event["end"])
        summary = client.close()               # the remaining end events arrive before it returns

Every event is written to ``out`` as one JSON line the moment it arrives (a background thread reads the
socket), so a server that dies mid-stream loses none the client already received. ``events()`` (blocking) and
``async for event in client`` iterate over the events until the session ends.

    python -m jobs.stream_client --url ws://127.0.0.1:8000/v1/stream --features clip.npy --rate 4 --out events.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

_END = object()


class StreamClientError(Exception):
    """The server refused something (``code``, ``message``: its ``error`` message), or the session is over."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def stream_url(url: str) -> str:
    """``http(s)://host:port`` or ``ws(s)://host:port[/v1/stream]`` -> the WebSocket URL of ``/v1/stream``."""
    url = url.rstrip("/")
    if url.startswith("http"):
        url = "ws" + url[4:]
    return url if url.endswith("/v1/stream") else url + "/v1/stream"


class StreamClient:
    """One ``/v1/stream`` session. ``out``: a JSON-lines file every event is appended to as it arrives;
    ``on_event``: called (on the reader thread) with each event as it arrives."""

    def __init__(self, url: str, out: str | Path | None = None, on_event: Callable[[dict], None] | None = None, timeout: float = 30.0):
        self.url, self.timeout, self.on_event = stream_url(url), timeout, on_event
        self._connection = connect(self.url, open_timeout=timeout, max_size=None)
        self.socket = self._connection.__enter__()  # the context manager's connection: closed in _shutdown
        self.out = open(out, "a", encoding="utf-8") if out is not None else None  # noqa: SIM115 - open as long as the session
        self.opened: dict | None = None
        self.closed: dict | None = None  # the server's "closed" message
        self.errors: list[dict] = []  # every error message the server sent
        self.disconnected: tuple[int | None, str] | None = None  # (close code, reason) once the connection is gone
        self.received = {"event": 0, "scores": 0}
        self._events: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="stream-client-reader", daemon=True)
        self._reader.start()

    # --- sending -----------------------------------------------------------------------------------

    def open(
        self,
        input: str = "features",
        *,
        model: str | None = None,
        scores: bool = False,
        timing: dict | None = None,
        rule: dict | None = None,
    ) -> dict:
        """Open the session; returns the server's ``opened`` message (labels, input_dim, limits, ...)."""
        options: dict[str, Any] = {"scores": scores}
        if timing is not None:
            options["timing"] = timing
        if rule:
            options["rule"] = rule
        self._send(json.dumps({"type": "open", "model": model, "input": input, "options": options}))
        reply = self._reply("opened")
        self.opened = reply
        return reply

    def send_features(self, features, timestamps=None) -> None:
        """Feature steps ``[n, C]`` or one step ``[C]``: as ``.npy`` bytes, or as JSON when ``timestamps`` (s) are given."""
        array = np.asarray(features, dtype=np.float32)
        if timestamps is not None:
            self._send(json.dumps({"type": "features", "features": array.tolist(), "timestamps": np.asarray(timestamps, float).tolist()}))
            return
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self._send(buf.getvalue())

    def send_video(self, chunk: bytes) -> None:
        """The next piece of an encoded stream (e.g. MPEG-TS), for a session opened with ``input="video"``."""
        self._send(bytes(chunk))

    def close(self, timeout: float | None = None) -> dict:
        """Ask the server to close the stream; returns its ``closed`` message once every end event has arrived."""
        if self.closed is None and self.disconnected is None:
            self._send(json.dumps({"type": "close"}))
            self._reply("closed", timeout)
        self._shutdown()
        if self.closed is None:
            raise StreamClientError("disconnected", f"the connection ended before the session closed: {self.disconnected}")
        return self.closed

    # --- receiving ---------------------------------------------------------------------------------

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Events (and ``scores`` messages, if asked for) as they arrive, until the session ends; ``timeout``:
        the longest wait for the next one (then ``StreamClientError("timeout")``)."""
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise StreamClientError("timeout", f"nothing from the server for {timeout:g} s") from None
            if item is _END:
                self._events.put(_END)  # for another iterator
                return
            yield item

    def poll(self) -> list[dict]:
        """What arrived since the last call, without waiting."""
        items = []
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return items
            if item is _END:
                self._events.put(_END)
                return items
            items.append(item)

    async def __aiter__(self):
        while True:
            item = await asyncio.to_thread(self._events.get)
            if item is _END:
                self._events.put(_END)
                return
            yield item

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc) -> None:
        self._shutdown()

    # --- the reader thread ---------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            for raw in self.socket:
                message = json.loads(raw)
                kind = message.get("type")
                if kind in ("event", "scores"):
                    self.received[kind] += 1
                    if kind == "event" and self.out is not None:
                        self.out.write(json.dumps(message) + "\n")
                        self.out.flush()
                    if kind == "event" and self.on_event is not None:
                        self.on_event(message)
                    self._events.put(message)
                elif kind == "error":
                    self.errors.append(message)
                    self._replies.put(message)
                else:  # opened, closed
                    if kind == "closed":
                        self.closed = message
                    self._replies.put(message)
        except ConnectionClosed:
            pass  # the close code and reason say how it ended
        finally:
            # 1000 after "closed"; 1008 / 1013 / 1011: the server ended it (an error message came first); 1006: it dropped
            self.disconnected = (self.socket.close_code, self.socket.close_reason or "")
            self._events.put(_END)
            self._replies.put(_END)

    def _reply(self, kind: str, timeout: float | None = None) -> dict:
        """The next ``kind`` message; an error meanwhile raises (for ``opened``) or is skipped (``closed``)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                item = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise StreamClientError("timeout", f"no {kind!r} from the server within {timeout or self.timeout:g} s") from None
            if item is _END:
                self._replies.put(_END)
                raise StreamClientError("disconnected", f"the connection ended before {kind!r}: {self.disconnected}")
            if item.get("type") == kind:
                return item
            if item.get("type") == "error" and kind == "opened":
                raise StreamClientError(item["code"], item["message"])

    def _send(self, data: str | bytes) -> None:
        try:
            self.socket.send(data)
        except ConnectionClosed as e:
            raise StreamClientError("disconnected", f"the connection is closed: {e}") from None

    def _shutdown(self) -> None:
        if hasattr(self._connection, "connection"):  # entered and not yet left
            self._connection.__exit__(None, None, None)
        self._reader.join(timeout=self.timeout)
        if self.out is not None and not self.out.closed:
            self.out.close()


# --- python -m jobs.stream_client ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.stream_client", description="Stream features (or a video) to /v1/stream, print events."
    )
    p.add_argument("--url", required=True, help="ws://HOST:PORT/v1/stream (or the app's http:// base URL)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", type=Path, help=".npy of [T, C] feature steps")
    source.add_argument("--video", type=Path, help="an encoded stream file (MPEG-TS), sent in chunks")
    p.add_argument("--rate", type=float, default=4.0, help="feature steps (or video chunks) per second; 0: as fast as possible")
    p.add_argument("--chunk-kb", type=int, default=64, help="--video: bytes per chunk, KiB")
    p.add_argument("--out", type=Path, default=Path("events.jsonl"), help="events, one JSON line each, appended as they arrive")
    p.add_argument("--model", help="the model the server must be serving (checked at open)")
    p.add_argument("--scores", action="store_true", help="ask for per-step scores too (not printed)")
    args = p.parse_args(argv)

    def show(event: dict) -> None:
        end = "..." if event["end"] is None else f"{event['end']:.2f}"
        name = event.get("label_name", event["label"])
        print(f"{event['time']:9.2f}s  {event['kind']:6s}  {name}  [{event['start']:.2f}, {end}]  score {event['score']:.3f}", flush=True)

    try:
        with StreamClient(args.url, out=args.out, on_event=show) as client:
            client.open("video" if args.video else "features", model=args.model, scores=args.scores)
            if args.features is not None:
                features = np.load(args.features, allow_pickle=False)
                pieces = [features[i] for i in range(len(features))]
                send = client.send_features
            else:
                data = args.video.read_bytes()
                size = args.chunk_kb * 1024
                pieces = [data[i : i + size] for i in range(0, len(data), size)]
                send = client.send_video
            start = time.monotonic()
            for i, piece in enumerate(pieces):
                if args.rate > 0:
                    time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                send(piece)
            summary = client.close()
            for error in client.errors:
                print(f"server error {error['code']}: {error['message']}", file=sys.stderr)
    except (StreamClientError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{summary['steps']} steps, {summary['events']} events -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
