"""Choosing the next token: greedy, or temperature + top-p (nucleus) sampling with a seed; stop strings.

Greedy (``temperature == 0``) is ``argmax`` and is the default everywhere. Sampling is an
inverse-CDF draw, so one uniform number per token decides it and a seeded generator makes
it reproducible::

    p = softmax(logits / temperature)            (float32)
    sort p descending (ties: lower token id first)
    keep the shortest prefix whose mass reaches top_p (always at least one token)
    u ~ U[0, 1) from the request's generator;  token = first kept j with cumsum_j > u · mass

Each request draws from its own ``torch.Generator`` (seeded by the request), so its tokens
do not depend on which other requests share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from deepinsert.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens."""

    temperature: float = 0.0  # 0 = greedy (argmax); > 0 divides the logits before the softmax
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 keeps every token
    seed: int | None = None  # generator seed; None draws a fresh one (not reproducible)

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 100.0:
            raise InputError(f"temperature must be a number in [0, 100], got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
            raise InputError(f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax (temperature 0)."""
        return float(self.temperature) == 0.0

    def generator(self) -> torch.Generator | None:
        """A CPU generator seeded with ``seed`` (a random seed when ``None``); ``None`` for greedy."""
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        return g


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V,)`` logits -> the kept tokens' ids and probabilities, most likely first.

    Returns ``(ids (n,), probs (n,))`` float32, ``probs`` renormalised to sum to 1.
    """
    p = torch.softmax(logits.detach().float().cpu() / float(temperature), dim=-1)
    # stable sort on -p keeps ties in id order
    order = torch.sort(-p, stable=True).indices
    sp = p[order]
    cum = torch.cumsum(sp, 0)
    n = int(torch.searchsorted(cum, torch.tensor([float(top_p)]), right=False)[0]) + 1
    n = max(1, min(n, sp.numel()))
    kept = sp[:n]
    return order[:n], kept / kept.sum()


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one sequence from its ``(V,)`` logits."""
    if params.greedy:
        return int(logits.argmax())
    ids, probs = nucleus_probs(logits, params.temperature, params.top_p)
    u = float(torch.rand((), generator=generator))
    j = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor([u]), right=True)[0])
    return int(ids[min(j, ids.numel() - 1)])


def pick_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next tokens ``(B,)`` for ``(B, V)`` logits, row b with ``params[b]`` and ``generators[b]``.

    Greedy rows are one batched ``argmax``; sampled rows draw from their own generator.
    """
    out = logits.argmax(-1)
    for b, (sp, g) in enumerate(zip(params, generators, strict=True)):
        if not sp.greedy:
            out[b] = sample_row(logits[b], sp, g)
    return out


def make_picker(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``logits (B, V) -> (B,)``: argmax when ``temperature == 0``, else one seeded generator for the batch."""
    params = SamplingParams(temperature, top_p, seed)
    if params.greedy:
        return lambda logits: logits.argmax(-1)
    g = params.generator()
    return lambda logits: pick_tokens(logits, [params] * logits.shape[0], [g] * logits.shape[0])


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in ``text`` where the earliest stop string begins (searching from ``start``), or ``None``."""
    best: int | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, start))
        if i >= 0 and (best is None or i < best):
            best = i
    return best
