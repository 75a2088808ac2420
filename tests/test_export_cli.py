"""`deepinsert route` and `deepinsert serve` as a user runs them (serve: a real process on loopback)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from deepinsert.cli import build_parser
from deepinsert.cli import main as cli_main
from deepinsert.cli import is_loopback
from deepinsert.router.runtime import Router


@pytest.fixture(scope="module")
def bundle(make_tiny_bundle):
    return make_tiny_bundle(algorithm="dqn", dim=8, layers=(0, 4, 8), lam=0.2, seed=5, emb_seed=0, steps=64,
                            n_validation=30)[0]


def test_route_cli(bundle, capsys):
    router = Router.load(bundle)
    prompts = ["what colour is the square", "add two plus three"]
    assert cli_main(["route", str(bundle), *prompts, "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == [{"prompt": p, **router.route(p).to_dict()} for p in prompts]
    assert cli_main(["route", str(bundle), prompts[0]]) == 0
    d = router.route(prompts[0])
    assert capsys.readouterr().out.splitlines()[1].startswith(f"{d.layer}\t{'yes' if d.fallback else 'no'}\t")
    assert cli_main(["route", str(bundle), "   "]) == 2
    assert "empty" in capsys.readouterr().err


def test_serve_defaults_to_loopback():
    args = build_parser().parse_args(["serve", "B"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_serve_cli_real_process(bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepinsert.cli", "serve", str(bundle), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up in 60 s"
            time.sleep(0.2)
        r = httpx.post(f"{base}/route", json={"prompt": "how many objects"}, timeout=10)
        assert r.status_code == 200 and r.json() == Router.load(bundle).route("how many objects").to_dict()
        assert httpx.get(f"{base}/info", timeout=10).json()["candidate_layers"] == [0, 4, 8]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
