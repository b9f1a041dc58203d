"""QuPath's GeoJSON dialect: stored objects as QuPath objects, and QuPath objects back.

A nucleus is a QuPath *detection*; glands, lumina and tissue regions are *annotations*. Each
feature carries its object's UUID as `id`, `properties.objectType`, `properties.classification`
(`{name, color}`) and `properties.measurements` as a map (µm from the object and the feature
tables), in level-0 pixel coordinates. The feature text is built by the server, one row per
object, and streamed into a gzipped FeatureCollection: no slide is ever held in memory.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import json
import threading
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from queue import Queue

from psycopg2 import sql

from spatialdb.errors import UserError
from spatialdb.interop.results import Parsed, read_geometry

#: `--objects` names and the tables they export.
OBJECT_CHOICES = {
    "nuclei": "nucleus",
    "glands": "gland",
    "lumina": "lumen",
    "tissue": "tissue_region",
}
OBJECT_TYPES = {
    "nucleus": "detection",
    "gland": "annotation",
    "lumen": "annotation",
    "tissue_region": "annotation",
}
#: Colours of the shipped model's classes (QuPath shows objects in their class colour).
PALETTE = {
    "epithelial": (220, 50, 50), "lymphocyte": (40, 90, 220), "connective": (60, 170, 60),
    "plasma": (160, 80, 200), "neutrophil": (240, 160, 30), "eosinophil": (240, 110, 180),
    "nucleus": (120, 120, 120), "other": (150, 150, 150),
    "gland": (250, 200, 0), "surface-epi": (255, 140, 0),
    "benign gland": (250, 200, 0), "malignant gland": (230, 60, 0),
    "lumen": (0, 200, 220), "abnormal epithelium": (200, 0, 80),
    "normal epithelium": (255, 120, 150),
    "inflammatory": (80, 80, 255), "muscle": (150, 60, 30), "stroma": (120, 200, 120),
    "debris": (140, 140, 100), "mucous": (180, 220, 255), "adipose": (255, 240, 200),
}  # fmt: skip
#: Coordinates are written with this many decimals (level-0 pixels: 0.001 px).
DECIMALS = 3
BATCH_ROWS = 10_000

#: Shape measurements of every object (`spatialdb.store.morphometry`) as QuPath names them.
SHAPE = {
    "Equivalent diameter µm": "o.equivalent_diameter_um", "Major axis µm": "o.major_axis_um",
    "Minor axis µm": "o.minor_axis_um", "Eccentricity": "o.eccentricity",
    "Orientation °": "o.orientation_deg", "Circularity": "o.circularity",
    "Solidity": "o.solidity", "Extent": "o.extent",
}  # fmt: skip
#: Stain intensity of segmented nuclei, named as QuPath's cell detection names its own.
INTENSITY = {
    f"{place}: {stain} OD {label}": f"o.{prefix}{column}_od_{stat}"
    for place, prefix in (("Nucleus", ""), ("Cytoplasm", "cytoplasm_"))
    for stain, column in (("Hematoxylin", "haematoxylin"), ("Eosin", "eosin"))
    for label, stat in (("mean", "mean"), ("std dev", "std"), ("median", "q50"))
}
#: QuPath measurement name -> SQL expression, per table (`o` the object, `f` its gland features).
#: Glands keep their Feret axes, circularity and solidity from the gland features.
MEASUREMENTS = {
    "nucleus": {
        "Area µm^2": "o.area_um2", "Perimeter µm": "o.perimeter_um", **SHAPE, **INTENSITY,
        "Probability": "o.probability",
    },
    "gland": {
        "Area µm^2": "o.area_um2", "Perimeter µm": "o.perimeter_um",
        "Circularity": "f.circularity", "Solidity": "f.solidity",
        "Major axis µm": "f.major_axis_um", "Minor axis µm": "f.minor_axis_um",
        "Elongation": "f.elongation", "Nuclei": "f.nuclei_count",
        "Nuclei per 1000 µm^2": "f.nuclei_per_1000um2",
        "Nuclear area mean µm^2": "f.nuclear_area_mean_um2",
        "Nuclear area median µm^2": "f.nuclear_area_median_um2",
        "Lumina": "f.lumen_count", "Lumen area µm^2": "f.lumen_area_um2",
        "Lumen/gland area": "f.lumen_to_gland_area_ratio",
        "Nearest gland µm": "f.nearest_gland_distance_um",
        **{k: v for k, v in SHAPE.items() if k not in ("Major axis µm", "Minor axis µm",
                                                       "Circularity", "Solidity")},
    },
    "lumen": {"Area µm^2": "o.area_um2", "Perimeter µm": "o.perimeter_um", **SHAPE},
    "tissue_region": {"Area µm^2": "o.area_um2", "Probability": "o.probability"},
}  # fmt: skip


def default_colour(name: str) -> tuple[int, int, int]:
    """The palette colour of a known class, else a stable colour derived from the name."""
    if name in PALETTE:
        return PALETTE[name]
    hue = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.9))


def class_colours(cursor, slide_ids: list[int], tables: list[str]) -> dict[str, list[int]]:
    """Every class the export will write, with its colour: `object_class`, else the default."""
    union = sql.SQL(" UNION ").join(
        sql.SQL("SELECT DISTINCT class FROM {} WHERE slide_id = ANY(%(ids)s)").format(
            sql.Identifier(t)
        )
        for t in tables
    )
    cursor.execute(
        sql.SQL("SELECT c.class, o.color FROM ({}) c LEFT JOIN object_class o ON o.name = c.class "
                "ORDER BY 1").format(union),
        {"ids": slide_ids},
    )  # fmt: skip
    return {name: list(color or default_colour(name)) for name, color in cursor.fetchall()}


def feature_query(table: str, slide_id: int, colours: dict[str, list[int]]) -> sql.Composed:
    """One row per object of `table` on the slide: its QuPath GeoJSON feature as text."""
    measurements = sql.SQL(", ").join(
        sql.SQL("{}, {}").format(sql.Literal(name), sql.SQL(expr))
        for name, expr in MEASUREMENTS[table].items()
    )
    # The geometry's GeoJSON is spliced in as text: re-parsing it as json would cost more.
    return sql.SQL(
        """SELECT '{{"type":"Feature","id":"' || o.uuid || '","geometry":'
       || ST_AsGeoJSON(o.geom, {decimals}) || ',"properties":'
       || json_build_object(
              'objectType', {object_type},
              'classification', json_build_object(
                  'name', o.class, 'color', {colours}::jsonb -> o.class),
              'isLocked', false,
              'measurements', json_strip_nulls(json_build_object({measurements}))
          )::text || '}}'
FROM {table} o{features}
WHERE o.slide_id = {slide}
ORDER BY o.id"""
    ).format(
        decimals=sql.Literal(DECIMALS),
        object_type=sql.Literal(OBJECT_TYPES[table]),
        colours=sql.Literal(json.dumps(colours)),
        measurements=measurements,
        table=sql.Identifier(table),
        features=_feature_join(table),
        slide=sql.Literal(slide_id),
    )


def object_query(table: str, slide_id: int) -> sql.Composed:
    """One row per object of `table` on the slide, as QuPath objects are built from it: UUID,
    class, WKB geometry, then the values of `MEASUREMENTS[table]` in order (NULL: not measured)."""
    return sql.SQL(
        "SELECT o.uuid::text, o.class, ST_AsBinary(o.geom), {measurements} "
        "FROM {table} o{features} WHERE o.slide_id = {slide} ORDER BY o.id"
    ).format(
        measurements=sql.SQL(", ").join(map(sql.SQL, MEASUREMENTS[table].values())),
        table=sql.Identifier(table),
        features=_feature_join(table),
        slide=sql.Literal(slide_id),
    )


def _feature_join(table: str) -> sql.Composable:
    """The join that gives a gland's measurements from `gland_feature` (`f`)."""
    if table != "gland":
        return sql.SQL("")
    return sql.SQL(
        " LEFT JOIN gland_feature f ON f.slide_id = o.slide_id AND f.gland_id = o.id "
        "AND f.run_id = o.run_id"
    )


def stream_features(raw, slide_id: int, tables: list[str], colours) -> Iterator[list[str]]:
    """Batches of feature texts of a slide, table after table, from a server-side cursor."""
    for table in tables:
        with raw.cursor(name=f"qupath_{table}") as cur:
            cur.itersize = BATCH_ROWS
            cur.execute(feature_query(table, slide_id, colours))
            while rows := cur.fetchmany(BATCH_ROWS):
                yield [row[0] for row in rows]


def write_feature_collection(path: Path, batches: Iterator[list[str]]) -> int:
    """A gzipped FeatureCollection from feature texts; how many features it holds. The batches
    are fetched in a thread while the previous ones are compressed."""
    count = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as out:
        out.write('{"type":"FeatureCollection","features":[\n')
        for batch in prefetched(batches):
            if batch:
                out.write((",\n" if count else "") + ",\n".join(batch))
                count += len(batch)
        out.write("\n]}\n")
    return count


def prefetched(items: Iterator, depth: int = 4) -> Iterator:
    """The items of `items`, produced in a background thread at most `depth` ahead."""
    done = object()
    queue: Queue = Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                queue.put(item)
            queue.put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put(exc)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        worker.join(timeout=0)


IMPORT_SCRIPT = """\
// spatialdb: add this folder's objects to the image open in QuPath (0.4 or later).
// Automate > Script editor, open this file, Run. Objects keep UUIDs, classes and measurements.
import java.util.zip.GZIPInputStream
import qupath.lib.common.ColorTools
import qupath.lib.io.PathIO
import qupath.lib.objects.classes.PathClass

def folder = new File({folder})
def image = getProjectEntry()?.getImageName() ?: getCurrentServer().getMetadata().getName()
def file = new File(folder, GeneralTools.stripExtension(image) + '.geojson.gz')
if (!file.exists()) {{
    print "spatialdb: no ${{file.name}} in ${{folder}}"
    return
}}
new groovy.json.JsonSlurper().parse(new File(folder, 'classes.json')).each {{ c ->
    PathClass.fromString(c.name, ColorTools.packRGB(c.color[0], c.color[1], c.color[2]))
}}
def objects = new GZIPInputStream(new FileInputStream(file)).withCloseable {{
    PathIO.readObjectsFromGeoJSON(it)
}}
addObjects(objects)
print "spatialdb: added ${{objects.size()}} objects from ${{file.name}}"
"""


def import_script(folder: Path) -> str:
    return IMPORT_SCRIPT.format(folder=json.dumps(str(folder.resolve())))


def parse_features(
    source: str, features: list[dict], tissue_classes: set[str]
) -> tuple[dict[str, Parsed], dict[str, list[int]]]:
    """QuPath features as objects per table, and the colour of each class they use.

    Detections (and cells, by their nucleus) are nuclei; annotations are tissue regions when
    their class is a tissue class, lumina when it names a lumen, and glands otherwise.
    """
    out = {table: Parsed() for table in OBJECT_TYPES}
    colours: dict[str, list[int]] = {}
    for n, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise UserError(f"{source}: feature {n} is not a GeoJSON feature")
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise UserError(f"{source}: feature {n}: properties are not a JSON object")
        kind = props.get("objectType") or props.get("object_type") or "annotation"
        if kind not in ("detection", "cell", "annotation"):
            raise UserError(
                f"{source}: feature {n}: objectType {kind!r} is not stored "
                "(expected detection, cell or annotation)"
            )
        geometry = feature.get("geometry")
        if kind == "cell" and props.get("nucleusGeometry"):
            geometry = props["nucleusGeometry"]
        geom = read_geometry(source, n, geometry)
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            raise UserError(f"{source}: feature {n}: a {geom.geom_type} has no area to store")
        classification = props.get("classification") or {}
        name = classification.get("name") if isinstance(classification, dict) else None
        name = name if isinstance(name, str) and name else None
        table = _table(kind, name, tissue_classes)
        name = name or table
        colour = classification.get("color") if isinstance(classification, dict) else None
        if _is_rgb(colour):
            colours.setdefault(name, [int(c) for c in colour[:3]])
        measurements = props.get("measurements")
        probability = measurements.get("Probability") if isinstance(measurements, dict) else None
        out[table].append(geom, name, probability, _uuid(feature.get("id")))
    return {t: p for t, p in out.items() if p.geoms}, colours


def _table(kind: str, name: str | None, tissue_classes: set[str]) -> str:
    if kind in ("detection", "cell"):
        return "nucleus"
    if name in tissue_classes:
        return "tissue_region"
    if name and "lumen" in name.lower():
        return "lumen"
    return "gland"


def _is_rgb(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) >= 3
        and all(isinstance(c, int) and 0 <= c <= 255 for c in value[:3])
    )


def _uuid(value) -> str:
    """The feature's UUID, or a new one (objects drawn in QuPath before 0.4 have none)."""
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        return str(uuidlib.uuid4())
