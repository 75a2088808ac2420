"""The committed demo splits: deterministic from seeds, written as LLaVA-Instruct JSON + PNGs.

The demo model never trains on these records (it trains on samples generated on the fly
from the build seed); val/test digits come from sklearn digits the model never saw.
``train``/``val``/``test`` ask with the training phrasings; ``test_unseen`` is ``test``
(same seed: same images and answers, and it points at test's image files) asked with the
held-out phrasings only (:mod:`deepinsert.demo.phrasings`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.demo.families import Sample, balanced_families, make_sample
from deepinsert.errors import InputError
from deepinsert.utils.atomic import atomic_write_bytes, atomic_write_text


MAX_SPLIT_SIZE = 200_000
"""The most records one generated split may hold (they are generated in memory: ~1 GB at the limit)."""


@dataclass(frozen=True)
class SplitSpec:
    """One demo split (a committed one, or a fresh one of ``deepinsert demo data``): its size,
    generator seed and phrasings; invalid values raise :class:`~deepinsert.errors.InputError`."""

    name: str
    """File name (``<name>.json``); also the digit pool (train / val / test) unless ``images_of``."""
    size: int
    """Records, 1 .. :data:`MAX_SPLIT_SIZE`; families balanced."""
    seed: int  # content seed (families, images, answers); phrasings use [seed, 1]
    wording: str = "train"  # "train": training phrasings; "unseen": held-out phrasings (demo.phrasings.WORDINGS)
    images_of: str = ""  # digits pool and image files of this split ("": the split's own)

    def __post_init__(self) -> None:
        from deepinsert.demo.phrasings import WORDINGS
        from deepinsert.demo.scenes import DIGIT_POOL_SIZES

        if self.image_split not in DIGIT_POOL_SIZES:
            raise InputError(f"a demo split draws its digits from one of {', '.join(DIGIT_POOL_SIZES)}, "
                             f"got {self.image_split!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 1 <= self.size <= MAX_SPLIT_SIZE:
            raise InputError(f"a demo split's size must be an integer in 1..{MAX_SPLIT_SIZE}, got {self.size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InputError(f"a demo split's seed must be an integer >= 0, got {self.seed!r}")
        if self.wording not in WORDINGS:
            raise InputError(f"a demo split's wording must be one of {', '.join(WORDINGS)}, got {self.wording!r}")

    @property
    def image_split(self) -> str:
        """The split whose digit pool and image files this split uses."""
        return self.images_of or self.name


SPLIT_SPECS: tuple[SplitSpec, ...] = (
    SplitSpec("train", 1200, 101),
    SplitSpec("val", 304, 102),
    SplitSpec("test", 800, 103),
    SplitSpec("test_unseen", 800, 103, wording="unseen", images_of="test"),
)


def generate_split(spec: SplitSpec) -> list[Sample]:
    """The samples of ``spec``: families balanced, seeded order, no augmentation."""
    rng, phrase_rng = np.random.default_rng(spec.seed), np.random.default_rng([spec.seed, 1])
    return [
        make_sample(f, rng, digit_pool_name=spec.image_split, wording=spec.wording, phrase_rng=phrase_rng)
        for f in balanced_families(spec.size, rng)
    ]


def llava_record(sample_id: str, image_name: str, s: Sample) -> dict[str, Any]:
    """One LLaVA-Instruct record (with the demo's extra keys ``family``, ``needs_image``)."""
    return {
        "id": sample_id,
        "image": image_name,
        "conversations": [
            {"from": "human", "value": f"<image>\n{s.question}"},
            {"from": "gpt", "value": s.answer},
        ],
        "family": s.family,
        "needs_image": s.needs_image,
    }


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_split(spec: SplitSpec, data_dir: Path, *, progress: bool = False) -> Path:
    """Write ``data_dir/<name>.json`` and its images under ``data_dir/images/``; returns the JSON path.

    Image paths in the records are relative to ``data_dir`` (the JSON file's folder), so
    ``load_samples(path)`` needs no ``image_folder``. ``progress``: a bar over the records.
    """
    from tqdm.auto import tqdm

    records = []
    samples = generate_split(spec)
    for i, s in enumerate(tqdm(samples, desc=f"writing {spec.name}", unit="record", disable=not progress)):
        sid, image = f"{spec.name}-{i:05d}", f"{spec.image_split}-{i:05d}"
        if not spec.images_of:
            atomic_write_bytes(data_dir / "images" / f"{image}.png", _png(s.rendered.image))
        records.append(llava_record(sid, f"images/{image}.png", s))
    return atomic_write_text(data_dir / f"{spec.name}.json", json.dumps(records, indent=1) + "\n")


def write_all_splits(data_dir: Path, specs: tuple[SplitSpec, ...] = SPLIT_SPECS) -> list[Path]:
    """Write every split of ``specs`` into ``data_dir`` (a split borrowing images after its owner)."""
    return [write_split(spec, data_dir) for spec in specs]
