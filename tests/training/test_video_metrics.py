"""J and F (DAVIS definitions) on hand-made masks with values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from evfsam_lightning.training.video_metrics import boundary_f, boundary_map, region_j, sequence_jf


def _square(h, w, top, left, size):
    m = np.zeros((h, w), dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


def test_region_j_on_hand_made_masks():
    a = _square(10, 10, 0, 0, 4)  # 16 pixels
    b = _square(10, 10, 2, 2, 4)  # 16 pixels, overlap 2x2 = 4
    assert region_j(a, b) == pytest.approx(4 / 28)
    assert region_j(a, a) == 1.0
    assert region_j(a, np.zeros_like(a)) == 0.0
    assert region_j(np.zeros_like(a), np.zeros_like(a)) == 1.0  # object absent and predicted absent


def test_boundary_map_marks_pixels_whose_right_or_lower_neighbours_differ():
    m = _square(6, 6, 1, 1, 3)  # rows/cols 1..3
    b = boundary_map(m)
    expected = np.zeros((6, 6), dtype=bool)
    # inside pixels whose right / lower / lower-right neighbour is outside: last row and column of the square
    expected[3, 1:4] = True
    expected[1:4, 3] = True
    # outside pixels whose right / lower / lower-right neighbour is inside: the row above, the column left,
    # and the pixel diagonally above-left
    expected[0, 0:4] = True
    expected[0:4, 0] = True
    assert np.array_equal(b, expected)
    assert not boundary_map(np.ones((5, 5), dtype=bool)).any()  # the image border is no boundary


def test_boundary_f_on_hand_made_masks():
    h = w = 100  # diagonal 141.4 -> tolerance ceil(1.13) = 2 pixels
    gt = _square(h, w, 20, 20, 40)
    assert boundary_f(gt, gt) == 1.0
    # shifted down by 2 pixels: every boundary pixel is within the tolerance -> F = 1 (J is not)
    near = _square(h, w, 22, 20, 40)
    assert boundary_f(near, gt) == 1.0 and region_j(near, gt) < 1.0
    # shifted far: no boundary pixel matches except where the two outlines cross
    far = _square(h, w, 50, 50, 40)
    f = boundary_f(far, gt)
    assert 0.0 < f < 0.2
    # an empty prediction of a present object: precision 1, recall 0 -> F = 0; both empty -> 1
    empty = np.zeros((h, w), dtype=bool)
    assert boundary_f(empty, gt) == 0.0 and boundary_f(gt, empty) == 0.0
    assert boundary_f(empty, empty) == 1.0


def test_boundary_f_counts_matches_within_the_tolerance_exactly():
    # 10x10 image, diagonal 14.1 -> tolerance ceil(0.113) = 1 pixel (a plus-shaped disk)
    gt = np.zeros((10, 10), dtype=bool)
    gt[:, :5] = True  # vertical boundary: columns 4 (inside) and none outside except... computed below
    pred = np.zeros((10, 10), dtype=bool)
    pred[:, :7] = True
    # gt boundary: column 4 (its right neighbour differs); pred boundary: column 6; 2 columns apart > 1
    assert np.array_equal(np.argwhere(boundary_map(gt))[:, 1], np.full(10, 4))
    assert boundary_f(pred, gt) == 0.0
    pred2 = np.zeros((10, 10), dtype=bool)
    pred2[:, :6] = True  # boundary column 5: within 1 pixel of column 4 -> F = 1
    assert boundary_f(pred2, gt) == 1.0


def test_sequence_jf_averages_over_frames():
    gt = [_square(20, 20, 5, 5, 6)] * 2
    preds = [gt[0], np.zeros((20, 20), dtype=bool)]
    j, f = sequence_jf(preds, gt)
    assert j == pytest.approx(0.5) and f == pytest.approx(0.5)
