"""The last stage of the data path: examples -> the batch dict the model consumes (`collate`, in the
workers, tokenising every expression), finished on the device (`finish_batch`). The training stream
(`train_stream.py`) and the evaluation stream (`eval_stream.py`) both end here and yield whole batches
(use `DataLoader(batch_size=None)`).

The workers leave the SAM image as uint8 (`sam_pixels_uint8`): its float conversion and
normalisation run after the transfer to the device (`finish_batch`, called by
`EvfDataModule.on_after_batch_transfer`), with the arithmetic of `transforms.sam_preprocess`, so
the model sees bit-identical pixels while workers produce, stack and transfer a quarter of the bytes.
With `Preprocessing.sam_resize="device"` (SAM-1, training on a GPU) the workers do not even resize:
batches carry the decoded images (`sam_images_uint8`) and `finish_batch` runs Pillow's bilinear
resize on the device (`pillow_resize.resize_bilinear`, the same pixels) before the finish.

The batch dict (B images, N = sum of n_i expressions) as the model receives it:

    sam_pixel_values   float (B, 3, S, S)      SAM input (`transforms.sam_preprocess`, or sam2_preprocess);
                       from the workers as    uint8 `sam_pixels_uint8` (B, S, S, 3) (`transforms.sam_input_uint8`),
                                              or (sam_resize="device") `sam_images_uint8`, B uint8 (H_i, W_i, 3)
                                              decoded images, and `sam_resize_sizes`, B (h', w') tuples
    image_features     dict of bf16 (B, ...)   instead of the SAM image, with an embedding cache (training only)
    beit_pixel_values  float (B, 3, 224, 224)  BEiT-3 input (`transforms.beit3_preprocess`)
    resize_hw          long (B, 2)             (h', w') returned by the SAM preprocessing
    original_hw        long (B, 2)             (H, W) of the original image
    input_ids          long (N, L)             right-padded with 1
    attention_mask     bool (N, L)             input_ids != 1
    image_index        long (N,)               image of each expression, nondecreasing
    object_index       long (N,)               object (within its image's record) of each expression
    offsets            long (B + 1,)           [0, n0, n0 + n1, ...]
    masks              list of B uint8 (n_i, H_i, W_i), 0/1/255 (255 = ignore), one per expression
                       (an object's mask repeats when several of its expressions are drawn)
    keys, sources, tasks   list[str] (B)
    expressions        list[str] (N)
    data_stats         dict[str, int]: "images" (B), "skipped" (samples skipped while producing this
                       batch) and one count per reason in `skips.SKIP_REASONS` ("read_error" counts
                       unreadable shards and is not part of "skipped"). Counts are this batch's
                       share only, so summing over consumed batches and ranks gives the totals.

Training batches also carry `_stream` (rank, batch index, logical worker, reader positions);
`EvfDataModule.on_before_batch_transfer` removes it and records it as the consumed position.
An eval batch may hold fewer than B images (or none) when samples are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .examples import Preprocessing
from .pillow_resize import resize_bilinear
from .tokenizer import load_tokenizer, tokenize
from .transforms import normalise_sam_pixels


@lru_cache(maxsize=4)
def cached_tokenizer(path: str) -> Any:
    """The tokenizer at `path`, loaded once per process (workers inherit or load it)."""
    return load_tokenizer(path)


def collate(examples: Sequence[dict[str, Any]], prep: Preprocessing) -> dict[str, Any]:
    """Examples -> the batch dict (without `data_stats`), tokenising every expression."""
    b = len(examples)
    counts = [len(ex["expressions"]) for ex in examples]
    expressions = [e for ex in examples for e in ex["expressions"]]
    if expressions:
        input_ids, attention_mask = tokenize(cached_tokenizer(prep.tokenizer), expressions, prep.max_text_length)
    else:
        input_ids, attention_mask = torch.ones(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool)
    s, t = prep.sam_image_size, prep.beit_image_size
    if b and examples[0]["image_features"] is not None:
        image = {"image_features": {k: torch.stack([ex["image_features"][k] for ex in examples])
                                    for k in examples[0]["image_features"]}}
    elif prep.resize_on_device:
        image = {"sam_images_uint8": [ex["sam"] for ex in examples],
                 "sam_resize_sizes": [tuple(ex["resize_hw"]) for ex in examples], "sam_image_size": s}
    else:
        image = {"sam_pixels_uint8": torch.stack([ex["sam"] for ex in examples]) if b
                 else torch.zeros(0, s, s, 3, dtype=torch.uint8)}
    return {
        **image,
        "beit_pixel_values": torch.stack([ex["beit"] for ex in examples]) if b else torch.zeros(0, 3, t, t),
        "resize_hw": torch.tensor([ex["resize_hw"] for ex in examples], dtype=torch.long).reshape(b, 2),
        "original_hw": torch.tensor([ex["original_hw"] for ex in examples], dtype=torch.long).reshape(b, 2),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_index": torch.repeat_interleave(torch.arange(b), torch.tensor(counts, dtype=torch.long)),
        "object_index": torch.tensor([o for ex in examples for o in ex["object_index"]], dtype=torch.long),
        "offsets": torch.tensor([0, *np.cumsum(counts, dtype=np.int64).tolist()], dtype=torch.long),
        "masks": [ex["masks"] for ex in examples],
        "keys": [ex["key"] for ex in examples],
        "sources": [ex["source"] for ex in examples],
        "tasks": [ex["task"] for ex in examples],
        "expressions": expressions,
    }


def finish_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Turn the workers' uint8 SAM images into the model's input floats, where the batch lies (the
    device, after transfer): `sam_pixels_uint8` -> `sam_pixel_values`, bit-identical to
    `transforms.sam_preprocess`. A batch without uint8 images is returned as it is."""
    if isinstance(batch, dict) and "sam_images_uint8" in batch:  # resize here (sam_resize="device")
        batch["sam_pixels_uint8"] = resize_to_canvas(batch.pop("sam_images_uint8"), batch.pop("sam_resize_sizes"),
                                                     batch.pop("sam_image_size"), batch["resize_hw"].device)
    if isinstance(batch, dict) and "sam_pixels_uint8" in batch:
        batch["sam_pixel_values"] = normalise_sam_pixels(batch.pop("sam_pixels_uint8"), batch["resize_hw"])
    return batch


def resize_to_canvas(images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], size: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Decoded uint8 (H, W, 3) images (on `device`) -> the (B, S, S, 3) uint8 canvases of
    `transforms.sam_resize_uint8`, computed there (sizes are host integers: no synchronisation)."""
    canvas = torch.zeros(len(images), size, size, 3, dtype=torch.uint8, device=device)
    for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        canvas[i, :h, :w] = resize_bilinear(image, h, w)
    return canvas


def stats(images: int, skips: dict[str, int]) -> dict[str, int]:
    """The `data_stats` of a batch: its image count and its share of the skip counts."""
    return {"images": images, "skipped": sum(n for r, n in skips.items() if r != "read_error"), **skips}
