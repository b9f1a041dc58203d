"""Stain intensity of each nucleus and of the cytoplasm around it, from the RGB pixels that
segmentation already holds.

Colour deconvolution (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001) with the standard H&E
stain vectors of that paper (scikit-image's `hed_from_rgb`, the same for every slide): optical
density OD = -log10(I / 255) per channel (I at least 1), then the haematoxylin and eosin amounts
are OD times the inverse of the stain matrix, in optical-density units (scikit-image's `rgb2hed`
gives the same divided by 6, before it clips at zero). Per nucleus: the mean, standard deviation
and 10th, 50th and 90th percentiles over its pixels; the same over its *cytoplasm ring*, the pixels
within `RING_UM` of it that belong to no nucleus.
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed_from_rgb

from inference.postprocess import dilate_labels

RING_UM = 2.0
STAINS = ("haematoxylin", "eosin")
STATISTICS = ("mean", "std", "q10", "q50", "q90")
#: Names of the measurements, in the order `nucleus_intensity` returns them (the nucleus table's
#: `INTENSITY_COLUMNS` in spatialdb, which may not import this package; a test keeps them equal).
INTENSITY = tuple(
    f"{place}{stain}_od_{stat}"
    for place in ("", "cytoplasm_")
    for stain in STAINS
    for stat in STATISTICS
)


def stain_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin and eosin optical density of (..., 3) uint8 RGB pixels, as (..., 2) float32."""
    od = -np.log10(np.maximum(rgb, 1).astype(np.float32) / 255)
    return (od @ hed_from_rgb[:, :2].astype(np.float32)).astype(np.float32)


def nucleus_intensity(labels: np.ndarray, rgb: np.ndarray, ring_px: int) -> dict[str, np.ndarray]:
    """`INTENSITY` of the nuclei 1..labels.max() of a label image over (H, W, 3) RGB pixels, each
    an array indexed by label - 1 (NaN where a nucleus has no ring). Only the pixels of nuclei
    and rings are deconvolved."""
    n = int(labels.max())
    grown = dilate_labels(labels, ring_px) if n else labels
    # Grey dilation takes the largest label nearby; the ring is what no nucleus holds.
    near = grown > 0
    in_nucleus = labels[near]
    stains = stain_od(rgb[near])
    out = {}
    for place, owner in (
        ("", in_nucleus),
        ("cytoplasm_", np.where(in_nucleus == 0, grown[near], 0)),
    ):
        for k, stain in enumerate(STAINS):
            stats = _label_statistics(owner, stains[:, k], n)
            for stat in STATISTICS:
                out[f"{place}{stain}_od_{stat}"] = stats[stat]
    return out


def _label_statistics(owner: np.ndarray, values: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Mean, standard deviation and percentiles (linear interpolation, as numpy's) of `values`
    per label 1..n of `owner` (same length, 0 = none): sorted once by (label, value), no loop
    over labels."""
    inside = owner > 0
    owner, value = owner[inside], values[inside].astype(np.float64)
    count = np.bincount(owner, minlength=n + 1)[1:].astype(np.float64)
    total = np.bincount(owner, weights=value, minlength=n + 1)[1:]
    squares = np.bincount(owner, weights=value * value, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean * mean, 0))
    # One float sort by label, then value: the value scaled into [0, 0.5) beside the label.
    low, span = (value.min(), np.ptp(value)) if len(value) else (0.0, 0.0)
    order = np.argsort(owner + (value - low) / (2 * span + 1e-12), kind="stable")
    ordered = value[order]
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    out = {"mean": mean, "std": std}
    for stat, q in (("q10", 0.1), ("q50", 0.5), ("q90", 0.9)):
        position = q * np.maximum(count - 1, 0)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, np.maximum(count - 1, 0).astype(np.int64))
        weight = position - low
        has = count > 0
        result = np.full(n, np.nan)
        lo, hi = start[has] + low[has], start[has] + high[has]
        result[has] = ordered[lo] * (1 - weight[has]) + ordered[hi] * weight[has]
        out[stat] = result
    return out
