"""A synthetic referring dataset: coloured shapes on a plain or noisy background.

The embedded default dataset of the quickstart and the tests: no download, thousands of samples in
seconds, identical for the same seed whatever the number of workers. Each image holds 2-4
non-overlapping shapes (circle, square, triangle, diamond) of distinct colours; each shape is one
object with 2-4 expressions. Images are PNG, so masks match the pixels exactly.

Grammars (`grammar=`):
- "colour" (default): colour-keyed only, "the red circle", "the red shape", "the red one",
  "the red object". A tiny model learns these within minutes on a CPU (colours are distinct per
  image, so each is unambiguous);
- "full": the colour expressions plus shape ("the circle", when it is the only circle) and
  position ("the leftmost shape", "the blue square on the left", "the shape at the top"), used
  only when the shape is clearly the extreme one. Spatial words are learnt much more slowly.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..convert import Built, ConversionPlan, WorkItem, convert
from ..schema import Sample, SampleObject, make_key

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 225), "yellow": (235, 215, 40),
    "orange": (245, 135, 30), "purple": (150, 60, 195), "cyan": (40, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "diamond")
GRAMMARS = ("colour", "full")
SPLITS = ("train", "val")
_COLOUR_TEMPLATES = ("the {c} {s}", "the {c} shape", "the {c} one", "the {c} object")
#: Negatives name a colour absent from the image (every grammar keys on colour), in the colour
#: forms of the positives and as often as they occur there: each form equally often, "the {c} {s}"
#: with each shape word equally often. A single form ("the {} shape") taught the presence head to
#: reject that form instead of reading the colour (BENCHMARKS.md, "Presence head vs empty masks").
VOCABULARY = {"templates": [t.format(c="{}", s=s) for t in _COLOUR_TEMPLATES for s in SHAPES],
              "names": list(COLOURS)}
# Where the extreme shape must lead the next one by this fraction of the image to be named by position.
_CLEAR_GAP = 0.12


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """A (size, size) bool mask of `shape` centred at (cx, cy) with radius-like extent r."""
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = 0.8 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        # Upward triangle: inside the base line and the two sloped edges through the apex.
        base = dy <= 0.75 * r
        slope = (1.75 * r) / (0.95 * r)
        return base & (dy >= -r + slope * np.abs(dx))
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _place(rng: np.random.Generator, n: int, size: int) -> list[tuple[float, float, float]]:
    # Rejection sampling of non-overlapping bounding circles; retries with fewer shapes if crowded.
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            r = float(rng.uniform(0.10, 0.18) * size)
            cx, cy = (float(v) for v in rng.uniform(r + 2, size - r - 2, size=2))
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 2) ** 2 for x, y, rr in placed):
                placed.append((cx, cy, r))
                if len(placed) == n:
                    return placed
        n = max(2, n - 1)


def _spatial(index: int, centres: list[tuple[float, float]], size: int) -> dict[str, bool]:
    gap = _CLEAR_GAP * size
    xs = [c[0] for c in centres]
    ys = [c[1] for c in centres]
    others = [j for j in range(len(centres)) if j != index]
    return {
        "left": all(xs[index] + gap <= xs[j] for j in others),
        "right": all(xs[index] - gap >= xs[j] for j in others),
        "top": all(ys[index] + gap <= ys[j] for j in others),
        "bottom": all(ys[index] - gap >= ys[j] for j in others),
    }


def _expression_pool(colour: str, shape: str, unique_shape: bool, where: dict[str, bool],
                     grammar: str) -> list[str]:
    pool = [t.format(c=colour, s=shape) for t in _COLOUR_TEMPLATES]
    if grammar == "colour":
        return pool
    if unique_shape:
        pool.append(f"the {shape}")
    for side, word in (("left", "leftmost"), ("right", "rightmost")):
        if where[side]:
            pool += [f"the {word} shape", f"the {colour} {shape} on the {side}", f"the {colour} one on the {side}",
                     f"the shape on the {side}"]
    for side, word in (("top", "topmost"), ("bottom", "bottom-most")):
        if where[side]:
            pool += [f"the {word} shape", f"the shape at the {side}", f"the {colour} {shape} at the {side}"]
    return pool


def make_sample(seed: int, split: str, index: int, *, image_size: int = 128, grammar: str = "colour") -> Sample:
    """Synthetic sample `index` of `split`; a pure function of its arguments."""
    if grammar not in GRAMMARS:
        raise ValueError(f"grammar {grammar!r}: use one of {GRAMMARS}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    size = image_size
    background = rng.integers(25, 115)
    noise = float(rng.choice([0.0, rng.uniform(2, 12)]))
    image = np.full((size, size, 3), background, dtype=np.float32)
    placed = _place(rng, int(rng.integers(2, 5)), size)
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=len(placed), replace=False)]
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=len(placed))]
    centres = [(cx, cy) for cx, cy, _ in placed]
    objects = []
    for i, ((cx, cy, r), colour, shape) in enumerate(zip(placed, colours, shapes, strict=True)):
        mask = shape_mask(shape, cx, cy, r, size)
        image[mask] = COLOURS[colour]
        pool = _expression_pool(colour, shape, shapes.count(shape) == 1, _spatial(i, centres, size), grammar)
        k = min(len(pool), int(rng.integers(2, 5)))
        expressions = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
        objects.append(SampleObject(expressions, mask.astype(np.uint8), category=shape, id=f"{colour} {shape}"))
    if noise:
        image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8), mode="RGB").save(buf, format="PNG",
                                                                                   compress_level=1)
    key = make_key("synthetic", split, f"{index:07d}")
    return Sample(key=key, source="synthetic", task="referring", image_bytes=buf.getvalue(), image_ext="png",
                  objects=objects, height=size, width=size, image_file=None,
                  meta={"split": split, "seed": seed, "index": index, "grammar": grammar})


def build(item: WorkItem) -> Built:
    """Driver hook: one synthetic work item -> its `Sample`."""
    d: dict[str, Any] = item.data
    return Built(make_sample(d["seed"], item.split, d["index"], image_size=d["image_size"], grammar=d["grammar"]))


def plan(n_train: int, n_val: int, *, image_size: int = 128, seed: int = 0,
         grammar: str = "colour") -> ConversionPlan:
    """Plan `n_train` + `n_val` synthetic samples."""
    if grammar not in GRAMMARS:
        raise ValueError(f"grammar {grammar!r}: use one of {GRAMMARS}")
    if image_size < 32:
        raise ValueError(f"image_size {image_size} is too small for 2-4 shapes; use >= 32")
    items = [WorkItem(split, make_key("synthetic", split, f"{i:07d}"),
                      {"seed": seed, "index": i, "image_size": image_size, "grammar": grammar})
             for split, n in zip(SPLITS, (n_train, n_val), strict=True) for i in range(n)]
    return ConversionPlan(format="synthetic", source="synthetic", task="referring", build=build, items=items,
                          splits=list(SPLITS), vocabulary=VOCABULARY)


def generate_synthetic(out_dir: str | Path, n_train: int = 1000, n_val: int = 200, image_size: int = 128,
                       seed: int = 0, *, grammar: str = "colour", shard_size: int = 1000, workers: int = 1,
                       progress: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write `out_dir/train` and `out_dir/val` shard folders (and `out_dir/report.json`) of
    synthetic samples; returns the conversion report."""
    return convert(plan(n_train, n_val, image_size=image_size, seed=seed, grammar=grammar), out_dir,
                   workers=workers, shard_size=shard_size, progress=progress, overwrite=overwrite)
