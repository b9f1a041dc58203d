"""Stain intensity per nucleus: colour deconvolution equal to scikit-image's, statistics equal to
numpy's per nucleus, and a hand-made field with known stains inside and around its nuclei."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hed

from inference.intensity import INTENSITY, nucleus_intensity, stain_od
from spatialdb.store.schema import INTENSITY_COLUMNS


def test_the_names_are_the_nucleus_tables_columns():
    assert INTENSITY == INTENSITY_COLUMNS


def test_colour_deconvolution_agrees_with_scikit_image():
    rgb = np.random.default_rng(0).integers(1, 256, (64, 64, 3), dtype=np.uint8)
    ours = stain_od(rgb)
    theirs = rgb2hed(rgb)[..., :2] * 6  # skimage: log base 1e-6, negatives clipped to zero
    positive = theirs > 0
    np.testing.assert_allclose(ours[positive], theirs[positive], rtol=1e-4, atol=1e-5)
    assert (ours[~positive] <= 1e-5).all()
    assert np.allclose(stain_od(np.full((1, 3), 255, np.uint8)), 0)  # white: no stain


def test_statistics_per_nucleus_equal_numpys():
    rng = np.random.default_rng(1)
    labels = np.zeros((60, 60), np.int32)
    labels[5:20, 5:25], labels[30:50, 10:20], labels[30:45, 35:55] = 1, 2, 3
    rgb = rng.integers(20, 250, (60, 60, 3), dtype=np.uint8)
    out = nucleus_intensity(labels, rgb, ring_px=3)
    assert set(out) == set(INTENSITY) and all(len(v) == 3 for v in out.values())
    stains = stain_od(rgb)
    for i in (1, 2, 3):
        h = stains[..., 0][labels == i].astype(np.float64)
        assert out["haematoxylin_od_mean"][i - 1] == pytest.approx(h.mean(), rel=1e-6)
        assert out["haematoxylin_od_std"][i - 1] == pytest.approx(h.std(), rel=1e-5)
        for name, q in (("q10", 0.1), ("q50", 0.5), ("q90", 0.9)):
            assert out[f"haematoxylin_od_{name}"][i - 1] == pytest.approx(np.quantile(h, q))


def test_a_dark_nucleus_in_pink_cytoplasm():
    """Nuclei painted in haematoxylin's colour inside eosin-pink cytoplasm: haematoxylin high
    inside and low in the ring, eosin the other way round; a nucleus walled in by others has no
    ring."""
    labels = np.zeros((40, 80), np.int32)
    labels[10:20, 10:20] = 1
    labels[10:30, 40:70] = 2
    labels[15:25, 50:60] = 3  # inside nucleus 2: nothing around it but nucleus
    rgb = np.empty((40, 80, 3), np.uint8)
    rgb[:] = (235, 140, 190)  # eosin pink
    rgb[labels > 0] = (70, 60, 150)  # haematoxylin blue-purple
    out = nucleus_intensity(labels, rgb, ring_px=4)
    inside, ring = stain_od(np.array([[70, 60, 150]], np.uint8))[0], stain_od(rgb[0, :1])[0]
    for stat in ("mean", "q10", "q50", "q90"):
        assert out[f"haematoxylin_od_{stat}"][0] == pytest.approx(inside[0], rel=1e-5)
        assert out[f"cytoplasm_eosin_od_{stat}"][0] == pytest.approx(ring[1], rel=1e-5)
    assert out["haematoxylin_od_std"][0] == pytest.approx(0, abs=1e-5)
    assert out["haematoxylin_od_mean"][0] > 2 * out["cytoplasm_haematoxylin_od_mean"][0]
    assert out["cytoplasm_eosin_od_mean"][0] > out["eosin_od_mean"][0]
    assert np.isnan(out["cytoplasm_haematoxylin_od_mean"][2])  # nucleus 3 has no ring
