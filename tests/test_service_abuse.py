"""A real ``deepinsert serve`` on 127.0.0.1 under abuse: slow clients are dropped within the
request timeout, and a burst of maximum-size requests (4 clients x 3 requests) leaves a
well-behaved client's median latency within 2x. (Before/after figures, and a sustained
flood, come from ``benchmarks/service_abuse.py``.)"""

from __future__ import annotations

import json

import pytest

from helpers.abuse import good_latencies, latency_under_burst, slow_clients, start_server

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(make_tiny_bundle):
    bundle = make_tiny_bundle(algorithm="dqn", dim=8, layers=(0, 4, 8), lam=0.2, seed=5, emb_seed=0, steps=64,
                              n_validation=30)[0]
    srv = start_server(bundle, "--request-timeout", str(TIMEOUT_S), "--max-connections", "64")
    yield srv
    srv.stop()


@pytest.mark.parametrize("mode", ["headers", "body", "trickle"])
def test_slow_clients_are_dropped(server, mode):
    res = slow_clients(server.port, 40, mode=mode, hold_s=TIMEOUT_S + 6)
    assert res["closed"] == 40, res
    assert res["last_closed_s"] <= TIMEOUT_S + 2.0, res
    assert len(good_latencies(server.port, 5)) == 5  # and the server still answers


def test_burst_of_max_size_prompts_keeps_good_latency(server):
    # the largest request the server accepts: max_prompt_chars (4096) characters of real words
    words = ("what colour is the square circle how many objects " * 100)[:4096]
    body = json.dumps({"prompt": words}).encode()
    res = latency_under_burst(server.port, body, n_clients=4, per_client=3, rounds=4, per_round=25)
    assert res["burst_statuses"] == [200], res
    assert res["p50_with_burst_ms"] <= 2.0 * res["p50_alone_ms"], res
    # and anything longer is refused before tokenising
    too_long = json.dumps({"prompt": words + "x"}).encode()
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    c.request("POST", "/route", body=too_long, headers={"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 413 and "max_prompt_chars" in json.loads(r.read())["error"]
