"""A training pack: the training data of one configuration in one compact file, for a machine
that cannot see `../shared/data` (a lent GPU machine takes at most 64 MiB along with the
repository, and the datasets are 144 MB).

The pack holds the training images exactly as `inference.train` reads them (resampled to the
network's resolutions, with the derived labels, losslessly compressed: WebP for images, PNG for
label maps) and an unchanged copy of the files of the held-out images in their datasets' own
layouts, so that `spatialdb evaluate` scores them there as it does here. It is one `.tar.xz`
(the MoNuSeg outlines' XML shrinks tenfold); `unpack` opens it into a folder that training takes
as its `data`, and a pack made for other settings is refused.

    python -m inference.train --config configs/gpu.toml --pack .gpu/pack.tar.xz
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import cv2
import numpy as np

from inference import datasets
from inference.datasets import LabelledImage

MANIFEST = "pack.json"
VERSION = 1


class PackError(ValueError):
    """A pack that is unreadable or was made for other training settings."""


def is_pack(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def settings(config, preset) -> dict:
    """What a pack's contents depend on: resolutions, splits and datasets."""
    return {
        "mpp": preset.mpp,
        "region_mpp": preset.mpp * preset.gland_scale,
        "glas_val_every": config.glas_val_every,
        "consep_val_every": config.consep_val_every,
        "monuseg_held_out": sorted(config.monuseg_held_out),
        "sources": sorted(datasets.training_sources(config)),
    }


# --- writing ----------------------------------------------------------------------------------


def _encode(array: np.ndarray, path: Path) -> None:
    if array.ndim == 3:  # RGB image: lossless WebP
        ok, data = cv2.imencode(".webp", array[..., ::-1], [cv2.IMWRITE_WEBP_QUALITY, 101])
    else:  # label map: 8- or 16-bit PNG
        if array.min() < 0 or array.max() > 65535:
            raise PackError(f"{path.name}: labels outside 0..65535")
        dtype = np.uint8 if array.max() <= 255 else np.uint16
        ok, data = cv2.imencode(".png", array.astype(dtype), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise PackError(f"{path.name}: could not encode")
    path.write_bytes(data.tobytes())


def _write_items(items: list[LabelledImage], folder: Path) -> list[dict]:
    entries = []
    for i, item in enumerate(items):
        stem = f"{item.source}-{i:04d}"
        _encode(item.image, folder / f"{stem}.webp")
        for task, labels in item.instances.items():
            _encode(labels, folder / f"{stem}.{task}.png")
        for task, types in item.types.items():
            _encode(types, folder / f"{stem}.{task}-types.png")
        entries.append(
            {
                "file": stem,
                "name": item.name,
                "source": item.source,
                "instances": sorted(item.instances),
                "types": sorted(item.types),
                "grade": item.grade,
                "scale": item.scale,
            }
        )
    return entries


def _copy_held_out(root: Path, summary: dict, out: Path) -> None:
    """The held-out images' own files, in their datasets' layouts."""
    glas = out / "glas"
    (glas / "images").mkdir(parents=True)
    (glas / "masks").mkdir()
    for name, image, mask in datasets.glas_pairs(root / "glas"):
        if name in summary["glas"]["held_out"]:
            shutil.copy2(image, glas / "images" / image.name)
            shutil.copy2(mask, glas / "masks" / mask.name)
    if (root / "glas" / "Grade.csv").exists():
        shutil.copy2(root / "glas" / "Grade.csv", glas / "Grade.csv")
    monuseg = out / "monuseg"
    monuseg.mkdir()
    for name, image, xml in datasets.monuseg_pairs(root / "monuseg"):
        if name in summary["monuseg"]["held_out"]:
            shutil.copy2(image, monuseg / image.name)
            shutil.copy2(xml, monuseg / xml.name)
    consep = out / "consep"
    for sub in ("images", "inst", "types"):
        (consep / sub).mkdir(parents=True)
    for name, image, inst, types in datasets.consep_patches(root / "consep"):
        if datasets.consep_image_of(name) in summary["consep"]["held_out"]:
            for path, sub in ((image, "images"), (inst, "inst"), (types, "types")):
                shutil.copy2(path, consep / sub / path.name)


def write(config, preset, out: str | Path, log=print) -> Path:
    """Read the configuration's training data from `config.data` and write the pack to `out`
    (a `.tar.xz`), atomically."""
    out = Path(out)
    if not out.name.endswith(".tar.xz"):
        raise PackError(f"{out}: a pack is a .tar.xz file")
    items, summary = datasets.read_training(config, preset)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        folder = Path(tmp) / "pack"
        (folder / "train").mkdir(parents=True)
        entries = []
        for source, listed in items.items():
            entries += _write_items(listed, folder / "train")
            log(f"{source}: {len(listed)} training images")
        _copy_held_out(Path(config.data), summary, folder / "held_out")
        manifest = {
            "version": VERSION,
            "settings": settings(config, preset),
            "summary": summary,
            "items": entries,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        archive = Path(tmp) / out.name
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            tar.add(folder, arcname="pack")
        archive.replace(out)
    log(f"pack written to {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out


# --- reading ----------------------------------------------------------------------------------


def unpack(archive: str | Path, into: str | Path) -> Path:
    """Open a pack into `into`/pack and return that folder (the `data` of a training run, with
    the held-out images under held_out/glas, held_out/monuseg and held_out/consep)."""
    into = Path(into)
    try:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(into, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise PackError(f"{archive}: not a readable pack ({exc})") from None
    folder = into / "pack"
    if not is_pack(folder):
        raise PackError(f"{archive}: no {MANIFEST} inside")
    return folder


def _decode(path: Path, colour: bool) -> np.ndarray:
    flags = cv2.IMREAD_COLOR if colour else cv2.IMREAD_UNCHANGED
    array = cv2.imread(str(path), flags)
    if array is None:
        raise PackError(f"{path}: missing or unreadable")
    return np.ascontiguousarray(array[..., ::-1]) if colour else array


def read(folder: str | Path, config, preset) -> tuple[dict[str, list[LabelledImage]], dict]:
    """The training images of an unpacked pack, as `datasets.read_training` returns them;
    refused if the pack was made for other settings than `config` and `preset`."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise PackError(f"{folder}: unreadable {MANIFEST} ({exc})") from None
    if manifest.get("version") != VERSION:
        raise PackError(f"{folder}: pack version {manifest.get('version')}, expected {VERSION}")
    wanted = settings(config, preset)
    differ = [k for k in wanted if manifest["settings"].get(k) != wanted[k]]
    if differ:
        raise PackError(f"{folder}: the pack was made for other settings ({', '.join(differ)})")
    items: dict[str, list[LabelledImage]] = {}
    train = folder / "train"
    for entry in manifest["items"]:
        stem = entry["file"]
        item = LabelledImage(
            name=entry["name"],
            source=entry["source"],
            image=_decode(train / f"{stem}.webp", colour=True),
            instances={
                t: _decode(train / f"{stem}.{t}.png", False).astype(np.int32)
                for t in entry["instances"]
            },
            types={
                t: _decode(train / f"{stem}.{t}-types.png", False).astype(np.uint8)
                for t in entry["types"]
            },
            grade=entry["grade"],
            scale=entry["scale"],
        )
        items.setdefault(item.source, []).append(item)
    return items, manifest["summary"]
