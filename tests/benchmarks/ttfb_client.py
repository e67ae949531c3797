"""Streamed-request timing over one keep-alive connection, from its own process, raw sockets.

For each ``"stream": true`` chat completion it records the time from the last byte of the
request sent to: the first byte of the response (TTFB), the first SSE ``data:`` event in
the body, and the end of the stream. A minimal HTTP/1.1 reader (Content-Length or chunked)
keeps the client's own cost to microseconds, so the figures are the server's. The run is
bounded by ``--count`` and ``--duration``; it prints one JSON object on stdout:

    python -m tests.benchmarks.ttfb_client --port 4000 --header 'Authorization: Bearer K'
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from dataclasses import dataclass

DEFAULT_BODY = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"stream":true}'


class ProtocolError(Exception):
    pass


@dataclass
class Sample:
    status: int
    ttfb: float
    first_event: float | None
    total: float
    events: int
    done: bool
    body: bytes


class Connection:
    def __init__(self, host: str, port: int, timeout: float):
        self._address = (host, port)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self._address, timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock, self._buf = sock, b""
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _recv(self) -> None:
        assert self._sock is not None
        data = self._sock.recv(65536)
        if not data:
            raise ProtocolError("connection closed by the server")
        self._buf += data

    def _until(self, sep: bytes) -> bytes:
        while (at := self._buf.find(sep)) < 0:
            self._recv()
        line, self._buf = self._buf[:at], self._buf[at + len(sep) :]
        return line

    def _exact(self, size: int) -> bytes:
        while len(self._buf) < size:
            self._recv()
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def request(self, raw: bytes) -> Sample:
        sock = self._connect()
        start = time.perf_counter()
        sock.sendall(raw)
        self._recv()
        ttfb = time.perf_counter() - start
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        first_event: float | None = None
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._until(b"\r\n")  # no trailers expected: the empty line
                    break
                body += self._exact(size + 2)[:-2]
                if first_event is None and b"data:" in body:
                    first_event = time.perf_counter() - start
        elif "content-length" in headers:
            body = self._exact(int(headers["content-length"]))
        else:  # delimited by the end of the connection
            try:
                while True:
                    self._recv()
            except ProtocolError:
                pass
            body, self._buf = self._buf, b""
            self.close()
        total = time.perf_counter() - start
        if first_event is None and b"data:" in body:
            first_event = total
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Sample(status, ttfb, first_event, total, body.count(b"data:"), b"[DONE]" in body, body)


def build_request(host: str, port: int, path: str, headers: list[str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    lines += [h for h in headers if h.partition(":")[0].strip().lower() not in {"host", "content-type"}]
    lines += [f"Content-Length: {len(body)}", "Connection: keep-alive"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict[str, object]:
    raw = build_request(args.host, args.port, args.path, args.header, args.body.encode())
    conn = Connection(args.host, args.port, args.timeout)
    samples: list[Sample] = []
    failures: list[str] = []
    deadline = time.monotonic() + args.duration
    try:
        for index in range(args.warmup + args.count):
            if time.monotonic() > deadline:
                break
            try:
                sample = conn.request(raw)
            except (OSError, ProtocolError, ValueError, IndexError) as exc:
                conn.close()
                failures.append(f"{type(exc).__name__}: {exc}")
                if len(failures) > 20:
                    break
                continue
            if index >= args.warmup:
                samples.append(sample)
    finally:
        conn.close()
    good = [s for s in samples if s.status == 200 and s.done]
    bad = next((s for s in samples if not (s.status == 200 and s.done)), None)
    ms = 1000.0
    ttfb = [s.ttfb * ms for s in good]
    first = [s.first_event * ms for s in good if s.first_event is not None]
    total = [s.total * ms for s in good]
    return {
        "requests": len(samples),
        "ok": len(good),
        "bad_status": sorted({s.status for s in samples if s.status != 200}),
        "incomplete": sum(1 for s in samples if s.status == 200 and not s.done),
        "first_bad_reply": bad.body[:300].decode(errors="replace") if bad is not None else None,
        "failures": failures[:5],
        "failure_count": len(failures),
        "events_per_stream": statistics.median([s.events for s in good]) if good else None,
        "ttfb_ms": {"p50": percentile(ttfb, 50), "p90": percentile(ttfb, 90), "p99": percentile(ttfb, 99)},
        "first_event_ms": {"p50": percentile(first, 50), "p99": percentile(first, 99)},
        "total_ms": {"p50": percentile(total, 50), "p99": percentile(total, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="time streamed chat completions over one connection")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--body", default=DEFAULT_BODY)
    parser.add_argument("--count", type=int, default=1000, help="measured requests at most")
    parser.add_argument("--warmup", type=int, default=20, help="requests sent first and not counted")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds at most, warm-up included")
    parser.add_argument("--timeout", type=float, default=30.0, help="socket timeout in seconds")
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
