"""The slide viewer's tile server: image tiles, object vector tiles and object details of the
slides in the database, and the viewer page (OpenLayers) that draws them.

It runs beside the Streamlit app (in its process, on its own thread and event loop: Tornado, the
server Streamlit itself runs on), bound to the dashboard's address, 127.0.0.1 by default. The
browser names slides by their database id only; file paths come from the database, so nothing but
the slides' own files is read. Database reads go through the dashboard's read-only `Reader`.

    GET /viewer?slide=ID                                  the viewer page
    GET /slides/ID/info.json                              size, µm/px, pyramid, run, classes
    GET /slides/ID/image/Z/X/Y.jpg                        an image tile (JPEG, 256 px)
    GET /slides/ID/runs/RUN/tiles/Z/X/Y.pbf               the objects' vector tile (MVT)
    GET /slides/ID/runs/RUN/objects/TABLE/OBJECT.json     an object's measurements

An unknown slide, run or object, or a tile outside the pyramid, is a 404; a malformed address a
400. Tiles are cached in memory (least recently used first out; looked up once the slide and run
are known to be current) and marked cacheable by browsers.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.log import access_log
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler, StaticFileHandler

from dashboard import vector_tiles
from dashboard.data import TABLES, Reader, Unavailable
from dashboard.tiles import TILE_PX, ByteCache, OutsidePyramid, Pyramid, image_tile

STATIC = Path(__file__).resolve().parent / "viewer"
#: Where `scripts/setup.sh` puts OpenLayers (from the npm registry, checksum checked).
OPENLAYERS = STATIC / "ol" / "ol.js"
CACHE_BYTES = 256 * 2**20  # per kind of tile
THREADS = 4
READERS_PER_THREAD = 8
IMAGE_MAX_AGE = 3600  # s; a slide's pixels do not change, but its file might be replaced
MAX_ID = 2**31 - 1

SLIDE = """
SELECT s.id, s.name, s.width, s.height, s.mpp_x, s.file_path, s.current_run_id, r.object_counts
FROM slide s LEFT JOIN run r ON r.id = s.current_run_id
WHERE s.id = %s
"""
OBJECT = """
SELECT to_jsonb(o) - 'geom' - 'centroid' || jsonb_build_object('centroid_x_px', ST_X(o.centroid),
       'centroid_y_px', ST_Y(o.centroid))
FROM {table} o WHERE o.slide_id = %s AND o.run_id = %s AND o.id = %s
"""
GLAND_FEATURES = """
SELECT to_jsonb(f) - 'slide_id' - 'gland_id' - 'run_id' - 'gland_uuid'
FROM gland_feature f WHERE f.slide_id = %s AND f.run_id = %s AND f.gland_id = %s
"""


@dataclass(frozen=True)
class Slide:
    id: int
    name: str
    width: int
    height: int
    mpp: float
    file_path: str
    run_id: int | None
    object_counts: dict

    @property
    def pyramid(self) -> Pyramid:
        return Pyramid(self.width, self.height)


class Tiles:
    """What the handlers share: the reader, the tile caches, open slide files per thread."""

    def __init__(self, reader: Reader, cache_bytes: int = CACHE_BYTES):
        self.reader = reader
        self.images = ByteCache(cache_bytes)
        self.overlays = ByteCache(cache_bytes)
        self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="viewer")
        self._local = threading.local()

    def slide(self, slide_id: int) -> Slide:
        with self.reader.cursor() as cur:
            cur.execute(SLIDE, (slide_id,))
            row = cur.fetchone()
        if row is None:
            raise refused(404, f"no slide {slide_id}")
        return Slide(*row[:7], row[7] or {})

    def image(self, slide_id: int, z: int, x: int, y: int) -> bytes:
        slide = self.slide(slide_id)
        check_address(slide.pyramid, z, x, y)
        key = (slide_id, slide.file_path, z, x, y)
        tile = self.images.get(key)
        if tile is None:
            reader = self._open(slide)
            try:
                tile = image_tile(reader, slide.pyramid, z, x, y)
            except Exception as exc:  # a damaged file: whatever its reader raises
                message = f"slide {slide_id}'s tile {z}/{x}/{y} cannot be read ({exc})"
                raise refused(500, message.splitlines()[0]) from exc
            self.images.put(key, tile)
        return tile

    def overlay(self, slide_id: int, run_id: int, z: int, x: int, y: int) -> bytes:
        """The tile's MVT, gzip-compressed."""
        slide = self.current(slide_id, run_id)
        pyramid = slide.pyramid
        check_address(pyramid, z, x, y)
        key = (slide_id, run_id, z, x, y)
        tile = self.overlays.get(key)
        if tile is None:
            scale = pyramid.scale(z)
            # Asked per density tile, not remembered: a refresh may store them later.
            stored = vector_tiles.nucleus_form(scale) == "density" and vector_tiles.has_density(
                self.reader, slide_id, run_id
            )
            mvt = vector_tiles.vector_tile(
                self.reader, slide_id, run_id, pyramid.box(z, x, y), scale, slide.mpp, stored,
            )  # fmt: skip
            tile = gzip.compress(mvt, compresslevel=5, mtime=0)
            self.overlays.put(key, tile)
        return tile

    def details(self, slide_id: int, run_id: int, table: str, object_id: int) -> dict:
        if table not in TABLES:
            raise refused(404, f"no object table {table[:40]!r}")
        self.current(slide_id, run_id)
        with self.reader.cursor() as cur:
            cur.execute(OBJECT.format(table=table), (slide_id, run_id, object_id))
            row = cur.fetchone()
            if row is None:
                raise refused(404, f"no {table} {object_id} in run {run_id}")
            features = None
            if table == "gland":
                cur.execute(GLAND_FEATURES, (slide_id, run_id, object_id))
                found = cur.fetchone()
                features = found[0] if found else None
        return {"table": table, "id": object_id, "measurements": row[0], "features": features}

    def current(self, slide_id: int, run_id: int) -> Slide:
        """The slide, if `run_id` is its current run (objects of replaced runs are gone)."""
        slide = self.slide(slide_id)
        if slide.run_id != run_id:
            raise refused(404, f"run {run_id} is not slide {slide_id}'s current run")
        return slide

    def info(self, slide_id: int) -> dict:
        slide = self.slide(slide_id)
        counts = {t: slide.object_counts.get(t, {}) for t in TABLES}
        known = self.reader.colours()
        classes = {c for per_class in counts.values() for c in per_class}
        pyramid = slide.pyramid
        return {
            "id": slide.id,
            "name": slide.name,
            "width": slide.width,
            "height": slide.height,
            "mpp": slide.mpp,
            "tile_px": TILE_PX,
            "max_zoom": pyramid.max_zoom,
            "run_id": slide.run_id,
            "image": Path(slide.file_path).is_file(),
            "counts": counts,
            "colours": {c: self.reader.colour(c, known) for c in sorted(classes)},
            "nuclei": {  # the zooms from which nuclei are drawn as outlines, as centroids
                "outlines_from_zoom": pyramid.max_zoom - int(math.log2(vector_tiles.OUTLINES_TO)),
                "centroids_from_zoom": pyramid.max_zoom - int(math.log2(vector_tiles.POINTS_TO)),
            },
        }

    def _open(self, slide: Slide):
        """The slide's file open in this thread (a reader per thread: no shared file state; the
        READERS_PER_THREAD most recently opened kept)."""
        from inference.slide import SlideError, open_slide

        readers: dict = self._local.__dict__.setdefault("readers", {})
        key = (slide.id, slide.file_path)
        if key not in readers:
            try:
                reader = open_slide(slide.file_path)
            except (SlideError, OSError, ValueError) as exc:
                raise refused(404, f"slide {slide.id}'s image is unavailable") from exc
            if len(readers) >= READERS_PER_THREAD:
                readers.pop(next(iter(readers)))
            readers[key] = reader
        return readers[key]


def check_address(pyramid: Pyramid, z: int, x: int, y: int) -> None:
    try:
        pyramid.box(z, x, y)
    except OutsidePyramid as exc:
        raise refused(404, str(exc)) from None


def refused(status: int, message: str) -> HTTPError:
    """An error answer whose one-line message (in the status line and the body) is plain ASCII:
    it may quote what the browser sent."""
    line = message.encode("ascii", "backslashreplace").decode()
    return HTTPError(status, reason="".join(c if c.isprintable() else "?" for c in line))


def number(text: str) -> int:
    """A path's integer part; anything else is a malformed address."""
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_ID:
        raise refused(400, f"malformed address part {text[:40]!r}")
    return int(text)


class Handler(RequestHandler):
    def initialize(self, tiles: Tiles) -> None:
        self.tiles = tiles

    async def blocking(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.tiles.pool, fn, *args)
        except Unavailable as exc:
            raise refused(503, f"the database cannot be read ({exc})") from None

    def write_error(self, status_code: int, **kwargs) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code}: {self._reason}\n")


class Info(Handler):
    async def get(self, slide: str) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.finish(await self.blocking(self.tiles.info, number(slide)))


class ImageTile(Handler):
    async def get(self, slide: str, z: str, x: str, y: str) -> None:
        tile = await self.blocking(self.tiles.image, *map(number, (slide, z, x, y)))
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("Cache-Control", f"max-age={IMAGE_MAX_AGE}")
        self.finish(tile)


class VectorTile(Handler):
    async def get(self, slide: str, run: str, z: str, x: str, y: str) -> None:
        tile = await self.blocking(self.tiles.overlay, *map(number, (slide, run, z, x, y)))
        self.set_header("Content-Type", "application/vnd.mapbox-vector-tile")
        self.set_header("Cache-Control", "max-age=31536000, immutable")  # a run never changes
        if "gzip" in self.request.headers.get("Accept-Encoding", ""):
            self.set_header("Content-Encoding", "gzip")
        else:
            tile = gzip.decompress(tile)
        self.finish(tile)


class ObjectDetails(Handler):
    async def get(self, slide: str, run: str, table: str, object_id: str) -> None:
        ids = number(slide), number(run)
        details = await self.blocking(self.tiles.details, *ids, table, number(object_id))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(details, default=str))


class NotFound(Handler):
    def prepare(self) -> None:
        raise refused(404, "no such address")


class Page(Handler):
    def get(self) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish((STATIC / "viewer.html").read_bytes())


def application(tiles: Tiles) -> Application:
    part = r"([^/]+)"
    shared = {"tiles": tiles}
    return Application(
        [
            (r"/viewer", Page, shared),
            (rf"/slides/{part}/info\.json", Info, shared),
            (rf"/slides/{part}/image/{part}/{part}/{part}\.jpg", ImageTile, shared),
            (rf"/slides/{part}/runs/{part}/tiles/{part}/{part}/{part}\.pbf", VectorTile, shared),
            (rf"/slides/{part}/runs/{part}/objects/{part}/{part}\.json", ObjectDetails, shared),
            (r"/static/(.*)", StaticFileHandler, {"path": str(STATIC)}),
        ],
        default_handler_class=NotFound,
        default_handler_args=shared,
        log_function=log_failure,
    )


def log_failure(handler: RequestHandler) -> None:
    """Only server errors go to the log: the viewer's requests are many and refusals expected."""
    if handler.get_status() >= 500:
        access_log.error("%d %s %s", handler.get_status(), handler.request.method,
                         handler.request.uri)  # fmt: skip


class ViewerServer:
    """The tile server on `address`:`port` (0: any free port), serving from a thread of its own
    until `stop()`."""

    def __init__(self, reader: Reader, address: str = "127.0.0.1", port: int = 0, **tiles_kw):
        self.tiles = Tiles(reader, **tiles_kw)
        sockets = bind_sockets(port, address, family=socket.AF_INET)
        self.address, self.port = sockets[0].getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = HTTPServer(application(self.tiles), xheaders=False)
            self._server.add_sockets(sockets)
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="viewer-server", daemon=True)
        self._thread.start()
        started.wait()

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.tiles.pool.shutdown(wait=False)


def openlayers_installed() -> bool:
    return OPENLAYERS.is_file()
