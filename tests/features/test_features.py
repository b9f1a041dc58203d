"""Gland–nuclei features on hand-built slides whose answers are known, refreshed after a new run,
and exported as tables that read back."""

from __future__ import annotations

import math

import geopandas as gpd
import pandas as pd
import pytest
import shapely
import shapely.affinity
from sqlalchemy import text

from spatialdb.errors import UserError
from spatialdb.features import export as feature_export
from spatialdb.features.refresh import refresh
from spatialdb.store import loader
from spatialdb.store.loader import RunWriter
from tests.conftest import make_slide
from tests.test_cli import assert_one_error_line, spatialdb

MPP = 0.5
EXACT = {"rel": 1e-6}

# Three glands (level-0 px): a 200 px square, a 400 x 100 px bar 100 px to its right, and an L.
SQUARE = shapely.box(0, 0, 200, 200)
BAR = shapely.box(300, 0, 700, 100)
ELL = shapely.box(2000, 2000, 2400, 2400).difference(shapely.box(2200, 2200, 2400, 2400))
# Nuclei inside the square: squares of side 2, 4, 6, 8 and 10 px -> 1, 4, 9, 16, 25 µm².
INSIDE = [shapely.box(20 * k, 30, 20 * k + s, 30 + s) for k, s in enumerate((2, 4, 6, 8, 10), 1)]
INSIDE_CLASSES = ["epithelial", "epithelial", "lymphocyte", "epithelial", "lymphocyte"]
STRADDLING = shapely.box(198, 50, 208, 60)  # overlaps the square, centroid (203, 55) outside
STROMAL = [shapely.box(1000, 1000, 1006, 1006), shapely.box(1010, 1000, 1016, 1006)]
STROMAL += [shapely.box(2600, 2600, 2606, 2606)]
LUMEN = shapely.box(50, 50, 110, 110)  # 60 px square inside the square gland: 900 µm²
STRAY_LUMEN = shapely.box(1500, 1500, 1520, 1520)  # outside every gland: 100 µm²
EPITHELIUM = shapely.MultiPolygon([shapely.box(0, 0, 1000, 1000)])
STROMA = shapely.MultiPolygon(
    [shapely.box(0, 0, 3000, 3000).difference(shapely.box(0, 0, 1000, 1000))]
)


def load_known_slide(engine, name="known", nuclei_in_bar=0, lanes=None, refresh_features=True):
    bar_nuclei = [shapely.box(400 + 10 * k, 40, 404 + 10 * k, 44) for k in range(nuclei_in_bar)]
    nuclei = [*INSIDE, STRADDLING, *STROMAL, *bar_nuclei]
    classes = INSIDE_CLASSES + ["connective"] * (1 + len(STROMAL)) + ["epithelial"] * nuclei_in_bar
    slide = make_slide(name, width=3000, height=3000, mpp=MPP)
    with RunWriter(engine, slide, lanes=lanes) as run:
        run.add("nucleus", nuclei, classes)
        run.add("gland", [SQUARE, BAR, ELL], ["gland", "gland", "surface-epi"])
        run.add("lumen", [LUMEN, STRAY_LUMEN], "lumen")
        run.add("tissue_region", [EPITHELIUM, STROMA], ["normal epithelium", "stroma"])
        slide_id = run.commit().slide_id
    if refresh_features:
        refresh(engine, slide_id)
    return slide_id


def gland_rows(engine, slide_id: int) -> list[dict]:
    """Gland features, smallest first (then left to right)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT * FROM gland_feature WHERE slide_id = :s ORDER BY area_um2, centroid_x_px"
            ),
            {"s": slide_id},
        ).mappings()
        return [dict(r) for r in rows]


def known_glands(engine, slide_id: int) -> dict[str, dict]:
    """The known slide's gland features by shape."""
    square, bar, ell = gland_rows(engine, slide_id)
    return {"square": square, "bar": bar, "ell": ell}


def slide_row(engine, slide_id: int) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT * FROM slide_feature WHERE slide_id = :s"), {"s": slide_id}
        ).mappings()
        return next((dict(r) for r in row), None)


def test_gland_shape_features_in_micrometres(engine):
    glands = known_glands(engine, load_known_slide(engine))
    square, bar, ell = glands["square"], glands["bar"], glands["ell"]
    assert square["area_um2"] == pytest.approx(100 * 100, **EXACT)
    assert square["perimeter_um"] == pytest.approx(400, **EXACT)
    assert square["circularity"] == pytest.approx(math.pi / 4, **EXACT)
    assert square["solidity"] == pytest.approx(1, **EXACT)
    # Axes: the longest chord (for a rectangle, its diagonal d) and the width across it (2wh/d).
    diagonal = math.hypot(100, 100)
    assert (square["major_axis_um"], square["minor_axis_um"]) == pytest.approx(
        (diagonal, diagonal), **EXACT
    )
    assert bar["area_um2"] == pytest.approx(200 * 50, **EXACT)
    diagonal = math.hypot(200, 50)
    assert (bar["major_axis_um"], bar["minor_axis_um"]) == pytest.approx(
        (diagonal, 2 * 200 * 50 / diagonal), **EXACT
    )
    assert bar["elongation"] == pytest.approx(diagonal**2 / (2 * 200 * 50), **EXACT)
    assert bar["circularity"] == pytest.approx(4 * math.pi * 10_000 / 500**2, **EXACT)
    # The L is three quarters of a square; its hull cuts the missing quarter's diagonal.
    assert ell["area_um2"] == pytest.approx(0.75 * 200 * 200, **EXACT)
    assert ell["solidity"] == pytest.approx(0.75 / 0.875, **EXACT)
    assert ell["gland_class"] == "surface-epi"


def test_axes_of_an_elliptic_gland_are_its_diameters(engine):
    ellipse = shapely.affinity.scale(shapely.Point(0, 0).buffer(1, quad_segs=64), 120, 40)
    ellipse = shapely.affinity.rotate(shapely.affinity.translate(ellipse, 500, 500), 30)
    with RunWriter(engine, make_slide("ellipse", width=1000, height=1000, mpp=MPP)) as run:
        run.add("gland", [ellipse], "gland")
        slide_id = run.commit().slide_id
    refresh(engine, slide_id)
    (row,) = gland_rows(engine, slide_id)
    # A 256-gon inscribed in the ellipse: its diameters fall short by less than 0.1 %.
    assert row["major_axis_um"] == pytest.approx(240 * MPP, rel=1e-3)
    assert row["minor_axis_um"] == pytest.approx(80 * MPP, rel=1e-3)
    assert row["elongation"] == pytest.approx(3, rel=1e-3)
    assert row["nearest_gland_distance_um"] is None and row["nuclei_count"] == 0


def test_nuclei_inside_a_gland_are_counted_measured_and_typed(engine):
    glands = known_glands(engine, load_known_slide(engine))
    square, bar = glands["square"], glands["bar"]
    assert square["nuclei_count"] == 5  # the straddling nucleus's centroid is outside
    assert square["nuclei_per_1000um2"] == pytest.approx(1000 * 5 / 10_000, **EXACT)
    assert square["nuclear_area_mean_um2"] == pytest.approx((1 + 4 + 9 + 16 + 25) / 5, **EXACT)
    assert square["nuclear_area_median_um2"] == pytest.approx(9, **EXACT)
    assert square["nuclei_by_class"] == {"epithelial": 3, "lymphocyte": 2}
    assert bar["nuclei_count"] == 0 and bar["nuclei_by_class"] == {}
    assert bar["nuclear_area_mean_um2"] is None and bar["nuclear_area_median_um2"] is None


def test_nuclei_and_lumina_inside_a_gland_are_read_from_the_centroid_index_alone(
    engine, monkeypatch
):
    # The probe of gland_features for the square, whose nuclei lie in two lanes' leaves;
    # index scans are forced because the planner would scan tables this small whole. The index
    # holds every column the probe reads and the loader's COPY FREEZE marked the pages
    # all-visible, so no heap page is read.
    monkeypatch.setattr(loader, "CHUNK_ROWS", 3)  # the square's nuclei: 3 in lane 0, 2 in lane 1
    slide_id = load_known_slide(engine, "covering", lanes=2)
    probe = """
        EXPLAIN (ANALYZE, FORMAT JSON)
        SELECT n.k, n.mean, n.classes, l.k, l.area
        FROM gland g
        CROSS JOIN LATERAL (
            SELECT count(*) AS k, avg(o.area_um2) AS mean, array_agg(o.class) AS classes
            FROM nucleus o WHERE o.slide_id = :s AND ST_Contains(g.geom, o.centroid)) n
        CROSS JOIN LATERAL (
            SELECT count(*) AS k, sum(o.area_um2) AS area
            FROM lumen o WHERE o.slide_id = :s AND ST_Contains(g.geom, o.centroid)) l
        WHERE g.slide_id = :s AND ST_Contains(g.geom, ST_Point(100, 100))  -- the square
    """
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        conn.execute(text("SET LOCAL enable_bitmapscan = off"))
        (plan,) = conn.execute(text(probe), {"s": slide_id}).scalar_one()

    def reads(node):  # the scans of nuclei or lumina that found some (one loop: the square)
        if node.get("Relation Name", "").startswith(("nucleus", "lumen")) and node["Actual Rows"]:
            yield node
        for child in node.get("Plans", []):
            yield from reads(child)

    found = list(reads(plan["Plan"]))
    leaves = {n["Relation Name"] for n in found}
    nuclei = sorted(leaf for leaf in leaves if leaf.startswith(f"nucleus_s{slide_id}_r"))
    assert [leaf[-3:] for leaf in nuclei] == ["_l0", "_l1"], leaves
    assert sum(n["Actual Rows"] for n in found if n["Relation Name"].startswith("nucleus")) == 5
    assert any(leaf.startswith("lumen") for leaf in leaves)
    for node in found:
        assert node["Node Type"] == "Index Only Scan", node["Relation Name"]
        assert "_centroid_" in node["Index Name"] and node["Heap Fetches"] == 0, node


def test_lumina_distances_and_tissue_under_each_gland(engine):
    glands = known_glands(engine, load_known_slide(engine))
    square, bar, ell = glands["square"], glands["bar"], glands["ell"]
    assert (square["lumen_count"], square["lumen_area_um2"]) == (1, pytest.approx(900, **EXACT))
    assert square["lumen_to_gland_area_ratio"] == pytest.approx(0.09, **EXACT)
    assert (bar["lumen_count"], bar["lumen_area_um2"], bar["lumen_to_gland_area_ratio"]) == (
        0,
        0,
        0,
    )
    # The square and the bar are 100 px (50 µm) apart; the L's nearest is the bar's corner.
    assert square["nearest_gland_distance_um"] == pytest.approx(50, **EXACT)
    assert bar["nearest_gland_distance_um"] == pytest.approx(50, **EXACT)
    assert ell["nearest_gland_distance_um"] == pytest.approx(math.hypot(1300, 1900) * MPP, **EXACT)
    assert (square["tissue_class"], bar["tissue_class"]) == (
        "normal epithelium",
        "normal epithelium",
    )
    assert ell["tissue_class"] == "stroma"


def test_the_nearest_gland_is_found_behind_a_nearer_box_and_touching_glands_are_0_apart(engine):
    target = shapely.box(0, 0, 100, 100)
    # An L whose box is 50 px from the target but whose nearest corner is (150, 300).
    ell = shapely.box(150, 0, 450, 400).difference(shapely.box(150, 0, 350, 300))
    below = shapely.box(0, 180, 100, 260)  # its box is 80 px away: farther, but nearer in fact
    left, right = shapely.box(1000, 1000, 1100, 1100), shapely.box(1100, 1000, 1200, 1100)
    with RunWriter(engine, make_slide("nearest", width=1500, height=1500, mpp=MPP)) as run:
        run.add("gland", [target, ell, below, left, right], "gland")
        slide_id = run.commit().slide_id
    refresh(engine, slide_id, lanes=2)
    by_gland = {
        name: row["nearest_gland_distance_um"]
        for name, row in zip(
            ("below", "target", "left", "right", "ell"), gland_rows(engine, slide_id), strict=True
        )
    }
    assert by_gland["target"] == pytest.approx(80 * MPP, **EXACT)
    assert by_gland["ell"] == pytest.approx(math.hypot(50, 40) * MPP, **EXACT)
    assert by_gland["below"] == pytest.approx(math.hypot(50, 40) * MPP, **EXACT)
    assert by_gland["left"] == 0 and by_gland["right"] == 0


def test_slide_features_summarise_objects_tissue_and_glands(engine):
    slide_id = load_known_slide(engine)
    row = slide_row(engine, slide_id)
    tissue = 3000 * 3000 * MPP**2
    glands = 10_000 + 10_000 + 30_000
    assert row["tissue_area_um2"] == pytest.approx(tissue, **EXACT)
    assert row["tissue_class_area_um2"] == pytest.approx(
        {"normal epithelium": 1000 * 1000 * MPP**2, "stroma": tissue - 1000 * 1000 * MPP**2},
        **EXACT,
    )
    assert (row["nucleus_count"], row["gland_count"], row["lumen_count"]) == (9, 3, 2)
    assert row["object_counts"] == {
        "nucleus": {"connective": 4, "epithelial": 3, "lymphocyte": 2},
        "gland": {"gland": 2, "surface-epi": 1},
        "lumen": {"lumen": 2},
        "tissue_region": {"normal epithelium": 1, "stroma": 1},
    }
    assert row["gland_area_um2"] == pytest.approx(glands, **EXACT)
    assert row["gland_area_fraction"] == pytest.approx(glands / tissue, **EXACT)
    assert row["lumen_area_fraction"] == pytest.approx(1000 / tissue, **EXACT)
    assert (row["nuclei_in_glands"], row["nuclei_in_stroma"]) == (5, 4)
    assert row["stroma_area_um2"] == pytest.approx(tissue - glands, **EXACT)
    assert row["nuclei_per_1000um2_in_glands"] == pytest.approx(1000 * 5 / glands, **EXACT)
    assert row["nuclei_per_1000um2_in_stroma"] == pytest.approx(
        1000 * 4 / (tissue - glands), **EXACT
    )
    area = row["gland_feature_quantiles"]["area_um2"]
    assert area["q50"] == pytest.approx(10_000, **EXACT)
    assert area["mean"] == pytest.approx(glands / 3, **EXACT)
    assert area["q05"] == pytest.approx(10_000, **EXACT) and area["q95"] == pytest.approx(
        10_000 + 0.9 * 20_000, **EXACT
    )
    assert set(row["gland_feature_quantiles"]) >= {"solidity", "nuclei_count", "elongation"}


def test_sql_refresh_and_shared_refresh_agree(engine):
    slide_id = load_known_slide(engine)
    before = gland_rows(engine, slide_id)
    with engine.begin() as conn:
        conn.execute(text("SELECT refresh_slide_features(:s)"), {"s": slide_id})
    assert gland_rows(engine, slide_id) == before
    refresh(engine, slide_id, lanes=3)
    assert gland_rows(engine, slide_id) == before


def test_features_are_the_same_whatever_the_load_layout(engine):
    """One lane stores the slide as plain tables (the Citus layout), more as sub-partitions."""
    ignored = {"gland_id", "run_id", "gland_uuid", "computed_at"}

    def measured(lanes: int) -> tuple[list[dict], dict]:
        slide_id = load_known_slide(engine, lanes=lanes)
        glands = [
            {k: v for k, v in r.items() if k not in ignored} for r in gland_rows(engine, slide_id)
        ]
        return glands, {k: v for k, v in slide_row(engine, slide_id).items() if k not in ignored}

    flat = measured(1)
    assert measured(3) == flat and len(flat[0]) == 3
    assert measured(1) == flat


def test_a_new_run_drops_stale_features_until_refreshed(engine):
    slide_id = load_known_slide(engine, nuclei_in_bar=0)
    first = slide_row(engine, slide_id)
    with RunWriter(engine, make_slide("known", width=3000, height=3000, mpp=MPP)) as run:
        run.add("gland", [SQUARE, BAR], "gland")
        run.add("nucleus", [shapely.box(400, 40, 404, 44)], "epithelial")
        second_run = run.commit().run_id
    assert slide_row(engine, slide_id) is None  # old features went with the old run
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM gland_feature")).scalar() == 0
    refresh(engine, slide_id)
    second = slide_row(engine, slide_id)
    assert second["run_id"] == second_run != first["run_id"]
    assert (second["gland_count"], second["nuclei_in_glands"]) == (2, 1)
    assert second["tissue_area_um2"] == 0 and second["gland_area_fraction"] is None
    square, bar = gland_rows(engine, slide_id)
    assert (square["nuclei_count"], bar["nuclei_count"]) == (0, 1)
    assert bar["tissue_class"] is None and bar["run_id"] == second_run


def test_nucleus_features_on_demand(engine):
    slide_id = load_known_slide(engine)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM nucleus_features(:s, 10) ORDER BY centroid_x_px, centroid_y_px"),
            {"s": slide_id},
        ).mappings()
        rows = {(round(r["centroid_x_px"]), round(r["centroid_y_px"])): dict(r) for r in rows}
        square_id = conn.execute(
            text("SELECT id FROM gland WHERE slide_id = :s AND ST_XMin(geom) = 0"),
            {"s": slide_id},
        ).scalar()
    assert len(rows) == 9
    first = rows[(21, 31)]  # the 2 px nucleus, 21 px from the square's left edge
    assert first["gland_id"] == square_id and first["tissue_class"] == "normal epithelium"
    assert first["distance_to_gland_boundary_um"] == pytest.approx(21 * MPP, **EXACT)
    straddling = rows[(203, 55)]
    assert straddling["gland_id"] is None
    assert straddling["distance_to_gland_boundary_um"] == pytest.approx(3 * MPP, **EXACT)
    # Stromal pair 10 px (5 µm) apart: neighbours of each other within 10 µm; the third is alone.
    assert rows[(1003, 1003)]["neighbours_within_radius"] == 1
    assert rows[(1013, 1003)]["neighbours_within_radius"] == 1
    assert rows[(2603, 2603)]["neighbours_within_radius"] == 0
    assert rows[(2603, 2603)]["tissue_class"] == "stroma"
    # The nuclei in the square are 21 px (10.5 µm) apart: just outside the radius.
    assert rows[(42, 32)]["neighbours_within_radius"] == 0
    assert {r["radius_um"] for r in rows.values()} == {10}


def test_gland_and_slide_exports_read_back(engine, tmp_path):
    slide_id = load_known_slide(engine)
    csv = feature_export.export(engine, "gland", "csv", tmp_path / "g.csv", [slide_id])
    table = pd.read_csv(csv.path)
    assert csv.rows == len(table) == 3
    assert list(table.columns[:4]) == ["slide_id", "slide_name", "run_id", "gland_id"]
    square = table.sort_values("area_um2").iloc[0]
    assert (square["nuclei_count_epithelial"], square["nuclei_count_lymphocyte"]) == (3, 2)
    assert square["circularity"] == pytest.approx(math.pi / 4, **EXACT)

    geo = feature_export.export(engine, "gland", "geoparquet", tmp_path / "g.parquet", [slide_id])
    frame = gpd.read_parquet(geo.path)
    assert len(frame) == 3 and frame.crs is None
    assert shapely.equals(frame.sort_values("area_um2").geometry.iloc[0], SQUARE)
    assert frame["gland_uuid"].str.len().eq(36).all()

    slide = feature_export.export(engine, "slide", "parquet", tmp_path / "s.parquet", [slide_id])
    summary = pd.read_parquet(slide.path).iloc[0]
    assert summary["nucleus_count_connective"] == 4
    assert summary["tissue_area_um2_stroma"] == pytest.approx(2_000_000, **EXACT)
    assert summary["gland_area_um2_q50"] == pytest.approx(10_000, **EXACT)
    assert summary["mpp_x"] == MPP
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.csv", "g.parquet", "s.parquet"]


def test_nucleus_export_streams_every_nucleus_with_its_geometry(engine, tmp_path):
    slide_id = load_known_slide(engine)
    out = feature_export.export(
        engine, "nucleus", "geoparquet", tmp_path / "n.parquet", [slide_id], radius_um=10
    )
    frame = gpd.read_parquet(out.path)
    assert len(frame) == out.rows == 9
    assert frame["gland_id"].notna().sum() == 5
    inside = frame[frame["gland_id"].notna()]
    assert inside.geometry.centroid.within(SQUARE).all()


def test_a_failed_export_leaves_nothing_behind(engine, tmp_path, monkeypatch):
    slide_id = load_known_slide(engine)
    (tmp_path / "g.csv").write_text("previous export\n")

    def broken(raw, queries, path):
        path.write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(feature_export, "_write_csv", broken)
    with pytest.raises(RuntimeError):
        feature_export.export(engine, "gland", "csv", tmp_path / "g.csv", [slide_id])
    assert [p.name for p in tmp_path.iterdir()] == ["g.csv"]
    assert (tmp_path / "g.csv").read_text() == "previous export\n"
    with pytest.raises(UserError, match="no geometry"):
        feature_export.export(engine, "slide", "geoparquet", tmp_path / "s.parquet", [slide_id])


def test_features_commands(engine, cli_env, tmp_path):
    slide_id = load_known_slide(engine, name="cli-slide")
    refreshed = spatialdb("features", "refresh", env=cli_env)
    assert refreshed.returncode == 0, refreshed.stderr
    assert f"slide {slide_id} (cli-slide): features of 3 glands, 9 nuclei" in refreshed.stdout

    out = tmp_path / "slides.csv"
    exported = spatialdb(
        "features",
        "export",
        "--level",
        "slide",
        "--slide",
        "cli-slide",
        "-o",
        str(out),
        env=cli_env,
    )
    assert exported.returncode == 0, exported.stderr
    assert f"{out}: 1 rows" in exported.stdout
    assert pd.read_csv(out)["gland_count"].tolist() == [3]

    missing = spatialdb("features", "refresh", "no-such-slide", env=cli_env)
    assert_one_error_line(missing, "no slide matches 'no-such-slide'")
    geo = spatialdb("features", "export", "--level", "slide", "--format", "geoparquet", env=cli_env)
    assert_one_error_line(geo, "no geometry")
    nowhere = spatialdb(
        "features", "export", "--level", "gland", "-o", str(tmp_path / "no" / "g.csv"), env=cli_env
    )
    assert_one_error_line(nowhere, "no such directory")

    with RunWriter(engine, make_slide("cli-slide", width=3000, height=3000, mpp=MPP)) as run:
        run.add("gland", [SQUARE], "gland")
        run.commit()  # a new run without a refresh: its features are missing
    stale = spatialdb("features", "export", "--level", "gland", "--slide", "cli-slide", env=cli_env)
    assert_one_error_line(stale, "has no current features", "spatialdb features refresh")
