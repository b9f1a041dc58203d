"""A slide as a pyramid of 256 px tiles (XYZ: zoom 0 holds the whole slide in one tile, the last
zoom is the slide's level 0) and its image tiles, read through tiatoolbox like ingest reads it.

A tile's address is (z, x, y); at zoom z one tile pixel covers `scale(z)` level-0 pixels, so tile
(z, x, y) shows the level-0 box [x, x + 1) × [y, y + 1) times 256 · scale(z). Tiles on the right and
bottom edges are padded with white to 256 px, as XYZ clients expect.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dashboard.data import Box

TILE_PX = 256
JPEG_QUALITY = 85
GLASS = (255, 255, 255)


class OutsidePyramid(ValueError):
    """A tile address that is not part of the slide's pyramid."""


@dataclass(frozen=True)
class Pyramid:
    """The tile pyramid of a slide `width` × `height` level-0 pixels large."""

    width: int
    height: int

    @property
    def max_zoom(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height) / TILE_PX)))

    def scale(self, z: int) -> int:
        """Level-0 pixels per tile pixel at zoom `z`."""
        return 2 ** (self.max_zoom - z)

    def tiles(self, z: int) -> tuple[int, int]:
        """Columns and rows of tiles at zoom `z`."""
        side = TILE_PX * self.scale(z)
        return math.ceil(self.width / side), math.ceil(self.height / side)

    def box(self, z: int, x: int, y: int) -> Box:
        """The level-0 box of tile (z, x, y), which may reach past the slide's edge."""
        if not 0 <= z <= self.max_zoom:
            raise OutsidePyramid(f"zoom {z} is outside 0-{self.max_zoom}")
        columns, rows = self.tiles(z)
        if not (0 <= x < columns and 0 <= y < rows):
            raise OutsidePyramid(f"tile {x},{y} is outside the {columns}x{rows} tiles of zoom {z}")
        side = TILE_PX * self.scale(z)
        return Box(x * side, y * side, (x + 1) * side, (y + 1) * side)


def image_tile(reader, pyramid: Pyramid, z: int, x: int, y: int) -> bytes:
    """Tile (z, x, y) of the slide open in `reader` (a tiatoolbox WSIReader) as JPEG bytes."""
    box = pyramid.box(z, x, y)
    scale = pyramid.scale(z)
    x1, y1 = min(box.x1, pyramid.width), min(box.y1, pyramid.height)
    size = (math.ceil((x1 - box.x0) / scale), math.ceil((y1 - box.y0) / scale))
    pixels = reader.read_bounds(
        (int(box.x0), int(box.y0), int(x1), int(y1)), resolution=1 / scale, units="baseline"
    )
    part = Image.fromarray(np.asarray(pixels)[..., :3])
    if part.size != size:
        part = part.resize(size, Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (TILE_PX, TILE_PX), GLASS)
    tile.paste(part, (0, 0))
    out = io.BytesIO()
    tile.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class ByteCache:
    """A least-recently-used map of keys to bytes, at most `budget` bytes in all; thread-safe."""

    def __init__(self, budget: int):
        self.budget = budget
        self.size = 0
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self.size += len(value) - (len(old) if old is not None else 0)
            self._items[key] = value
            while self.size > self.budget and self._items:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)
