"""Results made elsewhere stored as a slide's new run: Cerberus `.dat` and GeoJSON files
(`spatialdb import`, a run of kind `import`) and objects edited in QuPath (`spatialdb
import-qupath`, a `curated` run that keeps their UUIDs and colours). Either replaces the slide's
current objects atomically, and its features are recomputed."""

from __future__ import annotations

import tempfile
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

ALL_SLIDES = "SELECT id, name, file_path FROM slide ORDER BY id"
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
    run = _store_run(engine, slide, parsed, "import", results, kind, uuids=False)
    return Imported(slide, run, fitted)


def import_curated(engine, source: Path, slide_ref: str | None) -> tuple[list[Imported], list[str]]:
    """Store QuPath objects as a new curated run per slide, keeping their UUIDs, classes and
    colours: a QuPath GeoJSON file (plain or gzipped) for the slide `slide_ref`, or a QuPath
    project — its image of `slide_ref`, or (None) every image mapped to its stored slide by
    file path, file name or name. Everything is read and checked before anything is stored.
    Returns the imports and the project's images that match no stored slide."""
    if not source.exists():
        raise UserError(f"{source}: no such file or project")
    if source.is_dir() or source.suffix == ".qpproj":
        return _import_project(engine, source, slide_ref)
    if slide_ref is None:
        raise UserError(f"{source}: a GeoJSON file needs --slide (the slide its objects are of)")
    slide_id = find_slide(engine, slide_ref)["id"]
    curated = _curated(engine, str(source), slide_id, read_features(source))
    return [_store(engine, *curated, source, "qupath-geojson")], []


def _import_project(engine, project: Path, slide_ref: str | None):
    from spatialdb.interop.qupath_project import outcome, qupath_process, read_project

    with tempfile.TemporaryDirectory(prefix="spatialdb-qupath-") as tmp:
        with qupath_process() as qupath:
            entries = outcome(qupath.submit(read_project, project, Path(tmp)))
        if slide_ref is not None:
            slide = find_slide(engine, slide_ref)
            unique = _unique_file_names(entries)
            entry = next((e for e in entries if _matches(e, slide, unique)), None)
            if entry is None:
                names = ", ".join(e.name for e in entries) or "none"
                raise UserError(
                    f"{project}: no image of slide {slide['id']} ({slide['name']}) "
                    f"(its images: {names})"
                )
            pairs, unmatched = [(entry, slide)], []
        else:
            pairs, unmatched = _map_images(engine, project, entries)
        prepared = [
            _curated(
                engine,
                f"{project} image {entry.name!r}",
                slide["id"],
                read_features(entry.objects),
            )
            for entry, slide in pairs
        ]
    return [_store(engine, *p, project, "qupath-project") for p in prepared], unmatched


def _map_images(engine, project: Path, entries) -> tuple[list, list[str]]:
    """(image, slide) for every project image that matches a stored slide, and the others."""
    with engine.connect() as conn:
        slides = [dict(r) for r in conn.execute(text(ALL_SLIDES)).mappings()]
    pairs, unmatched, taken = [], [], {}
    unique = _unique_file_names(entries)
    for entry in entries:
        found = [s for s in slides if _matches(entry, s, unique)]
        if len(found) > 1:
            ids = ", ".join(str(s["id"]) for s in found)
            raise UserError(f"{project}: image {entry.name!r} matches several slides (ids {ids})")
        if not found:
            unmatched.append(entry.name)
            continue
        slide = found[0]
        if slide["id"] in taken:
            raise UserError(
                f"{project}: images {taken[slide['id']]!r} and {entry.name!r} are both of "
                f"slide {slide['id']} ({slide['name']}); import one with --slide"
            )
        taken[slide["id"]] = entry.name
        pairs.append((entry, slide))
    if not pairs:
        raise UserError(
            f"{project}: none of its images ({', '.join(unmatched) or 'none'}) is a stored slide"
        )
    return pairs, unmatched


def _unique_file_names(entries) -> set[str]:
    """File names that only one of the project's images has."""
    names = [Path(e.file_path).name for e in entries if e.file_path]
    return {n for n in names if names.count(n) == 1}


def _matches(entry, slide: dict, unique_names: set[str]) -> bool:
    """Whether a project image is of the slide: the same file, else a file of the same name
    (only one image has it), else the image's name is the slide's name."""
    if entry.file_path:
        if Path(entry.file_path).resolve() == Path(slide["file_path"]).resolve():
            return True
        name = Path(entry.file_path).name
        if name == Path(slide["file_path"]).name and name in unique_names:
            return True
    return slide["name"] in (entry.name, Path(entry.name).stem)


def _curated(engine, source: str, slide_id: int, features: list):
    """QuPath features checked and fitted to the slide: (slide, parsed, colours, fitted)."""
    slide = stored_slide(engine, slide_id)
    with engine.connect() as conn:
        rows = conn.execute(text(TISSUE_CLASSES_OF_SLIDE), {"id": slide_id})
        tissue_classes = {r[0] for r in rows}
    parsed, colours = parse_features(source, features, tissue_classes)
    fitted = fit_to_slide(source, parsed, slide.width, slide.height)
    return slide, parsed, colours, fitted


def _store(engine, slide, parsed, colours, fitted, source, file_format) -> Imported:
    """Curated objects as the slide's new run (keeping their UUIDs), then its features."""
    run = _store_run(engine, slide, parsed, "curated", source, file_format, uuids=True,
                     colours=colours)  # fmt: skip
    return Imported(slide, run, fitted)


def _store_run(engine, slide, parsed, run_kind, source, file_format, *, uuids, colours=None):
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
