"""The analyses' summaries: paired differences vs NumPy, the poster table's alignment by
depth, and the early-exit comparison at equal FLOPs on hand-made grids."""

from __future__ import annotations

import numpy as np
import pytest

from deepinsert.analysis.early_exit import exit_saves, grid_table, verdict
from deepinsert.analysis.masking import POSTER, paired_difference, poster_table


def test_paired_difference_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(200) < 0.8, rng.random(200) < 0.7
    d = a.astype(float) - b.astype(float)
    got = paired_difference(a.tolist(), b.tolist())
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(d.size), rel=1e-12)


def _masking_result(ks: list[int]) -> dict:
    acc = {k: 0.9 - 0.05 * k for k in ks}
    return {"k": ks, "mask": {"accuracy": [acc[k] - 0.01 for k in ks]}, "skip": {"accuracy": [acc[k] for k in ks]}}


def test_poster_table_aligns_by_depth_fraction() -> None:
    r = _masking_result(list(range(9)))
    rows = poster_table(r, 8).splitlines()[2:]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2", "3", "4"]  # k/N = 4/32 .. 16/32 of N = 8
    first = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert first == ["4/32", "1", "0.840", "0.850", "4", f"{POSTER['llava-1.5-7b']['masking'][0]:.3f}",
                     f"{POSTER['llava-1.5-7b']['skipping'][0]:.3f}", f"{POSTER['llava-1.5-13b']['masking'][0]:.3f}",
                     f"{POSTER['llava-1.5-13b']['skipping'][0]:.3f}"]
    # a model whose depth fractions miss the poster's rows gets only the rows it has
    rows6 = poster_table(_masking_result([0, 1, 2, 3]), 6).splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows6] == ["16/32"]  # N = 6: only 3/6 is a poster depth


def _point(k: int, m: int, acc: float, n_layers: int = 4) -> dict:
    return {"k": k, "m": m, "accuracy": acc, "accuracy_se": 0.0, "flops": 0.4 + 0.6 * (m - k) / n_layers}


def test_verdict_compares_best_points_at_equal_flops() -> None:
    pts = [_point(0, 4, 0.9), _point(1, 4, 0.7), _point(2, 4, 0.6), _point(0, 2, 0.65), _point(1, 3, 0.75),
           _point(0, 3, 0.72), _point(2, 2, 0.5), _point(4, 4, 0.5)]
    lines = verdict({"points": pts}, 4).splitlines()
    # m − k = 2: late entry k=2 (0.60) vs the best of (0, 2) 0.65 and (1, 3) 0.75;
    # m − k = 3: late entry k=1 (0.70) vs (0, 3) 0.72; m − k = 0 (no image): no exit window to compare
    assert lines == [
        "FLOPs 0.70: late entry alone k=2 acc 0.600; best early exit (k=1, m=3) acc 0.750 (+0.150 ± 0.000)",
        "FLOPs 0.85: late entry alone k=1 acc 0.700; best early exit (k=0, m=3) acc 0.720 (+0.020 ± 0.000)",
    ]
    saves = exit_saves(pts, 4)
    assert {(s["point"]["k"], s["point"]["m"]) for s in saves} == {(0, 2), (1, 3), (0, 3)}
    table = grid_table({"points": pts}, 4).splitlines()
    assert table[0] == "| k \\ m | m=2 | m=3 | m=4 (no exit) |"
    assert table[2] == "| k=0 | 0.650 / 0.70 | 0.720 / 0.85 | 0.900 / 1.00 |"
