"""Opening whole-slide images with tiatoolbox, finding their tissue, and reading the model's
input tiles from them.

`open_slide` turns every way a file can fail to be a usable slide into one `SlideError` with a
short message; `tissue_mask` finds stained tissue on a low-resolution thumbnail; `tile_loader`
batches the input patches of chosen output tiles (for segmentation and for compression).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from inference.targets import disk

#: Resolution (µm/px) of the thumbnail the tissue mask is computed on.
MASK_MPP = 8.0
#: Tissue pieces smaller than this (µm²) are ignored (dust, debris, pen dots).
MIN_TISSUE_UM2 = 20_000.0


class SlideError(Exception):
    """A file that cannot be used as a slide; the message says why, in one line."""


@dataclass
class TissueMask:
    """Boolean tissue mask of a slide at `mpp` µm/px (row 0 = top of the slide)."""

    mask: np.ndarray
    mpp: float

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * self.mpp**2 / 1e6


def open_slide(path: str | Path, mpp: float | None = None):
    """A tiatoolbox `WSIReader` for `path`, with `mpp` (µm/px) overriding the file's metadata."""
    import openslide
    import tifffile
    from tiatoolbox.utils.exceptions import FileNotSupportedError
    from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader, VirtualWSIReader, WSIReader

    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if not path.is_file():
        raise SlideError(f"{path}: not a file")
    if mpp is not None and not mpp > 0:
        raise SlideError(f"--mpp must be positive, not {mpp}")
    override = (mpp, mpp) if mpp else None
    failures = (
        FileNotSupportedError,
        openslide.OpenSlideError,
        tifffile.TiffFileError,
        ValueError,
        TypeError,
        OSError,
        KeyError,
        IndexError,
    )
    try:
        reader = WSIReader.open(path, mpp=override)
        if isinstance(reader, VirtualWSIReader) and path.suffix.lower() in (".tif", ".tiff"):
            # tiatoolbox reads multi-page tiled TIFFs only as BigTIFF; OpenSlide reads the
            # classic-TIFF pyramids as "generic-tiff", with their resolution tags.
            with contextlib.suppress(openslide.OpenSlideError):
                reader = OpenSlideWSIReader(path, mpp=override)
        info = reader.info
        width, height = (int(v) for v in info.slide_dimensions)
        # Decode the smallest level's corner: catches truncated or corrupt pixel data early.
        reader.read_rect((0, 0), (16, 16), resolution=info.level_count - 1, units="level")
    except failures as exc:
        raise SlideError(f"{path}: not a readable slide ({_first_line(exc)})") from exc
    if width < 1 or height < 1:
        raise SlideError(f"{path}: the slide has no pixels")
    if info.mpp is None or not np.all(np.asarray(info.mpp, dtype=float) > 0):
        raise SlideError(
            f"{path}: the file records no resolution (µm per pixel); give it with --mpp"
        )
    return reader


def tissue_mask(reader, mpp: float = MASK_MPP) -> TissueMask:
    """Stained tissue on a thumbnail at `mpp` µm/px: pixels that are coloured (saturation) or
    dark enough, cleaned by closing and opening, holes filled, small pieces dropped. A blank or
    white slide gives an empty mask (unlike Otsu, which always splits the histogram in two)."""
    thumb = np.asarray(reader.slide_thumbnail(resolution=mpp, units="mpp"))[..., :3]
    hsv = cv2.cvtColor(np.ascontiguousarray(thumb), cv2.COLOR_RGB2HSV)
    grey = thumb.mean(axis=2)
    tissue = ((hsv[..., 1] > 20) | (grey < 200)) & (grey > 10)
    radius = max(1, round(16 / mpp))
    # Pad with the edge values so that tissue cut by the slide border is not eroded away.
    tissue = np.pad(tissue, radius, mode="edge")
    tissue = ndimage.binary_closing(tissue, disk(radius))
    tissue = ndimage.binary_opening(tissue, disk(max(1, radius // 2)))
    tissue = ndimage.binary_fill_holes(tissue[radius:-radius, radius:-radius])
    labels, n = ndimage.label(tissue)
    if n:
        area = np.bincount(labels.ravel()) * mpp**2
        area[0] = 0
        tissue = (area >= MIN_TISSUE_UM2)[labels]
    return TissueMask(tissue, mpp)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def default_batch(preset) -> int:
    """Patches per forward pass: 8 of 512 px, fewer of larger patches (the same pixels)."""
    return max(1, round(8 * (512 / preset.input_size) ** 2))


def tile_loader(reader, preset, tiles: list[tuple[int, int]], batch_size: int):
    """Batches of the model's input patches (tiatoolbox's `WSIPatchDataset`) for the output
    tiles `tiles` ((row, col) of the preset's output grid at its mpp), in that order."""
    import torch
    from tiatoolbox.models import WSIPatchDataset

    dataset = WSIPatchDataset(
        input_img=reader,
        patch_input_shape=(preset.input_size, preset.input_size),
        patch_output_shape=(preset.output_size, preset.output_size),
        stride_shape=(preset.output_size, preset.output_size),
        resolution=preset.mpp,
        units="mpp",
        auto_get_mask=False,
    )
    index = {
        (int(y0) // preset.output_size, int(x0) // preset.output_size): i
        for i, (x0, y0, _, _) in enumerate(dataset.outputs)
    }
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=[index[rc] for rc in tiles]
    )
