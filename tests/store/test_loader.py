"""The bulk loader: what goes in comes back, runs replace each other atomically, bad shapes are
repaired or dropped, and an interrupted load leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
import shapely
from sqlalchemy import text

from spatialdb.store import loader
from spatialdb.store.catalog import ModelRecord
from spatialdb.store.loader import RunWriter, sweep_orphans
from tests.conftest import blobs, make_slide

MODEL = ModelRecord("test-model", "cpu", "hash-1", {"nucleus": ["a", "b"]}, 0.5, {"note": "t"})


def load(engine, slide, objects: dict, **kwargs):
    with RunWriter(engine, slide, model=MODEL, **kwargs) as run:
        for table, (geoms, classes, *rest) in objects.items():
            run.add(table, geoms, classes, *rest)
        return run.commit()


def fetch(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(sql), params).mappings().all()


def test_round_trip_keeps_geometry_measurements_classes_and_uuids(engine):
    slide = make_slide(mpp=0.25)
    nuclei = blobs(500)
    classes = np.where(np.arange(500) % 3 == 0, "lymphocyte", "epithelial")
    probability = np.linspace(0.1, 0.9, 500)
    probability[::7] = np.nan
    uuids = [uuid.uuid4() for _ in range(500)]
    donut = shapely.box(0, 0, 400, 300).difference(shapely.box(100, 100, 200, 200))
    tissue = shapely.MultiPolygon([shapely.box(0, 0, 50, 50), shapely.box(100, 0, 150, 80)])
    result = load(
        engine,
        slide,
        {
            "nucleus": (nuclei, classes, probability, uuids),
            "gland": ([donut], "benign"),
            "tissue_region": ([tissue, shapely.box(500, 500, 600, 600)], ["stroma", "muscle"]),
        },
    )
    assert result.object_counts["nucleus"] == {"epithelial": 333, "lymphocyte": 167}
    assert result.total("gland") == 1 and result.total("tissue_region") == 2

    rows = fetch(
        engine,
        "SELECT uuid, class, probability, area_um2, perimeter_um, ST_AsBinary(geom) AS wkb, "
        "ST_X(centroid) AS cx, ST_Y(centroid) AS cy, run_id, slide_id FROM nucleus",
    )
    assert len(rows) == 500
    by_uuid = {row["uuid"]: row for row in rows}
    for i in [0, 1, 7, 250, 499]:
        row = by_uuid[uuids[i]]
        stored = shapely.from_wkb(bytes(row["wkb"]))
        assert shapely.equals_exact(stored, nuclei[i], tolerance=0)
        assert row["class"] == classes[i]
        if np.isnan(probability[i]):
            assert row["probability"] is None
        else:
            assert row["probability"] == pytest.approx(probability[i], rel=1e-6)
        assert row["area_um2"] == pytest.approx(nuclei[i].area * 0.25**2, rel=1e-9)
        assert row["perimeter_um"] == pytest.approx(nuclei[i].length * 0.25, rel=1e-9)
        assert row["cx"] == pytest.approx(nuclei[i].centroid.x, rel=1e-9)
        assert row["cy"] == pytest.approx(nuclei[i].centroid.y, rel=1e-9)
        assert (row["run_id"], row["slide_id"]) == (result.run_id, result.slide_id)

    (gland,) = fetch(engine, "SELECT area_um2, perimeter_um, ST_AsBinary(geom) AS wkb FROM gland")
    assert shapely.equals_exact(shapely.from_wkb(bytes(gland["wkb"])), donut, tolerance=0)
    assert gland["area_um2"] == pytest.approx(donut.area * 0.0625, rel=1e-9)
    assert gland["perimeter_um"] == pytest.approx(donut.length * 0.25, rel=1e-9)
    tissue_rows = fetch(
        engine, "SELECT class, GeometryType(geom) AS kind, area_um2 FROM tissue_region ORDER BY 1"
    )
    assert [(r["class"], r["kind"]) for r in tissue_rows] == [
        ("muscle", "MULTIPOLYGON"),
        ("stroma", "MULTIPOLYGON"),
    ]
    assert tissue_rows[1]["area_um2"] == pytest.approx(tissue.area * 0.0625, rel=1e-9)


def test_anisotropic_pixels_are_measured_in_micrometres(engine):
    slide = make_slide()
    slide.mpp_x, slide.mpp_y = 0.5, 0.25
    load(engine, slide, {"gland": ([shapely.box(0, 0, 100, 40)], "benign")})
    (row,) = fetch(engine, "SELECT area_um2, perimeter_um FROM gland")
    assert row["area_um2"] == pytest.approx(100 * 0.5 * 40 * 0.25)
    assert row["perimeter_um"] == pytest.approx(2 * (100 * 0.5 + 40 * 0.25))


def test_objects_spread_over_lanes_get_unique_ids(engine, monkeypatch):
    monkeypatch.setattr(loader, "CHUNK_ROWS", 100)
    result = load(engine, make_slide(), {"nucleus": (blobs(1_000), "a")}, lanes=3)
    assert result.total("nucleus") == 1_000
    (row,) = fetch(
        engine,
        "SELECT count(*) AS n, count(DISTINCT id) AS ids, count(DISTINCT uuid) AS uuids, "
        "count(DISTINCT tableoid) AS leaves FROM nucleus",
    )
    assert (row["n"], row["ids"], row["uuids"], row["leaves"]) == (1_000, 1_000, 1_000, 3)


def test_leaves_carry_the_spatial_and_class_indexes(engine):
    load(engine, make_slide(), {"nucleus": (blobs(50), "a")}, lanes=2)
    definitions = [
        r["indexdef"]
        for r in fetch(engine, "SELECT indexdef FROM pg_indexes WHERE tablename LIKE 'nucleus_s%'")
    ]
    for lane in (0, 1):
        mine = [d for d in definitions if f"_l{lane} " in d]
        assert any("USING gist (geom)" in d for d in mine)
        # One centroid index, attached as the parent's (an unmatched one would be built again).
        (centroid,) = [d for d in mine if "USING gist (centroid)" in d]
        assert centroid.endswith("INCLUDE (slide_id, class, area_um2, centroid)")
        assert any("(slide_id, class)" in d for d in mine)


def slide_partitions(engine) -> dict[str, tuple[str, list[str]]]:
    """Each object table's slide partitions: name -> (relkind, its own partitions)."""
    rows = fetch(
        engine,
        "SELECT c.relname, c.relkind, coalesce(array_agg(l.relname::text ORDER BY l.relname) "
        "FILTER (WHERE l.relname IS NOT NULL), '{}') AS leaves "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "LEFT JOIN pg_inherits li ON li.inhparent = c.oid "
        "LEFT JOIN pg_class l ON l.oid = li.inhrelid "
        "WHERE i.inhparent = 'nucleus'::regclass GROUP BY 1, 2",
    )
    return {r["relname"]: (r["relkind"], r["leaves"]) for r in rows}


def test_one_lane_attaches_a_plain_table_and_layouts_replace_each_other(engine):
    slide = make_slide()
    first = load(engine, slide, {"nucleus": (blobs(200, seed=1), "a")}, lanes=1)
    flat = f"nucleus_s{first.slide_id}_r{first.run_id}_l0"
    assert slide_partitions(engine) == {flat: ("r", [])}
    second = load(engine, slide, {"nucleus": (blobs(300, seed=2), "b")}, lanes=2)
    nested = f"nucleus_s{second.slide_id}_r{second.run_id}"
    assert slide_partitions(engine) == {nested: ("p", [f"{nested}_l0", f"{nested}_l1"])}
    third = load(engine, slide, {"nucleus": (blobs(100, seed=3), "c")}, lanes=1)
    assert list(slide_partitions(engine)) == [f"nucleus_s{third.slide_id}_r{third.run_id}_l0"]
    (row,) = fetch(engine, "SELECT count(*) AS n, min(class) AS c, max(run_id) AS r FROM nucleus")
    assert (row["n"], row["c"], row["r"]) == (100, "c", third.run_id)
    assert (
        fetch(engine, "SELECT count(*) AS n FROM pg_class WHERE relname ~ '_r[0-9]+_l1$'")[0]["n"]
        == 0
    )


def test_new_run_replaces_the_old_one_atomically(engine):
    slide = make_slide()
    first = load(
        engine,
        slide,
        {"nucleus": (blobs(300, seed=1), "a"), "gland": ([shapely.box(0, 0, 9, 9)], "g")},
    )
    second = load(engine, slide, {"nucleus": (blobs(120, seed=2), "b")})
    assert second.slide_id == first.slide_id and second.run_id != first.run_id
    counts = fetch(engine, "SELECT run_id, class, count(*) AS n FROM nucleus GROUP BY 1, 2")
    assert [dict(r) for r in counts] == [{"run_id": second.run_id, "class": "b", "n": 120}]
    assert fetch(engine, "SELECT count(*) AS n FROM gland")[0]["n"] == 0
    runs = fetch(engine, "SELECT id, status FROM run ORDER BY id")
    assert [(r["id"], r["status"]) for r in runs] == [
        (first.run_id, "superseded"),
        (second.run_id, "complete"),
    ]
    (slide_row,) = fetch(engine, "SELECT current_run_id, status FROM slide")
    assert (slide_row["current_run_id"], slide_row["status"]) == (second.run_id, "ready")
    # Only the new run's tables remain (no leftovers of the first run).
    tables = {
        r["relname"]
        for r in fetch(engine, "SELECT relname FROM pg_class WHERE relname ~ '_r[0-9]+'")
    }
    assert not any(f"_r{first.run_id}" in t for t in tables)


def test_failed_load_leaves_previous_run_and_nothing_else(engine):
    slide = make_slide()
    first = load(engine, slide, {"nucleus": (blobs(200), "a")})
    tables_before = fetch(engine, "SELECT count(*) AS n FROM pg_class")[0]["n"]
    with pytest.raises(RuntimeError, match="boom"), RunWriter(engine, slide, lanes=2) as run:
        run.add("nucleus", blobs(500, seed=3), "b")
        raise RuntimeError("boom")
    assert fetch(engine, "SELECT DISTINCT run_id, class FROM nucleus") == [
        {"run_id": first.run_id, "class": "a"}
    ]
    assert [r["id"] for r in fetch(engine, "SELECT id FROM run")] == [first.run_id]
    assert fetch(engine, "SELECT count(*) AS n FROM pg_class")[0]["n"] == tables_before


def test_failure_during_the_swap_drops_the_committed_lanes(engine, monkeypatch):
    slide = make_slide()
    tables_before = fetch(engine, "SELECT count(*) AS n FROM pg_class")[0]["n"]

    def broken_assemble(self, cur, table, partition):
        raise RuntimeError("swap failed")

    monkeypatch.setattr(RunWriter, "_assemble", broken_assemble)
    with pytest.raises(RuntimeError, match="swap failed"), RunWriter(engine, slide, lanes=2) as run:
        run.add("nucleus", blobs(100), "a")
        run.commit()
    assert fetch(engine, "SELECT count(*) AS n FROM pg_class")[0]["n"] == tables_before
    assert fetch(engine, "SELECT count(*) AS n FROM slide")[0]["n"] == 0


def test_invalid_shapes_are_repaired_or_dropped_and_counted(engine):
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    spike = shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10), (0, 0), (-5, 5), (0, 0)])
    flat = shapely.Polygon([(0, 0), (10, 0), (20, 0)])
    geoms = [
        bowtie,
        spike,
        flat,
        shapely.Polygon(),
        shapely.LineString([(0, 0), (5, 5)]),
        shapely.box(0, 0, 3, 3),
    ]
    result = load(engine, make_slide(), {"nucleus": (geoms, "a")})
    assert result.total("nucleus") == 3
    assert result.repaired >= 2 and result.dropped == 3
    rows = fetch(
        engine, "SELECT ST_IsValid(geom) AS ok, GeometryType(geom) AS kind, area_um2 FROM nucleus"
    )
    assert all(r["ok"] and r["kind"] == "POLYGON" and r["area_um2"] > 0 for r in rows)
    (report,) = fetch(engine, "SELECT load_report FROM run")
    assert report["load_report"] == {"repaired": result.repaired, "dropped": 3}


def test_bad_arguments_are_rejected_before_anything_is_written(engine):
    with (
        pytest.raises(ValueError, match="unknown object table"),
        RunWriter(engine, make_slide()) as run,
    ):
        run.add("cells", blobs(3), "a")
    with (
        pytest.raises(ValueError, match="one per geometry"),
        RunWriter(engine, make_slide()) as run,
    ):
        run.add("nucleus", blobs(3), ["a", "b"])
    with pytest.raises(ValueError, match="non-empty"), RunWriter(engine, make_slide()) as run:
        run.add("nucleus", blobs(2), ["a", ""])
    assert fetch(engine, "SELECT count(*) AS n FROM slide")[0]["n"] == 0


KILLED_LOADER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from spatialdb.store.db import connect
    from spatialdb.store.loader import RunWriter
    from tests.conftest import blobs, make_slide

    stage = sys.argv[2]
    if stage == "swap":  # stop inside the window where the lanes have committed
        def _wait(self, *args):
            print("SWAPPING", flush=True)
            time.sleep(600)
        RunWriter._assemble = _wait
    engine = connect(sys.argv[1], migrate=False)
    with RunWriter(engine, make_slide(), lanes=2) as run:
        run.add("nucleus", blobs(30_000, seed=9), "new")
        if stage == "loaded":
            print("LOADED", flush=True)
            time.sleep(600)
        run.commit()
    """
)


@pytest.mark.parametrize("stage", ["loaded", "swap"])
def test_process_killed_mid_load_leaves_nothing(engine, db_url, tmp_path, stage):
    slide = make_slide()
    previous = load(engine, slide, {"nucleus": (blobs(100), "old")})
    tables_before = {r["relname"] for r in fetch(engine, "SELECT relname FROM pg_class")}
    script = tmp_path / "load.py"
    script.write_text(KILLED_LOADER)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, str(script), db_url, stage], stdout=subprocess.PIPE, text=True, env=env
    )
    marker = proc.stdout.readline().strip()
    assert marker in ("LOADED", "SWAPPING")
    proc.kill()
    proc.wait()
    time.sleep(0.5)  # let the server notice the dead client and roll back

    assert fetch(engine, "SELECT DISTINCT run_id, class FROM nucleus") == [
        {"run_id": previous.run_id, "class": "old"}
    ]
    assert [r["id"] for r in fetch(engine, "SELECT id FROM run")] == [previous.run_id]
    with engine.begin() as conn:
        swept = sweep_orphans(conn.connection.cursor())
    assert bool(swept) == (stage == "swap")  # committed lanes are orphans until swept
    tables_after = {r["relname"] for r in fetch(engine, "SELECT relname FROM pg_class")}
    assert tables_after == tables_before
    # And a re-run completes.
    rerun = load(engine, slide, {"nucleus": (blobs(50), "new")})
    assert (
        fetch(engine, "SELECT count(*) AS n FROM nucleus WHERE run_id = :r", r=rerun.run_id)[0]["n"]
        == 50
    )


def test_optional_measurements_are_stored_and_nan_is_null(engine):
    nuclei = blobs(300, seed=5)
    mean = np.linspace(0.1, 0.9, 300)
    ring = mean * 2
    ring[::4] = np.nan  # e.g. a nucleus walled in by others has no cytoplasm ring
    result = load(
        engine,
        make_slide("measured"),
        {
            "nucleus": (
                nuclei,
                "epithelial",
                None,
                None,
                {"haematoxylin_od_mean": mean, "cytoplasm_haematoxylin_od_mean": ring},
            )
        },
    )
    rows = fetch(
        engine,
        "SELECT haematoxylin_od_mean AS h, cytoplasm_haematoxylin_od_mean AS ring, eosin_od_mean "
        "AS e, ST_AsBinary(geom) AS wkb FROM nucleus WHERE slide_id = :s",
        s=result.slide_id,
    )
    assert len(rows) == 300
    for row in rows:
        i = next(k for k in range(300) if mean[k] == pytest.approx(row["h"], abs=1e-12))
        assert shapely.equals_exact(shapely.from_wkb(bytes(row["wkb"])), nuclei[i], tolerance=0)
        assert row["ring"] is None if np.isnan(ring[i]) else row["ring"] == ring[i]
        assert row["e"] is None  # not given: empty
    with pytest.raises(ValueError, match="no measurement columns"):
        load(engine, make_slide("bad"), {"gland": (nuclei[:2], "gland", None, None, {"x": [1, 2]})})
