"""Pillow's bilinear resize on the device (`pillow_resize`): the same pixels as Pillow, for every
kind of size change, and through the data pipeline the same batches as the workers' resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evfsam_lightning.data import pillow_resize
from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.transforms import sam_resize_hw
from tests.data.conftest import consume, data_settings


def _pillow(image: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def _images(rng, h, w):
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    coarse = rng.integers(0, 256, (max(1, h // 9), max(1, w // 9), 3), dtype=np.uint8)
    return noise, _pillow(coarse, h, w)  # pixel noise, and a smooth photo-like image


CASES = [
    (480, 640, 768, 1024),  # COCO-like, SAM upsampling
    (640, 480, 1024, 768),
    (1, 700, 1, 1024), (700, 1, 1024, 1),  # one-pixel sides (one pass only)
    (3000, 4000, 768, 1024),  # large photo shrunk
    (2000, 300, 1024, 154),  # tall image shrunk: the vertical pass runs first in Pillow 13
    (1024, 1024, 1024, 1024),  # no resize at all
    (37, 29, 10, 8), (5, 7, 11, 13), (333, 333, 1024, 1024), (100, 900, 20, 1000),
]


@pytest.mark.parametrize("in_h,in_w,out_h,out_w", CASES)
def test_device_resize_equals_pillow(in_h, in_w, out_h, out_w):
    rng = np.random.default_rng(in_h * 7919 + in_w)
    for image in _images(rng, in_h, in_w):
        got = pillow_resize.resize_bilinear(torch.from_numpy(np.array(image)), out_h, out_w)
        assert got.dtype == torch.uint8 and got.shape == (out_h, out_w, 3)
        np.testing.assert_array_equal(got.numpy(), _pillow(image, out_h, out_w))


def test_device_resize_equals_pillow_on_random_sam_sizes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(1, 1600, 2))
        rh, rw = sam_resize_hw(h, w, 1024)
        image = _images(rng, h, w)[int(rng.integers(0, 2))]
        got = pillow_resize.resize_bilinear(torch.from_numpy(np.array(image)), rh, rw).numpy()
        assert np.array_equal(got, _pillow(image, rh, rw)), (h, w, rh, rw)


def test_the_pass_order_matters_and_is_detected():
    """A tall image shrunk comes out differently with the two known pass orders; the installed
    Pillow's is found by `pass_order` (one of the two, never None here)."""
    order = pillow_resize.pass_order()
    assert order in ("vertical-first-when-tall", "horizontal-first")
    image = torch.from_numpy(_images(np.random.default_rng(3), 400, 60)[0])
    a = pillow_resize.resize_bilinear(image, 100, 15, order="vertical-first-when-tall")
    b = pillow_resize.resize_bilinear(image, 100, 15, order="horizontal-first")
    assert not torch.equal(a, b)
    expected = torch.from_numpy(np.array(_pillow(image.numpy(), 100, 15)))
    assert torch.equal(a if order == "vertical-first-when-tall" else b, expected)


def test_rejects_other_dtypes():
    with pytest.raises(ValueError, match="uint8"):
        pillow_resize.resize_bilinear(torch.zeros(4, 4, 3), 2, 2)


def test_device_resize_batches_equal_worker_batches(tokenizer_dir, three_sources):
    """The same training stream with sam_resize=device (decoded images in the batch, resized in
    on_after_batch_transfer) and with the workers' resize: bit-identical model inputs."""
    root, _ = three_sources
    worker = consume(EvfDataModule(*data_settings(tokenizer_dir, root, sam_image_size=96)), 4)
    device = consume(EvfDataModule(*data_settings(tokenizer_dir, root, sam_image_size=96, sam_resize="device")), 4)
    for a, b in zip(worker, device, strict=True):
        assert a["keys"] == b["keys"]
        assert "sam_images_uint8" not in b and "sam_resize_sizes" not in b
        assert torch.equal(a["resize_hw"], b["resize_hw"])
        assert torch.equal(a["sam_pixel_values"].view(torch.int32), b["sam_pixel_values"].view(torch.int32))


def test_unknown_resize_place_is_named(tokenizer_dir, three_sources):
    root, _ = three_sources
    with pytest.raises(ValueError, match="data.sam_resize='gpu' is not allowed"):
        EvfDataModule(*data_settings(tokenizer_dir, root, sam_resize="gpu"))
    with pytest.raises(ValueError, match="data.sam_resize=auto reached the data module unresolved"):
        EvfDataModule(*data_settings(tokenizer_dir, root, sam_resize="auto"))


def test_a_batch_without_images_is_finished_too():
    from evfsam_lightning.data.collate import finish_batch

    batch = finish_batch({"sam_images_uint8": [], "sam_resize_sizes": [], "sam_image_size": 64,
                          "resize_hw": torch.zeros(0, 2, dtype=torch.long)})
    assert batch["sam_pixel_values"].shape == (0, 3, 64, 64) and set(batch) == {"sam_pixel_values", "resize_hw"}
