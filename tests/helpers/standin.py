"""A synthetic insertion-layer problem whose answer is known (tests, examples, benchmarks).

Prompts fall into clusters; each cluster has a "breaking layer" b: the loss stays low for
k ≤ b and jumps above it (like an image-needing question whose image must enter early),
or stays flat for every k (a text-only question). With λ > 0 the best layer of a cluster
is therefore its breaking layer (N for flat clusters), which a router must learn from the
observation alone (cluster centre + noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepinsert.env.data import VQASample
from deepinsert.env.losses import TableLossProvider


@dataclass
class StandIn:
    """Samples ``(S)``, observations ``(S, D)``, the provider, and each sample's cluster."""

    samples: list[VQASample]
    observations: np.ndarray
    provider: TableLossProvider
    cluster: np.ndarray
    breaking_layer: list[int]

    def best_k(self, lam: float) -> np.ndarray:
        """The reward-maximising k of each sample at λ > 0 ``(S,)``."""
        assert lam > 0
        return np.asarray([self.breaking_layer[c] for c in self.cluster], dtype=np.int64)


def clustered_standin(
    n_samples: int = 240,
    breaking_layers: tuple[int, ...] = (1, 3, 8),
    *,
    num_layers: int = 8,
    dim: int = 16,
    noise: float = 0.3,
    low: float = 0.1,
    jump: float = 2.0,
    seed: int = 0,
) -> StandIn:
    """Build the problem; ``breaking_layers[c] = N`` makes cluster c text-only (flat loss)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(breaking_layers), dim)) * 2.0
    cluster = np.arange(n_samples) % len(breaking_layers)
    obs = (centres[cluster] + noise * rng.normal(size=(n_samples, dim))).astype(np.float32)
    samples = [
        VQASample(
            id=f"s{i}",
            image_path=Path(f"img{i}.png"),
            question=f"question {i} of cluster {c}",
            answer=f"answer{c}",
            family=f"cluster{c}",
            needs_image=breaking_layers[c] < num_layers,
        )
        for i, c in enumerate(cluster)
    ]
    by_id = {s.id: int(c) for s, c in zip(samples, cluster)}
    # small per-sample wobble so prompts are not exact copies
    wobble = {s.id: float(w) for s, w in zip(samples, rng.uniform(0.0, 0.02, n_samples))}

    def loss(s: VQASample, k: int) -> float:
        b = breaking_layers[by_id[s.id]]
        return low + wobble[s.id] + (jump * (k - b) / num_layers + 0.5 if k > b else 0.0)

    provider = TableLossProvider(loss, num_layers, fingerprint=f"standin-{seed}-{breaking_layers}")
    return StandIn(samples, obs, provider, cluster, list(breaking_layers))
