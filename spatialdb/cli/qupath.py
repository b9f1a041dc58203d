"""`spatialdb export-qupath` and `spatialdb import-qupath`: objects to QuPath and back."""

from __future__ import annotations

from pathlib import Path

import click

from spatialdb.interop.qupath_export import export_slides, object_tables
from spatialdb.interop.qupath_geojson import OBJECT_CHOICES
from spatialdb.interop.results import fit_note
from spatialdb.pipeline.imports import import_curated
from spatialdb.store.catalog import find_slide
from spatialdb.store.db import connect
from spatialdb.store.schema import OBJECT_TABLES


@click.command("export-qupath")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--slide", "slides", multiple=True, help="Slide id, name or path (default: all).")
@click.option(
    "--objects",
    default=",".join(OBJECT_CHOICES),
    show_default=True,
    help="Comma-separated: " + ", ".join(OBJECT_CHOICES) + ".",
)
@click.pass_obj
def export_qupath(obj: dict, out_dir: Path, slides, objects: str) -> None:
    """Write slides' objects for QuPath into OUT_DIR: a gzipped QuPath GeoJSON per slide, the
    classes, an import script, and a QuPath project when QuPath is installed."""
    tables = object_tables(objects)
    engine = connect(obj["db_url"])
    ids = [find_slide(engine, ref)["id"] for ref in slides] or None
    result = export_slides(engine, out_dir, ids, tables)
    for slide, path, count in result.files:
        click.echo(f"slide {slide['id']} ({slide['name']}): {count:,} objects -> {path}")
    click.echo(f"{result.classes} classes -> {out_dir / 'classes.json'}")
    click.echo(f"QuPath script (Automate > Script editor) -> {result.script}")
    if result.project:
        click.echo(f"QuPath project -> {result.project}")
    else:
        click.echo(f"spatialdb: note: no QuPath project written: {result.no_project}", err=True)


@click.command("import-qupath")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--slide",
    "slide_ref",
    help="The slide (id, name or path); needed for a GeoJSON file. For a project, default: "
    "every image that matches a stored slide by file path, file name or name.",
)
@click.pass_obj
def import_qupath(obj: dict, source: Path, slide_ref: str | None) -> None:
    """Store QuPath objects (a QuPath GeoJSON file, plain or gzipped, or a QuPath project) as a
    new curated run per slide, keeping their UUIDs, classes and colours, and recompute its
    features."""
    engine = connect(obj["db_url"])
    imported, unmatched = import_curated(engine, source, slide_ref)
    for one in imported:
        run = one.run
        stored = ", ".join(f"{t} {run.total(t):,}" for t in OBJECT_TABLES if run.total(t))
        click.echo(
            f"{source.name}: curated run {run.run_id} of slide {run.slide_id} "
            f"({one.slide.name}): {stored or 'no objects'}{fit_note(one.fitted)}"
        )
    if unmatched:
        click.echo(
            f"spatialdb: note: not imported, no stored slide: {', '.join(unmatched)}", err=True
        )
