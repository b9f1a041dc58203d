"""From head outputs to instances, as in Cerberus: marker-controlled watershed for nuclei;
threshold, dilate and fill for glands and lumina; lumina outside glands dropped; instance types by
majority vote of the type head inside each instance.

Inputs are per-pixel class probabilities (3, H, W) of a segmentation head, in the order
background, eroded inner, contour (see `inference.targets`).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from inference.targets import disk


def nuclei_instances(
    probs: np.ndarray,
    inner_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_area_px: int = 10,
) -> np.ndarray:
    """Markers are the confident inner regions; watershed on the inner probability grows them to
    the foreground (inner + contour), so touching nuclei split along their contours."""
    inner, foreground = probs[1], probs[1] + probs[2]
    markers, _ = ndimage.label(inner > inner_threshold)
    markers = _remove_small(markers, max(1, min_area_px // 4))
    mask = foreground > foreground_threshold
    labels = watershed(-inner, markers=markers, mask=mask)
    return _remove_small(labels, min_area_px)


def nuclei_instances_hv(
    probs: np.ndarray,
    hv: np.ndarray,
    foreground_threshold: float = 0.5,
    slope_threshold: float = 0.0,
    sobel_px: int = 11,
    min_area_px: int = 10,
) -> np.ndarray:
    """HoVer-Net's post-processing (Graham et al. 2019) on window-independent scales. Within a
    nucleus its distance maps `hv` (2, H, W) rise from -1 to 1 along x and y; where two nuclei
    touch they fall steeply. Markers are the foreground pixels (inner + contour probability above
    `foreground_threshold`) where both maps rise by more than `slope_threshold` per pixel
    (Sobel derivatives over `sobel_px`, in map units per pixel); watershed on the steepest fall
    grows them over the foreground."""
    foreground = ndimage.binary_fill_holes(probs[1] + probs[2] > foreground_threshold)
    foreground = _remove_small(ndimage.label(foreground)[0], min_area_px) > 0
    slope = np.minimum(_slope(hv[0], sobel_px, 1, 0), _slope(hv[1], sobel_px, 0, 1))
    markers = ndimage.binary_fill_holes(foreground & (slope > slope_threshold))
    markers = ndimage.binary_opening(markers, structure=disk(1))
    markers = _remove_small(ndimage.label(markers)[0], max(1, min_area_px // 4))
    landscape = cv2.GaussianBlur(-slope.astype(np.float32), (3, 3), 0)
    labels = watershed(landscape, markers=markers, mask=foreground)
    return _remove_small(labels, min_area_px)


def _slope(values: np.ndarray, ksize: int, dx: int, dy: int) -> np.ndarray:
    """The Sobel derivative of `values` along x (dx=1) or y (dy=1) in units per pixel: divided
    by the kernel's response to a ramp of slope 1."""
    ramp = np.repeat(np.arange(2 * ksize + 1, dtype=np.float32)[:, None], 2 * ksize + 1, axis=1)
    unit = cv2.Sobel(ramp.T if dx else ramp, cv2.CV_32F, dx, dy, ksize=ksize)[ksize, ksize]
    return cv2.Sobel(values.astype(np.float32), cv2.CV_32F, dx, dy, ksize=ksize) / unit


def region_instances(
    probs: np.ndarray,
    contour_px: int,
    inner_threshold: float = 0.5,
    min_area_px: int = 100,
) -> np.ndarray:
    """Glands and lumina: connected inner regions, dilated back over their contour band and with
    holes filled. Where dilations meet, the nearer region wins (no overlaps)."""
    inner, _ = ndimage.label(probs[1] > inner_threshold)
    inner = _remove_small(inner, max(1, min_area_px // 4))
    if inner.max() == 0:
        return inner
    # Each pixel within contour_px of an inner region joins the nearest one.
    distance, (iy, ix) = ndimage.distance_transform_edt(inner == 0, return_indices=True)
    labels = np.where(distance <= contour_px, inner[iy, ix], 0)
    filled = np.zeros_like(labels)
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None:
            hole_free = ndimage.binary_fill_holes(labels[box] == label)
            filled[box][hole_free & (filled[box] == 0)] = label
    return _remove_small(filled, min_area_px)


def lumina_inside_glands(lumina: np.ndarray, glands: np.ndarray, min_inside: float = 0.5):
    """Lumina with at least `min_inside` of their area inside some gland; the rest removed."""
    if lumina.max() == 0:
        return lumina
    area = np.bincount(lumina.ravel(), minlength=lumina.max() + 1)
    inside = np.bincount(lumina.ravel(), weights=glands.ravel() > 0, minlength=lumina.max() + 1)
    keep = np.zeros(len(area), dtype=bool)
    keep[1:] = inside[1:] >= min_inside * np.maximum(area[1:], 1)
    kept = np.where(keep[lumina], lumina, 0)
    return _relabel(kept)


def type_map(probs: np.ndarray) -> np.ndarray:
    """Per pixel, the most probable real type (channels 1..) of a type head's (C, H, W)
    probabilities; 0 where every real type has probability zero (untrained heads). The head's
    own no-label channel is left out: which pixels are objects is the instance head's call."""
    real = probs[1:]
    return np.where(real.max(axis=0) > 0, real.argmax(axis=0) + 1, 0).astype(np.uint8)


def majority_types(instances: np.ndarray, type_map: np.ndarray, n_types: int) -> dict:
    """{instance: (type, fraction)} where type is the most frequent non-zero type inside the
    instance (type 0 = no label) and fraction its share of the instance's typed pixels."""
    n = int(instances.max())
    if n == 0:
        return {}
    table = np.bincount(
        instances.ravel() * n_types + type_map.ravel(), minlength=(n + 1) * n_types
    ).reshape(n + 1, n_types)[:, 1:]
    out = {}
    for label in np.flatnonzero(table.sum(axis=1)):
        if label == 0:
            continue
        counts = table[label]
        best = int(np.argmax(counts))
        out[int(label)] = (best + 1, float(counts[best] / counts.sum()))
    return out


def _remove_small(labels: np.ndarray, min_area_px: int) -> np.ndarray:
    area = np.bincount(labels.ravel())
    small = area < min_area_px
    small[0] = False
    return _relabel(np.where(small[labels], 0, labels))


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in order of their value."""
    present = np.flatnonzero(np.bincount(labels.ravel()))
    present = present[present > 0]
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lookup[present] = np.arange(1, len(present) + 1)
    return lookup[labels]
