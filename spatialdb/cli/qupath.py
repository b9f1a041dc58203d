"""`spatialdb export-qupath` and `spatialdb import-qupath`: objects to QuPath and back."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import text

from spatialdb.catalog import find_slide, save_class_colours, stored_slide
from spatialdb.cli.ingest import refresh_features
from spatialdb.db import connect
from spatialdb.errors import UserError
from spatialdb.imports import fit_note, fit_to_slide, read_features
from spatialdb.qupath_export import export_slides, object_tables
from spatialdb.qupath_geojson import OBJECT_CHOICES, parse_features
from spatialdb.schema import OBJECT_TABLES

TISSUE_CLASSES_OF_SLIDE = """
SELECT class FROM tissue_region WHERE slide_id = :id
UNION
SELECT jsonb_array_elements_text(m.class_names -> 'Patch-Class')
FROM run r JOIN model m ON m.id = r.model_id WHERE r.slide_id = :id
"""


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
        click.echo(f"spatialdb: note: no QuPath project written: {result.qupath_missing}", err=True)


@click.command("import-qupath")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--slide", "slide_ref", required=True, help="The slide (id, name or path).")
@click.pass_obj
def import_qupath(obj: dict, source: Path, slide_ref: str) -> None:
    """Store QuPath objects (a QuPath GeoJSON file, plain or gzipped, or a QuPath project) as a
    new curated run of SLIDE, keeping their UUIDs, classes and colours, and recompute its
    features."""
    from spatialdb.loader import RunWriter

    if not source.exists():
        raise UserError(f"{source}: no such file or project")
    engine = connect(obj["db_url"])
    slide_id = find_slide(engine, slide_ref)["id"]
    slide = stored_slide(engine, slide_id)
    if source.is_dir() or source.suffix == ".qpproj":
        from spatialdb.qupath_project import qupath_missing, read_project

        missing = qupath_missing()
        if missing:
            raise UserError(f"{source}: a QuPath project needs QuPath: {missing}")
        features, kind = read_project(source, Path(slide.file_path).name), "qupath-project"
    else:
        features, kind = read_features(source), "qupath-geojson"
    with engine.connect() as conn:
        rows = conn.execute(text(TISSUE_CLASSES_OF_SLIDE), {"id": slide_id})
        tissue_classes = {r[0] for r in rows}
    parsed, colours = parse_features(str(source), features, tissue_classes)
    fitted = fit_to_slide(source, parsed, slide.width, slide.height)
    parameters = {"source": str(source.resolve()), "format": kind}
    with RunWriter(engine, slide, kind="curated", parameters=parameters) as run:
        for table, objects in parsed.items():
            run.add(table, objects.geoms, objects.classes, objects.probability, objects.uuids)
        result = run.commit()
    save_class_colours(engine, colours)
    refresh_features(engine, result.slide_id, source)
    stored = ", ".join(f"{t} {result.total(t):,}" for t in OBJECT_TABLES if result.total(t))
    click.echo(
        f"{source.name}: curated run {result.run_id} of slide {result.slide_id} ({slide.name}): "
        f"{stored or 'no objects'}{fit_note(fitted)}"
    )
