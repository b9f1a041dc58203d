"""Object overlays as Mapbox vector tiles, made by PostGIS (`ST_AsMVT`) per slide, run and tile.

One MVT layer per object table (`nucleus`, `gland`, `lumen`, `tissue_region`) with the object's
id, class and a few measurements. Geometries are level-0 pixels with y down; the viewer's map
has y up (its extent is [0, -height, width, 0]), so they are mirrored (`ST_Scale(…, 1, -1)`) into
the tile's envelope, whose top is -y0. Nuclei change form with the zoom, so that a tile never
carries a million polygons: outlines where a tile pixel covers at most `OUTLINES_TO` level-0
pixels, centroids up to `POINTS_TO`, and beyond that a `nucleus_density` layer of square cells
(at least `DENSITY_CELL_PX` level-0 pixels and 8 tile pixels wide) holding each class's count,
read from the level of the stored `nucleus_density` pyramid with cells that size (or counted from
the centroids where a run has none: not refreshed yet). Objects smaller than 2 × 2 tile
pixels are left out.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from dashboard.data import TABLES, Box, Reader
from dashboard.tiles import TILE_PX
from spatialdb.store.schema import DENSITY_CELL_PX

EXTENT = 4096  # MVT units per tile side
BUFFER = 64  # MVT units drawn beyond the tile's edge, so outlines meet across tiles
OUTLINES_TO = 2
POINTS_TO = 8
DENSITY_TILE_PX = 8  # a density cell's side in tile pixels, at the least
LAYER_POOL = ThreadPoolExecutor(8, thread_name_prefix="vector-tile-layer")

#: The attributes of every outline, besides its id and class (as float32: 4 bytes in a tile).
ATTRIBUTES = "area_um2::real, perimeter_um::real, circularity::real, eccentricity::real"

_ENVELOPE = "ST_MakeEnvelope(%(x0)s, -%(y1)s, %(x1)s, -%(y0)s, 0)"
_SEARCH = "ST_MakeEnvelope(%(sx0)s, %(sy0)s, %(sx1)s, %(sy1)s, 0)"

OUTLINES = f"""
SELECT ST_AsMVT(t, %(layer)s, {EXTENT}, 'geom', 'id') FROM (
    SELECT id, class, {ATTRIBUTES},
           ST_AsMVTGeom(ST_Scale(ST_Simplify(geom, %(tolerance)s, true), 1, -1), {_ENVELOPE},
                        {EXTENT}, {BUFFER}, true) AS geom
    FROM {{table}}
    WHERE slide_id = %(slide)s AND run_id = %(run)s AND geom && {_SEARCH}
      AND area_um2 >= %(min_area_um2)s
) t WHERE geom IS NOT NULL
"""
CENTROIDS = f"""
SELECT ST_AsMVT(t, 'nucleus', {EXTENT}, 'geom', 'id') FROM (
    SELECT id, class,
           ST_AsMVTGeom(ST_Scale(centroid, 1, -1), {_ENVELOPE}, {EXTENT}, 0, true) AS geom
    FROM nucleus
    WHERE slide_id = %(slide)s AND run_id = %(run)s AND centroid && {_SEARCH}
) t
"""
#: Cells of %(cell)s level-0 pixels: (cx, cy, class, n), from the stored counts or the centroids.
STORED_CELLS = """
SELECT gx AS cx, gy AS cy, class, n
FROM nucleus_density
WHERE slide_id = %(slide)s AND run_id = %(run)s AND level = %(level)s
  AND gx BETWEEN %(gx0)s AND %(gx1)s AND gy BETWEEN %(gy0)s AND %(gy1)s
"""
COUNTED_CELLS = f"""
SELECT floor(ST_X(centroid) / %(cell)s)::integer AS cx, floor(ST_Y(centroid) / %(cell)s)::integer
       AS cy, class, count(*) AS n
FROM nucleus
WHERE slide_id = %(slide)s AND run_id = %(run)s AND centroid && {_SEARCH}
GROUP BY 1, 2, 3
"""
DENSITY = f"""
WITH cells AS ({{cells}})
SELECT ST_AsMVT(t, 'nucleus_density', {EXTENT}, 'geom') FROM (
    SELECT jsonb_object_agg(class, n) AS counts,
           ST_AsMVTGeom(ST_Scale(ST_MakeEnvelope(cx * %(cell)s, cy * %(cell)s, (cx + 1) * %(cell)s,
                                                 (cy + 1) * %(cell)s, 0), 1, -1),
                        {_ENVELOPE}, {EXTENT}, 0, true) AS geom
    FROM cells GROUP BY cx, cy
) t WHERE geom IS NOT NULL
"""
HAS_DENSITY = "SELECT EXISTS (SELECT FROM nucleus_density WHERE slide_id = %s AND run_id = %s)"


def nucleus_form(scale: int) -> str:
    """How nuclei are drawn where a tile pixel covers `scale` level-0 pixels."""
    if scale <= OUTLINES_TO:
        return "outlines"
    return "centroids" if scale <= POINTS_TO else "density"


def vector_tile(
    reader: Reader, slide_id: int, run_id: int, box: Box, scale: int, mpp: float, stored: bool
) -> bytes:
    """Every layer's tile over `box` (level-0 pixels, `scale` per tile pixel), as one MVT: the
    layers' tiles, queried at once on connections of their own, concatenated. `stored`: whether
    the run's nucleus densities are stored."""
    margin = BUFFER / EXTENT * TILE_PX * scale
    params = {
        "slide": slide_id,
        "run": run_id,
        "x0": box.x0,
        "y0": box.y0,
        "x1": box.x1,
        "y1": box.y1,
        "sx0": box.x0 - margin,
        "sy0": box.y0 - margin,
        "sx1": box.x1 + margin,
        "sy1": box.y1 + margin,
        "tolerance": scale / 2,
        # Objects smaller than 2 × 2 tile pixels are left out.
        "min_area_um2": (2 * scale * mpp) ** 2 if scale > 1 else 0.0,
    }
    statements = []
    for table in TABLES:
        if table != "nucleus" or nucleus_form(scale) == "outlines":
            statements.append((OUTLINES.format(table=table), {**params, "layer": table}))
        elif nucleus_form(scale) == "centroids":
            statements.append((CENTROIDS, params))
        else:
            statements.append(_density(params, scale, stored))
    return b"".join(LAYER_POOL.map(lambda s: _layer(reader, *s), statements))


def _layer(reader: Reader, query: str, values: dict) -> bytes:
    with reader.cursor() as cur:
        cur.execute(query, values)
        return bytes(cur.fetchone()[0] or b"")


def has_density(reader: Reader, slide_id: int, run_id: int) -> bool:
    with reader.cursor() as cur:
        cur.execute(HAS_DENSITY, (slide_id, run_id))
        return bool(cur.fetchone()[0])


def _density(params: dict, scale: int, stored: bool) -> tuple[str, dict]:
    cell = max(DENSITY_CELL_PX, DENSITY_TILE_PX * scale)
    values = {**params, "cell": cell, "level": (cell // DENSITY_CELL_PX).bit_length() - 1}
    if not stored:
        return DENSITY.format(cells=COUNTED_CELLS), values
    values |= {  # the tile's cells (its side is a whole number of cells)
        "gx0": int(params["x0"] // cell),
        "gy0": int(params["y0"] // cell),
        "gx1": int(params["x1"] // cell) - 1,
        "gy1": int(params["y1"] // cell) - 1,
    }
    return DENSITY.format(cells=STORED_CELLS), values
