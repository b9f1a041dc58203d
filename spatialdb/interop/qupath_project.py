"""QuPath projects (`.qpproj`) through paquo, which runs QuPath's own classes in a JVM.

paquo needs a QuPath installation (`PAQUO_QUPATH_DIR`, or paquo's own search). Objects go in
and out as the same QuPath GeoJSON features as `spatialdb.interop.qupath_geojson` writes, so a
project and a GeoJSON export hold identical objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from spatialdb.errors import UserError


def qupath_missing() -> str | None:
    """None when paquo can start QuPath; otherwise the reason, in one line."""
    try:
        import paquo.projects  # noqa: F401  (starts the JVM with QuPath's classes)
    except (ValueError, FileNotFoundError) as exc:  # paquo: none found, or not a QuPath there
        return f"QuPath is not installed ({exc}); set PAQUO_QUPATH_DIR to a QuPath installation"
    except Exception as exc:  # a broken installation: JVM or jar errors
        return f"QuPath could not be started through paquo ({type(exc).__name__}: {exc})"
    return None


def write_project(
    project_dir: Path,
    slides: list[dict],
    colours: dict[str, list[int]],
    features_of: Callable[[dict], Iterator[list[str]]],
) -> dict[int, int]:
    """A new QuPath project with each slide as a brightfield (H&E) image holding its objects,
    added in bulk with the hierarchy's autoflush off. Returns objects written per slide id."""
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    written = {}
    with QuPathProject(project_dir, mode="x") as project:
        project.path_classes = [QuPathPathClass(n, color=tuple(c)) for n, c in colours.items()]
        for slide in slides:
            try:
                entry = project.add_image(
                    slide["file_path"], image_type=QuPathImageType.BRIGHTFIELD_H_E
                )
            except Exception as exc:  # paquo/QuPath raise a variety of Java and Python errors
                raise UserError(
                    f"QuPath cannot open {slide['file_path']} (slide {slide['id']}): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
            count = 0
            with entry.hierarchy.no_autoflush():
                for batch in features_of(slide):
                    entry.hierarchy.load_geojson([json.loads(f) for f in batch])
                    count += len(batch)
            written[slide["id"]] = count
    return written


def read_project(project: Path, image_name: str) -> list[dict]:
    """The GeoJSON features (annotations and detections) of the project's image whose file is
    called `image_name`."""
    from paquo.java import GsonTools
    from paquo.projects import QuPathProject

    with QuPathProject(project, mode="r") as qp:
        names = [Path(str(entry.uri)).name for entry in qp.images]
        matches = [e for e, n in zip(qp.images, names, strict=True) if n == image_name]
        if not matches:
            raise UserError(
                f"{project}: no image called {image_name} (it has: {', '.join(names) or 'none'})"
            )
        hierarchy = matches[0].hierarchy.java_object
        gson = GsonTools.getInstance()
        features = []
        for objects in (hierarchy.getAnnotationObjects(), hierarchy.getDetectionObjects()):
            features += json.loads(str(gson.toJson(objects)))
        return features
