"""Tiny stand-ins for tests and benchmarks: a word-level tokenizer, an embedding table and
small SB3 policies trained on random observations (no model download, seconds on a CPU).

Not used by the library itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

WORDS = (
    "what colour is the square circle triangle red green blue how many objects are there in image "
    "count left right top bottom which digit shown add two plus three equals day after monday "
    "repeat word hello world yes no a an of it this picture shape"
).split()


def tiny_tokenizer() -> Any:
    """A fast transformers tokenizer over ``WORDS`` (+ ``<unk>``, ``<pad>``, ``<image>``), whitespace split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<image>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", additional_special_tokens=["<image>"]
    )


def word_prompts(words: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` random prompts of 3–8 words drawn from ``words`` (seeded)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(list(words), size=int(rng.integers(3, 9)))) for _ in range(n)]


def tiny_embedding(vocab_size: int, dim: int = 16, seed: int = 0, extra_rows: int = 5) -> np.ndarray:
    """(vocab_size + extra_rows, dim) float32 Gaussian table (models often pad the vocabulary)."""
    rng = np.random.default_rng(seed)
    return (0.5 * rng.standard_normal((vocab_size + extra_rows, dim))).astype(np.float32)


def make_normalizing_extractor_class() -> type:
    """A features extractor that standardises the observation with registered buffers (like a real run's)."""
    import torch
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class NormalizingExtractor(BaseFeaturesExtractor):
        def __init__(self, observation_space: Any, mean: list[float], std: list[float]) -> None:
            super().__init__(observation_space, features_dim=int(observation_space.shape[0]))
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return (obs - self.mean) / self.std

    return NormalizingExtractor


def train_tiny_policy(algorithm: str, dim: int, n_actions: int, seed: int = 0, steps: int = 256, normalize: bool = True) -> Any:
    """An SB3 model (PPO/A2C/DQN) trained for ``steps`` one-step episodes on random Gaussian observations.

    Reward favours action ``(obs[0] > 0) * (n_actions - 1)`` so the policy is not uniform.
    With ``normalize``, observations pass through :func:`make_normalizing_extractor_class`
    with a non-trivial mean/std, so an export that skipped the extractor would fail validation.
    """
    import gymnasium as gym
    import torch
    from stable_baselines3 import A2C, DQN, PPO
    from stable_baselines3.common.logger import Logger

    class RandomObsEnv(gym.Env):
        def __init__(self) -> None:
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
            self.action_space = gym.spaces.Discrete(n_actions)
            self._obs = np.zeros(dim, np.float32)

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
            super().reset(seed=seed)
            self._obs = (0.3 * self.np_random.standard_normal(dim) + 0.1).astype(np.float32)
            return self._obs, {}

        def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
            target = (n_actions - 1) if self._obs[0] > 0.1 else 0
            return self._obs, -abs(int(action) - target) / n_actions, True, False, {}

    torch.manual_seed(seed)
    policy_kwargs: dict[str, Any] = {"net_arch": [32, 32]}
    if normalize:
        policy_kwargs["features_extractor_class"] = make_normalizing_extractor_class()
        policy_kwargs["features_extractor_kwargs"] = {"mean": [0.1] * dim, "std": [0.3 + 0.01 * i for i in range(dim)]}
    env = RandomObsEnv()
    if algorithm == "ppo":
        model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, seed=seed, device="cpu", policy_kwargs=policy_kwargs)
    elif algorithm == "a2c":
        model = A2C("MlpPolicy", env, n_steps=8, seed=seed, device="cpu", policy_kwargs=policy_kwargs)
    elif algorithm == "dqn":
        model = DQN("MlpPolicy", env, learning_starts=32, buffer_size=1000, batch_size=32, seed=seed, device="cpu",
                    policy_kwargs=policy_kwargs)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes a /tmp/SB3-* folder per call
    model.learn(steps)
    return model


def export_tiny_bundle(
    out: Any,
    *,
    algorithm: str = "ppo",
    dim: int = 12,
    layers: Sequence[int] = (0, 3, 5, 8),
    lam: float = 0.1,
    seed: int = 1,
    emb_seed: int = 2,
    steps: int = 128,
    n_validation: int = 100,
    **extra: Any,
) -> tuple[Any, Any, Any, Any]:
    """Train a tiny policy on the tiny tokenizer's vocabulary and export it: (bundle dir, tokenizer,
    embedding (V, D) tensor, SB3 model). ``extra`` goes to ``export_bundle`` (e.g. ``metrics``)."""
    import torch

    from deepinsert.export.exporter import export_bundle

    tok = tiny_tokenizer()
    weight = torch.from_numpy(tiny_embedding(len(tok), dim=dim, seed=emb_seed))
    model = train_tiny_policy(algorithm, dim=dim, n_actions=len(layers), steps=steps, seed=seed)
    export_bundle(out, policy=model.policy, algorithm=algorithm, embedding_weight=weight, tokenizer=tok, lam=lam,
                  candidate_layers=list(layers), num_layers=8, model_source="tiny", max_tokens=256,
                  n_prompts=n_validation, n_embeddings=n_validation, **extra)
    return out, tok, weight, model
