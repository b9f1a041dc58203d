"""Choose the nuclear post-processing on training images, never on held-out ones.

The network's maps are computed once per image of the weights' training split (MoNuSeg tiles,
CoNSeP patches), then every pair of thresholds of the grid turns them into nuclei: markers where
the inner probability exceeds the inner threshold, grown over pixels whose inner + contour
probability exceeds the foreground threshold. Prints mean AJI, PQ and Dice per dataset and
setting, and marks the best mean AJI over the datasets.

    python -m inference.sweep ../shared/data/monuseg ../shared/data/consep [--weights FILE]
                              [--inner 0.5,0.6,0.7] [--foreground 0.4,0.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from inference import weights as weights_file
from inference.datasets import DatasetError
from inference.evaluate import (
    detect_layout,
    found_instances,
    nucleus_figures,
    nucleus_images,
    predicted_maps,
)
from inference.predict import POSTPROCESS

INNER = (0.5, 0.6, 0.7, 0.8, 0.9)
FOREGROUND = (0.4, 0.5, 0.6, 0.7)
FIGURES = ("aji", "pq", "dice")


def nucleus_settings(info, inner=INNER, foreground=FOREGROUND) -> list[dict]:
    """The weights' post-processing with each (inner, foreground) threshold pair for nuclei."""
    base = {**POSTPROCESS, **info.postprocess}
    return [
        {
            **base,
            "inner_threshold": {**base["inner_threshold"], "Nuclei": i},
            "foreground_threshold": f,
        }
        for i in inner
        for f in foreground
    ]


def sweep(folder: Path, net, info, settings: list[dict], device="cpu", progress=print) -> dict:
    """{"layout", "images", "figures": [mean figures per setting]} over the training images."""
    layout = detect_layout(folder)
    if layout not in ("monuseg", "consep"):
        raise DatasetError(f"{folder}: the sweep scores nuclei (MoNuSeg or CoNSeP folders)")
    train = info.training.get("data", {}).get(layout, {}).get("train")
    if not train:
        raise DatasetError(f"{folder}: the weights record no {layout} training images")
    totals = np.zeros((len(settings), len(FIGURES)))
    count = 0
    for name, image, true, _, mpp in nucleus_images(folder, layout, set(train), None):
        progress(name)
        maps = predicted_maps(net, info, image, mpp / info.mpp, ("Nuclei",), device)
        for row, setting in enumerate(settings):
            pred = found_instances(maps, info, true.shape, setting)[0]["Nuclei"]
            figures = nucleus_figures(true, pred)
            totals[row] += [figures[key] for key in FIGURES]
        count += 1
    means = totals / max(count, 1)
    return {
        "layout": layout,
        "images": count,
        "figures": [dict(zip(FIGURES, row, strict=True)) for row in means],
    }


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--weights", type=Path, default=weights_file.DEFAULT_WEIGHTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inner", type=_floats, default=INNER, help="e.g. 0.5,0.6,0.7")
    parser.add_argument("--foreground", type=_floats, default=FOREGROUND)
    args = parser.parse_args(argv)
    try:
        net, info = weights_file.load(args.weights)
        net.to(args.device)
        settings = nucleus_settings(info, args.inner, args.foreground)
        started = time.monotonic()
        results = [
            sweep(folder, net, info, settings, args.device, progress=lambda name: None)
            for folder in args.folders
        ]
    except (weights_file.WeightsError, DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    current = {**POSTPROCESS, **info.postprocess}
    now = (current["inner_threshold"]["Nuclei"], current["foreground_threshold"])
    header = "inner  foreground  " + "  ".join(
        f"{r['layout']} ({r['images']}) AJI / PQ / Dice" for r in results
    )
    print(f"{args.weights.name}, training images, {time.monotonic() - started:.0f} s")
    print(header + "  mean AJI")
    mean_aji = [np.mean([r["figures"][i]["aji"] for r in results]) for i in range(len(settings))]
    best = int(np.argmax(mean_aji))
    for i, setting in enumerate(settings):
        pair = (setting["inner_threshold"]["Nuclei"], setting["foreground_threshold"])
        cells = "  ".join(
            " / ".join(f"{r['figures'][i][key]:.3f}" for key in FIGURES) for r in results
        )
        mark = " best" if i == best else ""
        mark += " (current)" if pair == now else ""
        print(f"{pair[0]:5.2f}  {pair[1]:10.2f}  {cells}  {mean_aji[i]:.3f}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
