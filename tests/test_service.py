"""The HTTP router service: FastAPI test client, then the real uvicorn server over loopback."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from deepinsert.router.runtime import Router
from deepinsert.router.service import create_app

LAYERS = [0, 4, 8]


@pytest.fixture(scope="module")
def router(make_tiny_bundle):
    out = make_tiny_bundle(algorithm="dqn", dim=8, layers=LAYERS, lam=0.5, seed=2, emb_seed=4, steps=64,
                           n_validation=50, metrics={"accuracy": 0.9})[0]
    return Router.load(out)


@pytest.fixture(scope="module")
def client(router):
    return TestClient(create_app(router, max_batch=4, max_body_bytes=4096))


def test_health_and_info(client, router):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["candidate_layers"] == LAYERS and info["lam"] == 0.5 and info["metrics"] == {"accuracy": 0.9}
    assert info["limits"] == {"max_batch": 4, "max_body_bytes": 4096, "max_prompt_chars": 4096}
    assert info["observation"]["max_tokens"] == router.max_tokens


def test_route_single_and_batch_equal_the_runtime(client, router):
    prompts = ["what colour is the square", "how many objects", "repeat hello world"]
    r = client.post("/route", json={"prompt": prompts[0]})
    assert r.status_code == 200 and r.json() == router.route(prompts[0]).to_dict()
    r = client.post("/route", json={"prompts": prompts})
    assert r.status_code == 200
    assert r.json() == {"results": [d.to_dict() for d in router.route_batch(prompts)]}


@pytest.mark.parametrize(
    "body, status, msg",
    [
        ({"prompt": ""}, 400, "empty"),
        ({"prompt": 7}, 422, "prompt: Input should be a valid string"),
        ({}, 422, "exactly one of"),
        ({"prompt": "red", "prompts": ["red"]}, 422, "exactly one of"),
        ({"prompts": []}, 422, "at least 1"),
        ({"prompts": ["red", 3]}, 422, "prompts.1"),
        ({"prompts": ["red"] * 5}, 422, "max_batch=4"),
        ({"prompt": "red", "temperature": 1}, 422, "Extra inputs"),
        ({"prompt": "red " * 2000}, 413, "too large"),
    ],
)
def test_bad_requests_are_4xx_json(client, body, status, msg):
    r = client.post("/route", json=body)
    assert r.status_code == status
    assert msg in r.json()["error"]


def test_malformed_and_streamed_bodies(client):
    r = client.post("/route", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]

    def chunks():  # no Content-Length: the middleware counts the streamed bytes
        for _ in range(20):
            yield b" " * 500

    r = client.post("/route", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit 4096" in r.json()["error"]
    assert client.get("/nowhere").status_code == 404 and client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/route").status_code == 405


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_real_server_over_loopback(router):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(router), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=10) as http:
            assert http.get(f"{base}/health").json() == {"status": "ok"}
            r = http.post(f"{base}/route", content=json.dumps({"prompt": "which digit shown"}),
                          headers={"content-type": "application/json"})
            assert r.status_code == 200 and r.json() == router.route("which digit shown").to_dict()
            r = http.post(f"{base}/route", json={"prompts": ["red", "blue circle"]})
            assert [x["layer"] for x in r.json()["results"]] == [d.layer for d in router.route_batch(["red", "blue circle"])]
            assert http.post(f"{base}/route", json={"prompt": ""}).status_code == 400
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
