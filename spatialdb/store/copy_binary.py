"""PostgreSQL binary COPY encoding of object rows, vectorised with numpy.

A row is a fixed-width record (ids, measurements, centroid WKB, class name, geometry header)
followed by the geometry. Rows are sorted into layout groups (class, which of the probability and
the optional measurements are known, and for hole-free polygons the ring's point count) so that
all rows of a group have one byte layout: a group is then a 2-D byte array, records in the first
columns and coordinates in the rest, measured and written with numpy alone. Other shapes (holes,
multipolygons) go through shapely's measurements and WKB writer, one group per class.
"""

from __future__ import annotations

import io
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import chain

import numpy as np
import shapely

from spatialdb.store.geometry import (
    measurements,
    ring_measurements,
    simple_polygons,
    star_shaped_rings,
)
from spatialdb.store.morphometry import MORPHOMETRY, ring_shape_measurements, shape_measurements

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)

#: Column order of the encoded rows (the COPY column list), without optional measurements.
OBJECT_COLUMNS = (
    "slide_id",
    "id",
    "run_id",
    "uuid",
    "probability",
    "area_um2",
    "perimeter_um",
    *MORPHOMETRY,
    "centroid",
    "class",
    "geom",
)
_WKB_POINT, _WKB_POLYGON, _LITTLE_ENDIAN = 1, 3, 1
_POINT_SIZE = 21  # byte order, type, x, y
_POLYGON_HEADER = 13  # byte order, type, ring count, point count
_MORPHOMETRY_FIELDS = [
    field for key in MORPHOMETRY for field in ((f"l_{key}", ">i4"), (key, ">f8"))
]


@dataclass
class ObjectRows:
    """Rows of one object table, as columns (probability NaN = unknown)."""

    slide_id: int
    run_id: int
    ids: np.ndarray
    uuids: np.ndarray  # (n, 16) uint8
    probability: np.ndarray  # float32
    class_codes: np.ndarray  # int, index into class_names
    class_names: list[str]  # non-empty
    geoms: np.ndarray  # valid shapely polygons or multipolygons, level-0 px
    mpp_x: float
    mpp_y: float
    #: Optional per-object measurements (column -> float64 values, NaN = unknown = NULL).
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def take(self, index: np.ndarray) -> ObjectRows:
        return replace(
            self,
            ids=self.ids[index],
            uuids=self.uuids[index],
            probability=self.probability[index],
            class_codes=self.class_codes[index],
            geoms=self.geoms[index],
            extra={name: values[index] for name, values in self.extra.items()},
        )


def copy_columns(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The COPY column list of rows with these optional measurements (after the shape ones)."""
    at = OBJECT_COLUMNS.index("centroid")
    return (*OBJECT_COLUMNS[:at], *extra, *OBJECT_COLUMNS[at:])


def encode(rows: ObjectRows, *, prove_validity: bool = False) -> tuple[bytes, np.ndarray]:
    """The rows in binary COPY format (no stream header or trailer) and the rows left out.

    Without `prove_validity` the geometries must be valid and every row is encoded. With it, the
    geometries are unchecked: hole-free polygons whose rings `star_shaped_rings` proves valid are
    encoded, and the indices of all other rows are returned for GEOS to check and repair.
    """
    simple = simple_polygons(rows.geoms)
    simple_index, other_index = np.flatnonzero(simple), np.flatnonzero(~simple)
    parts, unproven = [], []
    for data, left_out in _encode_simple(rows.take(simple_index), prove_validity):
        parts.append(data)
        unproven.append(simple_index[left_out])
    if prove_validity:
        unproven.append(other_index)
    else:
        parts.extend(_encode_other(rows.take(other_index)))
    left_out = np.sort(np.concatenate(unproven)) if unproven else np.array([], dtype=np.int64)
    return b"".join(parts), left_out


def _encode_simple(rows: ObjectRows, prove: bool) -> Iterator[tuple[bytes, np.ndarray]]:
    """Hole-free polygons: WKB written from coordinates, one 2-D byte block per layout; with
    `prove`, only rings proven valid (the others' indices are yielded alongside)."""
    points = shapely.get_num_coordinates(rows.geoms)
    rows, keys, bounds = _grouped(rows, points)
    points = points[bounds.order]
    coords = shapely.get_coordinates(rows.geoms)
    point_start = np.concatenate([[0], np.cumsum(points)])
    for (name, with_probability, known), b, e in zip(keys, bounds.starts, bounds.ends, strict=True):
        k = int(points[b])
        rings = coords[point_start[b] : point_start[e]].reshape(e - b, k, 2)
        ok = star_shaped_rings(rings) if prove else np.ones(e - b, dtype=bool)
        left_out = bounds.order[b + np.flatnonzero(~ok)]
        if not ok.any():
            yield b"", left_out
            continue
        sel = b + np.flatnonzero(ok)
        rings = rings[ok] if not ok.all() else rings
        area, perimeter, cx, cy = ring_measurements(rings, rows.mpp_x, rows.mpp_y)
        shape = ring_shape_measurements(rings, rows.geoms[sel], rows.mpp_x, rows.mpp_y)
        record = _records(
            rows, sel, name, with_probability, known, area, perimeter, cx, cy, shape, k
        )
        record["l_geom"] = _POLYGON_HEADER + 16 * k
        record["g_order"], record["g_type"], record["g_rings"] = 1, _WKB_POLYGON, 1
        record["g_points"] = k
        block = np.empty((len(sel), record.dtype.itemsize + 16 * k), dtype=np.uint8)
        block[:, : record.dtype.itemsize] = record.view(np.uint8).reshape(len(sel), -1)
        block[:, record.dtype.itemsize :] = rings.astype("<f8").view(np.uint8).reshape(len(sel), -1)
        yield block.tobytes(), left_out


def _encode_other(rows: ObjectRows) -> Iterator[bytes]:
    """Polygons with holes and multipolygons: shapely's WKB, one group per class."""
    rows, keys, bounds = _grouped(rows, np.zeros(len(rows.ids), dtype=np.int64))
    area, perimeter, cx, cy = measurements(rows.geoms, rows.mpp_x, rows.mpp_y)
    shape = shape_measurements(rows.geoms, rows.mpp_x, rows.mpp_y)
    wkb = shapely.to_wkb(rows.geoms, byte_order=_LITTLE_ENDIAN, output_dimension=2)
    for (name, with_probability, known), b, e in zip(keys, bounds.starts, bounds.ends, strict=True):
        sel = np.arange(b, e)
        record = _records(
            rows,
            sel,
            name,
            with_probability,
            known,
            area[sel],
            perimeter[sel],
            cx[sel],
            cy[sel],
            {key: values[sel] for key, values in shape.items()},
        )
        record["l_geom"] = np.frompyfunc(len, 1, 1)(wkb[sel]).astype(np.int32)
        raw, size = record.tobytes(), record.dtype.itemsize
        heads = [raw[i : i + size] for i in range(0, len(raw), size)]
        yield b"".join(chain.from_iterable(zip(heads, wkb[sel], strict=True)))


@dataclass
class _Bounds:
    order: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


def _grouped(rows: ObjectRows, layout: np.ndarray) -> tuple[ObjectRows, list, _Bounds]:
    """Rows sorted by (class, probability known, optional measurements known, layout); each
    group's key (class name, probability known, the optional measurements known) and extent."""
    class_code = rows.class_codes
    known = ~np.isnan(rows.probability)
    measured = np.zeros(len(class_code), dtype=np.int64)  # bit j: the j-th extra is known
    for j, values in enumerate(rows.extra.values()):
        measured |= (~np.isnan(values)).astype(np.int64) << j
    order = np.lexsort((layout, measured, known, class_code))
    key = np.stack([class_code[order], known[order], measured[order], layout[order]], axis=1)
    change = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
    starts = np.concatenate([[0], change]).astype(np.int64) if len(key) else np.array([], int)
    ends = np.concatenate([change, [len(key)]]).astype(np.int64) if len(key) else starts
    names = list(rows.extra)
    keys = [
        (
            rows.class_names[key[b, 0]].encode(),
            bool(key[b, 1]),
            tuple(n for j, n in enumerate(names) if key[b, 2] >> j & 1),
        )
        for b in starts
    ]
    return rows.take(order), keys, _Bounds(order, starts, ends)


def _records(rows, sel, name, with_probability, known, area, perimeter, cx, cy, shape, points=None):
    """The fixed-width part of rows `sel`, up to the geometry's length (and WKB header); of the
    optional measurements, those in `known` are written and the others are NULL."""
    dtype = _record_dtype(with_probability, len(name), points is not None, list(rows.extra), known)
    record = np.zeros(len(sel), dtype=dtype)
    record["nfields"] = len(OBJECT_COLUMNS) + len(rows.extra)
    record["l_slide"], record["slide_id"] = 4, rows.slide_id
    record["l_id"], record["id"] = 8, rows.ids[sel]
    record["l_run"], record["run_id"] = 4, rows.run_id
    record["l_uuid"], record["uuid"] = 16, rows.uuids[sel].view("V16").ravel()
    if with_probability:
        record["l_probability"], record["probability"] = 4, rows.probability[sel]
    else:
        record["l_probability"] = -1  # NULL
    record["l_area"], record["area_um2"] = 8, area
    record["l_perimeter"], record["perimeter_um"] = 8, perimeter
    for key in MORPHOMETRY:
        record[f"l_{key}"], record[key] = 8, shape[key]
    for key, values in rows.extra.items():
        if key in known:
            record[f"l_{key}"], record[key] = 8, values[sel]
        else:
            record[f"l_{key}"] = -1  # NULL
    record["l_centroid"], record["c_order"], record["c_type"] = _POINT_SIZE, 1, _WKB_POINT
    record["cx"], record["cy"] = cx, cy
    record["l_class"], record["class"] = len(name), name
    return record


def _record_dtype(
    with_probability: bool,
    class_len: int,
    polygon_header: bool,
    extra: list[str] = (),
    known: tuple[str, ...] = (),
) -> np.dtype:
    fields = [
        ("nfields", ">i2"),
        ("l_slide", ">i4"), ("slide_id", ">i4"),
        ("l_id", ">i4"), ("id", ">i8"),
        ("l_run", ">i4"), ("run_id", ">i4"),
        ("l_uuid", ">i4"), ("uuid", "V16"),
        ("l_probability", ">i4"),
        *([("probability", ">f4")] if with_probability else []),
        ("l_area", ">i4"), ("area_um2", ">f8"),
        ("l_perimeter", ">i4"), ("perimeter_um", ">f8"),
        *_MORPHOMETRY_FIELDS,
        *_optional_fields(extra, known),
        ("l_centroid", ">i4"), ("c_order", "u1"), ("c_type", "<u4"), ("cx", "<f8"), ("cy", "<f8"),
        ("l_class", ">i4"), ("class", f"S{class_len}"),
        ("l_geom", ">i4"),
        *([("g_order", "u1"), ("g_type", "<u4"), ("g_rings", "<u4"), ("g_points", "<u4")]
          if polygon_header else []),
    ]  # fmt: skip
    return np.dtype(fields)


def _optional_fields(extra, known) -> list[tuple[str, str]]:
    """Length and value of each optional measurement; a NULL one has its length alone."""
    return [
        f for key in extra for f in [(f"l_{key}", ">i4"), (key, ">f8")][: 2 if key in known else 1]
    ]


class CopyStream(io.RawIOBase):
    """A file-like view of binary COPY data for `cursor.copy_expert`, encoded ahead in a thread.

    The encoder thread produces the next chunk while the server parses the current one; numpy
    and shapely release the GIL, and so does psycopg2 while it sends.
    """

    def __init__(self, chunks: Iterable[bytes], depth: int = 2):
        super().__init__()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._pending = [HEADER]
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(iter(chunks),), daemon=True)
        self._thread.start()

    def _produce(self, chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                self._queue.put(chunk)
            self._queue.put(TRAILER)
        except BaseException as exc:  # handed to the reading thread, which raises it
            self._queue.put(exc)
        self._queue.put(None)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._pending:
            return self._pending.pop()
        if self._done:
            return b""
        item = self._queue.get()
        if item is None:
            self._done = True
            return b""
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item
