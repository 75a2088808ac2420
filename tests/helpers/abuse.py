"""Load and abuse of a real ``deepinsert serve`` process on 127.0.0.1 (tests and benchmarks).

Every loop here is bounded in count and in time, and only loopback addresses are used.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOOD_PROMPT = "what colour is the square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen
    port: int

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or ""


def start_server(bundle: Path, *args: str, ready_timeout_s: float = 90.0, env: dict[str, str] | None = None) -> Server:
    """``python -m deepinsert serve BUNDLE --port P ARGS`` until /health answers (``env``: extra variables)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepinsert", "serve", str(bundle), "--port", str(port), "--log-level", "error", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                c.close()
                return Server(proc, port)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not come up")


def post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/route", body=body, headers={"content-type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status


def good_latencies(port: int, n: int, *, stop: threading.Event | None = None, time_limit_s: float = 60.0) -> list[float]:
    """Seconds per request of one well-behaved client (keep-alive, short prompt), ``n`` requests."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"prompt": GOOD_PROMPT}).encode()
    out: list[float] = []
    t_end = time.monotonic() + time_limit_s
    for _ in range(n):
        if time.monotonic() > t_end:
            break
        t0 = time.perf_counter()
        status = post(conn, body)
        out.append(time.perf_counter() - t0)
        assert status == 200, status
    conn.close()
    return out


def flood(port: int, body: bytes, n_clients: int, stop: threading.Event, max_requests: int = 200) -> list[threading.Thread]:
    """``n_clients`` threads each POSTing ``body`` back to back until ``stop`` (at most ``max_requests`` each)."""
    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(max_requests):
            if stop.is_set():
                break
            try:
                post(conn, body)
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(n_clients)]
    for t in threads:
        t.start()
    return threads


def latency_under_flood(port: int, body: bytes, *, n_clients: int = 4, n: int = 100) -> dict[str, Any]:
    """p50 of the good client alone, then while ``n_clients`` send ``body`` continuously."""
    good_latencies(port, 20)  # warm-up
    base = good_latencies(port, n)
    stop = threading.Event()
    threads = flood(port, body, n_clients, stop)
    time.sleep(0.2)  # the flood is under way
    loaded = good_latencies(port, n)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return {
        "p50_alone_ms": 1e3 * statistics.median(base),
        "p50_under_flood_ms": 1e3 * statistics.median(loaded),
        "p90_alone_ms": 1e3 * statistics.quantiles(base, n=10)[-1],
        "p90_under_flood_ms": 1e3 * statistics.quantiles(loaded, n=10)[-1],
        "n": n,
        "flood_clients": n_clients,
        "flood_body_bytes": len(body),
    }


def slow_clients(port: int, n: int, *, mode: str, hold_s: float) -> dict[str, Any]:
    """Open ``n`` connections that send a partial request (``mode`` = ``headers``: half the
    headers; ``body``: headers and 10 of 1000 body bytes; ``trickle``: one header byte per
    0.5 s), then report how many the server closed and when (within ``hold_s``)."""
    socks: list[socket.socket] = []
    opened = time.monotonic()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if mode == "body":
            s.sendall(b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\":")
        else:
            s.sendall(b"POST /route HTTP/1.1\r\nHost: x\r\n")
        s.setblocking(False)
        socks.append(s)
    closed_at: dict[int, float] = {}
    deadline = opened + hold_s
    next_trickle = time.monotonic() + 0.5
    while len(closed_at) < n and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            try:
                if s.recv(4096) == b"":
                    closed_at[i] = time.monotonic() - opened
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - opened
        if mode == "trickle" and time.monotonic() >= next_trickle:
            next_trickle += 0.5
            for i, s in enumerate(socks):
                if i not in closed_at:
                    try:
                        s.send(b"X")
                    except OSError:
                        closed_at[i] = time.monotonic() - opened
        time.sleep(0.02)
    for s in socks:
        s.close()
    times = sorted(closed_at.values())
    return {"mode": mode, "opened": n, "closed": len(times), "last_closed_s": times[-1] if times else None}
