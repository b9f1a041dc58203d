"""Alembic environment: runs migrations on the connection handed over by
`spatialdb.store.db.upgrade`, or resolves the URL itself when `alembic` is called directly."""

from alembic import context
from geoalchemy2 import Geometry, alembic_helpers
from sqlalchemy import text

from spatialdb.store.db import make_engine, resolve_url
from spatialdb.store.schema import Base

config = context.config
target_metadata = Base.metadata

#: Serialises concurrent upgrades (several CLI processes starting at once).
MIGRATION_LOCK = 72_617_001


def include_object(obj, name, type_, reflected, compare_to):
    # Per-slide partitions are managed by the loader, and PostGIS owns spatial_ref_sys.
    if type_ == "table" and reflected and compare_to is None:
        return False
    return alembic_helpers.include_object(obj, name, type_, reflected, compare_to)


def compare_type(context, inspected_column, metadata_column, inspected_type, metadata_type):
    """PostGIS reports SRID 0 ("unknown", our level-0 pixel frame) as no SRID at all."""
    if isinstance(inspected_type, Geometry) and isinstance(metadata_type, Geometry):
        return (inspected_type.geometry_type, max(inspected_type.srid, 0)) != (
            metadata_type.geometry_type,
            max(metadata_type.srid, 0),
        )
    return None


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=include_object,
        process_revision_directives=alembic_helpers.writer,
        render_item=alembic_helpers.render_item,
        compare_type=compare_type,
    )
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or resolve_url()[0]
    with make_engine(url).connect() as conn:
        run(conn)
        conn.commit()
