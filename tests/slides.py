"""Generated slide files for tests: pyramidal BigTIFFs (one IFD per level) and broken files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "CMU-1-Small-Region.svs"


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3) -> Path:
    """A tiled, JPEG-compressed BigTIFF with one IFD per level (each half the size of the one
    before) and, when `mpp` is given, resolution tags in pixels per centimetre."""
    resolution = {}
    if mpp is not None:
        resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level = image
        for k in range(levels):
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                subfiletype=1 if k else 0,
                metadata=None,
                **(resolution if k == 0 else {}),
            )
            level = cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2), cv2.INTER_AREA)
    return path


def tissue_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """White glass with a pink, nucleus-speckled block of 'tissue' in the middle."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 242, np.uint8)
    y0, y1, x0, x1 = height // 6, height * 5 // 6, width // 6, width * 5 // 6
    image[y0:y1, x0:x1] = (225, 150, 190)
    for _ in range((y1 - y0) * (x1 - x0) // 900):
        cy, cx = int(rng.integers(y0 + 8, y1 - 8)), int(rng.integers(x0 + 8, x1 - 8))
        cv2.ellipse(image, (cx, cy), (7, 5), int(rng.integers(0, 180)), 0, 360, (70, 40, 120), -1)
    return cv2.GaussianBlur(image, (3, 3), 0)
