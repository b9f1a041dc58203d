"""Neighbourhood features of nuclei: known answers on a hexagonal lattice, and the export's k-d tree
counts equal to PostGIS's on the same slide."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from spatialdb.features import export as feature_export
from spatialdb.features.neighbourhood import count_within, neighbourhood
from tests.features.test_features import load_known_slide

SPACING = 12.0  # µm between lattice neighbours


def hexagonal(rows: int, cols: int) -> np.ndarray:
    """Centroids of a hexagonal lattice: every inner point has 6 neighbours at SPACING."""
    y, x = np.mgrid[0:rows, 0:cols].astype(float)
    x = x * SPACING + (y % 2) * SPACING / 2
    return np.c_[x.ravel(), y.ravel() * SPACING * np.sqrt(3) / 2]


def test_a_hexagonal_lattice_has_known_neighbourhoods():
    points = hexagonal(20, 20)
    rows = np.arange(len(points)) // 20
    classes = np.where(rows % 2 == 0, "epithelial", "lymphocyte")  # alternate lattice rows
    out = neighbourhood(points, classes)
    inner = np.flatnonzero(
        (points[:, 0] > 3 * SPACING) & (points[:, 0] < 16 * SPACING)
        & (points[:, 1] > 3 * SPACING) & (points[:, 1] < 15 * SPACING)
    )  # fmt: skip
    assert len(inner) > 100
    # Within 10 µm nobody; within 25 µm the 6 at 12 µm, the 6 at 20.8 µm and the 6 at 24 µm.
    assert (out["neighbours_within_10_um"][inner] == 0).all()
    assert (out["neighbours_within_25_um"][inner] == 18).all()
    for k in range(1, 6):
        assert out[f"nearest_{k}_distance_um"][inner] == pytest.approx(SPACING)
    assert (out["delaunay_degree"][inner] == 6).all()
    assert out["delaunay_edge_mean_um"][inner] == pytest.approx(SPACING)
    # Of those 18, around an even-row (epithelial) point: its own row 4 at 12 and 24 µm, the odd
    # rows beside it 4 each (12 and 20.8 µm), the even rows two away 3 each (20.8 and 24 µm).
    lymphocytes = np.where(rows % 2 == 0, 8 / 18, 10 / 18)
    assert out["neighbour_fraction_lymphocyte"][inner] == pytest.approx(lymphocytes[inner])
    total = out["neighbour_fraction_lymphocyte"] + out["neighbour_fraction_epithelial"]
    assert total[inner] == pytest.approx(1.0)


def test_few_nuclei_get_empty_neighbourhoods():
    one = neighbourhood(np.array([[5.0, 5.0]]), np.array(["epithelial"]))
    assert one["neighbours_within_50_um"][0] == 0 and np.isnan(one["nearest_1_distance_um"][0])
    assert one["delaunay_degree"][0] == 0 and np.isnan(one["delaunay_edge_mean_um"][0])
    assert np.isnan(one["neighbour_fraction_epithelial"][0])
    line = neighbourhood(np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), np.array(["a"] * 3))
    assert list(line["delaunay_degree"]) == [0, 0, 0]  # collinear: no triangulation
    assert list(line["nearest_2_distance_um"]) == [2.0, 1.0, 2.0]
    assert np.isnan(line["nearest_3_distance_um"]).all()
    none = neighbourhood(np.zeros((0, 2)), np.array([], dtype=object))
    assert all(len(v) == 0 for v in none.values())
    assert len(count_within(np.zeros((0, 2)), 10)) == 0


def test_the_exports_counts_equal_postgis(engine, tmp_path):
    slide_id = load_known_slide(engine, nuclei_in_bar=30)
    with engine.connect() as conn:
        postgis = pd.read_sql(
            text("SELECT nucleus_id, neighbours_within_radius FROM nucleus_features(:s, 10)"),
            conn,
            params={"s": slide_id},
        ).set_index("nucleus_id")["neighbours_within_radius"]
        skipped = conn.execute(
            text("SELECT count(neighbours_within_radius) FROM nucleus_features(:s, NULL)"),
            {"s": slide_id},
        ).scalar()
    assert skipped == 0  # no radius: not counted in SQL
    out = feature_export.export(
        engine, "nucleus", "csv", tmp_path / "n.csv", [slide_id], radius_um=10
    )
    table = pd.read_csv(out.path).set_index("nucleus_id")
    assert out.rows == len(table) == len(postgis) == 39
    assert (table["neighbours_within_radius"] == postgis.loc[table.index]).all()
    assert postgis.max() >= 2  # the bar's nuclei, 10 px (5 µm) apart, see each other
    fractions = [c for c in table.columns if c.startswith("neighbour_fraction_")]
    assert fractions == [
        "neighbour_fraction_connective", "neighbour_fraction_epithelial",
        "neighbour_fraction_lymphocyte",
    ]  # fmt: skip
    has = table["neighbours_within_25_um"] > 0
    assert table.loc[has, fractions].sum(axis=1).to_numpy() == pytest.approx(1.0)
    parquet = feature_export.export(
        engine, "nucleus", "parquet", tmp_path / "n.parquet", [slide_id], radius_um=10
    )
    assert list(pd.read_parquet(parquet.path).columns) == list(pd.read_csv(out.path).columns)
