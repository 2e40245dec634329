"""Pictures of samples and predictions for logs and `evfsam-data inspect`."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 64, 0), alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out.astype(np.uint8)


def mask_panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, text: str) -> np.ndarray:
    """[image | truth overlay | prediction overlay] with the expression written below."""
    h, w = image.shape[:2]
    row = np.concatenate([image, overlay(image, truth, (0, 200, 0)), overlay(image, prediction, (255, 64, 0))], 1)
    canvas = Image.new("RGB", (row.shape[1], h + 16), (0, 0, 0))
    canvas.paste(Image.fromarray(row), (0, 0))
    ImageDraw.Draw(canvas).text((2, h + 2), text[:120], fill=(255, 255, 255))
    return np.asarray(canvas)
