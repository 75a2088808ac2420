"""A generated miniature of ``llava_v1_5_mix665k.json``, in exactly its format.

Records like the real file's: ``id``, ``image`` under per-dataset folders (``coco/train2017``,
``gqa/images``, ``ocr_vqa/images``, ``textvqa/train_images``, ``vg/VG_100K``/``VG_100K_2``),
multi-turn ``conversations`` (human/gpt alternating, ``<image>`` in the first human turn,
at its start or its end), text-only ShareGPT-style records without ``image`` (with a
``model`` key, as in the real file), and some records whose image file is missing (as
when part of a source failed to download). :func:`write_mix665k` returns the file and the
ground truth it wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = {
    "coco": "coco/train2017/{:012d}.jpg",
    "gqa": "gqa/images/{}.jpg",
    "ocr_vqa": "ocr_vqa/images/{:010d}.jpg",
    "textvqa": "textvqa/train_images/{:016x}.jpg",
    "vg": "vg/VG_100K_2/{}.jpg",
}


@dataclass
class Truth:
    """What the generator wrote: per record, its id, source, image (or None), turns, and
    whether its image file exists."""

    id: str
    source: str
    image: str | None
    turns: list[tuple[str, str]]
    image_exists: bool


def write_mix665k(folder: Path, per_source: int = 10, n_text: int = 6, seed: int = 0,
                  missing_every: int = 7) -> tuple[Path, list[Truth]]:
    """Write ``folder/llava_v1_5_mix665k.json`` and the images it names (every
    ``missing_every``-th image record's image is left out). Returns (path, truth)."""
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    truth: list[Truth] = []
    n = 0
    for source, pattern in SOURCES.items():
        for j in range(per_source):
            n += 1
            rid = str(int(rng.integers(10**6, 10**9)))
            image = pattern.format(int(rid))
            n_turns = 1 + int(rng.integers(0, 4))
            turns = [(f"{source} question {j}.{t}: what is shown?", f"{source} answer {j}.{t}") for t in range(n_turns)]
            first = f"<image>\n{turns[0][0]}" if j % 2 == 0 else f"{turns[0][0]}\n<image>"
            convs = []
            for t, (q, a) in enumerate(turns):
                convs += [{"from": "human", "value": first if t == 0 else q}, {"from": "gpt", "value": a}]
            records.append({"id": rid, "image": image, "conversations": convs})
            exists = n % missing_every != 0
            if exists:
                path = folder / image
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), tuple(int(c) for c in rng.integers(0, 256, 3))).save(path, format="JPEG")
            truth.append(Truth(rid, source, image, turns, exists))
    for j in range(n_text):
        rid = f"sg{j:04d}_0"
        turns = [(f"text question {j}.{t}", f"text answer {j}.{t}") for t in range(1 + j % 3)]
        convs = []
        for q, a in turns:
            convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"id": rid, "model": "", "conversations": convs})
        truth.append(Truth(rid, "text", None, turns, False))
    order = rng.permutation(len(records))  # sources interleaved, as in the real mix
    path = folder / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps([records[i] for i in order]), encoding="utf-8")
    return path, [truth[i] for i in order]
