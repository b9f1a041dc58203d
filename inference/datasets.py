"""Training and evaluation data: readers for GlaS, MoNuSeg and CoNSeP, resampled to the network's
resolution from each image's own, plus the labels this project derives from them (lumen
pseudo-labels inside GlaS glands, per-patch tissue classes from GlaS masks and grade, and each
gland's type from its image's grade).

Every reader returns `LabelledImage`s that carry only the labels their dataset has; training
treats the missing ones as absent, never as background.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from inference.network import LABELLED_GLAND_TYPES, LABELLED_NUCLEUS_TYPES, TISSUE_CLASSES
from inference.targets import disk

GLAS_MPP = 0.62  # 20x Zeiss MIRAX scans (Sirinukunwattana et al. 2017)
MONUSEG_MPP = 0.25  # 40x TCGA; the XML's MicronsPerPixel wins where present
#: CoNSeP's 1000 px images at 40x (about 0.25 µm/px) were resized to 1024 before being cut into
#: 256 px patches (see ../shared/data/consep/PROVENANCE.md).
CONSEP_MPP = 0.244

#: CoNSeP's merged classes (1 other, 2 inflammatory, 3 epithelial, 4 spindle-shaped) as the
#: project's nuclear types: spindle-shaped cells (fibroblast, muscle, endothelium) are connective.
CONSEP_TYPES = {
    1: LABELLED_NUCLEUS_TYPES.index("other"),
    2: LABELLED_NUCLEUS_TYPES.index("inflammatory"),
    3: LABELLED_NUCLEUS_TYPES.index("epithelial"),
    4: LABELLED_NUCLEUS_TYPES.index("connective"),
}


class DatasetError(ValueError):
    """A dataset folder that cannot be read as the layout it claims."""


@dataclass
class LabelledImage:
    """One image at the network's resolution and the labels its dataset provides."""

    name: str
    source: str
    image: np.ndarray  # (H, W, 3) uint8
    instances: dict[str, np.ndarray] = field(default_factory=dict)  # task -> int32 label map
    #: task -> uint8 map of type indices (`LABELLED_NUCLEUS_TYPES`, `LABELLED_GLAND_TYPES`)
    types: dict[str, np.ndarray] = field(default_factory=dict)
    grade: str | None = None  # GlaS: "benign" or "malignant"
    scale: float = 1.0  # resampled size / original size


def resample_image(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (round(w * scale), round(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def resample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to (H, W)."""
    if labels.shape == size:
        return labels
    out = cv2.resize(labels.astype(np.int32), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return out.astype(labels.dtype)


# --- GlaS -------------------------------------------------------------------------------------


def glas_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) for a GlaS folder: either `images/X.png` + `masks/X.png` (this
    project's shared layout) or the original flat `X.bmp` + `X_anno.bmp`."""
    root = Path(root)
    pairs = []
    if (root / "images").is_dir() and (root / "masks").is_dir():
        for image in sorted((root / "images").iterdir()):
            mask = root / "masks" / image.name
            if mask.exists():
                pairs.append((image.stem, image, mask))
    else:
        for mask in sorted(root.glob("*_anno.*")):
            name = mask.stem[: -len("_anno")]
            for image in root.glob(f"{name}.*"):
                if image != mask:
                    pairs.append((name, image, mask))
                    break
    if not pairs:
        raise DatasetError(f"{root}: no GlaS images with masks (images/ + masks/, or X_anno.bmp)")
    return sorted(pairs, key=lambda p: _natural_key(p[0]))


def glas_grades(root: Path) -> dict[str, str]:
    path = Path(root) / "Grade.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    return {row[0].strip(): row[2].strip() for row in rows[1:] if len(row) >= 3}


def read_glas(root: Path, mpp: float, names: set[str] | None = None) -> list[LabelledImage]:
    grades = glas_grades(root)
    out = []
    for name, image_path, mask_path in glas_pairs(root):
        if names is not None and name not in names:
            continue
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = np.asarray(Image.open(mask_path)).astype(np.int32)
        if mask.ndim == 3:
            mask = mask[..., 0]
        scale = GLAS_MPP / mpp
        image = resample_image(image, scale)
        glands = resample_labels(mask, image.shape[:2])
        grade = grades.get(name)
        types = {}
        if grade in ("benign", "malignant"):
            kind = LABELLED_GLAND_TYPES.index(f"{grade} gland")
            types["Gland"] = np.where(glands > 0, kind, 0)
        out.append(
            LabelledImage(
                name=name,
                source="glas",
                image=image,
                instances={"Gland": glands, "Lumen": lumen_pseudo_labels(image, glands, mpp)},
                types={task: t.astype(np.uint8) for task, t in types.items()},
                grade=grade,
                scale=scale,
            )
        )
    return out


def lumen_pseudo_labels(image: np.ndarray, glands: np.ndarray, mpp: float) -> np.ndarray:
    """Bright, unstained regions enclosed by a gland, one instance per connected region.

    GlaS has no lumen outlines, so these are derived: pixels inside a gland lighter than its
    epithelium (grey > 175: unstained lumen, mucus, pale debris), closed by a 2 µm disk and opened
    by a 1 µm one, holes filled, at least 20 µm², and with at least 90% of a 2 µm ring around them
    inside the same gland.
    """
    grey = image.mean(axis=2)
    radius = max(1, round(1.0 / mpp))
    light = ndimage.binary_closing((grey > 175) & (glands > 0), structure=disk(2 * radius))
    light = ndimage.binary_opening(light & (glands > 0), structure=disk(radius))
    candidates, _ = ndimage.label(ndimage.binary_fill_holes(light))
    min_area = 20.0 / mpp**2
    ring_px = max(1, round(2.0 / mpp))
    out = np.zeros(glands.shape, dtype=np.int32)
    label = 0
    for index, box in enumerate(ndimage.find_objects(candidates), start=1):
        if box is None:
            continue
        window = tuple(
            slice(max(s.start - ring_px, 0), min(s.stop + ring_px, size))
            for s, size in zip(box, glands.shape, strict=True)
        )
        region = candidates[window] == index
        if region.sum() < min_area:
            continue
        gland = np.bincount(glands[window][region]).argmax()
        ring = ndimage.binary_dilation(region, structure=disk(ring_px)) & ~region
        touches_edge = ring.sum() < 0.5 * disk(ring_px).sum()  # clipped by the image border
        if gland == 0 or touches_edge or (glands[window][ring] == gland).mean() < 0.9:
            continue
        label += 1
        out[window][region] = label
    return out


def tissue_class(glands: np.ndarray, image: np.ndarray, grade: str | None) -> int:
    """Per-patch tissue label from a GlaS crop, or -1 where the rule gives none: no tissue ->
    background; glands covering most of the tissue -> normal (benign) or abnormal (malignant)
    epithelium; tissue with hardly any gland -> stroma."""
    grey = image.mean(axis=2)
    spread = image.max(axis=2).astype(np.int16) - image.min(axis=2)
    tissue = (grey < 215) | (spread > 30)
    tissue_fraction = tissue.mean()
    if tissue_fraction < 0.2:
        return TISSUE_CLASSES.index("background")
    gland_share = (glands > 0).mean() / tissue_fraction
    if gland_share >= 0.5 and grade in ("benign", "malignant"):
        name = "normal epithelium" if grade == "benign" else "abnormal epithelium"
        return TISSUE_CLASSES.index(name)
    if gland_share < 0.1 and tissue_fraction > 0.5:
        return TISSUE_CLASSES.index("stroma")
    return -1


# --- MoNuSeg ----------------------------------------------------------------------------------


def monuseg_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, xml) for a MoNuSeg folder, flat or with `Tissue Images/` + `Annotations/`."""
    root = Path(root)
    xmls = {p.stem: p for p in root.rglob("*.xml")}
    pairs = [
        (p.stem, p, xmls[p.stem])
        for p in sorted(root.rglob("*"))
        if p.suffix.lower() in (".tif", ".tiff", ".png") and p.stem in xmls
    ]
    if not pairs:
        raise DatasetError(f"{root}: no MoNuSeg tiles (an image with a same-named .xml)")
    return pairs


def read_monuseg_outlines(xml_path: Path) -> tuple[list[np.ndarray], float | None]:
    """Nucleus polygons ((N, 2) arrays of x, y pixels) and the XML's MicronsPerPixel, if any."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{xml_path}: not a readable ImageScope XML ({exc})") from None
    mpp = root.attrib.get("MicronsPerPixel")
    outlines = []
    for region in root.iter("Region"):
        vertices = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(vertices) >= 3:
            outlines.append(np.asarray(vertices))
    return outlines, float(mpp) if mpp else None


def rasterise(outlines: list[np.ndarray], shape: tuple[int, int], scale: float) -> np.ndarray:
    """Instance map of polygons drawn in order (later ones win where they overlap)."""
    out = np.zeros(shape, dtype=np.int32)
    for label, outline in enumerate(outlines, start=1):
        rows, cols = fill_polygon(outline[:, 1] * scale, outline[:, 0] * scale, shape=shape)
        out[rows, cols] = label
    return out


def read_monuseg(root: Path, mpp: float, names: set[str] | None = None) -> list[LabelledImage]:
    out = []
    for name, image_path, xml_path in monuseg_pairs(root):
        if names is not None and name not in names:
            continue
        outlines, own_mpp = read_monuseg_outlines(xml_path)
        scale = (own_mpp or MONUSEG_MPP) / mpp
        image = resample_image(np.asarray(Image.open(image_path).convert("RGB")), scale)
        nuclei = rasterise(outlines, image.shape[:2], scale)
        out.append(LabelledImage(name, "monuseg", image, {"Nuclei": nuclei}, scale=scale))
    return out


# --- CoNSeP -----------------------------------------------------------------------------------


def consep_patches(root: Path) -> list[tuple[str, Path, Path, Path]]:
    """(name, image, instance map, types) for a folder in the CoNSeP layout: `images/X.jpg|png`,
    `inst/X.png` (16-bit instance map) and `types/X.mat` (`inst_type`, one class per instance in
    the order of the patch's sorted non-zero ids)."""
    root = Path(root)
    if not all((root / sub).is_dir() for sub in ("images", "inst", "types")):
        raise DatasetError(f"{root}: not a CoNSeP folder (images/, inst/ and types/)")
    out = []
    for image in sorted((root / "images").iterdir(), key=lambda p: _natural_key(p.stem)):
        inst, types = root / "inst" / f"{image.stem}.png", root / "types" / f"{image.stem}.mat"
        if inst.exists() and types.exists():
            out.append((image.stem, image, inst, types))
    if not out:
        raise DatasetError(f"{root}: no CoNSeP patches (an image with inst/ and types/ files)")
    return out


def consep_image_of(name: str) -> str:
    """The source image a patch was cut from: `train_3_007` -> `train_3`."""
    return name.rsplit("_", 1)[0]


def read_consep_patch(image_path: Path, inst_path: Path, types_path: Path):
    """(image, instance map, per-pixel type map of `LABELLED_NUCLEUS_TYPES` indices) at the
    patch's own resolution."""
    from scipy.io import loadmat

    image = np.asarray(Image.open(image_path).convert("RGB"))
    instances = np.asarray(Image.open(inst_path)).astype(np.int32)
    try:
        classes = loadmat(types_path)["inst_type"].ravel().astype(int)
    except (ValueError, KeyError, OSError) as exc:
        raise DatasetError(f"{types_path}: no readable inst_type ({exc})") from None
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if len(ids) != len(classes):
        raise DatasetError(
            f"{types_path}: {len(classes)} classes for {len(ids)} instances in {inst_path.name}"
        )
    lookup = np.zeros(int(instances.max()) + 1, dtype=np.uint8)
    lookup[ids] = [CONSEP_TYPES.get(int(c), 0) for c in classes]
    return image, instances, lookup[instances]


def read_consep(
    root: Path, mpp: float, images: set[str] | None = None, mosaic: int = 2
) -> list[LabelledImage]:
    """CoNSeP patches of the chosen source images, `mosaic` x `mosaic` consecutive patches of one
    image to a training image (the patches' grid order is unknown, so each keeps its own
    instances: a nucleus cut by a patch edge stays cut)."""
    groups: dict[str, list] = {}
    for name, image_path, inst_path, types_path in consep_patches(root):
        if images is None or consep_image_of(name) in images:
            groups.setdefault(consep_image_of(name), []).append(
                (name, image_path, inst_path, types_path)
            )
    scale = CONSEP_MPP / mpp
    out = []
    per = mosaic * mosaic
    for source, patches in groups.items():
        for start in range(0, len(patches) - per + 1, per):
            parts = [read_consep_patch(*p[1:]) for p in patches[start : start + per]]
            image, nuclei, types = _mosaic(parts, mosaic, scale)
            name = f"{source}_{start // per}"
            out.append(
                LabelledImage(
                    name, "consep", image, {"Nuclei": nuclei}, {"Nuclei": types}, scale=scale
                )
            )
    return out


def _mosaic(parts: list, side: int, scale: float):
    """Resampled patches placed `side` x `side`, instance ids made unique across patches."""
    images, nuclei, types = [], [], []
    offset = 0
    for image, instances, type_map in parts:
        image = resample_image(image, scale)
        size = image.shape[:2]
        labels = resample_labels(instances, size)
        labels = np.where(labels > 0, labels + offset, 0)
        offset = max(offset, int(labels.max()))
        images.append(image)
        nuclei.append(labels)
        types.append(resample_labels(type_map, size))

    def grid(arrays):
        h = min(a.shape[0] for a in arrays)
        w = min(a.shape[1] for a in arrays)
        rows = [
            np.concatenate([a[:h, :w] for a in arrays[r * side : (r + 1) * side]], axis=1)
            for r in range(side)
        ]
        return np.concatenate(rows, axis=0)

    return grid(images), grid(nuclei).astype(np.int32), grid(types).astype(np.uint8)


# --- training splits ---------------------------------------------------------------------


def consep_split(root: Path, every: int) -> tuple[list[str], list[str]]:
    """CoNSeP source images (not patches) for training and held out."""
    names = sorted(
        {consep_image_of(name) for name, *_ in consep_patches(root)},
        key=_natural_key,
    )
    return split_names(names, every)


def training_sources(config) -> list[str]:
    """The datasets a run trains on: GlaS, and the nuclear datasets its mix draws from."""
    return ["glas", *(name for name, weight in config.mix.items() if weight > 0)]


def read_training(config, preset) -> tuple[dict[str, list[LabelledImage]], dict]:
    """The training images of a run (an `inference.train.TrainConfig`, a network `Preset`) per
    dataset, GlaS at the region resolution and the nuclear datasets at the input's, and a
    summary naming what was held out: the split of every training run."""
    root = Path(config.data)
    region_mpp = preset.mpp * preset.gland_scale
    glas_names = [name for name, *_ in glas_pairs(root / "glas")]
    glas_train, glas_val = split_names(glas_names, config.glas_val_every)
    monuseg_names = [name for name, *_ in monuseg_pairs(root / "monuseg")]
    missing = set(config.monuseg_held_out) - set(monuseg_names)
    if missing:
        raise ValueError(f"held-out MoNuSeg tiles not found: {sorted(missing)}")
    monuseg_train = [n for n in monuseg_names if n not in config.monuseg_held_out]
    consep_train, consep_val = consep_split(root / "consep", config.consep_val_every)
    read = {
        "glas": lambda: read_glas(root / "glas", region_mpp, set(glas_train)),
        "monuseg": lambda: read_monuseg(root / "monuseg", preset.mpp, set(monuseg_train)),
        "consep": lambda: read_consep(root / "consep", preset.mpp, set(consep_train)),
    }
    summary = {
        "glas": {"train": glas_train, "held_out": glas_val, "mpp": region_mpp},
        "monuseg": {"train": monuseg_train, "held_out": list(config.monuseg_held_out)},
        "consep": {"train": consep_train, "held_out": consep_val},
    }
    return {source: read[source]() for source in training_sources(config)}, summary


# --- helpers ----------------------------------------------------------------------------------


def _natural_key(name: str) -> tuple:
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def split_names(names: list[str], every: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: every `every`-th name (1-based) is held out."""
    held_out = [name for i, name in enumerate(names, start=1) if i % every == 0]
    return [name for name in names if name not in held_out], held_out
