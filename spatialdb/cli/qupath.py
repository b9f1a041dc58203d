"""`spatialdb export-qupath` and `spatialdb import-qupath`: objects to QuPath and back."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import click
from sqlalchemy import text

from spatialdb.catalog import find_slide, save_class_colours, stored_slide
from spatialdb.cli.ingest import refresh_features
from spatialdb.db import connect
from spatialdb.errors import UserError
from spatialdb.imports import check_inside, read_features
from spatialdb.qupath_geojson import (
    OBJECT_CHOICES,
    class_colours,
    import_script,
    parse_features,
    stream_features,
    write_feature_collection,
)
from spatialdb.schema import OBJECT_TABLES

SCRIPT_NAME = "import_spatialdb.groovy"
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
    from spatialdb.qupath_project import qupath_missing, write_project

    tables = _tables(objects)
    engine = connect(obj["db_url"])
    targets = _slides(engine, slides)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".spatialdb-export-", dir=out_dir))
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            colours = class_colours(cur, [s["id"] for s in targets], tables)
        files = {}
        for slide in targets:
            name = _file_name(slide, targets)
            batches = stream_features(raw, slide["id"], tables, colours)
            count = write_feature_collection(staging / name, batches)
            files[name] = (slide, count)
        classes = [{"name": n, "color": c} for n, c in colours.items()]
        (staging / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
        (staging / SCRIPT_NAME).write_text(import_script(out_dir))
        missing = qupath_missing()
        if missing is None:
            write_project(
                staging / "project",
                targets,
                colours,
                lambda s: stream_features(raw, s["id"], tables, colours),
            )
        _move_into(staging, out_dir)
    finally:
        raw.rollback()
        raw.close()
        shutil.rmtree(staging, ignore_errors=True)
    for name, (slide, count) in files.items():
        click.echo(f"slide {slide['id']} ({slide['name']}): {count:,} objects -> {out_dir / name}")
    click.echo(f"{len(colours)} classes -> {out_dir / 'classes.json'}")
    click.echo(f"QuPath script (Automate > Script editor) -> {out_dir / SCRIPT_NAME}")
    if missing is None:
        click.echo(f"QuPath project -> {out_dir / 'project' / 'project.qpproj'}")
    else:
        click.echo(f"spatialdb: note: no QuPath project written: {missing}", err=True)


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
    check_inside(source, parsed, slide.width, slide.height)
    parameters = {"source": str(source.resolve()), "format": kind}
    with RunWriter(engine, slide, kind="curated", parameters=parameters) as run:
        for table, objects in parsed.items():
            run.add(table, objects.geoms, objects.classes, objects.probability, objects.uuids)
        result = run.commit()
    save_class_colours(engine, colours)
    refresh_features(engine, result.slide_id, source)
    stored = ", ".join(f"{t} {result.total(t):,}" for t in OBJECT_TABLES if result.total(t))
    repaired = f"; {result.repaired} repaired, {result.dropped} dropped" if result.repaired else ""
    click.echo(
        f"{source.name}: curated run {result.run_id} of slide {result.slide_id} ({slide.name}): "
        f"{stored or 'no objects'}{repaired}"
    )


def _tables(objects: str) -> list[str]:
    names = [n.strip() for n in objects.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECT_CHOICES]
    if unknown or not names:
        raise UserError(
            f"--objects: unknown {', '.join(unknown) or 'empty list'} "
            f"(choose from {', '.join(OBJECT_CHOICES)})"
        )
    return [OBJECT_CHOICES[n] for n in dict.fromkeys(names)]


def _slides(engine, refs: tuple[str, ...]) -> list[dict]:
    if refs:
        found = [find_slide(engine, ref) for ref in refs]
        ids = list(dict.fromkeys(s["id"] for s in found))
    else:
        ids = None
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, name, file_path FROM slide WHERE current_run_id IS NOT NULL "
                "AND (CAST(:ids AS integer[]) IS NULL OR id = ANY(:ids)) ORDER BY id"
            ),
            {"ids": ids},
        ).mappings()
        slides = [dict(r) for r in rows]
    if not slides:
        raise UserError("no slides with objects to export")
    return slides


def _file_name(slide: dict, slides: list[dict]) -> str:
    """`NAME.geojson.gz` (QuPath's image name without its extension), or `NAME-ID...` when two
    exported slides share a name."""
    safe = "".join(c if c.isalnum() or c in "-_. " else "_" for c in slide["name"]) or "slide"
    shared = sum(s["name"] == slide["name"] for s in slides) > 1
    return f"{safe}-{slide['id']}.geojson.gz" if shared else f"{safe}.geojson.gz"


def _move_into(staging: Path, out_dir: Path) -> None:
    """Put the finished export in place, replacing files of an earlier export."""
    for item in staging.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
