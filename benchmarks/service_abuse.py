"""The router service under abuse, before and after the limits: figures for the closing note.

    python benchmarks/service_abuse.py [--baseline-pythonpath DIR] [--out benchmarks/results/service_abuse.json]

Starts ``deepinsert serve`` on 127.0.0.1 with the tiny test bundle (a word-level tokenizer like
the demo model's) and measures one well-behaved client's latency (p50 / p90 over 100
sequential requests, keep-alive) alone and while 4 clients send the largest prompt the server
accepts: bursts (4 clients x 3 requests, 6 rounds interleaved with rounds alone) and a sustained flood (and, for
scale, a sustained flood of 200-character prompts); then opens 40 slow connections of each kind (partial headers, partial
body, one header byte per 0.5 s) and counts how many the server closes within 10 s.

``after``: this code with its defaults (4096 prompt characters per request) and
``--request-timeout 2`` (default 10 s). ``before``: the same code with
the limits lifted (``--max-prompt-chars 10**9 --request-timeout 3600``: 254 KB prompts,
no timeout) and, with ``--baseline-pythonpath``, an older checkout run as is. Loopback only;
every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers.abuse import latency_under_burst, latency_under_flood, slow_clients, start_server  # noqa: E402
from helpers.export import export_tiny_bundle  # noqa: E402


def _words(n: int) -> str:
    return ("what colour is the square circle how many objects " * (n // 50 + 1))[:n]


def measure(bundle: Path, args: list[str], prompt_chars: int, env: dict[str, str] | None, slow: bool) -> dict[str, Any]:
    srv = start_server(bundle, *args, env=env)
    try:
        body = json.dumps({"prompt": _words(prompt_chars)}).encode()
        small = json.dumps({"prompt": _words(200)}).encode()
        out: dict[str, Any] = {
            "server_args": args,
            "burst": latency_under_burst(srv.port, body, n_clients=4, per_client=3, rounds=6, per_round=25),
            "flood_max_size": latency_under_flood(srv.port, body, n_clients=4, n=100),
            "flood_small": latency_under_flood(srv.port, small, n_clients=4, n=100),
        }
        if slow:
            out["slow_clients"] = [slow_clients(srv.port, 40, mode=m, hold_s=10.0) for m in ("headers", "body", "trickle")]
    finally:
        srv.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-pythonpath", default=None, help="PYTHONPATH of an older checkout to measure as is")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "service_abuse.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_tiny_bundle(Path(tmp) / "b", algorithm="dqn", dim=8, layers=(0, 4, 8), lam=0.2, seed=5,
                                    emb_seed=0, steps=64, n_validation=30)[0]
        res: dict[str, Any] = {"machine": platform.platform(), "python": platform.python_version(),
                               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        res["after"] = measure(bundle, ["--request-timeout", "2"], 4096, None, slow=True)
        res["limits_lifted"] = measure(bundle, ["--max-prompt-chars", str(10**9), "--request-timeout", "3600"],
                                       254_000, None, slow=True)
        if a.baseline_pythonpath:
            res["baseline_checkout"] = measure(bundle, [], 254_000, {"PYTHONPATH": a.baseline_pythonpath}, slow=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
