"""QuPath projects (`.qpproj`) through paquo, which runs QuPath's own classes in a JVM.

A JVM cannot be stopped, and a process that forks after starting one hangs its children, so
every project operation runs in a fresh child interpreter (`multiprocessing` "spawn"): neither
the dashboard's long-lived process nor an ingest that forks post-processing workers ever holds
QuPath. paquo needs a QuPath installation (`PAQUO_QUPATH_DIR`, or paquo's own search).

Writing, the child reads the slide's objects from the database itself (while the parent writes
the GeoJSON files) and builds QuPath objects directly from their WKB with QuPath's and JTS's
classes, added to the hierarchy a batch at a time: no paquo wrapper per object, no JSON.
Reading, QuPath's own GeoJSON writer puts each image's objects in a file for the parent.
"""

from __future__ import annotations

import json
import multiprocessing
import struct
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from spatialdb.errors import UserError
from spatialdb.interop.qupath_geojson import (
    BATCH_ROWS,
    MEASUREMENTS,
    OBJECT_TYPES,
    object_query,
    prefetched,
)


@dataclass(frozen=True)
class ProjectImage:
    """A slide to add as a project image: its id, file and µm per pixel."""

    slide_id: int
    file_path: str
    mpp: float


@dataclass(frozen=True)
class ProjectEntry:
    """An image read back from a project: its name, its file (None: not a local file) and a
    GeoJSON file of its annotations and detections."""

    name: str
    file_path: str | None
    objects: Path


def qupath_process() -> ProcessPoolExecutor:
    """A pool of one fresh child interpreter for paquo (use as a context manager)."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def outcome(future: Future):
    """The result of work sent to `qupath_process`; one line if the child died."""
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise UserError(f"QuPath's process ended unexpectedly ({exc})") from None


def start_qupath() -> None:
    """Start QuPath in this process, or raise `UserError` saying why it cannot be started."""
    try:
        import paquo.projects  # noqa: F401  (starts the JVM with QuPath's classes)
    except (ValueError, FileNotFoundError) as exc:  # paquo: none found, or not a QuPath there
        raise UserError(
            f"QuPath is not installed ({exc}); set PAQUO_QUPATH_DIR to a QuPath installation"
        ) from None
    except Exception as exc:  # a broken installation: JVM or jar errors
        raise UserError(
            f"QuPath could not be started through paquo ({type(exc).__name__}: {exc})"
        ) from None
    _quiet()


def _quiet() -> None:
    """Keep QuPath's and paquo's logs (QuPath logs at DEBUG to stdout) out of the command's
    output; errors still reach it as exceptions."""
    import logging

    from paquo.java import JClass

    logging.getLogger("paquo").setLevel(logging.ERROR)
    level = JClass("ch.qos.logback.classic.Level").ERROR
    JClass("org.slf4j.LoggerFactory").getLogger("ROOT").setLevel(level)


def write_project(
    project_dir: Path, db_url: str, images: list[ProjectImage], tables: list[str], colours: dict
) -> dict[int, int]:
    """A new QuPath project with each slide as a brightfield (H&E) image at its stored µm per
    pixel holding its objects of `tables`, and the class list with colours. Runs in the child;
    returns the objects written per slide id."""
    start_qupath()
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    from spatialdb.store.db import make_engine

    engine = make_engine(db_url)
    written = {}
    try:
        with QuPathProject(project_dir, mode="x") as project:
            project.path_classes = [QuPathPathClass(n, color=tuple(c)) for n, c in colours.items()]
            classes = {c.name: c.java_object for c in project.path_classes}
            for image in images:
                try:
                    entry = project.add_image(
                        image.file_path, image_type=QuPathImageType.BRIGHTFIELD_H_E
                    )
                except Exception as exc:  # paquo/QuPath raise many Java and Python errors
                    raise UserError(
                        f"QuPath cannot open {image.file_path} (slide {image.slide_id}): "
                        f"{type(exc).__name__}: {_first_line(exc)}"
                    ) from None
                _calibrate(entry, image.mpp)
                hierarchy = entry.hierarchy.java_object
                written[image.slide_id] = sum(
                    _add_objects(hierarchy, engine, image.slide_id, table, classes)
                    for table in tables
                )
                entry.save()
    finally:
        engine.dispose()
    return written


def _calibrate(entry, mpp: float) -> None:
    """Set the image's pixel size to the slide's stored µm per pixel."""
    from paquo.java import JClass

    builder = JClass("qupath.lib.images.servers.ImageServerMetadata$Builder")
    data = entry._image_data  # paquo's ImageData of the entry, which `entry.save()` writes
    data.updateServerMetadata(builder(data.getServerMetadata()).pixelSizeMicrons(mpp, mpp).build())


def _add_objects(hierarchy, engine, slide_id: int, table: str, classes: dict) -> int:
    """Add the slide's objects of `table` to the hierarchy, a batch of rows at a time (the next
    batch fetched meanwhile). Each batch's geometries are read by JTS from one WKB
    GeometryCollection: Java calls cost a few µs each, so the loop per object makes few."""
    from jpype import JString
    from paquo.java import JClass

    tools = JClass("qupath.lib.roi.GeometryTools")
    objects = JClass("qupath.lib.objects.PathObjects")
    reader = JClass("org.locationtech.jts.io.WKBReader")(tools.getDefaultFactory())
    plane = JClass("qupath.lib.regions.ImagePlane").getDefaultPlane()
    new_uuid, new_list = JClass("java.util.UUID").fromString, JClass("java.util.ArrayList")
    create = (
        objects.createDetectionObject
        if OBJECT_TYPES[table] == "detection"
        else objects.createAnnotationObject
    )
    names = [JString(name) for name in MEASUREMENTS[table]]
    count = 0
    raw = engine.raw_connection()
    try:
        with raw.cursor(name=f"qupath_project_{table}") as cur:
            cur.itersize = BATCH_ROWS
            cur.execute(object_query(table, slide_id))
            for rows in prefetched(iter(lambda: cur.fetchmany(BATCH_ROWS), [])):
                collection = reader.read(_wkb_collection([row[2] for row in rows]))
                geometry = collection.getGeometryN
                batch = new_list(len(rows))
                for n, (uid, cls, _, *values) in enumerate(rows):
                    obj = create(tools.geometryToROI(geometry(n), plane), classes[cls])
                    obj.setID(new_uuid(uid))
                    put = obj.getMeasurementList().put
                    for name, value in zip(names, values, strict=True):
                        if value is not None:
                            put(name, float(value))
                    batch.add(obj)
                hierarchy.addObjects(batch)
                count += len(rows)
        raw.rollback()
    finally:
        raw.close()
    return count


def _wkb_collection(parts: list) -> bytes:
    """One WKB GeometryCollection (little-endian) holding WKB geometries."""
    return b"\x01" + struct.pack("<II", 7, len(parts)) + b"".join(parts)


def read_project(project: Path, out_dir: Path) -> list[ProjectEntry]:
    """Every image of a project with its objects written to a GeoJSON file in `out_dir` by
    QuPath's own writer. Runs in the child."""
    try:
        start_qupath()
    except UserError as exc:
        raise UserError(f"{project}: a QuPath project needs QuPath: {exc}") from None
    from paquo.java import GeneralTools, JClass
    from paquo.projects import QuPathProject

    path = project / "project.qpproj" if project.is_dir() else project
    version = _saved_by(path)
    ours = str(GeneralTools.getVersion())
    if _version_key(version) > _version_key(ours):
        raise UserError(
            f"{path}: saved by QuPath {version}, newer than the QuPath {ours} here; "
            f"open it with QuPath {version} or later"
        )
    try:
        qp = QuPathProject(path, mode="r")
    except Exception as exc:  # Java or paquo errors on a damaged project
        raise UserError(f"{path}: QuPath cannot open this project ({_first_line(exc)})") from None
    path_io, java_file = JClass("qupath.lib.io.PathIO"), JClass("java.io.File")
    options = JClass("qupath.lib.io.PathIO$GeoJsonExportOptions")
    entries = []
    with qp:
        for n, entry in enumerate(qp.images):
            if not (entry.entry_path / "data.qpdata").is_file():
                raise UserError(
                    f"{path}: image {entry.image_name!r} has no saved objects "
                    f"({entry.entry_path / 'data.qpdata'} is missing)"
                )
            hierarchy = entry.hierarchy.java_object
            objects = JClass("java.util.ArrayList")(hierarchy.getAnnotationObjects())
            objects.addAll(hierarchy.getDetectionObjects())
            out = out_dir / f"image-{n}.geojson"
            path_io.exportObjectsAsGeoJSON(java_file(str(out)), objects, options.FEATURE_COLLECTION)
            entries.append(ProjectEntry(entry.image_name, _local_file(entry.uri), out))
    return entries


def _saved_by(path: Path) -> str:
    """The QuPath version a `project.qpproj` names; `UserError` if it is not a project file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such QuPath project") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a QuPath project ({_first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: not a QuPath project (no list of images)")
    return str(data.get("version") or "0")


def _version_key(version: str) -> tuple[int, ...]:
    """(0, 6, 0) from "0.6.0" or "0.6.0-rc2"."""
    digits = []
    for part in version.split("-")[0].split("."):
        if not part.isdigit():
            break
        digits.append(int(part))
    return tuple(digits)


def _local_file(uri: str | None) -> str | None:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(str(uri or ""))
    return unquote(parsed.path) if parsed.scheme == "file" else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
