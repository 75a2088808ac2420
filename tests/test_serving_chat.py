"""The chat server end to end: the official `openai` client against a real uvicorn server on 127.0.0.1,
serving the shipped demo model with a router bundle exported for it.

Answers are never hard-coded: they are compared with ``deepinsert.generate`` (greedy) and
``FrozenVLM.generate`` (seeded sampling) at the layer the server reports.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

import deepinsert
from deepinsert.frozen_vlm import build_batch, load_vlm
from deepinsert.router import Router
from deepinsert.serving.app import ServerConfig, create_chat_app
from deepinsert.serving.scheduler import SchedulerConfig
from deepinsert.utils.sources import demo_data_dir
from helpers.serving import data_url, demo_bundle, running_server

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def vlm():
    return load_vlm("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def router(vlm, tmp_path_factory):
    return Router.load(demo_bundle(tmp_path_factory.mktemp("chat") / "bundle", vlm))


@pytest.fixture(scope="module")
def samples():
    recs = json.loads((demo_data_dir() / "test.json").read_text())[:10]
    images = [Image.open(demo_data_dir() / r["image"]).convert("RGB") for r in recs]
    questions = [r["conversations"][0]["value"].split("\n", 1)[1] for r in recs]
    return images, questions


@pytest.fixture(scope="module")
def server(vlm, router):
    app = create_chat_app(vlm, router, config=ServerConfig(model_name="demo"),
                          scheduler_config=SchedulerConfig(max_batch=8, batch_window_s=0.02))
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _messages(image, question):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": question}]}]


def _ask(client, image, question, **kw):
    return client.chat.completions.create(model="demo", messages=_messages(image, question),
                                          max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


def test_models_health_info_route(server, router):
    with httpx.Client(timeout=10) as http:
        assert http.get(f"{server}/v1/models").json()["data"][0]["id"] == "demo"
        assert http.get(f"{server}/health").json() == {"status": "ok"}
        info = http.get(f"{server}/info").json()
        assert info["model"]["num_layers"] == 8 and info["candidate_layers"] == list(router.info.candidate_layers)
        r = http.post(f"{server}/route", json={"prompt": "What colour is the square?"}).json()
        assert r == router.route("What colour is the square?").to_dict()


def test_greedy_routed_answers_equal_deepinsert_generate(client, vlm, router, samples):
    images, questions = samples
    want = deepinsert.generate(vlm, images, questions, router=router, max_new_tokens=MAX_TOKENS)
    for i, (img, q) in enumerate(zip(images, questions)):
        r = _ask(client, img, q)
        assert r.deepinsert["layer"] == want.layers[i] and r.deepinsert["routed"] is True
        assert r.choices[0].message.content == want.texts[i]
        assert r.usage.completion_tokens == len(want.token_ids[i])
        batch = build_batch(vlm.processor, [img], [q])
        assert r.usage.prompt_tokens == int(batch.attention_mask.sum())
        frac = deepinsert.frozen_vlm.flops_fraction(vlm, want.layers[i], r.usage.prompt_tokens - 16, 16)
        assert r.deepinsert["flops_fraction"] == pytest.approx(frac)


@pytest.mark.parametrize("k", [0, 5, 8])
def test_insert_layer_forces_the_layer(client, vlm, samples, k):
    images, questions = samples
    want = deepinsert.generate(vlm, images[:3], questions[:3], router=k, max_new_tokens=MAX_TOKENS)
    for i in range(3):
        r = _ask(client, images[i], questions[i], extra_body={"insert_layer": k})
        assert r.deepinsert["layer"] == k and r.deepinsert["routed"] is False
        assert r.choices[0].message.content == want.texts[i]


def test_text_only_request_runs_at_n_like_deepinsert_generate(client, vlm, router, samples):
    _, questions = samples
    want = deepinsert.generate(vlm, [None, None], questions[:2], router=router, max_new_tokens=MAX_TOKENS)
    for i in range(2):
        r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": questions[i]}],
                                           max_tokens=MAX_TOKENS)
        assert r.deepinsert["layer"] == vlm.num_layers == want.layers[i] and r.deepinsert["routed"] is False
        assert r.choices[0].message.content == want.texts[i]


def test_stream_concatenates_to_the_non_streamed_text(client, server, samples):
    images, questions = samples
    for i in range(3):
        for kw in ({}, {"temperature": 1.5, "seed": 11}):
            full = _ask(client, images[i], questions[i], **kw)
            chunks = list(_ask(client, images[i], questions[i], stream=True, stream_options={"include_usage": True},
                               **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == full.choices[0].message.content
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
            assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # on the wire: SSE data lines ending with [DONE]
    body = {"model": "demo", "messages": _messages(images[0], questions[0]), "stream": True, "max_tokens": 4}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_seed_makes_sampling_reproducible_and_matches_the_engine(client, vlm, samples):
    images, questions = samples
    kw = {"temperature": 1.7, "top_p": 0.95, "seed": 1234, "extra_body": {"insert_layer": 0}}
    a = _ask(client, images[1], questions[1], **kw).choices[0].message.content
    b = _ask(client, images[1], questions[1], **kw).choices[0].message.content
    assert a == b
    batch = build_batch(vlm.processor, [images[1]], [questions[1]])
    ids = vlm.generate(batch.input_ids, batch.pixel_values, batch.attention_mask, insert_layer=0,
                       max_new_tokens=MAX_TOKENS, temperature=1.7, top_p=0.95, seed=1234)
    eos = vlm.eos_token_ids()
    want = deepinsert.frozen_vlm.cut_at_eos(ids, eos)[0]
    assert a == vlm.tokenizer.decode(want, skip_special_tokens=True).strip()


def test_stop_string_stops(client, samples):
    """The answer is cut before the first stop string (inside a token too), streamed or not."""
    images, questions = samples
    answers = [_ask(client, img, q).choices[0].message.content for img, q in zip(images, questions)]
    i = max(range(len(answers)), key=lambda j: len(answers[j]))
    text = answers[i]
    assert len(text) >= 2, f"the demo's answers are too short for this test: {answers}"
    for stop in (text[1:], text[len(text) // 2:], [text[-1], "zzz-never"]):
        r = _ask(client, images[i], questions[i], stop=stop)
        first = min(text.index(s) for s in ([stop] if isinstance(stop, str) else stop) if s in text)
        assert r.choices[0].message.content == text[:first].rstrip()
        assert r.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           _ask(client, images[i], questions[i], stop=stop, stream=True) if c.choices)
        assert streamed == r.choices[0].message.content
    assert _ask(client, images[i], questions[i], stop="zzz-never").choices[0].message.content == text


def test_concurrent_clients_get_the_sequential_answers(client, samples, server):
    images, questions = samples
    sequential = [_ask(client, img, q).choices[0].message.content for img, q in zip(images, questions)]
    with ThreadPoolExecutor(len(images)) as pool:
        futures = [pool.submit(_ask, client, img, q) for img, q in zip(images, questions) for _ in range(2)]
        answers = [f.result().choices[0].message.content for f in futures]  # any 5xx raises here
    assert answers == [s for s in sequential for _ in range(2)]
    metrics = httpx.get(f"{server}/metrics").text
    assert "deepinsert_time_to_first_token_seconds_count" in metrics
    # requests were batched: some prefill ran more than one request
    count = float(next(ln.split()[-1] for ln in metrics.splitlines()
                       if ln.startswith("deepinsert_prefill_group_size_count")))
    total = float(next(ln.split()[-1] for ln in metrics.splitlines()
                       if ln.startswith("deepinsert_prefill_group_size_sum")))
    assert total > count


def test_full_queue_gives_429_with_retry_after(vlm, router, samples):
    images, questions = samples
    app = create_chat_app(vlm, router, config=ServerConfig(model_name="demo"),
                          scheduler_config=SchedulerConfig(max_batch=1, max_queue=2, batch_window_s=1.0,
                                                           retry_after_s=3))
    body = {"model": "demo", "messages": _messages(images[0], questions[0]), "max_tokens": 2}
    with running_server(app) as base, httpx.Client(timeout=30) as http:
        go = threading.Barrier(5)

        def post(_):
            go.wait()
            return http.post(f"{base}/v1/chat/completions", json=body)

        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(post, range(5)))
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["retry-after"] == "3"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        assert c.chat.completions.create(**body).choices[0].message.content  # and it recovers


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRCs), with an empty image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _bad_bodies(image):
    good = data_url(image)
    img = {"type": "image_url", "image_url": {"url": good}}
    q = {"type": "text", "text": "What colour is the square?"}

    def user(*parts):
        return {"model": "demo", "messages": [{"role": "user", "content": list(parts)}]}

    return {
        "not base64": user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}}, q),
        "not an image": user({"type": "image_url", "image_url": {"url": _url(b"hello, I am text")}}, q),
        "two images": user(img, img, q),
        "huge header": user({"type": "image_url", "image_url": {"url": _url(_png_header(40000, 40000))}}, q),
        "remote url": user({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}, q),
        "unknown role": {"model": "demo", "messages": [{"role": "wizard", "content": "hi"}]},
        "empty messages": {"model": "demo", "messages": []},
        "n=2": {**user(img, q), "n": 2},
        "unknown field": {**user(img, q), "best_of": 3},
        "bad temperature": {**user(img, q), "temperature": -1},
        "last is assistant": {"model": "demo", "messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]},
        "image only": user(img),
        "unknown model": {**user(img, q), "model": "gpt-4o"},
        "layer out of range": {**user(img, q), "insert_layer": 9},
        "layer as text": {**user(img, q), "insert_layer": "3"},
        "layer as bool": {**user(img, q), "insert_layer": True},
        "lone surrogate": user(img, {"type": "text", "text": "What colour is the \ud800 square?"}),
        "lone surrogate, system": {"model": "demo", "messages": [{"role": "system", "content": "be \udfff brief"},
                                                                  {"role": "user", "content": "hi"}]},
        "too many tokens": {**user(img, q), "max_tokens": 5000},
        "not json": None,
        "lam": {**user(img, q), "lam": 0.2},
    }


def test_malformed_requests_are_4xx_in_openai_error_shape(server, samples):
    images, _ = samples
    with httpx.Client(timeout=30) as http:
        for name, body in _bad_bodies(images[0]).items():
            if body is None:
                r = http.post(f"{server}/v1/chat/completions", content=b"{oops",
                              headers={"content-type": "application/json"})
            else:  # json.dumps escapes a lone surrogate as "\ud800", which httpx's own encoder refuses to send
                r = http.post(f"{server}/v1/chat/completions", content=json.dumps(body),
                              headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and err["type"], name
            assert set(err) == {"message", "type", "param", "code"}, name
        assert http.get(f"{server}/nowhere").json()["error"]["type"] == "not_found_error"
    c = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="at most one image"):
        c.chat.completions.create(**_bad_bodies(images[0])["two images"])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(**_bad_bodies(images[0])["unknown model"])


def test_multi_turn_history_goes_through_the_chat_template(client, vlm, samples):
    images, questions = samples
    msgs = [{"role": "system", "content": "Answer in one word."}, *_messages(images[2], questions[2]),
            {"role": "assistant", "content": "fine"}, {"role": "user", "content": questions[3]}]
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=MAX_TOKENS,
                                       extra_body={"insert_layer": 0})
    conv = [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[2]}]},
            {"role": "assistant", "content": [{"type": "text", "text": "fine"}]},
            {"role": "user", "content": [{"type": "text", "text": questions[3]}]}]
    prompt = vlm.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    enc = vlm.processor(text=[prompt], images=[images[2]], return_tensors="pt")
    ids = vlm.generate(enc["input_ids"], enc["pixel_values"], insert_layer=0, max_new_tokens=MAX_TOKENS)
    want = deepinsert.frozen_vlm.cut_at_eos(ids, vlm.eos_token_ids())[0]
    assert r.choices[0].message.content == vlm.tokenizer.decode(want, skip_special_tokens=True).strip()
    assert r.usage.prompt_tokens == enc["input_ids"].shape[1]
