"""Video object segmentation measures as the DAVIS benchmark defines them (Perazzi et al., CVPR 2016):
region similarity J (Jaccard index) and boundary accuracy F (F-measure of boundary pixels matched within
a tolerance of 0.8% of the image diagonal). J&F of a video = mean of its mean J and mean F; of a split =
the mean over its (video, object / expression) sequences.
"""

from __future__ import annotations

import math

import numpy as np

#: boundary tolerance as a fraction of the image diagonal (DAVIS `bound_th`)
BOUND_TH = 0.008


def region_j(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two binary masks; 1 when both are empty."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Pixels of a binary mask whose right, lower or lower-right neighbour differs (DAVIS `seg2bmap`
    on a same-size map): the last row compares to the right only, the last column below only, and the
    bottom-right pixel is never a boundary."""
    seg = mask.astype(bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    b[-1, :] = seg[-1, :] ^ east[-1, :]
    b[:, -1] = seg[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure: precision = predicted boundary pixels within the tolerance of the true
    boundary, recall = the converse; tolerance = ceil(bound_th * diagonal) pixels (or bound_th pixels
    when >= 1). Both boundaries empty -> 1; only one empty -> 0."""
    from scipy import ndimage

    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape[:2])))
    fg, gb = boundary_map(pred), boundary_map(gt)
    disk = _disk(radius)
    fg_dil = ndimage.binary_dilation(fg, structure=disk)
    gt_dil = ndimage.binary_dilation(gb, structure=disk)
    n_fg, n_gt = int(fg.sum()), int(gb.sum())
    if n_fg == 0 and n_gt == 0:
        precision = recall = 1.0
    elif n_fg == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = float((fg & gt_dil).sum() / n_fg)
        recall = float((gb & fg_dil).sum() / n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def sequence_jf(preds, gts) -> tuple[float, float]:
    """Mean J and mean F over the frames of one sequence (iterables of binary masks)."""
    js, fs = [], []
    for p, g in zip(preds, gts, strict=True):
        js.append(region_j(p, g))
        fs.append(boundary_f(p, g))
    return float(np.mean(js)), float(np.mean(fs))
