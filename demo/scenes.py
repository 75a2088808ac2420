"""Drawing the demo's images: 32 px RGB scenes of coloured shapes, and sklearn digits.

Every image comes with per-patch labels (the colour and shape covering most of each
8×8 patch), which the vision tower's pretraining predicts, and a digit label (or -1).
Pure numpy + PIL; everything is driven by an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
PATCH_SIZE = 8
N_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIGIT_POOL_SIZES: dict[str, int] = {"train": 1197, "val": 200, "test": 400}  # 1797 in all
_MIN_PATCH_PIXELS = 6  # an object "covers" a patch when it paints at least this many pixels


@dataclass(frozen=True)
class Shape:
    """One object of a scene: kind, colour name, centre (x, y) in pixels, half-size in pixels."""

    kind: str
    colour: str
    cx: int
    cy: int
    r: int


@dataclass(frozen=True)
class Rendered:
    """An image and its auxiliary labels.

    patch_colour / patch_shape: (16,) int64, 0 = background, else 1 + index into
    COLOURS / SHAPES (row-major patches). digit: 0..9 for digit images, -1 otherwise.
    """

    image: Image.Image
    patch_colour: np.ndarray
    patch_shape: np.ndarray
    digit: int


def _draw(draw: ImageDraw.ImageDraw, s: Shape, fill: tuple[int, int, int] | int) -> None:
    box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
    if s.kind == "square":
        draw.rectangle(box, fill=fill)
    elif s.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif s.kind == "triangle":
        draw.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)], fill=fill)
    else:  # pragma: no cover - internal
        raise ValueError(f"unknown shape {s.kind!r}")


def _patch_majority(label_map: np.ndarray) -> np.ndarray:
    """(32, 32) object-index map (0 = none) -> (16,) index of the object covering each patch."""
    g = IMAGE_SIZE // PATCH_SIZE
    patches = label_map.reshape(g, PATCH_SIZE, g, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(N_PATCHES, -1)
    out = np.zeros(N_PATCHES, dtype=np.int64)
    for p in range(N_PATCHES):
        counts = np.bincount(patches[p], minlength=4)
        counts[0] = 0
        if counts.max() >= _MIN_PATCH_PIXELS:
            out[p] = int(counts.argmax())
    return out


def render_scene(shapes: list[Shape]) -> Rendered:
    """Draw ``shapes`` (in order, later on top) on a black 32×32 canvas."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d, dl = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    for i, s in enumerate(shapes):
        _draw(d, s, COLOURS[s.colour])
        _draw(dl, s, i + 1)
    owner = _patch_majority(np.asarray(labels))
    colour_ids = [0] + [1 + list(COLOURS).index(s.colour) for s in shapes]
    shape_ids = [0] + [1 + SHAPES.index(s.kind) for s in shapes]
    return Rendered(img, np.asarray(colour_ids)[owner], np.asarray(shape_ids)[owner], -1)


def random_shapes(rng: np.random.Generator, n: int, *, side: str | None = None) -> list[Shape]:
    """``n`` non-overlapping random shapes; ``side`` = "left"/"right" forces one shape's half."""
    for _ in range(1000):
        out: list[Shape] = []
        for _ in range(n):
            r = int(rng.integers(4, 7))
            if side == "left":
                cx = int(rng.integers(r, 12))
            elif side == "right":
                cx = int(rng.integers(20, IMAGE_SIZE - r))
            else:
                cx = int(rng.integers(r, IMAGE_SIZE - r))
            cy = int(rng.integers(r, IMAGE_SIZE - r))
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            out.append(Shape(kind, colour, cx, cy, r))
        if all(
            max(abs(a.cx - b.cx), abs(a.cy - b.cy)) > a.r + b.r + 1
            for i, a in enumerate(out)
            for b in out[i + 1 :]
        ):
            return out
    raise RuntimeError("could not place shapes")  # pragma: no cover - 3 small shapes always fit


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's handwritten digits: (1797, 8, 8) float in 0..16 and (1797,) labels."""
    from deepinsert.utils.extras import require

    datasets = require("sklearn.datasets", "train")
    d = datasets.load_digits()
    return np.asarray(d.images), np.asarray(d.target)


@lru_cache(maxsize=3)
def digit_pool(split: str) -> np.ndarray:
    """Indices into sklearn's digits reserved for ``split``; the three pools are disjoint.

    The demo model trains only on the "train" pool, so val/test digits are unseen.
    """
    perm = np.random.default_rng(12345).permutation(sum(DIGIT_POOL_SIZES.values()))
    start = 0
    for name, size in DIGIT_POOL_SIZES.items():
        if name == split:
            return perm[start : start + size]
        start += size
    raise ValueError(f"unknown digit pool {split!r}")


def render_digit(index: int, *, shift: tuple[int, int] = (0, 0)) -> Rendered:
    """Digit ``index`` of sklearn's set, upscaled ×4 to 32×32 grey-on-black RGB, optionally shifted."""
    images, targets = _digits()
    a = np.kron(images[index] / 16.0, np.ones((4, 4)))  # (32, 32)
    dy, dx = shift
    if dy or dx:
        a = np.roll(a, (dy, dx), axis=(0, 1))
        if dy > 0:
            a[:dy] = 0
        elif dy < 0:
            a[dy:] = 0
        if dx > 0:
            a[:, :dx] = 0
        elif dx < 0:
            a[:, dx:] = 0
    grey = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.stack([grey] * 3, axis=-1))
    zeros = np.zeros(N_PATCHES, dtype=np.int64)
    return Rendered(img, zeros, zeros, int(targets[index]))
