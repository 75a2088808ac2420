"""The bandit's definitions in one home (deepinsert.env.problem): layer specs, actions, reward, λ."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepinsert.env.problem import (
    LAM_MAX,
    action_layers,
    check_lam,
    check_layer_spec,
    parse_lams,
    resolve_layers,
    reward,
)
from deepinsert.errors import ConfigError, InputError
from deepinsert.frozen_vlm.architectures import load_model_config
from deepinsert.policy.config import load_train_config


def test_candidate_layer_specs() -> None:
    assert resolve_layers("all", 4) == [0, 1, 2, 3, 4]
    assert resolve_layers("every:3", 8) == [0, 3, 6, 8]  # N always included
    assert resolve_layers("every:4", 8) == [0, 4, 8]
    assert resolve_layers([8, 0, 2], 8) == [0, 2, 8]
    assert resolve_layers((0, 8), 8) == [0, 8]


@pytest.mark.parametrize(
    ("spec", "n", "match"),
    [
        ([0, 33], 32, "out of range"),
        ([0, 4, 4], 8, "duplicates"),
        ("every second", 8, "not understood"),
        ("every:0", 8, "step must be positive"),
        ([], 8, "non-empty"),
        ([3], 8, "at least two"),
        ([3, 3], 8, "at least two distinct"),
        ([0, -1], 8, "integers >= 0"),
        ([0, True], 8, "integers >= 0"),
        ("all", 0, "num_layers"),
    ],
)
def test_bad_layer_specs(spec, n, match) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_layers(spec, n)


def test_shipped_train_config_layers_fit_the_model() -> None:
    cfg = load_train_config_path("train-llava-1.5-7b")
    n = load_model_config("llava-1.5-7b").num_layers
    assert resolve_layers(cfg.candidate_layers, n) == [0, 4, 8, 12, 16, 20, 24, 28, 32]


def load_train_config_path(name: str):
    from pathlib import Path

    import deepinsert

    return load_train_config(str(Path(deepinsert.__file__).parent / "configs" / f"{name}.yaml"))


def test_check_layer_spec_normalises() -> None:
    assert check_layer_spec(" ALL ") == "all"
    assert check_layer_spec("every: 2") == "every:2"
    assert check_layer_spec([4, 0]) == [0, 4]


def test_action_layers() -> None:
    assert action_layers([0, 2, 8], [2, 0, 1]).tolist() == [8, 0, 2]
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        action_layers([0, 2, 8], [3])


def test_reward_closed_form() -> None:
    losses = np.array([[0.5, 1.0, 2.0]])
    ks = np.array([0, 4, 8])
    got = reward(losses, ks[None, :], 0.2, 8)
    np.testing.assert_allclose(got, [[-0.5, -1.0 + 0.1, -2.0 + 0.2]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1e308, True, "0.1"])
def test_check_lam_rejects(bad) -> None:
    with pytest.raises(ConfigError):
        check_lam(bad)


def test_check_lam_bounds() -> None:
    assert check_lam(0) == 0.0 and check_lam(LAM_MAX) == LAM_MAX
    assert math.isfinite(np.float32(-10.0 + LAM_MAX))  # the reward stays finite in float32


def test_parse_lams() -> None:
    assert parse_lams("0, 0.05,0.1") == [0.0, 0.05, 0.1]
    for bad, match in (("0.1,nan", "finite"), ("0.1,0.1", "duplicates"), ("", "empty"), ("a", "numbers"),
                       ("0.1,-1", ">= 0"), ("1e308", "<=")):
        with pytest.raises(ConfigError, match=match):
            parse_lams(bad)
