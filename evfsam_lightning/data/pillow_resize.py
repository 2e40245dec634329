"""Pillow's bilinear resize of uint8 RGB images, in integer torch ops that run on any device.

SAM-1's preprocessing resizes the longest side to 1024 px with Pillow's `Image.resize(...,
BILINEAR)`. In the data workers that resize is most of the work (about 55% of a worker's time for
640x480 JPEGs). This module computes the same pixels, bit for bit, where the batch already is (the
GPU), so the workers only decode: the resize becomes a few gathers and integer sums there.

What it reproduces (Pillow's `libImaging/Resample.c`, 8 bits per channel, BILINEAR, no box):
- one pass per axis, each rounding to uint8: coefficients of the triangle filter are computed in
  double precision (support 1 pixel, widened by the scale when shrinking), normalised to sum 1,
  turned into fixed point with 22 fractional bits (`int(0.5 + k * 2**22)`); each output value is
  `clip(2**21 + sum(pixel * k) >> 22, 0, 255)`;
- the order of the passes: horizontal first, except when the height shrinks by more than twice as
  many pixels as the width, where the vertical pass runs first (Pillow 13 does this; older releases
  always run the horizontal pass first: `pass_order()` finds out which).

The arithmetic is exact integers (sums of 8-bit pixels times 22-bit weights fit easily in int64), so
the result does not depend on the device. `pass_order()` checks the installed Pillow against both
orders on probe images once per process; `device_resize_available()` is False (and callers keep
Pillow in the workers) if Pillow ever computes something else.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

PRECISION_BITS = 22
#: elements of the largest temporary a pass builds at once (rows are processed in chunks)
_CHUNK_ELEMENTS = 1 << 24


@lru_cache(maxsize=256)
def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear coefficients for resampling an axis of `in_size` pixels to `out_size`:
    (first input index of each output pixel (out,), int64 fixed-point weights (out, taps)), the
    weights zero past each pixel's window. Double-precision operations in Pillow's order."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.floor(center - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.floor(center + support + 0.5).astype(np.int64), in_size)
    count = last - first
    offsets = np.arange(taps, dtype=np.int64)
    x = ((offsets[None, :] + first[:, None]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    x = np.abs(x)
    w = np.where(x < 1.0, 1.0 - x, 0.0)
    w[offsets[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(taps):  # left to right, as Pillow sums (numpy's pairwise sum would round otherwise)
        total = total + w[:, j]
    w = np.divide(w, total[:, None], out=w, where=total[:, None] != 0.0)
    fixed = np.floor(0.5 + w * float(1 << PRECISION_BITS)).astype(np.int64)
    return first, fixed


@lru_cache(maxsize=256)
def _tap_tensors(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`bilinear_taps` as torch tensors: the input index of every (output pixel, tap), flattened
    and clamped inside the axis (the weights past a window are zero), and the weights."""
    first, fixed = bilinear_taps(in_size, out_size)
    index = np.minimum(first[:, None] + np.arange(fixed.shape[1]), in_size - 1).reshape(-1)
    return torch.from_numpy(index), torch.from_numpy(fixed)


def _pass(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """Resample int64 (H, W, C) `x` along `dim` (0: vertical, 1: horizontal) to `out_size`; the
    result holds uint8 values (still int64)."""
    index, weights = (t.to(x.device) for t in _tap_tensors(x.shape[dim], out_size))
    taps = weights.shape[1]
    other = 1 - dim
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (out_size * taps * x.shape[2]))
    out = []
    for start in range(0, x.shape[other], rows_per_chunk):
        part = x.narrow(other, start, min(rows_per_chunk, x.shape[other] - start))
        gathered = part.index_select(dim, index)
        if dim == 0:  # (out*taps, w, C) -> (out, taps, w, C)
            gathered = gathered.view(out_size, taps, *gathered.shape[1:])
            acc = (gathered * weights.view(out_size, taps, 1, 1)).sum(1)
        else:  # (h, out*taps, C) -> (h, out, taps, C)
            gathered = gathered.view(gathered.shape[0], out_size, taps, gathered.shape[2])
            acc = (gathered * weights.view(1, out_size, taps, 1)).sum(2)
        out.append(((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255))
    return torch.cat(out, dim=other)


def _vertical_first_when_tall(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    return (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2


def _horizontal_always(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    return False


_ORDERS = {"vertical-first-when-tall": _vertical_first_when_tall, "horizontal-first": _horizontal_always}


def resize_bilinear(image: torch.Tensor, out_h: int, out_w: int, order: str | None = None) -> torch.Tensor:
    """(H, W, C) uint8 `image` -> (out_h, out_w, C) uint8, equal to Pillow's
    `Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR)`, on `image`'s device."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"expected an (H, W, C) uint8 tensor, got {image.dtype} {tuple(image.shape)}")
    order = order or pass_order()
    if order is None:
        raise RuntimeError("the installed Pillow resizes differently from both known pass orders; "
                           "keep the resize in the data workers (device_resize_available() is False)")
    in_h, in_w = image.shape[:2]
    x = image.to(torch.int64)
    need_h, need_v = out_w != in_w, out_h != in_h
    if _ORDERS[order](in_h, in_w, out_h, out_w):
        x = _pass(x, 0, out_h) if need_v else x
        x = _pass(x, 1, out_w) if need_h else x
    else:
        x = _pass(x, 1, out_w) if need_h else x
        x = _pass(x, 0, out_h) if need_v else x
    return x.to(torch.uint8)


#: (in_h, in_w, out_h, out_w): upsampling, shrinking both ways, and a tall image shrunk (where the
#: two known orders differ)
_PROBES = ((7, 5, 13, 11), (37, 29, 10, 8), (96, 12, 24, 3), (50, 64, 23, 30))


@lru_cache(maxsize=1)
def pass_order() -> str | None:
    """The pass order of the installed Pillow ("vertical-first-when-tall" or "horizontal-first"), found by
    resizing probe images with Pillow and with both orders; None if neither reproduces Pillow."""
    rng = np.random.default_rng(0)
    probes = []
    for in_h, in_w, out_h, out_w in _PROBES:
        image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR))
        probes.append((torch.from_numpy(image), out_h, out_w, torch.from_numpy(np.array(expected))))
    for name in _ORDERS:
        if all(torch.equal(resize_bilinear(im, h, w, order=name), want) for im, h, w, want in probes):
            return name
    return None


def device_resize_available() -> bool:
    """Whether `resize_bilinear` reproduces the installed Pillow (checked once per process)."""
    return pass_order() is not None
