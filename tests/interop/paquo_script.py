"""What the tests do to a QuPath project through paquo, in a child process (a JVM must not start
in the pytest process, which forks ingest workers later).

    python -m tests.interop.paquo_script dump PROJECT OUT.json
    python -m tests.interop.paquo_script edit PROJECT OUT.json

`dump` writes every image (name, file, image type, µm per pixel, image server) with its objects
(UUID, annotation or detection, class, WKT, measurements) and the project's classes; `edit`
makes a pathologist's edits first: two classes changed, two objects deleted, one annotation and
one detection drawn, one vertex of a gland moved; then dumps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def dump(project) -> dict:
    images = []
    for entry in project.images:
        data = entry._image_data
        metadata = data.getServerMetadata()
        mpp = [float(metadata.getPixelWidthMicrons()), float(metadata.getPixelHeightMicrons())]
        hierarchy = entry.hierarchy
        objects = []
        for kind, proxy in (
            ("annotation", hierarchy.annotations),
            ("detection", hierarchy.detections),
        ):
            for obj in proxy:
                objects.append({
                    "id": str(obj.java_object.getID()),
                    "type": kind,
                    "class": obj.path_class.name if obj.path_class else None,
                    "wkt": obj.roi.wkt,
                    "measurements": dict(obj.measurements),
                })  # fmt: skip
        images.append({
            "name": entry.image_name,
            "uri": entry.uri,
            "image_type": entry.image_type.value,
            "mpp": mpp,
            "server": str(data.getServer().getClass().getSimpleName()),
            "objects": objects,
        })  # fmt: skip
    classes = [{"name": c.name, "color": list(c.color.to_rgb())} for c in project.path_classes]
    return {"images": images, "classes": classes}


def edit(project) -> list[str]:
    """The edits, on the first image; returns what was done (for the test's messages)."""
    import shapely
    from paquo.classes import QuPathPathClass
    from shapely import affinity

    hierarchy = project.images[0].hierarchy
    detections, annotations = list(hierarchy.detections), list(hierarchy.annotations)
    detections[0].update_path_class(QuPathPathClass("lymphocyte"))
    gland = next(a for a in annotations if a.path_class and a.path_class.name == "gland")
    gland.update_path_class(QuPathPathClass("Tumor"))
    hierarchy.detections.discard(detections[1])
    hierarchy.annotations.discard(next(a for a in annotations if a is not gland))
    hierarchy.add_annotation(
        roi=shapely.box(2000, 2000, 2300, 2200), path_class=QuPathPathClass("gland")
    )
    hierarchy.add_detection(
        roi=shapely.Point(2500, 2500).buffer(6), path_class=QuPathPathClass("epithelial")
    )
    ring = list(gland.roi.exterior.coords)
    ring[0] = ring[-1] = (ring[0][0] + 5.25, ring[0][1] - 3.5)  # one vertex moved
    moved = shapely.Polygon(ring, [list(i.coords) for i in gland.roi.interiors])
    gland.update_roi(moved if moved.is_valid else affinity.translate(gland.roi, 5.25, -3.5))
    return ["classes", "deleted", "added", "moved"]


def main() -> None:
    from paquo.projects import QuPathProject

    command, project, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if command == "edit":
        with QuPathProject(project, mode="r+") as qp:
            edit(qp)
            for entry in qp.images:
                entry.save()
    with QuPathProject(project, mode="r") as qp:
        out.write_text(json.dumps(dump(qp)))


if __name__ == "__main__":
    main()
