"""Training configs: the shipped one loads; bad values give one clear error each."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepinsert.errors import ConfigError, DataError
from deepinsert.policy.config import TrainConfig, load_train_config
from deepinsert.utils.config_io import from_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_shipped_demo_config_loads():
    cfg = load_train_config(str(CONFIGS / "demo.yaml"))
    assert cfg.algorithm == "losscurve" and cfg.model == "demo" and cfg.candidate_layers == "all"
    assert cfg.total_timesteps > 0 and cfg.lam >= 0


@pytest.mark.parametrize(
    "data, match",
    [
        ({"lam": -0.1}, "lam must be >= 0"),
        ({"lam": float("nan")}, "lam must be a finite number"),
        ({"algorithm": "sac"}, "unknown algorithm 'sac'; choose one of ppo, a2c, dqn"),
        ({"candidate_layers": []}, "candidate_layers is empty"),
        ({"candidate_layers": [0, -1]}, "integers >= 0"),
        ({"candidate_layers": [3, 3]}, "at least two distinct"),
        ({"total_timesteps": 0}, "total_timesteps must be a positive integer"),
        ({"n_envs": -2}, "n_envs must be a positive integer"),
        ({"net_arch": []}, "net_arch must be a non-empty list"),
        ({"algo": {"learning_rate": 0}}, "learning_rate must be > 0"),
        ({"algo": {"n_step": 8}}, r"unknown key\(s\) \['n_step'\]"),
        ({"lamda": 0.1}, r"unknown key\(s\) \['lamda'\]"),
        ({"data": {"train": ""}}, "data.train must be a path"),
    ],
)
def test_bad_values_are_rejected(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, data)


def test_candidate_layer_beyond_n_is_rejected():
    from deepinsert.env.problem import resolve_layers

    with pytest.raises(ConfigError, match=r"candidate layer 9 out of range \[0, 8\]"):
        resolve_layers([0, 4, 9], 8)
    assert resolve_layers("every:3", 8) == [0, 3, 6, 8]


def test_empty_dataset_split_is_rejected(tmp_path):
    from deepinsert.env.losses import TableLossProvider
    from deepinsert.env.cache import LossCache
    from deepinsert.policy.workspace import Workspace

    (tmp_path / "empty.json").write_text("[]")
    prov = TableLossProvider(lambda s, k: 0.0, 8)
    ws = Workspace(provider=prov, cache=LossCache(prov), candidate_layers=list(range(9)), model_source="x")
    cfg = from_dict(TrainConfig, {"data": {"train": str(tmp_path / "empty.json")}})
    with pytest.raises(DataError, match="empty dataset split"):
        ws.load_split("train", cfg.data.train, cfg, None)
    with pytest.raises(DataError, match="file not found"):
        ws.load_split("train", str(tmp_path / "missing.json"), cfg, None)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    from deepinsert.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: sac\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown algorithm 'sac'" in err[0]
    assert main(["train", "--config", str(CONFIGS / "demo.yaml"), "--lam", "-1", "--out", str(tmp_path / "r")]) == 2
    assert "lam must be >= 0" in capsys.readouterr().err
    assert main(["sweep", "--lams", "0.1,-0.2", "--out", str(tmp_path / "s")]) == 2
    assert "every λ must be >= 0" in capsys.readouterr().err


def test_margin_flag_overrides_the_config_and_keeps_the_algo_block(tmp_path):
    import argparse

    from deepinsert.cli import _load_config

    args = argparse.Namespace(config=str(CONFIGS / "demo.yaml"), timesteps=None, seed=None, algorithm=None,
                              cache_dir=str(tmp_path), device=None, dtype=None, margin=0.0)
    cfg = _load_config(args)
    assert cfg.algo.margin == 0.0
    assert cfg.algo.weight_decay == 0.01 and cfg.algo.epochs == 1000  # the YAML's other algo values stay
    assert load_train_config(str(CONFIGS / "demo.yaml")).algo.margin == 0.02
