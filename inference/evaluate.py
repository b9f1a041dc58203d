"""Evaluation of a weights file on a folder in the GlaS or MoNuSeg layout.

GlaS folders give gland object F1 (50 % overlap rule; true positives, false positives and false
negatives pooled over the images, as in the challenge), object Dice and object Hausdorff
(averaged over images). MoNuSeg folders give nuclei pixel Dice, AJI, PQ (DQ x SQ) and F1 at IoU
0.5 (averaged over images). Predictions are made at the network's resolution and compared with
the ground truth at the image's own, after nearest-neighbour resampling.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from inference import datasets, metrics
from inference.network import CerberusNet
from inference.predict import instances, predict_image
from inference.weights import WeightsInfo


def detect_layout(folder: Path) -> str:
    try:
        datasets.glas_pairs(folder)
        return "glas"
    except datasets.DatasetError:
        pass
    try:
        datasets.monuseg_pairs(folder)
        return "monuseg"
    except datasets.DatasetError:
        raise datasets.DatasetError(
            f"{folder}: neither a GlaS folder (images/ + masks/, or X + X_anno) nor a MoNuSeg "
            "folder (tiles with same-named .xml outlines)"
        ) from None


def evaluate(
    folder: str | Path,
    net: CerberusNet,
    info: WeightsInfo,
    *,
    held_out_only: bool = False,
    mpp: float | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] = lambda name: None,
) -> dict:
    """{"layout", "images": [per-image figures], "summary": {...}} for `folder`."""
    folder = Path(folder)
    layout = detect_layout(folder)
    names = None
    if held_out_only:
        names = set(info.training.get("data", {}).get(layout, {}).get("held_out", []))
    run = _evaluate_glas if layout == "glas" else _evaluate_monuseg
    rows = run(folder, net, info, names, mpp, device, progress)
    if not rows:
        raise datasets.DatasetError(f"{folder}: no images to evaluate")
    return {"layout": layout, "images": rows, "summary": _summary(layout, rows)}


def _predict(net, info, image: np.ndarray, scale: float, tasks, device) -> dict[str, np.ndarray]:
    """Instance maps at the image's own size."""
    resampled = datasets.resample_image(image, scale)
    maps = predict_image(net, resampled, tasks, device)
    found = instances(maps, info.postprocess, info.mpp)
    return {
        task: datasets.resample_labels(labels, image.shape[:2]) for task, labels in found.items()
    }


def _evaluate_glas(folder, net, info, names, mpp, device, progress) -> list[dict]:
    scale = (mpp or datasets.GLAS_MPP) / info.mpp
    rows = []
    for name, image_path, mask_path in datasets.glas_pairs(folder):
        if names is not None and name not in names:
            continue
        progress(name)
        image = np.asarray(Image.open(image_path).convert("RGB"))
        true = np.asarray(Image.open(mask_path)).astype(np.int32)
        if true.ndim == 3:
            true = true[..., 0]
        pred = _predict(net, info, image, scale, ("Gland", "Lumen"), device)["Gland"]
        f1 = metrics.object_f1(true, pred)
        rows.append(
            {
                "name": name,
                "glands": int(len(np.unique(true)) - 1),
                "predicted": int(pred.max()),
                "tp": f1["tp"],
                "fp": f1["fp"],
                "fn": f1["fn"],
                "object_f1": f1["f1"],
                "object_dice": metrics.object_dice(true, pred),
                "object_hausdorff": metrics.object_hausdorff(true, pred),
            }
        )
    return rows


def _evaluate_monuseg(folder, net, info, names, mpp, device, progress) -> list[dict]:
    rows = []
    for name, image_path, xml_path in datasets.monuseg_pairs(folder):
        if names is not None and name not in names:
            continue
        progress(name)
        outlines, own_mpp = datasets.read_monuseg_outlines(xml_path)
        tile_mpp = mpp or own_mpp or datasets.MONUSEG_MPP
        image = np.asarray(Image.open(image_path).convert("RGB"))
        true = datasets.rasterise(outlines, image.shape[:2], 1.0)
        pred = _predict(net, info, image, tile_mpp / info.mpp, ("Nuclei",), device)["Nuclei"]
        pq = metrics.panoptic_quality(true, pred)
        rows.append(
            {
                "name": name,
                "nuclei": int(len(np.unique(true)) - 1),
                "predicted": int(pred.max()),
                "dice": metrics.pixel_dice(true, pred),
                "aji": metrics.aggregated_jaccard(true, pred),
                "pq": pq["pq"],
                "dq": pq["dq"],
                "sq": pq["sq"],
                "f1": pq["f1"],
            }
        )
    return rows


def _summary(layout: str, rows: list[dict]) -> dict:
    def mean(key: str) -> float:
        return float(np.mean([row[key] for row in rows]))

    if layout == "glas":
        tp, fp, fn = (sum(row[k] for row in rows) for k in ("tp", "fp", "fn"))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        return {
            "images": len(rows),
            "object_f1": f1,
            "object_dice": mean("object_dice"),
            "object_hausdorff": mean("object_hausdorff"),
        }
    return {
        "images": len(rows),
        **{key: mean(key) for key in ("dice", "aji", "pq", "dq", "sq", "f1")},
    }


#: The bar the shipped weights must clear on images they never trained on.
BAR = {"glas": {"object_f1": 0.80, "object_dice": 0.80}, "monuseg": {"dice": 0.75, "aji": 0.50}}
