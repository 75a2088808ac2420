"""Prometheus metrics of the chat server (``GET /metrics``), one registry per app."""

from __future__ import annotations

from typing import Any

from deepinsert.utils.extras import require

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class ServerMetrics:
    """Counters, gauges and histograms; the scheduler updates them from its worker thread."""

    def __init__(self) -> None:
        prom = require("prometheus_client", "serve")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("deepinsert_requests", "Finished chat requests by insertion layer and finish reason",
                                     ["layer", "finish_reason"], registry=r)
        self.rejected = prom.Counter("deepinsert_rejected_requests", "Requests refused before running, by reason",
                                     ["reason"], registry=r)
        self.prompt_tokens = prom.Counter("deepinsert_prompt_tokens", "Prompt tokens by insertion layer", ["layer"],
                                          registry=r)
        self.generated_tokens = prom.Counter("deepinsert_generated_tokens", "Generated tokens by insertion layer",
                                             ["layer"], registry=r)
        self.fallbacks = prom.Counter("deepinsert_router_fallbacks", "Requests sent to the fallback layer (question unreadable, or the guard tripped)",
                                      registry=r)
        self.flops_total = prom.Counter("deepinsert_prefill_flops", "Eq. 5 prefill FLOPs run", registry=r)
        self.flops_saved = prom.Counter("deepinsert_prefill_flops_saved", "Eq. 5 prefill FLOPs saved vs k = 0",
                                        registry=r)
        self.queue_depth = prom.Gauge("deepinsert_queue_depth", "Requests waiting for admission", registry=r)
        self.batch_size = prom.Gauge("deepinsert_batch_size", "Sequences in the running decode batch", registry=r)
        self.kv_in_use = prom.Gauge("deepinsert_kv_cache_bytes", "KV-cache bytes the running rows hold", registry=r)
        self.kv_reserved = prom.Gauge("deepinsert_kv_cache_reserved_bytes",
                                      "KV-cache bytes reserved by admitted requests (their final size)", registry=r)
        self.kv_allocated = prom.Gauge("deepinsert_kv_cache_allocated_bytes",
                                       "KV-cache buffer bytes allocated (padding included)", registry=r)
        self.ttft = prom.Histogram("deepinsert_time_to_first_token_seconds", "Arrival to first token",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = prom.Histogram("deepinsert_time_per_output_token_seconds", "Mean time per token after the first",
                                   buckets=_TOKEN_BUCKETS, registry=r)
        self.worker_seconds = prom.Counter("deepinsert_worker_seconds", "Model-worker time by phase", ["phase"],
                                           registry=r)
        self.prefill_group = prom.Histogram("deepinsert_prefill_group_size", "Requests prefilled together",
                                            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST

    def observe_finish(self, layer: int, reason: str, n_prompt: int, n_gen: int, ttft: float | None,
                       tpot: float | None) -> None:
        """Record one finished request."""
        lay = str(layer)
        self.requests.labels(lay, reason).inc()
        self.prompt_tokens.labels(lay).inc(n_prompt)
        self.generated_tokens.labels(lay).inc(n_gen)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)

    def set_running(self, info: dict[str, Any], reserved: int, queued: int) -> None:
        """Gauges after a scheduler iteration."""
        self.batch_size.set(info["rows"])
        self.kv_in_use.set(info["kv_bytes"])
        self.kv_allocated.set(info["kv_bytes_allocated"])
        self.kv_reserved.set(reserved)
        self.queue_depth.set(queued)
