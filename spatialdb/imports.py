"""Reading results made elsewhere: Cerberus `.dat` files and QuPath / tiatoolbox GeoJSON.

Both readers return `{table: Parsed}` with shapely geometries in level-0 pixels of the slide, and
raise `UserError` with one line for a file they cannot use.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon, shape

from spatialdb.errors import UserError
from spatialdb.schema import OBJECT_TABLES

#: Cerberus `.dat` keys and the tables they fill.
DAT_TABLES = {"Nuclei": "nucleus", "Gland": "gland", "Lumen": "lumen"}


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
        self.probability.append(
            float(probability) if isinstance(probability, int | float) else np.nan
        )
        self.uuids.append(uuid)


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


def read_geojson(path: Path, table: str | None, tissue_classes: set[str]) -> dict[str, Parsed]:
    """QuPath or tiatoolbox GeoJSON in level-0 pixels (see `read_features`). The table comes
    from `table`, else a feature's `spatialdb_table` property, else its class name: `*gland*`
    → gland, `*lumen*` → lumen, a tissue class or a QuPath annotation → tissue_region, anything
    else → nucleus."""
    out = {t: Parsed() for t in OBJECT_TABLES}
    for n, feature in enumerate(read_features(path)):
        try:
            geom = shape(feature["geometry"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path}: feature {n}: no usable geometry") from exc
        if not isinstance(geom, shapely.Polygon | shapely.MultiPolygon):
            continue  # points and lines have no area to store
        props = feature.get("properties") or {}
        cls = _class_name(props)
        target = table or props.get("spatialdb_table") or _table_for(cls, props, tissue_classes)
        if target not in out:
            raise UserError(f"{path}: feature {n}: unknown table {target!r}")
        out[target].append(geom, cls or target, _probability(props))
    return {t: p for t, p in out.items() if p.geoms}


def _class_name(props: dict) -> str | None:
    classification = props.get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
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


def check_inside(path: Path, parsed: dict[str, Parsed], width: int, height: int) -> None:
    """Refuse objects lying wholly outside the slide: wrong slide or wrong resolution."""
    frame = shapely.box(0, 0, width, height)
    for table, objects in parsed.items():
        outside = ~shapely.intersects(np.array(objects.geoms, dtype=object), frame)
        if outside.any():
            raise UserError(
                f"{path}: {int(outside.sum())} {table} object(s) lie outside the "
                f"{width} x {height} slide (wrong --slide, or a resolution mismatch?)"
            )
