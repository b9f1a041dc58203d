"""Slide files: finding them (files, directories, globs), opening them as usable slides, and
what the database records about them."""

from __future__ import annotations

import glob
from pathlib import Path

from spatialdb.errors import UserError
from spatialdb.store.catalog import SlideRecord

#: Files a directory argument contributes (what tiatoolbox's WSIReader opens).
SLIDE_SUFFIXES = (
    ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".svslide", ".bif", ".vms", ".qptiff",
    ".dcm", ".jp2", ".png", ".jpg", ".jpeg",
)  # fmt: skip


def slide_paths(arguments: tuple[str, ...]) -> list[Path]:
    """Files named, slides inside directories (recursively) and glob matches, in order, once
    each. A name that matches nothing is kept, so that it fails as a missing file."""
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file()
            )
        elif glob.has_magic(argument):
            found = sorted(Path(p) for p in glob.glob(argument, recursive=True))
        else:
            found = [path]
        paths += [p for p in found if p not in paths]
    return paths


def open_reader(path: Path, mpp: float | None):
    """The slide's tiatoolbox reader; `UserError` with one line if it is not a usable slide.

    A slide is refused when the level its tissue thumbnail is read from (the coarsest level at
    least as fine as `MASK_MPP`) has more than 2^30 pixels: without a pyramid that small, finding
    its tissue would decode the level whole (a 10^6 x 10^6 px TIFF: 3 TB)."""
    from inference.slide import MASK_MPP, SlideError, open_slide

    try:
        reader = open_slide(path, mpp)
    except SlideError as exc:
        raise UserError(str(exc)) from exc
    except ZeroDivisionError as exc:  # tiatoolbox divides by the file's resolution tags
        raise UserError(f"{path}: not a readable slide (its resolution tags are zero)") from exc
    info = reader.info
    finer = [k for k, d in enumerate(info.level_downsamples) if d * max(info.mpp) <= MASK_MPP]
    width, height = info.level_dimensions[finer[-1] if finer else 0]
    if width * height > 2**30:
        raise UserError(
            f"{path}: {int(width):,} x {int(height):,} px without a smaller pyramid level is "
            "too large to read (at most 2^30 px in the level read for the tissue thumbnail)"
        )
    return reader


def slide_record(path: Path, reader, content: str) -> SlideRecord:
    """What the database keeps about a slide, from its reader's metadata."""
    meta = reader.info
    return SlideRecord(
        file_path=str(path.resolve()),
        name=path.stem,
        fingerprint=content,
        width=int(meta.slide_dimensions[0]),
        height=int(meta.slide_dimensions[1]),
        mpp_x=float(meta.mpp[0]),
        mpp_y=float(meta.mpp[1]),
        level_count=int(meta.level_count),
        objective_power=float(meta.objective_power) if meta.objective_power else None,
        vendor=meta.vendor,
    )
