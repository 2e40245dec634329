"""Exact EVF-SAM preprocessing and postprocessing (SPEC section 2).

Every function here is checked bit-exact (or to float rounding) against the parity fixtures.
Images enter as uint8 RGB arrays of shape (H, W, 3).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
BEIT3_IMAGE_SIZE = 224


def _check_rgb_uint8(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "dtype", type(image).__name__), getattr(image, "shape", None)
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got dtype/shape {got}")


def sam_resize_hw(height: int, width: int, target: int = 1024) -> tuple[int, int]:
    """The (h', w') that SAM-1 resizes an (H, W) image to: longest side = target, rounded half up."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _normalise_sam(pixels_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(pixels_uint8, copy=True)).permute(2, 0, 1).float()
    mean = torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
    return (x - mean) / std


def sam_preprocess(image: np.ndarray, image_size: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM-1 input: Pillow bilinear resize of the longest side to `image_size`, raw 0-255 floats
    normalised with SAM's mean/std, zero-padded right and bottom. Returns ((3, S, S), (h', w'))."""
    _check_rgb_uint8(image)
    h, w = image.shape[:2]
    rh, rw = sam_resize_hw(h, w, image_size)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))
    x = _normalise_sam(resized)
    x = F.pad(x, (0, image_size - rw, 0, image_size - rh))
    return x, (rh, rw)


def sam_resize_uint8(image: np.ndarray, image_size: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """The uint8 half of `sam_preprocess`: the Pillow bilinear resize placed top-left in a zero
    (S, S, 3) uint8 canvas (channels last: filled by contiguous row copies). `normalise_sam_pixels`
    finishes it (on the device) to exactly the pixels of `sam_preprocess`, at a quarter of the bytes
    to produce, stack and transfer. Returns ((S, S, 3) uint8, (h', w'))."""
    _check_rgb_uint8(image)
    h, w = image.shape[:2]
    rh, rw = sam_resize_hw(h, w, image_size)
    canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    canvas[:rh, :rw] = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))
    return torch.from_numpy(canvas), (rh, rw)


def normalise_sam_pixels(pixels: torch.Tensor, resize_hw: torch.Tensor) -> torch.Tensor:
    """uint8 canvases (B, S, S, 3) and their valid (h', w') (B, 2) -> SAM input floats (B, 3, S, S):
    the arithmetic of `sam_preprocess` (float32 (x - mean) / std, +0.0 outside (h', w')), so the
    result is bit-identical to it, on any device and without a host synchronisation."""
    s = pixels.shape[1]
    pixels = pixels.permute(0, 3, 1, 2).contiguous()  # NCHW on the uint8, a quarter of the float bytes
    mean = torch.tensor(SAM_PIXEL_MEAN, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=pixels.device).view(1, -1, 1, 1)
    x = pixels.float().sub_(mean).div_(std)
    grid = torch.arange(s, device=pixels.device)
    hw = resize_hw.to(pixels.device)
    pad = (grid.view(1, s, 1) >= hw[:, 0].view(-1, 1, 1)) | (grid.view(1, 1, s) >= hw[:, 1].view(-1, 1, 1))
    return x.masked_fill_(pad[:, None], 0.0)  # +0.0, as F.pad writes


def sam2_resize(image: np.ndarray, image_size: int = 1024) -> torch.Tensor:
    """SAM-2's resize: torch's native uint8 bilinear kernel to (S, S), aspect ratio not kept, no
    antialias (the reference `sam_preprocess(model_type="sam2")`). Pillow gives the same pixels only
    when both sides are upsampled; it antialiases when downsampling. Returns uint8 (3, S, S)."""
    _check_rgb_uint8(image)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)[0]


def sam2_preprocess(image: np.ndarray, image_size: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM-2 input: `sam2_resize` (no padding), SAM's mean/std. Returns ((3, S, S), (S, S))."""
    return _normalise_sam(sam2_resize(image, image_size).permute(1, 2, 0).numpy()), (image_size, image_size)


def sam_input_hw(height: int, width: int, variant: str, image_size: int = 1024) -> tuple[int, int]:
    """The valid (h', w') of either family's SAM input for an (H, W) image: `sam_resize_hw` for
    SAM-1, all of S x S for SAM-2 (its resize does not keep the aspect ratio)."""
    return sam_resize_hw(height, width, image_size) if variant == "sam" else (image_size, image_size)


def sam_input_uint8(image: np.ndarray, variant: str, image_size: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """The uint8 SAM input of either family, (S, S, 3) and the valid (h', w'): `sam_resize_uint8`
    for SAM-1, `sam2_resize` (all of S x S valid) for SAM-2. `normalise_sam_pixels` finishes it."""
    if variant == "sam":
        return sam_resize_uint8(image, image_size)
    return sam2_resize(image, image_size).permute(1, 2, 0), (image_size, image_size)


def beit3_preprocess(image: np.ndarray, image_size: int = BEIT3_IMAGE_SIZE) -> torch.Tensor:
    """BEiT-3 input: /255, torch bicubic resize to (S, S) without antialias or clamping, then
    (x - 0.5) / 0.5. Returns (3, S, S)."""
    _check_rgb_uint8(image)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255)
    x = F.interpolate(x[None], size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=False)[0]
    return (x - 0.5) / 0.5


def postprocess_masks(
    low_res_logits: torch.Tensor,
    resize_hw: tuple[int, int],
    original_hw: tuple[int, int],
    image_size: int = 1024,
    padded: bool = True,
) -> torch.Tensor:
    """Low-res logits (N, 1, h, w) -> logits at the original size (N, 1, H, W).

    SAM-1 (`padded=True`): bilinear to (S, S), crop the unpadded (h', w'), bilinear to (H, W).
    SAM-2 (`padded=False`): bilinear straight to (H, W)."""
    x = low_res_logits
    if padded:
        x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
        x = x[..., : int(resize_hw[0]), : int(resize_hw[1])]
    return F.interpolate(x, (int(original_hw[0]), int(original_hw[1])), mode="bilinear", align_corners=False)
