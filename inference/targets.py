"""Training targets from instance label maps: eroded-inner / contour classes and U-Net weights.

Each segmentation head predicts 3 classes: 0 background, 1 the instance's eroded inner region,
2 its contour band (the Cerberus targets). The weight map is the U-Net one (Ronneberger et al.
2015): class-balancing weights plus w0 * exp(-(d1 + d2)^2 / (2 sigma^2)), where d1 and d2 are the
distances to the nearest and second-nearest instance, which makes thin gaps between touching
objects expensive to get wrong.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BACKGROUND, INNER, CONTOUR = 0, 1, 2


def disk(radius: int) -> np.ndarray:
    """A boolean disk footprint of the given radius in pixels."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def inner_contour_map(instances: np.ndarray, contour_px: int) -> np.ndarray:
    """uint8 class map: pixels of an instance within `contour_px` of anything else (background or
    another instance) are contour; the rest of the instance is inner."""
    if contour_px < 1:
        raise ValueError("contour_px must be at least 1")
    footprint = disk(contour_px)
    low = ndimage.minimum_filter(instances, footprint=footprint, mode="nearest")
    high = ndimage.maximum_filter(instances, footprint=footprint, mode="nearest")
    out = np.zeros(instances.shape, dtype=np.uint8)
    foreground = instances > 0
    out[foreground] = CONTOUR
    out[foreground & (low == instances) & (high == instances)] = INNER
    return out


def unet_weight_map(
    instances: np.ndarray,
    classes: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
) -> np.ndarray:
    """float32 per-pixel loss weights for `classes` (the map from `inner_contour_map`)."""
    counts = np.bincount(classes.ravel(), minlength=3).astype(np.float64)
    present = counts > 0
    balance = np.zeros(3)
    balance[present] = counts[present].sum() / (present.sum() * counts[present])
    weights = balance[classes]
    d1, d2 = _two_nearest_distances(instances, reach=3 * sigma)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    return (weights + np.where(instances == 0, border, 0.0)).astype(np.float32)


def _two_nearest_distances(instances: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, distances to the nearest and second-nearest instance, computed only within
    `reach` of each instance (beyond it the border term vanishes); a loop over instances."""
    far = np.float64(2 * reach + 1)
    d1 = np.full(instances.shape, far)
    d2 = np.full(instances.shape, far)
    pad = int(np.ceil(reach))
    for label, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        window = tuple(
            slice(max(s.start - pad, 0), min(s.stop + pad, n))
            for s, n in zip(box, instances.shape, strict=True)
        )
        distance = ndimage.distance_transform_edt(instances[window] != label)
        near1, near2 = d1[window], d2[window]
        closer = distance < near1
        near2[:] = np.where(closer, near1, np.minimum(near2, distance))
        near1[:] = np.where(closer, distance, near1)
    return d1, d2


def hv_maps(instances: np.ndarray) -> np.ndarray:
    """HoVer-Net's distance maps, float32 (2, H, W): per instance pixel its horizontal (x) and
    vertical (y) offset from the instance's centroid, each side of the centroid scaled by the
    instance's largest offset on that side, so values run from -1 to 1 within every nucleus;
    0 on background."""
    out = np.zeros((2, *instances.shape), dtype=np.float32)
    labels = instances.ravel()
    inside = labels > 0
    if not inside.any():
        return out
    ids = labels[inside]
    n = int(ids.max()) + 1
    count = np.bincount(ids, minlength=n).astype(np.float64)
    ys, xs = np.divmod(np.flatnonzero(inside), instances.shape[1])
    for axis, coords in enumerate((xs, ys)):
        offset = coords - (np.bincount(ids, coords, minlength=n) / np.maximum(count, 1))[ids]
        low = np.zeros(n)
        high = np.zeros(n)
        np.minimum.at(low, ids, offset)
        np.maximum.at(high, ids, offset)
        scale = np.where(offset < 0, -low[ids], high[ids])
        out[axis].ravel()[np.flatnonzero(inside)] = np.divide(
            offset, scale, out=np.zeros_like(offset), where=scale > 0
        )
    return out
