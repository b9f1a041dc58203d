"""The whole product on a real Citus cluster (tests/scale/conftest.py): every command against the
distributed tables, per-slide queries routed to the slide's one worker, and features identical to
the single-node layout."""

from __future__ import annotations

import gzip
import json
import os
from types import SimpleNamespace

import pandas as pd
import pytest
from sqlalchemy import text

from dashboard.data import Box, Reader
from spatialdb.store.db import connect
from tests.conftest import empty
from tests.features.test_features import gland_rows, load_known_slide
from tests.scale.test_citus import DISTRIBUTED
from tests.slides import SAMPLE, tissue_image, write_pyramid
from tests.test_cli import spatialdb

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def citus(citus_url, tmp_path_factory):
    """The cluster's schema, distributed; the `spatialdb` environment; an engine on it."""
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "SPATIALDB_URL": citus_url, "SPATIALDB_HOME": str(home / "unused")}
    ok(spatialdb("db", "upgrade", "--citus", env=env))
    engine = connect(citus_url)
    empty(engine)
    yield SimpleNamespace(url=citus_url, env=env, engine=engine)
    empty(engine)
    engine.dispose()


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def rows(engine, query: str, **params) -> list:
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


def slide_id(engine, name: str) -> int:
    return rows(engine, "SELECT id FROM slide WHERE name = :n", n=name)[0][0]


def workers_holding(engine, slide: int) -> set[tuple]:
    """The nodes holding the shard of `slide` of every distributed table."""
    return {
        tuple(r)
        for table in sorted(DISTRIBUTED)
        for r in rows(
            engine,
            "SELECT n.nodename, n.nodeport FROM pg_dist_placement p "
            "JOIN pg_dist_node n USING (groupid) "
            "WHERE p.shardid = get_shard_id_for_distribution_column(:t, :s)",
            t=table,
            s=slide,
        )
    }


def task_count(engine, query: str, **params) -> int:
    """Tasks of the distributed plan of `query`: 1 is a router query on one shard group."""
    plan = [r[0] for r in rows(engine, "EXPLAIN " + query, **params)]
    counts = [line.split("Task Count:")[1].strip() for line in plan if "Task Count:" in line]
    assert counts, "\n".join(plan)
    return max(int(c) for c in counts)


def test_every_command_runs_on_distributed_tables(citus, tmp_path):
    crop = write_pyramid(tmp_path / "crop.tiff", tissue_image(768, 768, seed=4), mpp=0.5)
    ok(spatialdb("ingest", str(SAMPLE), str(crop), env=citus.env))
    sample, small = slide_id(citus.engine, SAMPLE.stem), slide_id(citus.engine, "crop")
    status = ok(spatialdb("status", env=citus.env)).stdout
    assert SAMPLE.stem in status and "crop" in status
    nuclei = rows(citus.engine, "SELECT count(*) FROM nucleus WHERE slide_id = :s", s=sample)[0][0]
    glands = rows(citus.engine, "SELECT count(*) FROM gland_feature WHERE slide_id = :s", s=sample)
    assert nuclei > 100 and glands[0][0] > 0  # ingest refreshes the features

    # Each slide on one worker, and every per-slide query a router query there.
    for s in (sample, small):
        assert len(workers_holding(citus.engine, s)) == 1
    for table in ("nucleus", "gland", "gland_feature", "slide_feature"):
        assert task_count(citus.engine, f"SELECT * FROM {table} WHERE slide_id = :s", s=sample) == 1
    assert (
        task_count(
            citus.engine,
            "SELECT n.id FROM nucleus n JOIN gland g ON g.slide_id = n.slide_id "
            "AND ST_Contains(g.geom, n.centroid) WHERE n.slide_id = :s AND g.slide_id = :s",
            s=sample,
        )
        == 1
    )

    # Re-ingest replaces the run; the replaced run's objects are gone.
    before = dict(rows(citus.engine, "SELECT id, current_run_id FROM slide"))
    ok(spatialdb("ingest", "--force", str(crop), env=citus.env))
    runs = dict(
        rows(
            citus.engine,
            "SELECT status, count(*) FROM run WHERE slide_id = :s GROUP BY status",
            s=small,
        )
    )
    assert runs == {"complete": 1, "superseded": 1}
    stale = rows(citus.engine, "SELECT count(*) FROM nucleus WHERE run_id = :r", r=before[small])[
        0
    ][0]
    assert stale == 0

    ok(spatialdb("features", "refresh", env=citus.env))
    stored = rows(citus.engine, "SELECT count(*) FROM gland_feature")[0][0]
    for fmt, ext in (("csv", "csv"), ("parquet", "parquet"), ("geoparquet", "parquet")):
        out = tmp_path / f"glands-{fmt}.{ext}"
        ok(spatialdb("features", "export", "--level", "gland", "--format", fmt, "-o", str(out),
                     env=citus.env))  # fmt: skip
        table = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
        assert len(table) == stored
    nuclei_out = tmp_path / "nuclei.csv"
    ok(spatialdb("features", "export", "--level", "nucleus", "--slide", "crop", "-o",
                 str(nuclei_out), env=citus.env))  # fmt: skip
    crop_nuclei = rows(citus.engine, "SELECT count(*) FROM nucleus WHERE slide_id = :s", s=small)
    assert len(pd.read_csv(nuclei_out)) == crop_nuclei[0][0]

    # QuPath: export, then the export back as an import and as a curated QuPath run.
    ok(spatialdb("export-qupath", str(tmp_path / "qp"), env=citus.env))
    geojson = tmp_path / "qp" / "crop.geojson.gz"
    with gzip.open(geojson, "rt") as file:
        exported = len(json.load(file)["features"])
    objects = rows(
        citus.engine,
        "SELECT (SELECT count(*) FROM nucleus WHERE slide_id = :s) + "
        "(SELECT count(*) FROM gland WHERE slide_id = :s) + "
        "(SELECT count(*) FROM lumen WHERE slide_id = :s) + "
        "(SELECT count(*) FROM tissue_region WHERE slide_id = :s)",
        s=small,
    )[0][0]
    assert exported == objects
    curated = ok(spatialdb("import-qupath", str(geojson), "--slide", "crop", env=citus.env))
    assert "curated run" in curated.stdout
    plain = tmp_path / "crop.geojson"
    plain.write_bytes(gzip.decompress(geojson.read_bytes()))
    ok(spatialdb("import", str(plain), "--slide", str(crop), env=citus.env))
    kinds = rows(citus.engine, "SELECT kind FROM run WHERE slide_id = :s ORDER BY id", s=small)
    assert [k[0] for k in kinds][-2:] == ["curated", "import"]
    after = rows(citus.engine, "SELECT count(*) FROM nucleus WHERE slide_id = :s", s=small)
    assert after == crop_nuclei

    # The dashboard's reader on the coordinator.
    reader = Reader.from_url(citus.url)
    assert set(reader.cohort()["name"]) == {SAMPLE.stem, "crop"}
    run = reader.current_run(sample)
    box = Box(0, 0, 2220, 2967)
    assert reader.count_in("nucleus", sample, run, box, limit=10**6) == nuclei
    assert len(reader.gland_features([sample, small])) == stored

    ok(spatialdb("delete", "crop", env=citus.env))
    left = rows(citus.engine, "SELECT count(*) FROM nucleus WHERE slide_id = :s", s=small)[0][0]
    assert left == 0 and "crop" not in ok(spatialdb("status", env=citus.env)).stdout


def test_features_are_identical_on_citus_and_on_one_server(citus, engine):
    """The known slide of tests/features, loaded on both layouts."""

    def kept(row) -> dict:  # identifiers and times differ between the two loads
        return {k: v for k, v in row.items() if not k.endswith(("_id", "_uuid", "_at"))}

    def features(e, s):
        glands = [kept(r) for r in gland_rows(e, s)]
        with e.connect() as conn:
            slide = conn.execute(text("SELECT * FROM slide_feature WHERE slide_id = :s"), {"s": s})
            summary = kept(slide.mappings().one())
            nuclei = conn.execute(
                text(
                    "SELECT nucleus_class, area_um2, distance_to_gland_boundary_um, tissue_class, "
                    "neighbours_within_radius, gland_id IS NULL FROM nucleus_features(:s) "
                    "ORDER BY centroid_x_px, centroid_y_px"
                ),
                {"s": s},
            ).all()
        return glands, summary, [tuple(n) for n in nuclei]

    single = features(engine, load_known_slide(engine, name="layouts"))
    distributed = features(citus.engine, load_known_slide(citus.engine, name="layouts"))
    assert single[0] and single[2]
    assert distributed == single
