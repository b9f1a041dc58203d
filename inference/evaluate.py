"""Evaluation of a weights file on a folder in the GlaS, MoNuSeg or CoNSeP layout.

GlaS folders give gland object F1 (50 % overlap rule; true positives, false positives and false
negatives pooled over the images, as in the challenge), object Dice and object Hausdorff
(averaged over images), for all images and for benign and malignant ones apart; each twice: with
the truth's labels as given (the GlaS convention) and with every connected piece of a true gland
as a gland of its own (some GlaS masks give separate glands one label). MoNuSeg and CoNSeP folders
give nuclei pixel Dice, AJI, PQ (DQ x SQ) and F1 at IoU 0.5 (averaged over images); CoNSeP adds
HoVer-Net's detection F1 and per-type classification F1, pooled over its patches, with the counts
behind each type's F1. Predictions are made at the network's resolution and compared with the
ground truth at the image's own, after nearest-neighbour resampling. With a scan resolution
(`scan_mpp`), each image finer than it is first reduced to it by area averaging, as a scanner at
that resolution would give it (a 40x dataset scored as 20x scans of the same tissue), against the
same truth; coarser images are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from inference import datasets, metrics
from inference.network import LABELLED_NUCLEUS_TYPES, CerberusNet
from inference.postprocess import majority_types, type_map
from inference.predict import instances, predict_image, without_untrained
from inference.weights import WeightsInfo

#: Centroids of a true and a predicted nucleus at most this far apart may pair (HoVer-Net's
#: 12 px at 40x).
PAIR_RADIUS_UM = 3.0
#: Nuclear types of other label sets, as CoNSeP's classes (to score weights with finer types).
AS_CONSEP_TYPE = {
    "lymphocyte": "inflammatory",
    "plasma": "inflammatory",
    "neutrophil": "inflammatory",
    "eosinophil": "inflammatory",
}


def detect_layout(folder: Path) -> str:
    readers = (
        ("consep", datasets.consep_patches),
        ("glas", datasets.glas_pairs),
        ("monuseg", datasets.monuseg_pairs),
    )
    for layout, reader in readers:
        try:
            reader(folder)
            return layout
        except datasets.DatasetError:
            continue
    raise datasets.DatasetError(
        f"{folder}: not a GlaS folder (images/ + masks/, or X + X_anno), a MoNuSeg folder (tiles "
        "with same-named .xml outlines) or a CoNSeP folder (images/, inst/ and types/)"
    )


def evaluate(
    folder: str | Path,
    net: CerberusNet,
    info: WeightsInfo,
    *,
    held_out_only: bool = False,
    split: WeightsInfo | None = None,
    mpp: float | None = None,
    scan_mpp: float | None = None,
    device: str = "cpu",
    flips: bool = False,
    progress: Callable[[str], None] = lambda name: None,
) -> dict:
    """{"layout", "images": [per-image figures], "summary": {...}} for `folder`. With
    `held_out_only`, only the images that `split` (default: `info`, the weights scored) held out
    of its training; another file's split scores two weights files on the same images. With
    `scan_mpp`, images finer than it are predicted as scans at it would give them; with `flips`,
    the network's maps are averaged over each tile's four flips."""
    folder = Path(folder)
    layout = detect_layout(folder)
    names = None
    if held_out_only:
        split = split or info
        names = set(split.training.get("data", {}).get(layout, {}).get("held_out", []))
    if scan_mpp is not None and not scan_mpp > 0:
        raise datasets.DatasetError(f"the scan resolution must be positive, not {scan_mpp}")
    run = {"glas": _evaluate_glas, "monuseg": _evaluate_monuseg, "consep": _evaluate_consep}
    predict = partial(_predict, net, info, device=device, scan_mpp=scan_mpp, flips=flips)
    rows, extra = run[layout](folder, predict, info, names, mpp, progress)
    if not rows:
        raise datasets.DatasetError(f"{folder}: no images to evaluate")
    return {"layout": layout, "images": rows, "summary": {**_summary(layout, rows), **extra}}


def predicted_maps(net, info, image: np.ndarray, scale: float, tasks, device, flips=False) -> dict:
    """The heads' probabilities at the network's resolution, untrained classes at zero (with
    `flips`, averaged over each tile's four flips)."""
    resampled = datasets.resample_image(image, scale)
    return without_untrained(predict_image(net, resampled, tasks, device, flips=flips), info)


def found_instances(maps: dict, info, shape: tuple[int, int], settings: dict | None = None):
    """Instance maps at the image's own size (`shape`), from the maps with the weights'
    post-processing or `settings`; and per task with a type head {label: type name}."""
    found = instances(maps, info.postprocess if settings is None else settings, info.mpp)
    types = {}
    if "Nuclei-TYPE" in maps and "Nuclei" in found:
        names = info.classes["Nuclei#TYPE"]
        voted = majority_types(found["Nuclei"], type_map(maps["Nuclei-TYPE"]), len(names))
        types["Nuclei"] = {label: names[kind] for label, (kind, _) in voted.items()}
    labels = {task: datasets.resample_labels(labels, shape) for task, labels in found.items()}
    return labels, types


def _predict(
    net, info, image: np.ndarray, image_mpp: float, tasks, device, scan_mpp=None, flips=False
):
    """Instances (and nuclear types) at the image's size; with a `scan_mpp` coarser than the
    image, predicted from the image area-averaged to it."""
    scanned = image
    if scan_mpp is not None and scan_mpp > image_mpp:
        scanned, image_mpp = datasets.resample_image(image, image_mpp / scan_mpp), scan_mpp
    maps = predicted_maps(net, info, scanned, image_mpp / info.mpp, tasks, device, flips)
    return found_instances(maps, info, image.shape[:2])


def truth_pieces(labels: np.ndarray) -> np.ndarray:
    """The label map with every connected piece of every object as an object of its own."""
    out = np.zeros(labels.shape, dtype=np.int32)
    count = 0
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, n = ndimage.label(labels[box] == label)
        out[box][pieces > 0] = pieces[pieces > 0] + count
        count += n
    return out


def _gland_figures(true: np.ndarray, pred: np.ndarray, prefix: str = "") -> dict:
    f1 = metrics.object_f1(true, pred)
    return {
        f"{prefix}tp": f1["tp"],
        f"{prefix}fp": f1["fp"],
        f"{prefix}fn": f1["fn"],
        f"{prefix}object_f1": f1["f1"],
        f"{prefix}object_dice": metrics.object_dice(true, pred),
        f"{prefix}object_hausdorff": metrics.object_hausdorff(true, pred),
    }


def _evaluate_glas(folder, predict, info, names, mpp, progress):
    image_mpp = mpp or datasets.GLAS_MPP
    grades = datasets.glas_grades(folder)
    rows = []
    for name, image_path, mask_path in datasets.glas_pairs(folder):
        if names is not None and name not in names:
            continue
        progress(name)
        image = np.asarray(Image.open(image_path).convert("RGB"))
        true = np.asarray(Image.open(mask_path)).astype(np.int32)
        if true.ndim == 3:
            true = true[..., 0]
        pred = predict(image, image_mpp, ("Gland", "Lumen"))[0]["Gland"]
        pieces = truth_pieces(true)
        rows.append(
            {
                "name": name,
                "grade": grades.get(name, "unknown"),
                "glands": int(len(np.unique(true)) - 1),
                "pieces": int(pieces.max()),
                "predicted": int(pred.max()),
                **_gland_figures(true, pred),
                **_gland_figures(pieces, pred, "pieces_"),
            }
        )
    return rows, {}


def nucleus_images(folder: Path, layout: str, names: set[str] | None, mpp: float | None):
    """(name, image, true instances, true type map or None, the image's µm/px) of each image of a
    MoNuSeg or CoNSeP folder; with `names`, only those (CoNSeP: the patches of those images)."""
    if layout == "monuseg":
        for name, image_path, xml_path in datasets.monuseg_pairs(folder):
            if names is not None and name not in names:
                continue
            outlines, own_mpp = datasets.read_monuseg_outlines(xml_path)
            image = np.asarray(Image.open(image_path).convert("RGB"))
            true = datasets.rasterise(outlines, image.shape[:2], 1.0)
            yield name, image, true, None, mpp or own_mpp or datasets.MONUSEG_MPP
        return
    for name, image_path, inst_path, types_path in datasets.consep_patches(folder):
        if names is not None and datasets.consep_image_of(name) not in names:
            continue
        image, true, true_types = datasets.read_consep_patch(image_path, inst_path, types_path)
        yield name, image, true, true_types, mpp or datasets.CONSEP_MPP


def _evaluate_monuseg(folder, predict, info, names, mpp, progress):
    rows = []
    for name, image, true, _, tile_mpp in nucleus_images(folder, "monuseg", names, mpp):
        progress(name)
        pred = predict(image, tile_mpp, ("Nuclei",))[0]["Nuclei"]
        rows.append({"name": name, **nucleus_figures(true, pred)})
    return rows, {}


def nucleus_figures(true: np.ndarray, pred: np.ndarray) -> dict:
    pq = metrics.panoptic_quality(true, pred)
    return {
        "nuclei": int(len(np.unique(true)) - 1),
        "predicted": int(len(np.unique(pred)) - 1),
        "dice": metrics.pixel_dice(true, pred),
        "aji": metrics.aggregated_jaccard(true, pred),
        "pq": pq["pq"],
        "dq": pq["dq"],
        "sq": pq["sq"],
        "f1": pq["f1"],
    }


def _evaluate_consep(folder, predict, info, names, mpp, progress):
    patch_mpp = mpp or datasets.CONSEP_MPP
    radius = PAIR_RADIUS_UM / patch_mpp
    typed = len(info.untrained.get("Nuclei#TYPE", [])) < len(info.classes["Nuclei#TYPE"]) - 1
    tasks = ("Nuclei", "Nuclei#TYPE") if typed else ("Nuclei",)
    detections = metrics.TypedDetections()
    rows = []
    for name, image, true, true_type_map, _ in nucleus_images(folder, "consep", names, mpp):
        progress(name)
        found, types = predict(image, patch_mpp, tasks)
        pred = found["Nuclei"]
        rows.append({"name": name, **nucleus_figures(true, pred)})
        true_ids, true_xy = metrics.centroids(true)
        pred_ids, pred_xy = metrics.centroids(pred)
        pairs = metrics.pair_centroids(true_xy, pred_xy, radius)
        true_types = [LABELLED_NUCLEUS_TYPES[true_type_map[true == i][0]] for i in true_ids]
        pred_names = types.get("Nuclei", {})
        pred_types = [AS_CONSEP_TYPE.get(pred_names.get(i), pred_names.get(i)) for i in pred_ids]
        detections.add(true_types, pred_types, pairs)
    extra = {"detection_f1": detections.detection_f1()}
    if typed:
        kinds = LABELLED_NUCLEUS_TYPES[1:]
        extra["type_f1"] = {kind: detections.type_f1(kind) for kind in kinds}
        extra["type_counts"] = {kind: detections.counts(kind) for kind in kinds}
    return rows, extra


def _summary(layout: str, rows: list[dict]) -> dict:
    def mean(key: str) -> float:
        return float(np.mean([row[key] for row in rows]))

    if layout == "glas":
        groups = {"all": rows}
        for grade in ("benign", "malignant"):
            chosen = [row for row in rows if row["grade"] == grade]
            if chosen:
                groups[grade] = chosen
        return {
            "images": len(rows),
            **_gland_summary(rows),
            "by_grade": {name: _gland_summary(chosen) for name, chosen in groups.items()},
        }
    return {
        "images": len(rows),
        **{key: mean(key) for key in ("dice", "aji", "pq", "dq", "sq", "f1")},
    }


def _gland_summary(rows: list[dict]) -> dict:
    out = {"images": len(rows)}
    for prefix in ("", "pieces_"):
        tp, fp, fn = (sum(row[prefix + k] for row in rows) for k in ("tp", "fp", "fn"))
        out[f"{prefix}object_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        for key in ("object_dice", "object_hausdorff"):
            out[prefix + key] = float(np.mean([row[prefix + key] for row in rows]))
    return out


#: The bar the shipped weights must clear on images they never trained on.
BAR = {
    "glas": {"object_f1": 0.80, "object_dice": 0.80},
    "monuseg": {"dice": 0.75, "aji": 0.50},
    "consep": {},
}
