"""`spatialdb import RESULTS --slide SLIDE`: bring existing results into the database."""

from __future__ import annotations

from pathlib import Path

import click

from spatialdb.interop.results import fit_note
from spatialdb.pipeline import imports
from spatialdb.store.db import connect
from spatialdb.store.schema import OBJECT_TABLES


@click.command("import")
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--slide",
    "slide_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The slide file the results belong to (gives size and µm per pixel).",
)
@click.option("--mpp", type=float, help="µm per pixel, for slides whose file does not record it.")
@click.option(
    "--table",
    type=click.Choice(OBJECT_TABLES),
    help="Store every GeoJSON feature in this table (default: decided per feature).",
)
@click.pass_obj
def import_results(obj: dict, results: Path, slide_path: Path, mpp, table) -> None:
    """Store RESULTS (a Cerberus .dat or a GeoJSON file) as a new run of SLIDE, replacing its
    current objects atomically."""
    engine = connect(obj["db_url"])
    imported = imports.import_results(engine, results, slide_path, mpp=mpp, table=table)
    run = imported.run
    stored = ", ".join(f"{t} {run.total(t):,}" for t in OBJECT_TABLES if run.total(t))
    click.echo(
        f"{results.name}: imported into slide {run.slide_id} ({imported.slide.name}), run "
        f"{run.run_id}: {stored or 'no objects'}{fit_note(imported.fitted)}"
    )
