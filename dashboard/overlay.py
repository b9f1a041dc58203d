"""A view of a slide with its objects drawn over it.

The view is a box in level-0 pixels rendered at most `VIEW_PX` wide: the slide image is read
through tiatoolbox at that scale, and each layer's objects inside the box come from a bounding-
box query. A layer with more than `DETAIL_LIMIT` objects in the view is drawn as a density grid
of its stored centroids instead, so a slide with a million nuclei stays responsive.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import shapely
from PIL import Image, ImageDraw

from dashboard.data import Box, Reader

VIEW_PX = 1024
DETAIL_LIMIT = 20_000
GRID_PX = 8  # density cells, in view pixels
LAYERS = {"nucleus": "Nuclei", "gland": "Glands", "lumen": "Lumina", "tissue_region": "Tissue"}
DENSITY_COLOUR = (220, 40, 40)


@dataclass
class View:
    image: Image.Image
    scale: float  # view pixels per level-0 pixel
    drawn: dict[str, int] = field(default_factory=dict)  # layer -> objects drawn one by one
    aggregated: dict[str, int] = field(default_factory=dict)  # layer -> objects in the grid
    classes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # legend
    image_note: str = ""


def slide_region(file_path: str, box: Box, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """The slide's pixels in `box`, `size` large; a white canvas and a note if unreadable."""
    from inference.slide import SlideError, open_slide

    try:
        reader = open_slide(file_path)
        scale = size[0] / box.width
        pixels = reader.read_bounds(
            (int(box.x0), int(box.y0), int(box.x1), int(box.y1)),
            resolution=scale,
            units="baseline",
        )
    except (SlideError, OSError, ValueError) as exc:
        return Image.new("RGB", size, "white"), f"slide image unavailable ({exc})"
    return Image.fromarray(np.asarray(pixels)[..., :3]).resize(size), ""


def render(
    reader: Reader, slide: dict, box: Box, layers: list[str], *, with_image: bool = True
) -> View:
    """The view of `box` on `slide` (a cohort row) with `layers` drawn."""
    scale = VIEW_PX / max(box.width, box.height)
    size = (max(1, round(box.width * scale)), max(1, round(box.height * scale)))
    if with_image:
        image, note = slide_region(slide["file_path"], box, size)
    else:
        image, note = Image.new("RGB", size, "white"), ""
    view = View(image.convert("RGBA"), scale, image_note=note)
    known = reader.colours()
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    # Big shapes are drawn first so that small ones stay visible on top; the layers are fetched
    # at once, each on its own connection.
    order = [t for t in ("tissue_region", "gland", "lumen", "nucleus") if t in layers]
    with ThreadPoolExecutor(max_workers=len(order) or 1) as pool:
        fetched = {t: pool.submit(_fetch, reader, t, slide["id"], box, scale) for t in order}
    for table in order:
        grid, objects = fetched[table].result()
        if grid is not None:
            _draw_density(draw, grid, box, scale)
            view.aggregated[table] = int(grid["n"].sum())
            view.classes[f"{LAYERS[table]} (density)"] = DENSITY_COLOUR
            continue
        classes, wkb = objects
        alpha = 40 if table == "tissue_region" else 70
        for cls, ring in _rings_in_view(classes, wkb, box, scale):
            colour = view.classes.setdefault(cls, reader.colour(cls, known))
            draw.polygon(ring, outline=(*colour, 255), fill=(*colour, alpha))
        view.drawn[table] = len(wkb)
    view.image = Image.alpha_composite(view.image, overlay).convert("RGB")
    return view


def _fetch(reader: Reader, table: str, slide_id: int, box: Box, scale: float):
    """(density grid, None) when the view holds too many objects to draw, else (None, objects)."""
    if reader.count_in(table, slide_id, box, DETAIL_LIMIT + 1) > DETAIL_LIMIT:
        return reader.centroid_grid(table, slide_id, box, GRID_PX / scale), None
    return None, reader.objects_in(table, slide_id, box, 0.5 / scale, 2 * DETAIL_LIMIT)


def _rings_in_view(classes: list[str], wkb: list[bytes], box: Box, scale: float):
    """(class, exterior ring in view pixels) of every polygon part, converted in one go."""
    if not wkb:
        return
    geoms = shapely.from_wkb(np.array(wkb, dtype=object))
    parts, owner = shapely.get_parts(geoms, return_index=True)
    coords, ring = shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)
    xy = (coords - (box.x0, box.y0)) * scale
    starts = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    owners = np.asarray(classes, dtype=object)[owner[ring[starts]]]
    for cls, points in zip(owners, np.split(xy, starts[1:]), strict=True):
        if len(points) >= 3:
            yield cls, points.ravel().tolist()


def _draw_density(draw: ImageDraw.ImageDraw, grid, box: Box, scale: float) -> None:
    """Cells shaded by their count of centroids (square-root scale)."""
    if not len(grid):
        return
    cell = GRID_PX
    strength = np.sqrt(grid["n"].to_numpy() / grid["n"].max())
    x = grid["gx"].to_numpy() * cell - box.x0 * scale
    y = grid["gy"].to_numpy() * cell - box.y0 * scale
    for x0, y0, s in zip(x, y, strength, strict=True):
        draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=(*DENSITY_COLOUR, int(40 + 170 * s)))
