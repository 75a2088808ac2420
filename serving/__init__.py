"""serving: the OpenAI-compatible multimodal chat server (``deepinsert serve BUNDLE --model SOURCE``).

- ``serving/protocol.py``: OpenAI's request / response / chunk / error JSON (pydantic).
- ``serving/conversation.py``: messages -> image, prompt ids, the router's question.
- ``serving/scheduler.py``: continuous batching by KV-memory budget, prefill grouped by
  layer, a bounded queue, one model worker thread.
- ``serving/metrics.py``: Prometheus metrics.
- ``serving/app.py``: the FastAPI app (:func:`~deepinsert.serving.app.create_chat_app`).

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client) and torch.
"""
