"""Load and abuse of a real ``deepinsert serve`` process on 127.0.0.1 (tests and benchmarks).

Every loop here is bounded in count and in time, and only loopback addresses are used.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
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


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1e3 * xs[min(len(xs) - 1, int(q * len(xs)))]


def latency_under_burst(port: int, body: bytes, *, n_clients: int = 4, per_client: int = 3,
                        rounds: int = 4, per_round: int = 25) -> dict[str, Any]:
    """A well-behaved client's latency alone vs during bursts, interleaved so both see the same
    background load: each round is ``per_round`` requests alone, then ``per_round`` requests
    with ``n_clients`` clients each sending ``per_client`` requests of ``body`` starting with
    the first of them. Also how long each burst took to be answered."""
    good_latencies(port, 20)  # warm-up
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    good = json.dumps({"prompt": GOOD_PROMPT}).encode()
    statuses: list[int] = []
    alone: list[float] = []
    during: list[float] = []
    burst_ms: list[float] = []
    for _ in range(rounds):
        for _ in range(per_round):
            t0 = time.perf_counter()
            assert post(conn, good) == 200
            alone.append(time.perf_counter() - t0)
        done: list[float] = []

        def burst_client() -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for _ in range(per_client):
                statuses.append(post(c, body))
            c.close()
            done.append(time.perf_counter())

        t_burst = time.perf_counter()
        threads = [threading.Thread(target=burst_client, daemon=True) for _ in range(n_clients)]
        for t in threads:
            t.start()
        for _ in range(per_round):
            t0 = time.perf_counter()
            assert post(conn, good) == 200
            during.append(time.perf_counter() - t0)
        for t in threads:
            t.join(timeout=120)
        burst_ms.append(1e3 * (max(done) - t_burst))
    conn.close()
    return {
        "p50_alone_ms": _p(alone, 0.5), "p90_alone_ms": _p(alone, 0.9),
        "p50_with_burst_ms": _p(during, 0.5), "p90_with_burst_ms": _p(during, 0.9),
        "max_with_burst_ms": _p(during, 1.0), "burst_answered_after_ms": sorted(burst_ms),
        "burst_statuses": sorted(set(statuses)), "requests_each": rounds * per_round,
        "burst": f"{n_clients} clients x {per_client} requests, {rounds} times", "burst_body_bytes": len(body),
    }


def latency_under_flood(port: int, body: bytes, *, n_clients: int = 4, n: int = 100) -> dict[str, Any]:
    """p50 of the good client alone, then while ``n_clients`` send ``body`` back to back (a
    sustained flood: the good client then shares the CPU with four busy ones)."""
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
        "p50_alone_ms": _p(base, 0.5), "p50_under_flood_ms": _p(loaded, 0.5),
        "p90_alone_ms": _p(base, 0.9), "p90_under_flood_ms": _p(loaded, 0.9),
        "n": n, "flood_clients": n_clients, "flood_body_bytes": len(body),
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
