"""`deepinsert analyze` on the shipped demo: JSON + PNG written; bad input is a one-line error."""

from __future__ import annotations

import json

import pytest

from deepinsert.cli import main


@pytest.mark.parametrize("name", ["redundancy", "masking"])
def test_analyze_writes_json_and_png(tmp_path, name: str) -> None:
    rc = main(["analyze", name, "--out", str(tmp_path), "--limit", "8", "--batch-size", "4",
               "--layers", "0,8", "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert res["samples"] == 8
    if name == "masking":  # at k = 0 both modes are the stock model
        assert res["mask"]["accuracy"][0] == res["skip"]["accuracy"][0]
        assert res["mask"]["loss"][0] == pytest.approx(res["skip"]["loss"][0], abs=1e-6)


def test_analyze_bad_layers_is_one_line_error(tmp_path, capsys) -> None:
    rc = main(["analyze", "masking", "--out", str(tmp_path), "--limit", "2", "--layers", "0,99", "--no-progress"])
    assert rc == 2
    assert "deepinsert analyze: error: --layers must be in" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["redundancy", "--eps", "abc"], "--eps must be comma-separated numbers"),
    (["redundancy", "--k", "99"], "--k must be in [0, 8], got 99"),
    (["attention", "--k", "-1"], "--k must be in [0, 8], got -1"),
])
def test_analyze_bad_options_are_one_line_errors(tmp_path, capsys, args, message) -> None:
    rc = main(["analyze", *args, "--out", str(tmp_path), "--limit", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
