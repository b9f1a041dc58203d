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

from dashboard.data import Box, Reader, Unavailable

VIEW_PX = 1024
DETAIL_LIMIT = 20_000
GRID_PX = 8  # density cells, in view pixels
LAYERS = {"nucleus": "Nuclei", "gland": "Glands", "lumen": "Lumina", "tissue_region": "Tissue"}
DENSITY_COLOUR = (220, 40, 40)
RUN_CHANGE_RETRIES = 3


@dataclass
class View:
    image: Image.Image
    scale: float  # view pixels per level-0 pixel
    drawn: dict[str, int] = field(default_factory=dict)  # layer -> objects drawn one by one
    aggregated: dict[str, int] = field(default_factory=dict)  # layer -> objects in the grid
    classes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # legend
    image_note: str = ""
    run_id: int | None = None  # the run every layer was read from


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
    # Big shapes are drawn first so that small ones stay visible on top.
    order = [t for t in ("tissue_region", "gland", "lumen", "nucleus") if t in layers]
    view.run_id, fetched = fetch_layers(reader, slide["id"], order, box, scale)
    for table in order:
        grid, objects = fetched[table]
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


def fetch_layers(reader: Reader, slide_id: int, tables: list[str], box: Box, scale: float):
    """(run id, {table: fetched}) with every layer from the same run. The layers are fetched at
    once, each on its own connection, from the slide's current run; if an ingest made another
    run current meanwhile, they are fetched again from that one, so a view never mixes runs."""
    run_id = reader.current_run(slide_id)
    for _ in range(RUN_CHANGE_RETRIES):
        if run_id is None:
            return None, {t: (None, ([], [])) for t in tables}
        with ThreadPoolExecutor(max_workers=len(tables) or 1) as pool:
            futures = {
                t: pool.submit(_fetch, reader, t, slide_id, run_id, box, scale) for t in tables
            }
        fetched = {t: f.result() for t, f in futures.items()}
        now = reader.current_run(slide_id)
        if now == run_id:
            return run_id, fetched
        run_id = now
    raise Unavailable(f"slide {slide_id} is being re-ingested; reload the page")


def _fetch(reader: Reader, table: str, slide_id: int, run_id: int, box: Box, scale: float):
    """(density grid, None) when the view holds too many objects to draw, else (None, objects)."""
    if reader.count_in(table, slide_id, run_id, box, DETAIL_LIMIT + 1) > DETAIL_LIMIT:
        return reader.centroid_grid(table, slide_id, run_id, box, GRID_PX / scale), None
    return None, reader.objects_in(table, slide_id, run_id, box, 0.5 / scale, 2 * DETAIL_LIMIT)


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
