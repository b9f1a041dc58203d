"""Shape measurements: known answers on hand-made shapes, agreement with scikit-image's
`regionprops` on rasterised ones, the fast ring path equal to the general one, and the values the
loader stores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Point, Polygon, box
from skimage.draw import polygon as raster_polygon
from skimage.measure import regionprops
from sqlalchemy import text

from spatialdb.features import export as feature_export
from spatialdb.store.backfill import backfill_morphometry
from spatialdb.store.morphometry import (
    MORPHOMETRY,
    ring_shape_measurements,
    shape_measurements,
)
from tests.conftest import blobs, make_slide
from tests.store.test_loader import fetch, load
from tests.test_cli import spatialdb


def ellipse(a: float, b: float, degrees: float, at=(0.0, 0.0)) -> Polygon:
    disc = Point(0, 0).buffer(1, quad_segs=256)
    shape = affinity.rotate(affinity.scale(disc, a, b), degrees, origin=(0, 0))
    return affinity.translate(shape, *at)


def measured(geom, mpp_x=1.0, mpp_y=1.0) -> dict:
    return {k: float(v[0]) for k, v in shape_measurements(np.array([geom]), mpp_x, mpp_y).items()}


def test_a_rotated_ellipse_far_from_the_origin_has_its_axes_and_angle():
    m = measured(ellipse(10, 5, 30, at=(81_000, 64_000)), 0.5, 0.5)
    assert m["major_axis_um"] == pytest.approx(20 * 0.5, rel=1e-4)
    assert m["minor_axis_um"] == pytest.approx(10 * 0.5, rel=1e-4)
    assert m["orientation_deg"] == pytest.approx(30, abs=1e-3)
    assert m["eccentricity"] == pytest.approx(np.sqrt(1 - 0.25), rel=1e-4)
    assert m["equivalent_diameter_um"] == pytest.approx(2 * np.sqrt(50) * 0.5, rel=1e-4)
    assert m["solidity"] == pytest.approx(1, abs=1e-6)
    assert m["extent"] == pytest.approx(np.pi * 50 / (2 * 9.01 * 2 * 6.61), rel=0.01)
    assert measured(ellipse(10, 5, -60))["orientation_deg"] == pytest.approx(-60, abs=1e-3)
    upright = measured(ellipse(10, 5, 90))["orientation_deg"]  # ±90: the same axis
    assert abs(upright) == pytest.approx(90, abs=1e-3)


def test_a_box_a_holed_square_and_two_parts():
    rect = measured(box(0, 0, 20, 10))
    assert rect["major_axis_um"] == pytest.approx(4 * np.sqrt(400 / 12))  # a uniform bar
    assert rect["minor_axis_um"] == pytest.approx(4 * np.sqrt(100 / 12))
    assert rect["orientation_deg"] == pytest.approx(0, abs=1e-9)
    assert rect["circularity"] == pytest.approx(4 * np.pi * 200 / 60**2)
    assert rect["extent"] == pytest.approx(1) and rect["solidity"] == pytest.approx(1)
    holed = measured(Polygon(box(0, 0, 10, 10).exterior, [box(3, 3, 7, 7).exterior.coords]))
    assert holed["equivalent_diameter_um"] == pytest.approx(np.sqrt(4 * 84 / np.pi))
    assert holed["solidity"] == pytest.approx(0.84) and holed["extent"] == pytest.approx(0.84)
    assert holed["eccentricity"] == pytest.approx(0, abs=1e-9)
    # holes count negative whatever the orientation of their ring
    reversed_hole = Polygon(box(0, 0, 10, 10).exterior, [box(3, 3, 7, 7).exterior.coords[::-1]])
    assert measured(reversed_hole) == pytest.approx(holed)
    pair = measured(MultiPolygon([box(0, 0, 2, 2), box(10, 0, 12, 2)]))
    assert pair["equivalent_diameter_um"] == pytest.approx(np.sqrt(4 * 8 / np.pi))
    assert pair["solidity"] == pytest.approx(8 / 24) and pair["orientation_deg"] == pytest.approx(0)


def test_anisotropic_pixels_scale_each_axis():
    m = measured(box(0, 0, 20, 10), mpp_x=0.5, mpp_y=0.25)  # 10 x 2.5 µm
    assert m["major_axis_um"] == pytest.approx(4 * np.sqrt(100 / 12))
    assert m["minor_axis_um"] == pytest.approx(4 * np.sqrt(2.5**2 / 12))
    assert m["equivalent_diameter_um"] == pytest.approx(np.sqrt(4 * 25 / np.pi))


@pytest.mark.parametrize("degrees", [0, 25, 60, 120])
def test_regionprops_agrees_on_rasterised_shapes(degrees):
    shape = ellipse(40, 18, degrees, at=(100, 100))
    xy = np.asarray(shape.exterior.coords)
    mask = np.zeros((200, 200), dtype=np.uint8)
    rr, cc = raster_polygon(xy[:, 1], xy[:, 0], mask.shape)
    mask[rr, cc] = 1
    props = regionprops(mask)[0]
    m = measured(shape)
    assert m["major_axis_um"] == pytest.approx(props.axis_major_length, rel=0.01)
    assert m["minor_axis_um"] == pytest.approx(props.axis_minor_length, rel=0.01)
    assert m["eccentricity"] == pytest.approx(props.eccentricity, rel=0.01)
    # the pixels' staircase is not convex: regionprops gives a rasterised disc 0.97-0.98
    assert m["solidity"] == pytest.approx(props.solidity, rel=0.035)
    # regionprops' box counts whole pixels (about one more row and column than the shape's)
    assert m["extent"] == pytest.approx(props.extent, rel=0.06)
    assert m["equivalent_diameter_um"] == pytest.approx(props.equivalent_diameter_area, rel=0.01)
    # regionprops: from the row axis to the major axis, counter-clockwise on screen, i.e.
    # 90° minus ours (an axis: modulo 180°)
    turn = (m["orientation_deg"] - (90 - np.degrees(props.orientation)) + 90) % 180 - 90
    assert abs(turn) < 1.0


def test_the_ring_path_equals_the_general_path():
    geoms = blobs(300, seed=3)
    rings = np.stack([np.asarray(g.exterior.coords) for g in geoms if len(g.exterior.coords) == 21])
    chosen = np.array([g for g in geoms if len(g.exterior.coords) == 21], dtype=object)
    assert len(chosen) > 10
    fast = ring_shape_measurements(rings, chosen, 0.5, 0.3)
    slow = shape_measurements(chosen, 0.5, 0.3)
    for key in MORPHOMETRY:
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-9, atol=1e-9, err_msg=key)


def test_the_loader_stores_them_for_every_object(engine):
    slide = make_slide(mpp=0.25)
    nuclei = np.array(
        [ellipse(12, 6, a, at=(1000 + 40 * i, 2000)) for i, a in enumerate((0, 45, 90))]
        + [shapely.box(5000, 5000, 5020, 5010)],
        dtype=object,
    )
    holed = Polygon(box(0, 0, 400, 400).exterior, [box(100, 100, 300, 300).exterior.coords])
    result = load(engine, slide, {"nucleus": (nuclei, "epithelial"), "gland": ([holed], "benign")})
    rows = fetch(engine, "SELECT * FROM nucleus WHERE slide_id = :s ORDER BY id", s=result.slide_id)
    expected = shape_measurements(nuclei, 0.25, 0.25)
    for i, row in enumerate(rows):
        for key in MORPHOMETRY:
            assert row[key] == pytest.approx(expected[key][i], rel=1e-9, abs=1e-9), key
    assert [round(r["orientation_deg"]) for r in rows[:3]] == [0, 45, 90]
    (gland,) = fetch(engine, "SELECT * FROM gland WHERE slide_id = :s", s=result.slide_id)
    assert gland["solidity"] == pytest.approx(0.75) and gland["eccentricity"] == pytest.approx(0)


def test_backfill_fills_what_was_stored_before_in_batches(engine, cli_env):
    nuclei = np.array([ellipse(9, 4, a, at=(600 + 30 * a, 900)) for a in range(0, 60, 5)])
    result = load(engine, make_slide("old", mpp=0.5), {"nucleus": (nuclei, "other")})
    as_loaded = fetch(
        engine, "SELECT * FROM nucleus WHERE slide_id = :s ORDER BY id", s=result.slide_id
    )
    blank = ", ".join(f"{name} = NULL" for name in MORPHOMETRY)
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE nucleus SET {blank} WHERE slide_id = :s"), {"s": result.slide_id}
        )
    done = []
    filled = backfill_morphometry(engine, batch=5, progress=lambda *a: done.append(a))
    assert filled["nucleus"] == len(nuclei) and filled["gland"] == 0
    assert [rows for table, slide, rows in done if slide == result.slide_id] == [5, 5, 2]
    again = fetch(
        engine, "SELECT * FROM nucleus WHERE slide_id = :s ORDER BY id", s=result.slide_id
    )
    for before, after in zip(as_loaded, again, strict=True):
        for name in MORPHOMETRY:
            assert after[name] == pytest.approx(before[name], rel=1e-9, abs=1e-9), name
    out = spatialdb("db", "backfill-morphometry", env=cli_env)
    assert out.returncode == 0 and out.stdout.strip() == (
        "nucleus: 0, gland: 0, lumen: 0, tissue_region: 0 filled"
    )


def test_the_nucleus_export_carries_them(engine, tmp_path):
    nuclei = np.array([ellipse(12, 6, a, at=(500 + 40 * i, 700)) for i, a in enumerate((0, 30))])
    result = load(engine, make_slide("export", mpp=0.25), {"nucleus": (nuclei, "other")})
    out = feature_export.export(engine, "nucleus", "csv", tmp_path / "n.csv", [result.slide_id])
    table = pd.read_csv(out.path).sort_values("nucleus_id")
    expected = shape_measurements(nuclei, 0.25, 0.25)
    for name in MORPHOMETRY:
        np.testing.assert_allclose(table[name], expected[name], rtol=1e-6, atol=1e-9, err_msg=name)
    assert table["major_axis_um"].tolist() == pytest.approx([6.0, 6.0], rel=1e-3)
    assert table["orientation_deg"].tolist() == pytest.approx([0.0, 30.0], abs=1e-3)
