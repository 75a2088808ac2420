"""``InsertionLayerEnv``: pick the layer at which a prompt's image tokens enter a frozen VLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TYPE_CHECKING

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from deepinsert.env.cache import LossCache
from deepinsert.env.losses import LossProvider
from deepinsert.env.problem import InsertionProblem
from deepinsert.errors import InputError

if TYPE_CHECKING:
    from deepinsert.frozen_vlm import FrozenVLM


class InsertionLayerEnv(gym.Env[np.ndarray, np.int64]):
    """A contextual bandit over image-insertion layers of a frozen LLaVA-style VLM.

    Each episode draws one (image, question, answer) sample; the agent chooses the
    decoder layer ``k`` at which the image tokens enter (DeepInsert); layers below ``k``
    run on the text alone, so a later ``k`` is cheaper but may lose what the image said.

    ## Action Space
    ``Discrete(len(candidate_layers))``: action ``a`` inserts the image at layer
    ``k = candidate_layers[a]`` (``k = 0`` is the stock model, ``k = N`` never looks at
    the image).

    ## Observation Space
    ``Box(-inf, inf, (D,), float32)``: the mean of the frozen model's input-token
    embeddings over the question's text tokens (no image tokens, no answer, no chat
    template); see :mod:`deepinsert.env.observation`, the one definition.

    ## Rewards
    ``reward = -loss + λ · k / N`` where ``loss`` is the mean next-token cross-entropy of
    the reference answer's tokens (end-of-sequence token excluded) with the image entering
    at layer ``k``, and ``N`` is the number of decoder layers.

    ## Episode End
    Every episode is one step: ``terminated`` is always True after ``step`` (``truncated``
    is False). The observation returned by ``step`` is the (terminal) observation of the
    same prompt; call ``reset`` for the next prompt.

    ## Info
    ``step`` returns ``loss``, ``k``, ``k_frac`` (k/N), ``performance`` (-loss),
    ``efficiency`` (λ·k/N), ``flops_fraction`` (Eq. 5 of DeepInsert with this sample's own
    text and image token counts, relative to k = 0) and ``sample_id``. ``reset`` returns
    ``sample_index`` and ``sample_id``.

    ## Arguments
    Either ``problem`` (an :class:`InsertionProblem`, shared with a vectorized env) or the
    pieces: ``samples`` + ``lam`` + ``candidate_layers`` and one of ``vlm`` (a
    ``FrozenVLM``), ``provider`` (a :class:`LossProvider`, then ``observations`` is
    required) or ``cache`` (a :class:`LossCache`, likewise).
    ``reset(options={"sample_index": i})`` picks a given sample instead of a random one.

    ## Version History
    * v0: first version.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        problem: InsertionProblem | None = None,
        *,
        samples: Sequence[Any] | None = None,
        lam: float = 0.0,
        candidate_layers: Sequence[int] | str = "all",
        vlm: FrozenVLM | None = None,
        provider: LossProvider | None = None,
        cache: LossCache | None = None,
        observations: np.ndarray | None = None,
        render_mode: str | None = None,
    ) -> None:
        if problem is None:
            problem = InsertionProblem.build(samples, lam, candidate_layers, vlm=vlm, provider=provider, cache=cache,
                                             observations=observations)
        if render_mode is not None:
            raise InputError(f"InsertionLayerEnv has no render modes, got render_mode={render_mode!r}")
        self.problem = problem
        self.render_mode = None
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(problem.obs_dim,), dtype=np.float32)
        self.action_space = spaces.Discrete(problem.n_actions)
        self._index: int | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options and options.get("sample_index") is not None:
            i = int(options["sample_index"])
            if not 0 <= i < len(self.problem):
                raise InputError(f"sample_index {i} out of range [0, {len(self.problem)})")
        else:
            i = int(self.np_random.integers(len(self.problem)))
        self._index = i
        return self.problem.observations[i].copy(), {
            "sample_index": i,
            "sample_id": str(self.problem.samples[i].id),
        }

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._index is None:
            raise InputError("call reset() before step(): each episode is one prompt")
        a = int(np.asarray(action).reshape(()))
        if not self.action_space.contains(a):
            raise InputError(f"action {action!r} not in {self.action_space}")
        rewards, infos = self.problem.step([self._index], [a])
        obs = self.problem.observations[self._index].copy()
        self._index = None
        return obs, float(rewards[0]), True, False, infos[0]
