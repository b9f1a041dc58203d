"""Neural Image Compression (Tellez et al.): a slide as a grid of encoder embeddings.

Each cell of the grid is a 128 px patch at the model's resolution (0.5 µm/px): its embedding is
the mean of the shared encoder's bottleneck features over the patch, computed in the same
512 px tiles (384 px kept, 64 px of context) as segmentation, so that `ingest --compress`
gets the very same grid as a by-product of its forward passes. Cells without tissue are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inference import tiling
from inference.predict import autocast
from inference.slide import TissueMask, default_batch, tile_loader

#: Side of one grid cell, px at the model's resolution.
CELL_PX = 128


class CompressError(ValueError):
    """The network cannot compress slides into 128 px cells."""


@dataclass
class SlideGrid:
    """A compressed slide: (rows, cols, channels) embeddings and the cells holding tissue."""

    embeddings: np.ndarray  # float16, zero where there is no tissue
    tissue: np.ndarray  # bool (rows, cols)
    encoder_sha256: str
    mpp: float
    cell_px: int = CELL_PX


def cells_per_tile(preset) -> int:
    """Grid cells along each side of a tile's kept output (3 for the cpu preset)."""
    if preset.output_size % CELL_PX or CELL_PX % preset.total_stride:
        raise CompressError(
            f"the {preset.name} preset keeps {preset.output_size} px per tile, which is not a "
            f"whole number of {CELL_PX} px cells; compress with the cpu preset"
        )
    return preset.output_size // CELL_PX


def tile_embeddings(net, bottleneck: torch.Tensor) -> torch.Tensor:
    """(N, C, k, k) cell embeddings from the bottleneck features of N tiles: the kept centre,
    averaged over each 128 px cell."""
    preset = net.preset
    cells = preset.output_size // preset.total_stride
    h, w = bottleneck.shape[-2:]
    top, left = (h - cells) // 2, (w - cells) // 2
    centre = bottleneck[..., top : top + cells, left : left + cells]
    return torch.nn.functional.avg_pool2d(centre, CELL_PX // preset.total_stride)


def empty_grid(shape_model_px: tuple[int, int], channels: int) -> np.ndarray:
    h, w = shape_model_px
    return np.zeros((-(-h // CELL_PX), -(-w // CELL_PX), channels), dtype=np.float16)


def place(grid: np.ndarray, rc: tuple[int, int], cells: np.ndarray) -> None:
    """Write one tile's (C, k, k) cell embeddings at tile (row, col) of the grid."""
    k = cells.shape[-1]
    r0, c0 = rc[0] * k, rc[1] * k
    block = cells.transpose(1, 2, 0)[: grid.shape[0] - r0, : grid.shape[1] - c0]
    grid[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block


def tissue_cells(reader, mask: TissueMask, preset) -> np.ndarray:
    """(rows, cols) True where a cell holds tissue."""
    mpp = np.asarray(reader.info.mpp, dtype=float)
    w, h = reader.slide_dimensions(resolution=preset.mpp, units="mpp")
    scale = (preset.mpp / mpp[0], preset.mpp / mpp[1])
    return tiling.Grid.over((int(h), int(w)), scale, CELL_PX, 0, mask.mask).tissue


def compress_slide(
    reader, model, mask: TissueMask, *, device: str = "cpu", batch_size: int | None = None
) -> SlideGrid:
    """The slide's grid: the encoder alone over the tissue tiles, read through tiatoolbox."""

    net, preset = model.net, model.info.preset
    cells_per_tile(preset)
    mpp = np.asarray(reader.info.mpp, dtype=float)
    w, h = reader.slide_dimensions(resolution=preset.mpp, units="mpp")
    margin = (preset.input_size - preset.output_size) // 2
    tiles = tiling.Grid.over(
        (int(h), int(w)), (preset.mpp / mpp[0], preset.mpp / mpp[1]), preset.output_size, margin,
        mask.mask,
    )  # fmt: skip
    grid = empty_grid((int(h), int(w)), preset.widths[-1])
    wanted = [(r, c) for r, c in zip(*np.nonzero(tiles.tissue), strict=True)]
    if wanted:
        loader = tile_loader(reader, preset, wanted, batch_size or default_batch(preset))
        net.eval()
        for batch in loader:
            images = batch["image"].to(device, torch.float32).permute(0, 3, 1, 2)
            with torch.inference_mode(), autocast(device):
                cells = tile_embeddings(net, net.backbone(images / 255.0)[-1])
            cells = cells.float().cpu().numpy()
            for i, (x0, y0, _, _) in enumerate(batch["output_locs"].numpy()):
                place(
                    grid, (int(y0) // preset.output_size, int(x0) // preset.output_size), cells[i]
                )
    tissue = tissue_cells(reader, mask, preset)
    grid[~tissue] = 0
    return SlideGrid(grid, tissue, model.info.sha256, preset.mpp)
