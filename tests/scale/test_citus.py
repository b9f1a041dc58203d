"""Citus scale-out: `spatialdb db upgrade --citus` and spatialdb/sql/citus.sql.

Against the test PostGIS (no citus extension) the upgrade must refuse with one line and change
nothing; the script itself, and loads and feature refreshes on the distributed tables, run on the
real Citus cluster of the `citus_url` fixture (tests/scale/conftest.py).
"""

from __future__ import annotations

import psycopg2
import pytest
import shapely
from sqlalchemy import text

from spatialdb.features.refresh import refresh
from spatialdb.scale.citus import SCRIPT, distribute
from spatialdb.store import loader
from spatialdb.store.catalog import delete_slide
from spatialdb.store.db import connect
from spatialdb.store.loader import RunWriter
from tests.conftest import blobs, make_slide
from tests.test_cli import assert_one_error_line, spatialdb

REFERENCE = {"slide", "model", "run", "object_class"}
DISTRIBUTED = {"nucleus", "gland", "lumen", "tissue_region", "gland_feature", "slide_feature",
               "slide_embedding", "slide_prediction"}  # fmt: skip

SNAPSHOT = """
SELECT (SELECT array_agg(relname::text || relkind::text ORDER BY relname) FROM pg_class
        WHERE relnamespace = 'public'::regnamespace),
       (SELECT array_agg(conname::text ORDER BY conname) FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace),
       (SELECT version_num FROM alembic_version)
"""


def snapshot(engine):
    with engine.connect() as conn:
        return tuple(conn.execute(text(SNAPSHOT)).one())


def test_upgrade_citus_without_citus_is_one_line_and_changes_nothing(engine, db_url, cli_env):
    before = snapshot(engine)
    result = spatialdb("--db-url", db_url, "db", "upgrade", "--citus", env=cli_env)
    assert_one_error_line(result, "has no citus extension", "nothing was changed")
    assert snapshot(engine) == before


def test_upgrade_citus_on_the_embedded_server_is_one_line(cli_env):
    env = {k: v for k, v in cli_env.items() if k != "SPATIALDB_URL"}
    result = spatialdb("db", "upgrade", "--citus", env=env)
    assert_one_error_line(result, "--citus: the embedded server has no Citus")


def test_the_script_compiles_and_stops_before_any_change_without_citus(engine):
    """PL/pgSQL compiles the whole block before running it: a syntax error would show here."""
    before = snapshot(engine)
    with pytest.raises(psycopg2.Error, match="the citus extension is not installed"):
        distribute(engine)
    assert snapshot(engine) == before
    assert "create_distributed_table" in SCRIPT.read_text()


def test_the_script_distributes_the_tables_by_slide_on_citus(citus_url, cli_env):
    for _ in range(2):  # the second run changes nothing
        result = spatialdb("--db-url", citus_url, "db", "upgrade", "--citus", env=cli_env)
        assert result.returncode == 0, result.stderr
    engine = connect(citus_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT logicalrelid::text, partmethod, colocationid, "
                "column_to_column_name(logicalrelid, partkey) FROM pg_dist_partition"
            )
        ).all()
        tables = {r[0]: r for r in rows}
        assert {t for t, r in tables.items() if r[1] == "n"} >= REFERENCE
        distributed = {t: r for t, r in tables.items() if t in DISTRIBUTED}
        assert set(distributed) == DISTRIBUTED
        assert {(r[1], r[3]) for r in distributed.values()} == {("h", "slide_id")}
        assert len({r[2] for r in distributed.values()}) == 1  # co-located
        assert conn.execute(text("SELECT count(*) FROM gland_features(1)")).scalar_one() == 0
    engine.dispose()


def test_runs_load_in_place_replace_and_get_features_on_citus(citus_url, cli_env):
    """The object tables are distributed plain tables: a load writes into them in place, readers
    see the old run until it commits, and more slides add rows, not shards."""
    result = spatialdb("--db-url", citus_url, "db", "upgrade", "--citus", env=cli_env)
    assert result.returncode == 0, result.stderr
    engine = connect(citus_url)

    def scalar(query: str, **params):
        with engine.connect() as conn:
            return conn.execute(text(query), params).scalar_one()

    shards = scalar("SELECT count(*) FROM pg_dist_shard")
    slides, loaded = [make_slide(f"citus-live-{k}") for k in range(3)], []
    try:
        for seed in (1, 2):  # the second run replaces the first
            with RunWriter(engine, slides[0], lanes=3) as run:
                run.add("nucleus", blobs(400 * seed, seed=seed), "epithelial")
                run.add("gland", [shapely.box(0, 0, 5_000, 5_000)], "gland")
                seen = scalar("SELECT count(*) FROM nucleus WHERE slide_id = :s", s=run.slide_id)
                assert seen == (0 if seed == 1 else 400)  # the old run, until the commit
                loaded.append(run.commit())
            refresh(engine, loaded[-1].slide_id)
        first = loaded[-1]
        count, inside = scalar(
            "SELECT array[nucleus_count, nuclei_in_glands] FROM slide_feature WHERE slide_id = :s",
            s=first.slide_id,
        )
        assert count == 800 and 0 < inside < 800
        runs = scalar("SELECT array_agg(DISTINCT run_id) FROM nucleus WHERE slide_id = :s",
                      s=first.slide_id)  # fmt: skip
        assert runs == [first.run_id]
        for slide in slides[1:]:
            with RunWriter(engine, slide) as run:
                run.add("nucleus", blobs(100, seed=3), "epithelial")
                loaded.append(run.commit())
        assert scalar("SELECT count(*) FROM pg_dist_shard") == shards
        assert scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = 'nucleus'::regclass") == 0
        delete_slide(engine, first.slide_id)
        assert scalar("SELECT count(*) FROM nucleus WHERE slide_id = :s", s=first.slide_id) == 0
    finally:
        for result in loaded:
            if scalar("SELECT count(*) FROM slide WHERE id = :s", s=result.slide_id):
                delete_slide(engine, result.slide_id)
        engine.dispose()


SHARD_ANALYZED = """
SELECT result FROM run_command_on_shards(:table,
    $$SELECT coalesce(last_analyze::text, 'never') FROM pg_stat_user_tables
      WHERE relid = '%s'::regclass$$)
WHERE shardid = get_shard_id_for_distribution_column(:table, :slide)
"""


def test_a_large_in_place_load_analyzes_the_tables_it_wrote(citus_url, cli_env, monkeypatch):
    """Planned on statistics from before a large slide, the refresh after its load took minutes:
    a load of at least ANALYZE_IN_PLACE_FROM objects analyzes every table it wrote; a smaller one
    none."""
    result = spatialdb("--db-url", citus_url, "db", "upgrade", "--citus", env=cli_env)
    assert result.returncode == 0, result.stderr
    monkeypatch.setattr(loader, "ANALYZE_IN_PLACE_FROM", 300)
    engine = connect(citus_url)

    def analyzed(slide_id: int) -> dict[str, str]:
        with engine.connect() as conn:
            return {
                table: conn.execute(
                    text(SHARD_ANALYZED), {"table": table, "slide": slide_id}
                ).scalar()
                for table in ("nucleus", "gland", "lumen")
            }

    loaded = []
    try:
        for nuclei in (100, 400):
            with RunWriter(engine, make_slide(f"citus-analyze-{nuclei}")) as run:
                before = analyzed(run.slide_id)
                run.add("nucleus", blobs(nuclei, seed=5), "epithelial")
                run.add("gland", [shapely.box(0, 0, 5_000, 5_000)], "gland")
                loaded.append(run.commit())
            after = analyzed(run.slide_id)
            changed = {table for table in after if after[table] != before[table]}
            assert changed == (set() if nuclei < 300 else {"nucleus", "gland"}), (before, after)
    finally:
        for done in loaded:
            delete_slide(engine, done.slide_id)
        engine.dispose()
