"""Masking vs skipping (the DeepInsert poster's Tables 1–2): accuracy and answer loss at each
k when the image tokens are masked in layers ``0..k−1`` (rows computed, attention to and
from them blocked) vs skipped (late entry)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deepinsert.analysis.common import Batches, accuracy, mean_answer_loss
from deepinsert.frozen_vlm import FrozenVLM

POSTER = {
    "llava-1.5-7b": {"layers": [4, 8, 12, 16], "masking": [0.370, 0.316, 0.269, 0.276],
                     "skipping": [0.549, 0.357, 0.264, 0.284]},
    "llava-1.5-13b": {"layers": [4, 8, 12, 16], "masking": [0.378, 0.351, 0.264, 0.268],
                      "skipping": [0.788, 0.695, 0.433, 0.400]},
}
"""The poster's numbers: image tokens masked / skipped in layers 0..k−1, k = 4, 8, 12, 16."""


def masking_vs_skipping(vlm: FrozenVLM, data: Batches, ks: Sequence[int], bar: Any = None) -> dict[str, Any]:
    """``{"k": ks, "skip"/"mask": {"accuracy": [...], "loss": [...]}, "poster": POSTER}``."""
    out: dict[str, Any] = {"k": list(ks), "samples": data.n_samples, "poster": POSTER}
    for mode in ("skip", "mask"):
        accs = []
        for k in ks:
            accs.append(accuracy(vlm, data, insert_layer=k, mode=mode))
            if bar is not None:
                bar.update(1)
        loss = mean_answer_loss(vlm, data, ks, mode=mode)
        out[mode] = {"accuracy": accs, "loss": loss}
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`masking_vs_skipping` result."""
    lines = ["| k (image absent from layers 0..k-1) | masking acc | skipping acc | masking loss | skipping loss |",
             "|---|---|---|---|---|"]
    for i, k in enumerate(result["k"]):
        lines.append(f"| {k} | {result['mask']['accuracy'][i]:.3f} | {result['skip']['accuracy'][i]:.3f} | "
                     f"{result['mask']['loss'][i]:.3f} | {result['skip']['loss'][i]:.3f} |")
    return "\n".join(lines)
