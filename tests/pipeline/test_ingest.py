"""`spatialdb ingest`, end to end against a real PostGIS: the bundled sample slide, generated
pyramidal BigTIFFs, idempotence, and every kind of bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import shapely
from sqlalchemy import text

from spatialdb.errors import UserError
from spatialdb.pipeline.ingest import ingest_slide
from spatialdb.pipeline.slides import slide_paths
from spatialdb.store.catalog import delete_slide
from tests.slides import SAMPLE, tissue_image, write_pyramid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    from inference import weights
    from inference.engine import CerberusModel

    net, info = weights.load()
    return CerberusModel(net, info), weights.DEFAULT_WEIGHTS


@pytest.fixture(scope="module")
def sample(session_engine, model):
    """The sample slide, ingested once for the module."""
    outcome = ingest_slide(session_engine, SAMPLE, model, workers=2)
    yield outcome
    # Tests using the `engine` fixture may already have emptied the database.
    if scalar(session_engine, "SELECT count(*) FROM slide WHERE id = :s", s=outcome.slide_id):
        delete_slide(session_engine, outcome.slide_id)
    with session_engine.begin() as conn:
        conn.execute(text("DELETE FROM model"))


def scalar(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).scalar_one()


def test_sample_slide_gives_valid_objects_inside_the_slide(session_engine, sample):
    assert sample.status == "ingested"
    for table in ("nucleus", "gland", "lumen", "tissue_region"):
        assert sum(sample.counts[table].values()) > 0, table
    slide = dict(
        session_engine.connect()
        .execute(text("SELECT * FROM slide WHERE id = :id"), {"id": sample.slide_id})
        .mappings()
        .one()
    )
    assert (slide["width"], slide["height"], slide["mpp_x"]) == (2220, 2967, 0.499)
    for table in ("nucleus", "gland", "lumen", "tissue_region"):
        bad = scalar(
            session_engine,
            f"SELECT count(*) FROM {table} WHERE slide_id = :s AND NOT (ST_IsValid(geom) "
            "AND ST_Within(geom, ST_MakeEnvelope(0, 0, :w, :h)))",
            s=sample.slide_id,
            w=slide["width"],
            h=slide["height"],
        )
        assert bad == 0, table
    # Nuclear areas of real nuclei at 20x: a median of some tens of µm².
    median = scalar(
        session_engine,
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY area_um2) FROM nucleus "
        "WHERE slide_id = :s",
        s=sample.slide_id,
    )
    assert 10 < median < 120


def test_nuclei_carry_their_stain_intensity_from_the_slides_pixels(session_engine, sample):
    """(Before the tests that empty the database.) Every segmented nucleus has its haematoxylin
    and eosin density, nuclei are darker in haematoxylin than the cytoplasm around them, and a
    few nuclei measured again from the slide (read at the model's resolution, the polygon
    rasterised, scikit-image's rgb2hed) agree."""
    from skimage.color import rgb2hed
    from skimage.draw import polygon as raster_polygon

    from inference.slide import open_slide
    from tests.slides import SAMPLE

    with session_engine.connect() as conn:
        rows = (
            conn.execute(
                text(
                    "SELECT ST_AsBinary(geom) AS wkb, area_um2, haematoxylin_od_mean AS h, "
                    "haematoxylin_od_q50 AS h50, eosin_od_mean AS e, "
                    "cytoplasm_haematoxylin_od_mean AS ring_h, cytoplasm_eosin_od_mean AS ring_e "
                    "FROM nucleus WHERE slide_id = :s ORDER BY id"
                ),
                {"s": sample.slide_id},
            )
            .mappings()
            .all()
        )
    assert rows and all(r["h"] is not None and r["h50"] is not None for r in rows)
    ringed = [r for r in rows if r["ring_h"] is not None]
    assert len(ringed) > 0.9 * len(rows)
    assert np.median([r["h"] - r["ring_h"] for r in ringed]) > 0.05
    assert np.median([r["e"] - r["h"] for r in rows]) < np.median(
        [r["ring_e"] - r["ring_h"] for r in ringed]
    )
    reader = open_slide(SAMPLE)
    scale = 0.5 / reader.info.mpp[0]  # level-0 px per model px
    big = sorted(rows, key=lambda r: -r["area_um2"])[:5]
    for row in big:
        nucleus = shapely.from_wkb(bytes(row["wkb"]))
        x0, y0, x1, y1 = nucleus.bounds
        patch = reader.read_bounds(
            (int(x0) - 8, int(y0) - 8, int(x1) + 8, int(y1) + 8), resolution=0.5, units="mpp"
        )[..., :3]
        xy = (np.asarray(nucleus.exterior.coords) - (int(x0) - 8, int(y0) - 8)) / scale - 0.5
        rr, cc = raster_polygon(xy[:, 1], xy[:, 0], patch.shape[:2])
        h = rgb2hed(patch)[rr, cc, 0] * 6
        assert row["h"] == pytest.approx(h.mean(), rel=0.1), row


@pytest.mark.parametrize("table", ["nucleus", "gland", "lumen"])
def test_no_object_comes_out_twice_across_tile_borders(session_engine, sample, table):
    duplicates = scalar(
        session_engine,
        f"SELECT count(*) FROM {table} a JOIN {table} b ON a.slide_id = b.slide_id "
        "AND a.id < b.id AND ST_Intersects(a.geom, b.geom) "
        "WHERE a.slide_id = :s AND ST_Area(ST_Intersection(a.geom, b.geom)) "
        "> 0.3 * LEAST(ST_Area(a.geom), ST_Area(b.geom))",
        s=sample.slide_id,
    )
    assert duplicates == 0


def test_the_same_content_and_model_is_skipped(session_engine, sample, model, tmp_path):
    again = ingest_slide(session_engine, SAMPLE, model)
    assert again.status == "skipped" and again.slide_id == sample.slide_id
    copy = tmp_path / "copy.svs"
    copy.write_bytes(SAMPLE.read_bytes())
    moved = ingest_slide(session_engine, copy, model)
    assert moved.status == "skipped" and str(SAMPLE.resolve()) in moved.message


def test_bigtiff_pyramid_ingests_and_force_replaces_the_run(engine, model, tmp_path):
    path = write_pyramid(tmp_path / "synthetic.tiff", tissue_image(1200, 1600), mpp=0.5)
    first = ingest_slide(engine, path, model, workers=0)
    assert first.status == "ingested" and sum(first.counts["nucleus"].values()) > 0
    # Tissue regions lie on the tissue block (the middle two thirds), not on the glass.
    outside = scalar(
        engine,
        "SELECT ST_Area(ST_Difference(ST_Union(geom), ST_MakeEnvelope(:x0, :y0, :x1, :y1))) "
        "/ ST_Area(ST_Union(geom)) FROM tissue_region WHERE slide_id = :s",
        s=first.slide_id,
        x0=1600 / 6 - 40,
        y0=1200 / 6 - 40,
        x1=1600 * 5 / 6 + 40,
        y1=1200 * 5 / 6 + 40,
    )
    assert outside < 0.05
    assert ingest_slide(engine, path, model).status == "skipped"

    forced = ingest_slide(engine, path, model, force=True, workers=0)
    assert forced.slide_id == first.slide_id and forced.counts == first.counts
    runs = engine.connect().execute(
        text("SELECT status, count(*) FROM run WHERE slide_id = :s GROUP BY status"),
        {"s": first.slide_id},
    )
    assert dict(runs.all()) == {"complete": 1, "superseded": 1}
    stored = scalar(engine, "SELECT count(*) FROM nucleus WHERE slide_id = :s", s=first.slide_id)
    assert stored == sum(first.counts["nucleus"].values())


def test_a_slide_without_tissue_succeeds_with_zero_objects(engine, model, tmp_path):
    blank = write_pyramid(tmp_path / "blank.tiff", np.full((900, 900, 3), 244, np.uint8), 0.5)
    outcome = ingest_slide(engine, blank, model)
    assert outcome.status == "ingested" and "no tissue" in outcome.message
    assert all(not classes for classes in outcome.counts.values())
    assert scalar(engine, "SELECT status FROM slide WHERE id = :s", s=outcome.slide_id) == "ready"


def test_a_slide_that_breaks_during_inference_leaves_nothing(engine, model, tmp_path):
    path = write_pyramid(tmp_path / "cut.tiff", tissue_image(2048, 2048), mpp=0.5)
    data = path.read_bytes()
    # Zero the middle of level 0's tile data: the file opens, its tiles fail to decode.
    path.write_bytes(data[:20_000] + bytes(len(data) // 3) + data[20_000 + len(data) // 3 :])
    with pytest.raises(Exception):  # noqa: B017 - whatever the decoder raises
        ingest_slide(engine, path, model, workers=0)
    assert scalar(engine, "SELECT count(*) FROM slide") == 0
    assert scalar(engine, "SELECT count(*) FROM nucleus") == 0


def test_slide_paths_expand_directories_and_globs(tmp_path):
    for name in ("a.svs", "b.tiff", "notes.txt", "sub/c.ndpi"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = slide_paths((str(tmp_path), str(tmp_path / "*.svs"), "missing.svs"))
    names = [p.name for p in found]
    assert names == ["a.svs", "b.tiff", "c.ndpi", "missing.svs"]


def test_no_mpp_is_an_error_unless_given(engine, model, tmp_path):
    path = write_pyramid(tmp_path / "nompp.tiff", np.full((600, 600, 3), 244, np.uint8), None)
    with pytest.raises(UserError, match="give it with --mpp"):
        ingest_slide(engine, path, model)
    assert ingest_slide(engine, path, model, mpp=0.5).status == "ingested"


def spatialdb(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "spatialdb", *args], capture_output=True, text=True, env=env
    )


def test_bad_inputs_fail_one_line_each_and_the_rest_go_on(engine, cli_env, tmp_path):
    not_slide = tmp_path / "notes.svs"
    not_slide.write_text("this is not a slide\n")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(SAMPLE.read_bytes()[:400_000])
    no_mpp = write_pyramid(tmp_path / "nompp.tiff", np.full((600, 600, 3), 244, np.uint8), None)
    blank = write_pyramid(tmp_path / "blank.tiff", np.full((600, 600, 3), 244, np.uint8), 0.5)
    args = (tmp_path / "missing.svs", not_slide, truncated, no_mpp, blank)
    result = spatialdb("ingest", *map(str, args), env=cli_env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("spatialdb: error")]
    assert errors[0].endswith("missing.svs: no such file")
    assert "notes.svs: not a readable slide" in errors[1]
    assert "truncated.svs: not a readable slide" in errors[2]
    assert "nompp.tiff: the file records no resolution" in errors[3]
    assert errors[4] == "spatialdb: error: 4 of 5 slide(s) failed"
    assert "blank.tiff: slide" in result.stdout and "no tissue found" in result.stdout
    assert scalar(engine, "SELECT count(*) FROM slide") == 1


def test_an_unreachable_database_is_one_line(cli_env):
    result = spatialdb(
        "--db-url", "postgresql://someone@127.0.0.1:9/none", "ingest", str(SAMPLE), env=cli_env
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("spatialdb: error: cannot use the database at")
    assert len(result.stderr.strip().splitlines()) == 1


def test_several_slides_in_flight_store_each_once(engine, model, tmp_path):
    from spatialdb.pipeline.ingest import ingest_many

    paths = [
        write_pyramid(tmp_path / f"s{k}.tiff", tissue_image(700, 900, seed=k), 0.5)
        for k in range(3)
    ]
    copy = tmp_path / "copy.tiff"
    copy.write_bytes(paths[0].read_bytes())  # the same content: skipped, not stored twice
    outcomes = dict(ingest_many(engine, [*paths, copy], model, jobs=2, workers=1))
    assert sorted(outcomes) == [0, 1, 2, 3]
    assert [outcomes[k].status for k in range(4)] == ["ingested"] * 3 + ["skipped"]
    assert outcomes[3].slide_id == outcomes[0].slide_id
    assert scalar(engine, "SELECT count(*) FROM slide") == 3
    for k in range(3):
        stored = scalar(
            engine, "SELECT count(*) FROM nucleus WHERE slide_id = :s", s=outcomes[k].slide_id
        )
        assert stored == sum(outcomes[k].counts["nucleus"].values()) > 0
