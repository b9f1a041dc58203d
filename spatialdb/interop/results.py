"""Reading results made elsewhere: Cerberus `.dat` files and QuPath / tiatoolbox GeoJSON.

Both readers return `{table: Parsed}` with shapely geometries in level-0 pixels of the slide, and
raise `UserError` with one line for a file they cannot use; `fit_to_slide` then makes the objects
storable (repaired, clipped to the slide) or refuses them.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.errors import ShapelyError
from shapely.geometry import Polygon, shape

from spatialdb.errors import UserError
from spatialdb.store.geometry import prepare_polygons
from spatialdb.store.schema import OBJECT_MODELS, OBJECT_TABLES

#: Cerberus `.dat` keys and the tables they fill.
DAT_TABLES = {"Nuclei": "nucleus", "Gland": "gland", "Lumen": "lumen"}
#: Most vertices one imported polygon may have (a detailed QuPath tissue annotation has some
#: 10^5); larger ones are refused before shapely copies them.
MAX_VERTICES = 1_000_000


@dataclass
class Parsed:
    """Objects of one table, ready for `RunWriter.add`."""

    geoms: list = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    probability: list[float] = field(default_factory=list)
    uuids: list[str | None] = field(default_factory=list)

    def append(self, geom, cls: str, probability: float | None, uuid: str | None = None) -> None:
        self.geoms.append(geom)
        self.classes.append(cls)
        self.probability.append(_number(probability))
        self.uuids.append(uuid)

    def keep(self, geoms, index) -> None:
        """Replace the objects by `geoms`, made from the objects at `index`."""
        self.geoms = list(geoms)
        self.classes = [self.classes[i] for i in index]
        self.probability = [self.probability[i] for i in index]
        self.uuids = [self.uuids[i] for i in index]


def _number(value) -> float:
    """A JSON number as a float; NaN for anything else (and for integers beyond float range)."""
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            pass
    return np.nan


def read_dat(path: Path, mpp: float, type_names: dict[str, list[str]]) -> dict[str, Parsed]:
    """A Cerberus `.dat` (joblib: `Nuclei`/`Gland`/`Lumen` → {id: {box, centroid, contour, type,
    type_prob}} and `resolution`). Contours are at `resolution`; `mpp` is the slide's level 0.
    `type_names` maps `Nuclei`/`Gland` to the class name of each type index."""
    import joblib

    try:
        data = joblib.load(path)
    except Exception as exc:  # joblib raises whatever unpickling hits
        raise UserError(f"{path}: not a Cerberus .dat file ({type(exc).__name__})") from exc
    if not isinstance(data, dict) or not set(DAT_TABLES) & set(data):
        raise UserError(f"{path}: not a Cerberus .dat file (no Nuclei, Gland or Lumen entries)")
    scale = _dat_scale(path, data.get("resolution"), mpp)
    out = {}
    for key, table in DAT_TABLES.items():
        parsed = Parsed()
        names = type_names.get(key)
        for uid, inst in (data.get(key) or {}).items():
            try:
                contour = np.asarray(inst["contour"], dtype=float).reshape(-1, 2) * scale
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{path}: {key} {uid}: no usable contour") from exc
            if len(contour) < 3:
                continue
            kind = inst.get("type")
            cls = names[int(kind)] if names and kind is not None and int(kind) > 0 else table
            parsed.append(Polygon(contour), cls, inst.get("type_prob"))
        out[table] = parsed
    return out


def _dat_scale(path: Path, resolution, mpp: float) -> float:
    """Level-0 pixels per `.dat` pixel."""
    if resolution is None:
        return 1.0
    units, value = resolution.get("units"), float(resolution.get("resolution", 0))
    if units == "mpp" and value > 0:
        return value / mpp
    if units == "baseline" and value > 0:
        return 1.0 / value
    raise UserError(f"{path}: unsupported resolution {resolution!r} (expected mpp or baseline)")


def read_features(path: Path) -> list:
    """The features of a GeoJSON file (plain or gzipped): a FeatureCollection, a list of
    features or one feature."""
    try:
        with open(path, "rb") as file:
            gzipped = file.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rt", encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a GeoJSON file ({exc})") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, list):
        return data
    raise UserError(f"{path}: not a GeoJSON FeatureCollection or list of features")


def read_geometry(source, n: int, geometry):
    """The shapely geometry of feature `n`'s GeoJSON `geometry`; `UserError` if it has none, has
    more than `MAX_VERTICES` vertices in one polygon, or has coordinates that are not finite."""
    if isinstance(geometry, dict) and geometry.get("type") in ("Polygon", "MultiPolygon"):
        depth = 1 if geometry["type"] == "Polygon" else 2
        vertices = _vertex_count(geometry.get("coordinates"), depth)
        if vertices > MAX_VERTICES:
            raise UserError(
                f"{source}: feature {n}: {vertices:,} vertices, more than the "
                f"{MAX_VERTICES:,} a polygon may have"
            )
    try:
        geom = shape(geometry)
        finite = np.isfinite(shapely.get_coordinates(geom)).all()
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        OverflowError,
        ShapelyError,
    ) as exc:
        raise UserError(f"{source}: feature {n}: no usable geometry") from exc
    if not finite:
        raise UserError(f"{source}: feature {n}: coordinates that are not finite numbers")
    return geom


def _vertex_count(coordinates, depth: int) -> int:
    """Positions in nested coordinate lists, `depth` levels of lists above the position lists."""
    if not isinstance(coordinates, list):
        return 0
    if depth == 0:
        return len(coordinates)
    return sum(_vertex_count(c, depth - 1) for c in coordinates)


def read_geojson(path: Path, table: str | None, tissue_classes: set[str]) -> dict[str, Parsed]:
    """QuPath or tiatoolbox GeoJSON in level-0 pixels (see `read_features` and
    `geojson_objects`)."""
    return geojson_objects(path, read_features(path), table, tissue_classes)


def geojson_objects(
    source, features: list, table: str | None, tissue_classes: set[str]
) -> dict[str, Parsed]:
    """Polygonal features as objects per table; points and lines are skipped. The table comes
    from `table`, else a feature's `spatialdb_table` property, else its class name: `*gland*`
    → gland, `*lumen*` → lumen, a tissue class or a QuPath annotation → tissue_region, anything
    else → nucleus."""
    out = {t: Parsed() for t in OBJECT_TABLES}
    for n, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise UserError(f"{source}: feature {n} is not a GeoJSON feature")
        geom = read_geometry(source, n, feature.get("geometry"))
        if not isinstance(geom, shapely.Polygon | shapely.MultiPolygon):
            continue  # points and lines have no area to store
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise UserError(f"{source}: feature {n}: properties are not a JSON object")
        cls = _class_name(props)
        target = table or props.get("spatialdb_table") or _table_for(cls, props, tissue_classes)
        if target not in out:
            raise UserError(f"{source}: feature {n}: unknown table {target!r}")
        out[target].append(geom, cls or target, _probability(props))
    return {t: p for t, p in out.items() if p.geoms}


def _class_name(props: dict) -> str | None:
    classification = props.get("classification")
    if isinstance(classification, dict):
        name = classification.get("name")
        return name if isinstance(name, str) and name else None
    for key in ("classification", "class", "type"):
        value = props.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _table_for(cls: str | None, props: dict, tissue_classes: set[str]) -> str:
    name = (cls or "").lower()
    if "gland" in name:
        return "gland"
    if "lumen" in name or "lumina" in name:
        return "lumen"
    if name in tissue_classes or props.get("objectType") == "annotation":
        return "tissue_region"
    return "nucleus"


def _probability(props: dict) -> float | None:
    measurements = props.get("measurements")
    if isinstance(measurements, dict):
        for key in ("probability", "Probability"):
            if key in measurements:
                return measurements[key]
    value = props.get("probability")
    return value if isinstance(value, int | float) else None


def fit_to_slide(source, parsed: dict[str, Parsed], width: int, height: int) -> dict[str, int]:
    """Make `parsed` storable, in place: invalid shapes repaired (make_valid, as the loader
    does), parts beyond the slide's edge clipped off, what has no area left dropped. Returns how
    many objects were repaired, clipped and dropped. Refuses (`UserError`) objects lying wholly
    outside the slide (wrong slide, or a resolution mismatch) and files that leave nothing."""
    frame = shapely.box(0, 0, width, height)
    counts = {"repaired": 0, "clipped": 0, "dropped": 0}
    for table, objects in parsed.items():
        geoms = np.array(objects.geoms, dtype=object)
        outside = ~shapely.intersects(geoms, frame) & ~shapely.is_empty(geoms)
        if outside.any():
            raise UserError(
                f"{source}: {int(outside.sum())} {table} object(s) lie outside the "
                f"{width} x {height} slide (wrong --slide, or a resolution mismatch?)"
            )
        multi = OBJECT_MODELS[table].geometry_type != "POLYGON"
        valid = prepare_polygons(geoms, multi=multi)
        beyond = ~shapely.covered_by(valid.geoms, frame)
        clipped = valid.geoms.copy()
        clipped[beyond] = shapely.clip_by_rect(clipped[beyond], 0, 0, width, height)
        fitted = prepare_polygons(clipped, multi=multi)
        objects.keep(fitted.geoms, valid.source_index[fitted.source_index])
        counts["repaired"] += valid.repaired
        counts["clipped"] += int(beyond.sum())
        counts["dropped"] += len(geoms) - len(fitted.geoms)
    if counts["dropped"] and not any(objects.geoms for objects in parsed.values()):
        raise UserError(f"{source}: no object has any area inside the slide")
    return counts


def fit_note(counts: dict[str, int]) -> str:
    """`fit_to_slide`'s counts for the command's summary line ('' when nothing was changed)."""
    changed = ", ".join(f"{n:,} {what}" for what, n in counts.items() if n)
    return f"; {changed}" if changed else ""
