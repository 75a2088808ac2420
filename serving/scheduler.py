"""Continuous batching by KV-memory budget, grouped prefill by layer, one model worker thread.

The HTTP side calls :meth:`Scheduler.submit` (never blocks: a full queue raises a 429
:class:`~deepinsert.serving.protocol.APIError`) and reads the job's events from an
``asyncio.Queue``. One worker thread owns the model and loops:

1. **admit** waiting jobs in arrival order while the running batch has rows left
   (``max_batch``) and KV memory left: a job reserves what its cache will really hold
   at the end, ``bytes_per_token_layer · (k·n_text + (N−k)·(n_text + n_image) + N·max_tokens)``
   (text only below its k, text + image from k on). A job that does not fit may be
   overtaken by later, smaller ones that do (backfill: late-inserted requests fill the
   memory a waiting k = 0 request cannot use yet), but by at most ``max_bypass`` of them;
   then admission waits until it fits, so large requests are not starved
   (``max_bypass = 0``: strict arrival order). When the model is idle it waits
   ``batch_window_s`` first so that requests arriving together are prefilled together;
2. **prefill** the admitted jobs grouped by layer k and they join the running batch. Each
   call is a run of consecutive k's (sorted): one call per k saves the most compute, one
   call for several k's saves only below the smallest but pays the per-call overhead once;
   :meth:`Scheduler.plan_prefills` picks the split from a cost model fitted online
   (``prefill_grouping="auto"``; ``"layer"`` and ``"merged"`` force either end). One
   image-processor call per prefill; k = N requests never run the image processor or the
   vision tower;
3. **one decode step** over the whole running batch (rows at any k, each with its own
   cache lengths: :class:`~deepinsert.frozen_vlm.running.RunningBatch`); finished,
   cancelled (client gone) and timed-out rows leave the batch right after it.

New requests therefore join between decode steps and never wait for a batch to drain.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from deepinsert.errors import ConfigError
from deepinsert.frozen_vlm.sampling import SamplingParams, find_stop, pick_tokens
from deepinsert.serving.protocol import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the scheduler."""

    max_batch: int = 32  # most sequences decoded together
    kv_budget_bytes: int = 2 << 30  # KV-cache bytes the running batch may reserve
    max_queue: int = 64  # waiting requests beyond this are refused with 429
    batch_window_s: float = 0.01  # an idle model waits this long for more arrivals before a prefill
    request_timeout_s: float = 600.0  # a request still running after this is stopped (408)
    retry_after_s: int = 1  # the Retry-After header of a 429
    prefill_grouping: str = "auto"  # "layer": one prefill per k; "merged": one per round; "auto": cost model
    max_bypass: int = 8  # later jobs that may be admitted ahead of the oldest waiting one that does not fit (0: FIFO)

    def __post_init__(self) -> None:
        if self.prefill_grouping not in ("auto", "layer", "merged"):
            raise ConfigError(f"prefill_grouping must be auto, layer or merged, got {self.prefill_grouping!r}")
        for name in ("max_batch", "kv_budget_bytes", "max_queue", "retry_after_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.max_bypass, bool) or not isinstance(self.max_bypass, int) or self.max_bypass < 0:
            raise ConfigError(f"max_bypass must be an int >= 0, got {self.max_bypass!r}")
        if not 0 <= self.batch_window_s <= 1:
            raise ConfigError(f"batch_window_s must be in [0, 1], got {self.batch_window_s}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


@dataclass(eq=False)
class Job:
    """One request in the scheduler. Events go to ``events``: ("delta", text), ("done", info), ("error", APIError)."""

    prompt_ids: list[int]
    image: Any
    layer: int
    n_text: int
    n_image: int
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    reserve: int = 0
    id: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    t_arrival: float = field(default_factory=time.perf_counter)
    deadline: float = 0.0
    cancelled: bool = False
    t_first: float | None = None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted
    last: int = 0
    generator: Any = None
    bypassed: int = 0  # later jobs admitted ahead of this one while it did not fit
    image_features: Any = None  # (n, D) projector output already computed (the image-aware stage's); None: encode here

    def cancel(self) -> None:
        """Ask the worker to drop this job (client disconnected, timed out)."""
        self.cancelled = True

    def emit(self, kind: str, payload: Any) -> None:
        """Hand an event to the HTTP side (thread-safe)."""
        if self.loop is not None and self.events is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class PrefillCost:
    """Online fit of ``prefill seconds ≈ c0 + c1 · FLOPs`` (least squares with exponential forgetting).

    Until a few calls of different sizes are seen it uses the priors (10 ms per call, 50 GFLOP/s).
    """

    def __init__(self, c0: float = 0.01, c1: float = 1 / 50e9, decay: float = 0.97) -> None:
        self.prior = (c0, c1)
        self.decay = decay
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, seconds: float, flops: float) -> None:
        """Add one prefill call."""
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + flops, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + flops * flops, d * self.sxy + flops * seconds

    def coefficients(self) -> tuple[float, float]:
        """``(c0 seconds per call, c1 seconds per FLOP)``, both >= 0."""
        if self.n < 3:
            return self.prior
        var = self.sxx / self.n - (self.sx / self.n) ** 2
        if var <= 1e-12 * max(1.0, (self.sx / self.n) ** 2):  # one size seen: keep the prior's split
            c1 = self.prior[1]
            return max(0.0, self.sy / self.n - c1 * self.sx / self.n), c1
        c1 = max(0.0, (self.sxy / self.n - self.sx * self.sy / self.n ** 2) / var)
        c0 = max(0.0, self.sy / self.n - c1 * self.sx / self.n)
        return c0, c1


class Scheduler:
    """Runs jobs on a :class:`~deepinsert.frozen_vlm.FrozenVLM` in one worker thread."""

    def __init__(self, vlm: Any, builder: Any, config: SchedulerConfig, metrics: Any = None, *,
                 eos_token_ids: list[int] | None = None) -> None:
        from deepinsert.frozen_vlm.running import RunningBatch

        self.vlm, self.builder, self.config, self.metrics = vlm, builder, config, metrics
        self.batch = RunningBatch(vlm)
        self.eos = set(vlm.eos_token_ids() if eos_token_ids is None else eos_token_ids)
        tc = vlm.config.text_config
        heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        elsize = vlm.embedding_weight.element_size()
        self.bytes_per_token_layer = 2 * int(heads) * int(head_dim) * int(elsize)
        self._pending: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._reserved = 0
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="deepinsert-model-worker", daemon=True)
        self.steps = 0
        self.prefills = 0
        self._cost = PrefillCost()
        self.phase_seconds: dict[str, float] = {}  # worker time by phase (image_processor, vision_tower, ...)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the model worker."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; waiting and running jobs get an error event."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The worker thread is running."""
        return self._thread.is_alive()

    def _phase(self, name: str, since: float) -> None:
        dt = time.perf_counter() - since
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + dt
        if self.metrics is not None:
            self.metrics.worker_seconds.labels(name).inc(dt)

    # ------------------------------------------------------------------ accounting
    def reservation(self, layer: int, n_text: int, n_image: int, max_tokens: int) -> int:
        """KV bytes a request holds at its end: text below k, text + image from k, plus its answer."""
        N = self.vlm.num_layers
        rows = layer * n_text + (N - layer) * (n_text + n_image) + N * max_tokens
        return rows * self.bytes_per_token_layer

    def state(self) -> dict[str, Any]:
        """Queue and batch sizes, reserved and held KV bytes."""
        with self._cond:
            return {"queued": len(self._pending), "running": len(self._running), "kv_reserved_bytes": self._reserved,
                    **self.batch.info()}

    # ------------------------------------------------------------------ HTTP side
    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue ``job``; its events arrive on ``job.events``. 429 when the queue is full."""
        job.reserve = self.reservation(job.layer, job.n_text, job.n_image, job.max_tokens)
        if job.reserve > self.config.kv_budget_bytes:
            self._reject("too_large")
            raise APIError(f"this request needs {job.reserve} bytes of KV cache, more than the server's budget "
                           f"({self.config.kv_budget_bytes}); lower max_tokens", param="max_tokens")
        job.loop, job.events = loop, asyncio.Queue()
        job.id = next(self._ids)
        job.deadline = job.t_arrival + self.config.request_timeout_s
        job.generator = job.sampling.generator()
        with self._cond:
            if self._stop:
                raise APIError("the server is shutting down", 503, type="server_error")
            if len(self._pending) >= self.config.max_queue:
                self._reject("queue_full")
                raise APIError(f"the server is busy ({len(self._pending)} requests waiting); retry later", 429,
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            self._pending.append(job)
            if self.metrics is not None:
                self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()
        return job

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._pending and not self._running:
                    self._cond.wait(0.5)
                if self._stop:
                    break
                idle = not self._running
            if idle and self.config.batch_window_s > 0:
                time.sleep(self.config.batch_window_s)
            try:
                self._iteration()
            except Exception as e:  # a bug: fail the running jobs, keep serving
                log.exception("model worker iteration failed")
                for job in list(self._running.values()):
                    self._finish(job, None, error=APIError(f"internal error: {type(e).__name__}: {e}", 500,
                                                           type="server_error"))
        err = APIError("the server is shutting down", 503, type="server_error")
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            job.emit("error", err)
        for job in list(self._running.values()):
            self._finish(job, None, error=err)

    def _admit(self) -> list[Job]:
        """Take the waiting jobs that fit now, in arrival order, with bounded backfill.

        Scans the queue while rows are left (``max_batch``): expired or cancelled jobs leave it;
        a job that fits in the KV memory left is admitted; one that does not stays queued and
        may be overtaken by later jobs that fit, each waiting job at most ``max_bypass`` times
        in all (:attr:`Job.bypassed`); once one has used them up, nothing passes it.
        """
        now = time.perf_counter()
        out: list[Job] = []
        with self._cond:
            keep: list[tuple[Job, int]] = []  # jobs left waiting, with len(out) when they were passed over
            limit = None  # admissions after which some waiting job would exceed max_bypass
            while self._pending:
                job = self._pending[0]
                if job.cancelled or now > job.deadline:
                    self._pending.popleft()
                    if not job.cancelled:
                        self._reject("timeout")
                        job.emit("error", APIError("the request timed out while waiting", 408, type="timeout"))
                    continue
                if len(self._running) + len(out) >= self.config.max_batch or (limit is not None and len(out) >= limit):
                    break
                self._pending.popleft()
                if self._reserved + job.reserve > self.config.kv_budget_bytes:
                    keep.append((job, len(out)))
                    room = len(out) + self.config.max_bypass - job.bypassed
                    limit = room if limit is None else min(limit, room)
                    continue
                self._reserved += job.reserve
                out.append(job)
            for job, seen in keep:
                job.bypassed += len(out) - seen
            self._pending.extendleft(job for job, _ in reversed(keep))
            if self.metrics is not None:
                self.metrics.queue_depth.set(len(self._pending))
        return out

    def _iteration(self) -> None:
        admitted = self._admit()
        for group in self.plan_prefills(admitted):
            self._prefill(group)
        now = time.perf_counter()
        for job in list(self._running.values()):
            if job.cancelled:
                self._finish(job, "cancelled")
            elif now > job.deadline:
                self._finish(job, None, error=APIError("the request timed out", 408, type="timeout"))
        if self._running:
            self._step()
        if self.metrics is not None:
            self.metrics.set_running(self.batch.info(), self._reserved, len(self._pending))

    # ------------------------------------------------------------------ prefill planning
    def _flops(self, job: Job, k: int) -> float:
        from deepinsert.frozen_vlm.flops import flops

        return flops(self.vlm, k, job.n_text, job.n_image)

    def plan_prefills(self, jobs: list[Job]) -> list[list[Job]]:
        """Split a round's admitted jobs into prefill calls, each a run of consecutive k's.

        One call with several k's saves compute only below its smallest k; one call per k
        pays the per-call overhead again. ``auto`` picks the split minimising
        ``Σ_calls (c0 + c1 · FLOPs(call))`` (dynamic programming over the jobs sorted by k),
        with ``c0`` (seconds per call) and ``c1`` (seconds per FLOP) fitted online to the
        prefills run so far: a small model (overhead-bound) merges, a large one groups by k.
        """
        if not jobs:
            return []
        jobs = sorted(jobs, key=lambda j: j.layer)
        mode = self.config.prefill_grouping
        if mode == "merged":
            return [jobs]
        if mode == "layer":
            out: list[list[Job]] = []
            for j in jobs:
                if out and out[-1][0].layer == j.layer:
                    out[-1].append(j)
                else:
                    out.append([j])
            return out
        c0, c1 = self._cost.coefficients()
        m = len(jobs)
        best = [0.0] + [float("inf")] * m  # best[i]: cost of jobs[:i]
        cut = [0] * (m + 1)
        for i in range(1, m + 1):
            for s in range(i):  # last call = jobs[s:i], run at per-job k with compute saved below jobs[s].layer
                kmin = jobs[s].layer
                cost = best[s] + c0 + c1 * sum(self._flops(j, kmin) for j in jobs[s:i])
                if cost < best[i] - 1e-15:
                    best[i], cut[i] = cost, s
        groups: list[list[Job]] = []
        i = m
        while i > 0:
            groups.append(jobs[cut[i]:i])
            i = cut[i]
        return groups[::-1]

    def _prefill(self, jobs: list[Job]) -> None:
        import torch

        N = self.vlm.num_layers
        pad = getattr(self.vlm.tokenizer, "pad_token_id", None)
        pad = int(pad if pad is not None else (min(self.eos) if self.eos else 0))
        L = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), L), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), L), dtype=torch.long)
        for r, j in enumerate(jobs):
            ids[r, L - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[r, L - len(j.prompt_ids):] = 1
        ks = [j.layer for j in jobs]
        for j in jobs:
            self._running[j.id] = j
        t0 = time.perf_counter()
        try:
            feats = None
            seen = [j for j in jobs if j.image is not None and j.layer < N]
            if seen:  # one image-processor call; k = N images are never processed nor encoded
                todo = [j for j in seen if j.image_features is None]  # the others were encoded when routed
                enc = iter(())
                if todo:
                    t_img = time.perf_counter()
                    pixels = self.builder.pixel_values([j.image for j in todo])
                    self._phase("image_processor", t_img)
                    t_img = time.perf_counter()
                    enc = iter(self.vlm.image_features(pixels))
                    self._phase("vision_tower", t_img)
                with_image = [j for j in jobs if j.image is not None]
                parts = []
                for j in with_image:
                    # a k = N row sharing a call with earlier k's: its image columns stay masked, any value does
                    parts.append(None if j.layer >= N else j.image_features if j.image_features is not None
                                 else next(enc))
                shape = next(p for p in parts if p is not None)
                feats = [p if p is not None else torch.zeros_like(shape) for p in parts]
            t_lm = time.perf_counter()
            logits = self.batch.prefill([j.id for j in jobs], ids.to(self.vlm.device), mask.to(self.vlm.device),
                                        None, ks[0] if len(set(ks)) == 1 else ks, image_features=feats)
            self._phase("prefill_lm", t_lm)
        except Exception as e:
            log.exception("prefill failed")
            for j in jobs:
                self._finish(j, None, error=APIError(f"prefill failed: {type(e).__name__}: {e}", 500,
                                                     type="server_error"), in_batch=False)
            return
        self._cost.observe(time.perf_counter() - t0, sum(self._flops(j, min(ks)) for j in jobs))
        self.prefills += 1
        if self.metrics is not None:
            self.metrics.prefill_group.observe(len(jobs))
            self.metrics.set_running(self.batch.info(), self._reserved, len(self._pending))
        toks = pick_tokens(logits, [j.sampling for j in jobs], [j.generator for j in jobs]).tolist()
        now = time.perf_counter()
        for j, t in zip(jobs, toks, strict=True):
            j.t_first = now
            self._on_token(j, int(t))

    def _step(self) -> None:
        rows = list(self.batch.ids)
        jobs = [self._running[r] for r in rows]
        t0 = time.perf_counter()
        logits = self.batch.step({j.id: j.last for j in jobs})
        self._phase("decode_step", t0)
        self.steps += 1
        toks = pick_tokens(logits, [j.sampling for j in jobs], [j.generator for j in jobs]).tolist()
        for j, t in zip(jobs, toks, strict=True):
            self._on_token(j, int(t))

    def _on_token(self, job: Job, tok: int) -> None:
        """Stream the text the token adds; finish on EOS, a stop string or max_tokens."""
        if tok in self.eos:
            self._finish(job, "stop")
            return
        job.tokens.append(tok)
        job.last = tok
        t0 = time.perf_counter()
        text = self.builder.decode(job.tokens).lstrip()
        self._phase("detokenize", t0)
        if job.stops:
            longest = max(len(s) for s in job.stops)
            at = find_stop(text, job.stops, start=job.sent - longest)
            if at is not None:
                self._finish(job, "stop", text=text[:at])
                return
            safe = len(text) - (longest - 1)
        else:
            safe = len(text)
        safe = min(safe, len(text.rstrip()))  # trailing spaces wait: the final answer is stripped
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe = min(safe, len(text) - 1)
        if safe > job.sent:
            job.emit("delta", text[job.sent:safe])
            job.sent = safe
        if len(job.tokens) >= job.max_tokens:
            self._finish(job, "length", text=text)

    def _finish(self, job: Job, reason: str | None, *, text: str | None = None, error: APIError | None = None,
                in_batch: bool = True) -> None:
        if job.id not in self._running:
            return
        del self._running[job.id]
        if in_batch and job.id in self.batch.ids:
            self.batch.remove(job.id)
        with self._cond:
            self._reserved -= job.reserve
        if error is not None:
            job.emit("error", error)
            return
        if reason == "cancelled":
            if self.metrics is not None:
                self.metrics.rejected.labels("cancelled").inc()
            return
        if text is None:
            text = self.builder.decode(job.tokens).lstrip()
        final = text.rstrip()
        if len(final) > job.sent:
            job.emit("delta", final[job.sent:])
            job.sent = len(final)
        now = time.perf_counter()
        n = len(job.tokens)
        ttft = None if job.t_first is None else job.t_first - job.t_arrival
        tpot = (now - job.t_first) / (n - 1) if job.t_first is not None and n > 1 else None
        if self.metrics is not None:
            self.metrics.observe_finish(job.layer, reason or "stop", len(job.prompt_ids), n, ttft, tpot)
        job.emit("done", {"finish_reason": reason, "text": final, "completion_tokens": n,
                          "prompt_tokens": len(job.prompt_ids), "ttft_s": ttft, "tpot_s": tpot})
