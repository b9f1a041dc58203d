"""`spatialdb db ...`: the database itself (schema upgrade, URL in use, embedded server)."""

import click

from spatialdb.config import home_dir
from spatialdb.scale.citus import distribute, require_citus
from spatialdb.store.db import connect, current_revision, redact, resolve_url
from spatialdb.store.embedded import EmbeddedCluster


@click.group()
def db() -> None:
    """Manage the database: schema, URL, embedded server."""


@db.command()
@click.option(
    "--citus",
    is_flag=True,
    help="Then distribute the tables by slide with Citus (needs the citus extension).",
)
@click.pass_obj
def upgrade(obj: dict, citus: bool) -> None:
    """Migrate the database to the current schema (creates PostGIS if allowed)."""
    if citus:
        require_citus(obj["db_url"])
    engine = connect(obj["db_url"], migrate=True)
    url = redact(engine.url.render_as_string(hide_password=False))
    if citus:
        distribute(engine)
    click.echo(f"{url} at revision {current_revision(engine)}" + (", distributed" if citus else ""))


@db.command()
@click.pass_obj
def url(obj: dict) -> None:
    """Print the database URL in use (starting the embedded server if it is the one)."""
    click.echo(redact(resolve_url(obj["db_url"])[0]))


@db.command()
def stop() -> None:
    """Stop the embedded PostgreSQL server (it starts again on the next command)."""
    cluster = EmbeddedCluster(home_dir())
    click.echo(
        f"stopped {cluster.data_dir}" if cluster.stop() else "the embedded server was not running"
    )


@db.command("backfill-morphometry")
@click.option("--batch", default=20_000, show_default=True, help="Objects per transaction.")
@click.pass_obj
def backfill_morphometry(obj: dict, batch: int) -> None:
    """Compute the shape measurements (equivalent diameter, axes, eccentricity, orientation,
    circularity, solidity, extent) of objects stored before they existed."""
    from spatialdb.store.backfill import backfill_morphometry as run

    engine = connect(obj["db_url"])
    filled = run(engine, batch)
    click.echo(", ".join(f"{table}: {count}" for table, count in filled.items()) + " filled")
