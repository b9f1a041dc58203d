"""Slide-level spatial statistics: densities per compartment, immune infiltration, cross-K and
per-class feature quantiles on a hand-made slide with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely
from sqlalchemy import text

from spatialdb.features import export as feature_export
from spatialdb.features.spatial import cross_k, spatial_statistics
from tests.features.test_features import load_known_slide, slide_row

GLAND = shapely.box(0, 0, 100, 100)  # µm: 0.01 mm², 0.4 mm of boundary
TISSUE = shapely.box(0, 0, 400, 400)


def known_slide():
    points = [
        *[(40, 40), (60, 40), (40, 60), (60, 60)],  # epithelial, inside, 40 µm from the boundary
        *[(50, 45), (50, 55)],  # inflammatory inside
        *[(110, 20), (110, 50), (50, 112)],  # inflammatory outside, 10-12 µm from the gland
        *[(300, 300), (310, 300), (300, 310), (310, 310), (305, 305)],  # connective, far away
    ]
    classes = ["epithelial"] * 4 + ["inflammatory"] * 5 + ["connective"] * 5
    return np.array(points, dtype=float), np.array(classes, dtype=object)


def test_densities_per_compartment_and_immune_infiltration():
    points, classes = known_slide()
    areas = np.arange(len(points), dtype=float)
    stats = spatial_statistics(points, classes, np.array([GLAND]), np.array([TISSUE]), {"a": areas})
    area = stats["compartment_area_mm2"]
    assert area["glands"] == pytest.approx(0.01)
    assert area["stroma"] == pytest.approx(0.15)
    # [0, 150]² µm, the band cut by the tissue, less its rounded outer corner (a 2 µm lattice)
    assert area["border"] == pytest.approx((150**2 - 50**2 * (1 - np.pi / 4)) / 1e6, rel=5e-3)
    density = stats["density_per_mm2"]
    assert density["glands"] == pytest.approx(
        {"connective": 0, "epithelial": 400, "inflammatory": 200}
    )
    assert density["stroma"]["connective"] == pytest.approx(5 / 0.15)
    assert density["stroma"]["inflammatory"] == pytest.approx(3 / 0.15)
    # within 50 µm of the boundary: all inside (at most 50 µm from it) and the 3 near it
    assert density["border"]["inflammatory"] == pytest.approx(5 / area["border"])
    assert density["border"]["connective"] == 0
    immune = stats["immune"]
    assert immune["classes"] == ["inflammatory"] and immune["gland_boundary_mm"] == pytest.approx(
        0.4
    )
    assert (immune["inside_glands"], immune["near_glands"]) == (2, 3)
    assert immune["inside_glands_per_mm_boundary"] == pytest.approx(5.0)
    assert immune["near_glands_per_mm_boundary"] == pytest.approx(7.5)
    quantiles = stats["nucleus_feature_quantiles"]["a"]
    assert quantiles["epithelial"]["mean"] == pytest.approx(1.5)
    assert quantiles["connective"]["q50"] == pytest.approx(11.0)
    assert set(stats["cross_k"]) == {f"{a}|{b}" for a in classes for b in classes}


def test_cross_k_counts_pairs_within_each_radius():
    points = np.array([[0, 0], [5, 0], [100, 100], [100, 130]], dtype=float)
    classes = np.array(["a", "a", "b", "b"], dtype=object)
    k = cross_k(points, classes, ["a", "b"], area_um2=1000.0)
    # two a's 5 µm apart: 2 ordered pairs within 10 µm, out of 2 x 1
    assert k["a|a"]["10_um"] == pytest.approx(1000 * 2 / (2 * np.pi * 100))
    assert k["b|b"]["10_um"] == 0 and k["b|b"]["50_um"] == pytest.approx(
        1000 * 2 / (2 * np.pi * 2500)
    )
    assert k["a|b"]["50_um"] == 0
    lone = cross_k(points[:3], classes[:3], ["a", "b"], area_um2=1000.0)
    assert lone["b|b"]["10_um"] is None  # one b: no pair to count


def test_a_refresh_stores_them_and_the_slide_export_carries_them(engine, tmp_path):
    slide_id = load_known_slide(engine, name="spatial")  # refreshed by the loader helper
    with engine.connect() as conn:
        stats = conn.execute(
            text("SELECT statistics FROM slide_spatial_feature WHERE slide_id = :s"),
            {"s": slide_id},
        ).scalar_one()
    sql_side = slide_row(engine, slide_id)
    area = stats["compartment_area_mm2"]
    assert area["glands"] == pytest.approx(0.05)  # the square, the bar and the L
    assert area["stroma"] * 1e6 == pytest.approx(sql_side["stroma_area_um2"])
    density = stats["density_per_mm2"]["glands"]
    assert density == pytest.approx({"connective": 0, "epithelial": 60, "lymphocyte": 40})
    in_glands = sum(density.values()) * area["glands"]
    assert in_glands == pytest.approx(sql_side["nuclei_in_glands"])
    immune = stats["immune"]
    assert immune["classes"] == ["lymphocyte"] and immune["gland_boundary_mm"] == pytest.approx(1.7)
    assert (immune["inside_glands"], immune["near_glands"]) == (2, 0)
    sizes = stats["nucleus_feature_quantiles"]["area_um2"]["epithelial"]
    assert sizes["q50"] == pytest.approx(4.0) and sizes["mean"] == pytest.approx((1 + 4 + 16) / 3)

    out = feature_export.export(engine, "slide", "csv", tmp_path / "s.csv", [slide_id])
    (row,) = pd.read_csv(out.path).to_dict("records")
    assert row["density_per_mm2_glands_epithelial"] == pytest.approx(60)
    assert row["immune_inside_glands"] == 2
    assert row["nucleus_area_um2_epithelial_q50"] == pytest.approx(4.0)
    assert row["nucleus_eccentricity_lymphocyte_mean"] == pytest.approx(0, abs=1e-9)  # squares
    assert "cross_k_epithelial_lymphocyte_25_um" in row

    load_known_slide(engine, name="spatial", refresh_features=False)  # a new run: stale, dropped
    with engine.connect() as conn:
        assert not conn.execute(
            text("SELECT count(*) FROM slide_spatial_feature WHERE slide_id = :s"), {"s": slide_id}
        ).scalar()
