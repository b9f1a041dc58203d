"""Gigapixel benchmark slides made of real tissue: pyramidal tiled TIFFs at 0.5 µm/px.

A slide is a section of square tissue blocks (2,048 px = 1.024 mm a side) on white glass, laid
out in a grid with 256 µm background gaps and a 512 µm margin, like the pieces of a real section.
Each block is one real H&E image, turned (one of 8 orientations) and mirrored at its edges until
it fills the block: the GlaS colon images (resampled from 0.62 µm/px) where `../shared/data` is
present, and always the bundled CMU-1-Small-Region sample. Levels at downsamples 1, 4, 16 and 64,
256 px JPEG tiles, resolution tags in pixels per centimetre: OpenSlide opens it as
`generic-tiff`, tiatoolbox as a TIFF pyramid. Level 0 is written tile by tile from one row of
blocks at a time, so building a 256 mm² slide needs about 1 GB of memory, not 16.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "CMU-1-Small-Region.svs"
MPP = 0.5
BLOCK, GAP, MARGIN, TILE = 2048, 512, 1024, 256
DOWNSAMPLES = (4, 16, 64)
BACKGROUND = (243, 241, 244)
#: Bump when the layout or the sources change: cached slides of another version are rebuilt.
VERSION = 1


@dataclass(frozen=True)
class Layout:
    """Where the `blocks` tissue blocks of a slide lie (row-major in a `cols`-wide grid)."""

    blocks: int

    @property
    def cols(self) -> int:
        return math.ceil(math.sqrt(self.blocks))

    @property
    def rows(self) -> int:
        return math.ceil(self.blocks / self.cols)

    @property
    def shape(self) -> tuple[int, int]:
        def side(n: int) -> int:
            return 2 * MARGIN + n * BLOCK + (n - 1) * GAP

        return side(self.rows), side(self.cols)

    def origin(self, index: int) -> tuple[int, int]:
        """Level-0 (y, x) of block `index`'s top-left corner."""
        row, col = divmod(index, self.cols)
        return MARGIN + row * (BLOCK + GAP), MARGIN + col * (BLOCK + GAP)


def blocks_for(tissue_mm2: float) -> int:
    """Blocks for about `tissue_mm2` of tissue (a block is (BLOCK × MPP)² µm of it)."""
    return max(1, round(tissue_mm2 / (BLOCK * MPP / 1000) ** 2))


def sources(data_dir: Path | None) -> list[np.ndarray]:
    """The real H&E images blocks are made of, RGB at `MPP`: GlaS's training images (where
    `data_dir` has them) and the bundled sample slide."""
    images = []
    glas = sorted((data_dir / "glas" / "images").glob("train_*.png")) if data_dir else []
    for path in glas:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        scale = 0.62 / MPP
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        images.append(cv2.resize(image, size, interpolation=cv2.INTER_CUBIC))
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(SAMPLE)
    images.append(np.asarray(reader.slide_thumbnail(resolution=MPP, units="mpp"))[..., :3])
    return images


def block(images: list[np.ndarray], index: int) -> np.ndarray:
    """Block `index`: source `index mod n` in orientation `index div n mod 8`, mirrored at its
    edges to BLOCK × BLOCK."""
    image = images[index % len(images)]
    turn = (index // len(images)) % 8
    image = np.rot90(image, turn % 4)
    if turn >= 4:
        image = image[:, ::-1]
    image = image[:BLOCK, :BLOCK]
    pad = ((0, BLOCK - image.shape[0]), (0, BLOCK - image.shape[1]), (0, 0))
    return np.ascontiguousarray(np.pad(image, pad, mode="symmetric"))


def build(path: Path, tissue_mm2: float, data_dir: Path | None) -> dict:
    """Write the benchmark slide for about `tissue_mm2` of tissue to `path` (cached: an existing
    slide of the same version and sources is kept) and return its description."""
    images = sources(data_dir)
    layout = Layout(blocks_for(tissue_mm2))
    meta = {
        "version": VERSION,
        "blocks": layout.blocks,
        "sources": len(images),
        "shape": list(layout.shape),
        "mpp": MPP,
    }
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == meta:
        return meta
    height, width = layout.shape
    levels = {d: np.full((height // d, width // d, 3), BACKGROUND, np.uint8) for d in DOWNSAMPLES}

    def tiles() -> Iterator[np.ndarray]:
        background = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)
        row_blocks: dict[int, np.ndarray] = {}
        current = -1
        for y in range(0, height, TILE):
            band, dy = divmod(y - MARGIN, BLOCK + GAP)
            if band != current and 0 <= band < layout.rows:
                current, row_blocks = band, {}
                for col in range(layout.cols):
                    index = band * layout.cols + col
                    if index < layout.blocks:
                        row_blocks[col] = pixels = block(images, index)
                        oy, ox = layout.origin(index)
                        for d, canvas in levels.items():
                            small = cv2.resize(
                                pixels, (BLOCK // d, BLOCK // d), interpolation=cv2.INTER_AREA
                            )
                            canvas[oy // d : (oy + BLOCK) // d, ox // d : (ox + BLOCK) // d] = small
            for x in range(0, width, TILE):
                col, dx = divmod(x - MARGIN, BLOCK + GAP)
                inside = y >= MARGIN and x >= MARGIN and dy < BLOCK and dx < BLOCK
                if inside and band == current and col in row_blocks:
                    yield row_blocks[col][dy : dy + TILE, dx : dx + TILE]
                else:
                    yield background

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    common = dict(
        tile=(TILE, TILE),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
        metadata=None,
    )
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        tif.write(
            tiles(),
            shape=(height, width, 3),
            dtype=np.uint8,
            subfiletype=0,
            resolution=(1e4 / MPP, 1e4 / MPP),
            resolutionunit="CENTIMETER",
            **common,
        )
        for d in DOWNSAMPLES:
            tif.write(
                levels[d],
                subfiletype=1,
                resolution=(1e4 / (MPP * d), 1e4 / (MPP * d)),
                resolutionunit="CENTIMETER",
                **common,
            )
    partial.replace(path)
    sidecar.write_text(json.dumps(meta))
    return meta
