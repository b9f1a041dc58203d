"""Writing slides for QuPath into a folder, all or nothing (used by the CLI and the dashboard).

OUT_DIR receives `NAME.geojson.gz` per slide (QuPath GeoJSON, see `qupath_geojson`),
`classes.json`, `import_spatialdb.groovy`, and `project/` (a QuPath project) when QuPath is
installed. Everything is written into a staging folder inside OUT_DIR first and moved into
place at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, text

from spatialdb.errors import UserError
from spatialdb.interop.qupath_geojson import (
    OBJECT_CHOICES,
    class_colours,
    import_script,
    stream_features,
    write_feature_collection,
)
from spatialdb.store.db import rollback_or_discard

SCRIPT_NAME = "import_spatialdb.groovy"
SLIDES = """
SELECT id, name, file_path, mpp_x FROM slide
WHERE current_run_id IS NOT NULL AND (CAST(:ids AS integer[]) IS NULL OR id = ANY(:ids))
ORDER BY id
"""


@dataclass
class QuPathExport:
    files: list[tuple[dict, Path, int]] = field(default_factory=list)  # slide, file, objects
    classes: int = 0
    script: Path | None = None
    project: Path | None = None
    project_objects: dict[int, int] = field(default_factory=dict)  # slide id -> objects
    no_project: str | None = None  # why no QuPath project was written


def object_tables(objects: str) -> list[str]:
    """Tables named by an `--objects` list such as "nuclei,glands"."""
    names = [n.strip() for n in objects.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECT_CHOICES]
    if unknown or not names:
        raise UserError(
            f"--objects: unknown {', '.join(unknown) or 'empty list'} "
            f"(choose from {', '.join(OBJECT_CHOICES)})"
        )
    return [OBJECT_CHOICES[n] for n in dict.fromkeys(names)]


def export_slides(
    engine: Engine, out_dir: Path, slide_ids: list[int] | None, tables: list[str]
) -> QuPathExport:
    """Export the slides (None: every slide with objects) into `out_dir`. The QuPath project
    is written by a child process (`qupath_project`) while the GeoJSON files are written here."""
    from spatialdb.interop.qupath_project import (
        ProjectImage,
        outcome,
        qupath_process,
        write_project,
    )

    with engine.connect() as conn:
        ids = list(dict.fromkeys(slide_ids)) if slide_ids else None
        slides = [dict(r) for r in conn.execute(text(SLIDES), {"ids": ids}).mappings()]
    if not slides:
        raise UserError("no slides with objects to export")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".spatialdb-export-", dir=out_dir))
    result = QuPathExport()
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            colours = class_colours(cur, [s["id"] for s in slides], tables)
        images = [ProjectImage(s["id"], s["file_path"], s["mpp_x"]) for s in slides]
        url = engine.url.render_as_string(hide_password=False)
        with qupath_process() as qupath:
            project = qupath.submit(
                write_project, staging / "project", url, images, tables, colours
            )
            for slide in slides:
                name = _file_name(slide, slides)
                batches = stream_features(raw, slide["id"], tables, colours)
                count = write_feature_collection(staging / name, batches)
                result.files.append((slide, out_dir / name, count))
            classes = [{"name": n, "color": c} for n, c in colours.items()]
            (staging / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
            (staging / SCRIPT_NAME).write_text(import_script(out_dir))
            result.classes, result.script = len(classes), out_dir / SCRIPT_NAME
            try:
                result.project_objects = outcome(project)
                result.project = out_dir / "project" / "project.qpproj"
            except UserError as exc:  # no QuPath, or an image it cannot open: GeoJSON still
                shutil.rmtree(staging / "project", ignore_errors=True)
                result.no_project = str(exc)
        _move_into(staging, out_dir)
    finally:
        rollback_or_discard(raw)
        raw.close()
        shutil.rmtree(staging, ignore_errors=True)
    return result


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
