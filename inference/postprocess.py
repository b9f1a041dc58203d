"""From head outputs to instances, as in Cerberus: marker-controlled watershed for nuclei;
threshold, dilate and fill for glands and lumina; lumina outside glands dropped; instance types by
majority vote of the type head inside each instance.

Inputs are per-pixel class probabilities (3, H, W) of a segmentation head, in the order
background, eroded inner, contour (see `inference.targets`); glands and lumina take them as
uint8 × 255 too.
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
    inner, _ = ndimage.label(above(probs[1], inner_threshold))
    inner = _remove_small(inner, max(1, min_area_px // 4))
    if inner.max() == 0:
        return inner
    labels = nearest_within(inner, contour_px)
    filled = np.zeros_like(labels)
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None:
            hole_free = ndimage.binary_fill_holes(labels[box] == label)
            filled[box][hole_free & (filled[box] == 0)] = label
    return _remove_small(filled, min_area_px)


def nearest_within(labels: np.ndarray, radius: int) -> np.ndarray:
    """`labels` with each unlabelled pixel within `radius` px (Euclidean) of a labelled one given
    the label of the nearest, as a Euclidean distance transform with indices gives it. Only
    pixels with two labels within reach need distances: the others take the one label that a
    disk-shaped dilation brings (two dilations of the whole map instead of a distance transform
    with indices: 4x faster on a gland window); the contested ones get the distance transform
    on crops around them."""
    top = int(labels.max())
    if radius < 1 or top == 0:
        return labels.copy()
    highest = dilate_labels(labels, radius)
    lowest = top + 1 - dilate_labels(np.where(labels > 0, top + 1 - labels, 0), radius)
    free = labels == 0
    reached = free & (highest > 0)
    out = labels.copy()
    unique = reached & (highest == lowest)
    out[unique] = highest[unique]
    contested = reached & ~unique
    if not contested.any():
        return out
    pieces, _ = ndimage.label(contested, structure=np.ones((3, 3)))
    h, w = labels.shape
    for piece, box in enumerate(ndimage.find_objects(pieces), start=1):
        # Labels within reach of the piece lie within `radius` of its box.
        y0, x0 = max(0, box[0].start - radius), max(0, box[1].start - radius)
        y1, x1 = min(h, box[0].stop + radius), min(w, box[1].stop + radius)
        crop = labels[y0:y1, x0:x1]
        _, (iy, ix) = ndimage.distance_transform_edt(crop == 0, return_indices=True)
        here = pieces[y0:y1, x0:x1] == piece
        out[y0:y1, x0:x1][here] = crop[iy[here], ix[here]]
    return out


def dilate_labels(labels: np.ndarray, radius: int) -> np.ndarray:
    """Per pixel, the largest label within `radius` px (a disk; 0 where none), as
    `ndimage.grey_dilation` with a disk footprint gives it, by OpenCV (several times faster)."""
    top = int(labels.max())
    kind = np.uint16 if top < 2**16 else np.float32  # exact, and a type cv2.dilate takes
    grown = cv2.dilate(labels.astype(kind), disk(radius).astype(np.uint8))
    return grown.astype(labels.dtype if labels.dtype.kind == "i" else np.int32)


def above(probability: np.ndarray, threshold: float) -> np.ndarray:
    """Where a probability map exceeds `threshold`; a uint8 map holds probabilities × 255 (as
    the tiles keep them) and is compared on that scale, without a float copy."""
    if probability.dtype == np.uint8:
        return probability > threshold * 255
    return probability > threshold


def lumina_inside_glands(lumina: np.ndarray, glands: np.ndarray, min_inside: float = 0.5):
    """Lumina with at least `min_inside` of their area inside some gland; the rest removed."""
    if lumina.max() == 0:
        return lumina
    area = np.bincount(lumina.ravel(), minlength=lumina.max() + 1)
    inside = np.bincount(lumina[glands > 0], minlength=lumina.max() + 1)
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
    totals = table.sum(axis=1)
    best = table.argmax(axis=1)
    typed = np.flatnonzero(totals[1:]) + 1
    fraction = table[typed, best[typed]] / totals[typed]
    return {
        int(label): (int(best[label]) + 1, float(share))
        for label, share in zip(typed, fraction, strict=True)
    }


def _remove_small(labels: np.ndarray, min_area_px: int) -> np.ndarray:
    """Labels of at least `min_area_px` pixels, renumbered 1..n in order of their value."""
    keep = np.bincount(labels.ravel()) >= min_area_px
    return _renumber(labels, keep)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in order of their value."""
    return _renumber(labels, np.bincount(labels.ravel()) > 0)


def _renumber(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The labels `keep` marks (indexed by label) renumbered 1..n in order, the others 0; the
    labels themselves when they are already 1..n."""
    keep[0] = False
    if keep[1:].all():
        return labels
    lookup = np.zeros(len(keep), dtype=np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[labels]
