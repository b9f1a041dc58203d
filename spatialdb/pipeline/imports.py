"""Results made elsewhere stored as a slide's new run: Cerberus `.dat` and GeoJSON files
(`spatialdb import`, a run of kind `import`) and objects edited in QuPath (`spatialdb
import-qupath`, a `curated` run that keeps their UUIDs and colours). Either replaces the slide's
current objects atomically, and its features are recomputed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from spatialdb.errors import UserError
from spatialdb.interop.qupath_geojson import parse_features
from spatialdb.interop.results import fit_to_slide, read_dat, read_features, read_geojson
from spatialdb.pipeline.ingest import refresh_features
from spatialdb.pipeline.slides import open_reader, slide_record
from spatialdb.store.catalog import (
    SlideRecord,
    find_slide,
    fingerprint,
    save_class_colours,
    stored_slide,
)
from spatialdb.store.loader import RunResult

TISSUE_CLASSES_OF_SLIDE = """
SELECT class FROM tissue_region WHERE slide_id = :id
UNION
SELECT jsonb_array_elements_text(m.class_names -> 'Patch-Class')
FROM run r JOIN model m ON m.id = r.model_id WHERE r.slide_id = :id
"""


@dataclass
class Imported:
    """A stored run of imported objects and what fitting them to the slide changed."""

    slide: SlideRecord
    run: RunResult
    fitted: dict[str, int]  # repaired, dropped, clipped: `interop.results.fit_note` says it


def import_results(
    engine, results: Path, slide_path: Path, *, mpp: float | None = None, table: str | None = None
) -> Imported:
    """Store RESULTS (a Cerberus .dat or a GeoJSON file) as a new run of the slide file."""
    from inference.network import GLAND_TYPES, LABELLED_NUCLEUS_TYPES, NUCLEUS_TYPES, TISSUE_CLASSES

    if not results.is_file():
        raise UserError(f"{results}: no such file")
    reader = open_reader(slide_path, mpp)
    meta = reader.info
    width, height = (int(v) for v in meta.slide_dimensions)
    if results.suffix.lower() == ".dat":
        kind = "cerberus-dat"
        types = {"Nuclei": list(NUCLEUS_TYPES), "Gland": list(GLAND_TYPES)}
        parsed = read_dat(results, float(meta.mpp[0]), types)
    elif results.suffix.lower() in (".geojson", ".json"):
        kind = "geojson"
        # "inflammatory" names a nuclear type as well as a tissue class: it is not a tissue
        # region by its name alone (a QuPath annotation of that class still is one).
        tissue = set(TISSUE_CLASSES) - set(LABELLED_NUCLEUS_TYPES)
        parsed = read_geojson(results, table, tissue)
    else:
        raise UserError(f"{results}: expected a Cerberus .dat or a .geojson/.json file")
    fitted = fit_to_slide(results, parsed, width, height)
    slide = slide_record(slide_path, reader, fingerprint(slide_path))
    run = _store(engine, slide, parsed, "import", results, kind, uuids=False)
    return Imported(slide, run, fitted)


def import_curated(engine, source: Path, slide_ref: str) -> Imported:
    """Store QuPath objects (a QuPath GeoJSON file, plain or gzipped, or a QuPath project) as a
    new curated run of a stored slide, keeping their UUIDs, classes and colours."""
    if not source.exists():
        raise UserError(f"{source}: no such file or project")
    slide_id = find_slide(engine, slide_ref)["id"]
    slide = stored_slide(engine, slide_id)
    if source.is_dir() or source.suffix == ".qpproj":
        from spatialdb.interop.qupath_project import qupath_missing, read_project

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
    run = _store(engine, slide, parsed, "curated", source, kind, uuids=True, colours=colours)
    return Imported(slide, run, fitted)


def _store(engine, slide, parsed, run_kind, source, file_format, *, uuids, colours=None):
    """The parsed objects as the slide's new run, then its features."""
    from spatialdb.store.loader import RunWriter

    parameters = {"source": str(source.resolve()), "format": file_format}
    with RunWriter(engine, slide, kind=run_kind, parameters=parameters) as run:
        for table, objects in parsed.items():
            if objects.geoms:
                run.add(
                    table, objects.geoms, objects.classes, objects.probability,
                    objects.uuids if uuids else None,
                )  # fmt: skip
        result = run.commit()
    if colours:
        save_class_colours(engine, colours)
    refresh_features(engine, result.slide_id, source)
    return result
