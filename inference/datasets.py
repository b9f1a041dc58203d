"""Training and evaluation data: readers for GlaS, MoNuSeg and the histolytics tile, resampled to
the network's resolution from each image's own, plus the labels this project derives from them
(lumen pseudo-labels inside GlaS glands, per-patch tissue classes from GlaS masks and grade).

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

from inference.network import NUCLEUS_TYPES, TISSUE_CLASSES
from inference.targets import disk

GLAS_MPP = 0.62  # 20x Zeiss MIRAX scans (Sirinukunwattana et al. 2017)
MONUSEG_MPP = 0.25  # 40x TCGA; the XML's MicronsPerPixel wins where present
HISTOLYTICS_MPP = 0.5  # undocumented; nuclear areas (median 61 µm² at 0.5) fit 20x

#: histolytics classes -> Cerberus nuclear types (inflammatory cells there are mostly lymphocytes).
HISTOLYTICS_TYPES = {
    1: NUCLEUS_TYPES.index("connective"),
    2: NUCLEUS_TYPES.index("lymphocyte"),
    3: NUCLEUS_TYPES.index("epithelial"),
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
    nucleus_types: np.ndarray | None = None  # uint8 map of NUCLEUS_TYPES indices
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
        out.append(
            LabelledImage(
                name=name,
                source="glas",
                image=image,
                instances={"Gland": glands, "Lumen": lumen_pseudo_labels(image, glands, mpp)},
                grade=grades.get(name),
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


# --- histolytics ------------------------------------------------------------------------------


def read_histolytics(root: Path, mpp: float) -> list[LabelledImage]:
    root = Path(root)
    image_path = root / "hgsc_nest.jpg"
    if not image_path.exists():
        raise DatasetError(f"{root}: hgsc_nest.jpg not found")
    scale = HISTOLYTICS_MPP / mpp
    image = resample_image(np.asarray(Image.open(image_path).convert("RGB")), scale)
    size = image.shape[:2]
    instances = np.load(root / "hgsc_nest_inst_mask.npz")["nuc_raster"]
    classes = np.load(root / "hgsc_nest_type_mask.npz")["nuc_raster"]
    lookup = np.zeros(int(classes.max()) + 1, dtype=np.uint8)
    for source, target in HISTOLYTICS_TYPES.items():
        if source < len(lookup):
            lookup[source] = target
    return [
        LabelledImage(
            "hgsc_nest",
            "histolytics",
            image,
            {"Nuclei": resample_labels(instances.astype(np.int32), size)},
            nucleus_types=resample_labels(lookup[classes], size),
            scale=scale,
        )
    ]


# --- helpers ----------------------------------------------------------------------------------


def _natural_key(name: str) -> tuple:
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def split_names(names: list[str], every: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: every `every`-th name (1-based) is held out."""
    held_out = [name for i, name in enumerate(names, start=1) if i % every == 0]
    return [name for name in names if name not in held_out], held_out
