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
