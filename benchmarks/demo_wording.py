"""How well a demo build understands wording: k = 0 accuracy on three wordings of `test`.

    deepinsert demo build --seed 0 --replace-p 0.5 --out /tmp/rp0.5-s0     # ~15 min each
    python benchmarks/demo_wording.py --model demo /tmp/rp0.5-s0/model [...] \
        [--out benchmarks/results/demo_wording.json]

For each model folder (``demo`` = the shipped one) it measures, greedy through the engine,
exact match, per family and overall:

- ``test``: the committed test split (training phrasings, new images);
- ``test_unseen``: the same images and answers asked with the held-out phrasings (some
  with words the build never saw);
- ``reworded``: the same images and answers asked with ``deepinsert.demo.phrasings.REWORDED``, a third set of
  phrasings written for this benchmark (new synonyms such as "hue", new word orders such as
  "After {day}, which day comes?"); no build trains on them and no router setting was
  chosen on them (the demo recipe was compared on them beside ``test_unseen``).

and the late-insertion shape on ``test`` (image-family mean at every k, text-family mean at
k = 0 and k = N), with each model's recipe from its ``build_info.json``. The gap to
``test`` is the number the demo's 3-point target is about.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "demo_wording.json"



def reworded_items() -> list[Any]:
    """``test``'s images and answers asked with ``REWORDED`` (drawn like ``test_unseen``)."""
    import numpy as np

    from deepinsert.demo.evaluate import EvalItem
    from deepinsert.demo.families import balanced_families, make_sample
    from deepinsert.demo.phrasings import REWORDED
    from deepinsert.demo.splits import SPLIT_SPECS

    spec = next(s for s in SPLIT_SPECS if s.name == "test")
    rng, prng = np.random.default_rng(spec.seed), np.random.default_rng([spec.seed, 2])
    samples = [make_sample(f, rng, digit_pool_name="test", phrase_rng=prng, table=REWORDED)
               for f in balanced_families(spec.size, rng)]
    return [EvalItem(s.rendered.image, s.question, s.answer, s.family) for s in samples]


def measure(model: str) -> dict[str, Any]:
    """Accuracy tables of one model folder (or ``demo``) on the three wordings."""
    import torch

    from deepinsert.demo import demo_data_path
    from deepinsert.demo.build import read_build_info
    from deepinsert.demo.evaluate import accuracy_tables, items_from_samples
    from deepinsert.demo.families import FAMILIES, IMAGE_FAMILIES, TEXT_FAMILIES
    from deepinsert.env.data import load_samples
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.frozen_vlm.loading import resolve_source

    torch.set_num_threads(1)
    vlm = load_vlm(model, dtype="float32", device="cpu")
    items = {
        "test": items_from_samples(load_samples(demo_data_path("test"))),
        "test_unseen": items_from_samples(load_samples(demo_data_path("test_unseen"))),
        "reworded": reworded_items(),
    }
    out: dict[str, Any] = {"recipe": read_build_info(resolve_source(model)).get("train_config")}
    for name, its in items.items():
        layers = list(range(vlm.num_layers + 1)) if name == "test" else [0]
        t = accuracy_tables(vlm, its, layers, batch_size=400)["exact"]
        out[name] = {"k0": round(t.mean(FAMILIES, 0), 4),
                     "families": {f: round(t.accuracy[f][0], 3) for f in FAMILIES}}
        if name == "test":
            out["shape"] = {"image_mean_by_k": [round(t.image_mean(k), 3) for k in layers],
                            "text_mean_k0_kN": [round(t.mean(TEXT_FAMILIES, 0), 3),
                                                round(t.mean(TEXT_FAMILIES, layers[-1]), 3)],
                            "image_families_k0": round(t.mean(IMAGE_FAMILIES, 0), 3)}
    for name in ("test_unseen", "reworded"):
        out[name]["gap_to_test"] = round(out["test"]["k0"] - out[name]["k0"], 4)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["demo"], help="model folders ('demo': the shipped one)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = ap.parse_args(argv)
    from deepinsert.utils.atomic import atomic_write_json

    out = {"models": {}}
    for m in args.model:
        r = out["models"][m] = measure(m)
        print(f"{m}: k=0 test {r['test']['k0']:.3f}, test_unseen {r['test_unseen']['k0']:.3f} "
              f"(gap {100 * r['test_unseen']['gap_to_test']:.1f} pts), reworded {r['reworded']['k0']:.3f} "
              f"(gap {100 * r['reworded']['gap_to_test']:.1f} pts); image families by k "
              f"{r['shape']['image_mean_by_k']}", flush=True)
    atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
