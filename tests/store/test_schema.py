"""The schema: migrations match the models, object tables are partitioned by slide and indexed."""

from alembic import command
from sqlalchemy import text

from spatialdb.store.db import alembic_config, current_revision, head_revision
from spatialdb.store.schema import OBJECT_TABLES


def test_migrations_reach_head_and_autogenerate_finds_nothing_to_do(session_engine):
    assert current_revision(session_engine) == head_revision()
    config = alembic_config(session_engine.url.render_as_string(hide_password=False))
    with session_engine.connect() as conn:
        config.attributes["connection"] = conn
        command.check(config)  # raises if the models and the database differ


def test_object_tables_are_partitioned_by_slide(session_engine):
    with session_engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname, pg_get_partkeydef(c.oid) AS key FROM pg_partitioned_table p "
                "JOIN pg_class c ON c.oid = p.partrelid WHERE c.relname = ANY(:names)"
            ),
            {"names": list(OBJECT_TABLES)},
        ).all()
    assert {name: key for name, key in rows} == dict.fromkeys(OBJECT_TABLES, "LIST (slide_id)")


def test_object_tables_have_gist_and_class_indexes_and_foreign_keys(session_engine):
    with session_engine.connect() as conn:
        for table in OBJECT_TABLES:
            indexes = (
                conn.execute(
                    text("SELECT indexdef FROM pg_indexes WHERE tablename = :t"), {"t": table}
                )
                .scalars()
                .all()
            )
            assert any("USING gist (geom)" in d for d in indexes), table
            assert any("USING gist (centroid)" in d for d in indexes), table
            assert any("(slide_id, class)" in d for d in indexes), table
            foreign = (
                conn.execute(
                    text(
                        "SELECT confrelid::regclass::text FROM pg_constraint "
                        "WHERE conrelid = CAST(:t AS regclass) AND contype = 'f'"
                    ),
                    {"t": table},
                )
                .scalars()
                .all()
            )
            assert sorted(foreign) == ["run", "slide"], table


def test_geometries_are_level0_pixels_with_srid_0(session_engine):
    with session_engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT f_table_name, f_geometry_column, srid, type FROM geometry_columns "
                "WHERE f_table_name = ANY(:names) ORDER BY 1, 2"
            ),
            {"names": list(OBJECT_TABLES)},
        ).all()
    assert {(r[0], r[1]): (r[2], r[3]) for r in rows} == {
        **{(t, "geom"): (0, "POLYGON") for t in ("gland", "lumen", "nucleus")},
        ("tissue_region", "geom"): (0, "MULTIPOLYGON"),
        **{(t, "centroid"): (0, "POINT") for t in OBJECT_TABLES},
    }


def test_the_density_migration_counts_the_nuclei_already_stored(session_engine, engine):
    """Migration 0012 fills `nucleus_density` for the slides stored before it, as a feature
    refresh does."""
    from spatialdb.features.refresh import nucleus_density
    from spatialdb.store.loader import RunWriter
    from tests.conftest import blobs, make_slide

    with RunWriter(engine, make_slide("before-0012", 20_000, 20_000)) as run:
        run.add("nucleus", blobs(5_000, seed=5), ["epithelial", "connective"] * 2_500)
        slide_id = run.commit().slide_id
    config = alembic_config(session_engine.url.render_as_string(hide_password=False))
    command.downgrade(config, "0011")
    command.upgrade(config, "head")
    query = text(
        "SELECT level, gx, gy, class, run_id, n FROM nucleus_density WHERE slide_id = :s "
        "ORDER BY 1, 2, 3, 4"
    )
    with session_engine.connect() as conn:
        migrated = conn.execute(query, {"s": slide_id}).all()
    raw = session_engine.raw_connection()
    try:
        nucleus_density(raw.cursor(), slide_id)
        raw.commit()
    finally:
        raw.close()
    with session_engine.connect() as conn:
        refreshed = conn.execute(query, {"s": slide_id}).all()
    assert migrated == refreshed
    assert {row.level for row in migrated} == {0, 1, 2}
    assert sum(row.n for row in migrated if row.level == 2) == 5_000
