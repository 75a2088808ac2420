"""Masking vs skipping (the DeepInsert poster's Tables 1–2): accuracy and answer loss at each
k when the image tokens are masked in layers ``0..k−1`` (rows computed, attention to and
from them blocked) vs skipped (late entry)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from deepinsert.analysis.common import Batches, batch_accuracy, mean_answer_loss
from deepinsert.frozen_vlm import FrozenVLM

POSTER = {
    "llava-1.5-7b": {"layers": [4, 8, 12, 16], "masking": [0.370, 0.316, 0.269, 0.276],
                     "skipping": [0.549, 0.357, 0.264, 0.284]},
    "llava-1.5-13b": {"layers": [4, 8, 12, 16], "masking": [0.378, 0.351, 0.264, 0.268],
                      "skipping": [0.788, 0.695, 0.433, 0.400]},
}
"""The poster's numbers: image tokens masked / skipped in layers 0..k−1, k = 4, 8, 12, 16."""


def correct_per_sample(vlm: FrozenVLM, data: Batches, **engine_kwargs: Any) -> list[bool]:
    """Greedy-answer correctness of every sample, in data order."""
    out: list[bool] = []
    for b, a, n in zip(data.prompts, data.answers, data.answer_lengths):
        out += batch_accuracy(vlm, b, a, n, **engine_kwargs)
    return out


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Mean of ``a − b`` over paired samples and its standard error ``sd(a − b)/√n``."""
    n = len(a)
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "se": math.sqrt(var / n)}


def masking_vs_skipping(vlm: FrozenVLM, data: Batches, ks: Sequence[int], bar: Any = None) -> dict[str, Any]:
    """``{"k": ks, "skip"/"mask": {"accuracy", "accuracy_se", "loss"}, "skip_minus_mask": [...]}``.

    ``accuracy_se`` is the binomial standard error ``√(p(1−p)/n)``; ``skip_minus_mask[i]`` the
    paired accuracy difference at ``ks[i]`` (same samples) with its standard error.
    """
    n = data.n_samples
    out: dict[str, Any] = {"k": list(ks), "samples": n, "poster": POSTER}
    per: dict[str, list[list[bool]]] = {}
    for mode in ("skip", "mask"):
        per[mode] = []
        for k in ks:
            per[mode].append(correct_per_sample(vlm, data, insert_layer=k, mode=mode))
            if bar is not None:
                bar.update(1)
        accs = [sum(c) / n for c in per[mode]]
        loss = mean_answer_loss(vlm, data, ks, mode=mode)
        out[mode] = {"accuracy": accs, "accuracy_se": [math.sqrt(p * (1 - p) / n) for p in accs], "loss": loss}
    out["skip_minus_mask"] = [paired_difference(s, m) for s, m in zip(per["skip"], per["mask"])]
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`masking_vs_skipping` result (accuracy ± binomial SE)."""
    lines = [("| k (image absent from layers 0..k-1) | masking acc | skipping acc | skip − mask (paired, ± SE) "
              "| masking loss | skipping loss |"),
             "|---:|---:|---:|---:|---:|---:|"]
    for i, k in enumerate(result["k"]):
        m, s = result["mask"], result["skip"]
        d = result["skip_minus_mask"][i]
        lines.append(f"| {k} | {m['accuracy'][i]:.3f} ± {m['accuracy_se'][i]:.3f} | "
                     f"{s['accuracy'][i]:.3f} ± {s['accuracy_se'][i]:.3f} | {d['mean']:+.3f} ± {d['se']:.3f} | "
                     f"{m['loss'][i]:.3f} | {s['loss'][i]:.3f} |")
    return "\n".join(lines)


def poster_table(result: dict[str, Any], num_layers: int) -> str:
    """The demo's accuracies beside the poster's, row by row at the same depth fraction k/N.

    The poster's k = 4, 8, 12, 16 of LLaVA-1.5's 32 layers are k/N = 1/8, 1/4, 3/8, 1/2;
    a row is written when ``result`` has the demo's k at that fraction.
    """
    lines = [("| k/N | demo k | demo masking | demo skipping | 7B k | 7B masking | 7B skipping "
              "| 13B masking | 13B skipping |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    p7, p13 = POSTER["llava-1.5-7b"], POSTER["llava-1.5-13b"]
    for j, pk in enumerate(p7["layers"]):
        frac = pk / 32
        k = frac * num_layers
        if k != int(k) or int(k) not in result["k"]:
            continue
        i = result["k"].index(int(k))
        lines.append(f"| {pk}/32 | {int(k)} | {result['mask']['accuracy'][i]:.3f} | {result['skip']['accuracy'][i]:.3f} "
                     f"| {pk} | {p7['masking'][j]:.3f} | {p7['skipping'][j]:.3f} "
                     f"| {p13['masking'][j]:.3f} | {p13['skipping'][j]:.3f} |")
    return "\n".join(lines)
