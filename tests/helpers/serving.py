"""Test helpers for the chat server: a router bundle for the demo model, a real uvicorn server on loopback."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers.export import train_tiny_policy


def demo_bundle(out: Path, vlm: Any, *, layers: tuple[int, ...] | None = None, seed: int = 0) -> Path:
    """Export a tiny policy (trained on random observations) as a router bundle for ``vlm``.

    Its decisions are arbitrary but deterministic; the tests compare the server with
    ``deepinsert.generate`` at whatever layer the router picks.
    """
    from deepinsert.export.exporter import export_bundle

    layers = tuple(range(vlm.num_layers + 1)) if layers is None else layers
    dim = int(vlm.embedding_weight.shape[1])
    model = train_tiny_policy("ppo", dim=dim, n_actions=len(layers), steps=64, seed=seed, normalize=False)
    export_bundle(out, policy=model.policy, algorithm="ppo", embedding_weight=vlm.embedding_weight.detach().cpu(),
                  tokenizer=vlm.tokenizer, lam=0.1, candidate_layers=list(layers), num_layers=vlm.num_layers,
                  model_source="demo", max_tokens=256, n_prompts=20, n_embeddings=20)
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a loopback port in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)


def data_url(image: Any, fmt: str = "PNG") -> str:
    """A PIL image as a ``data:image/...;base64,`` URL."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"
