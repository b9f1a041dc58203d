"""Choose the nuclear post-processing on training images, never on held-out ones.

The network's maps are computed once per image of the weights' training split (MoNuSeg tiles,
CoNSeP patches), then every pair of thresholds of the grid turns them into nuclei: markers where
the inner probability exceeds the inner threshold (or, for weights with distance maps, where both
maps rise faster than the slope threshold), grown over pixels whose inner + contour probability
exceeds the foreground threshold; nuclei smaller than the minimum area are dropped. Prints mean
AJI, PQ and Dice per dataset and setting, and marks the best mean AJI and the best mean PQ over the
datasets.

    python -m inference.sweep ../shared/data/monuseg ../shared/data/consep [--weights FILE]
        [--flips] [--inner 0.5,0.6,0.7] [--foreground 0.4,0.5] [--min-area 3,8,15]
        [--slope 0.02,0.05] [--sobel 5,7,11]
"""

from __future__ import annotations

import argparse
import itertools
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

#: What the sweep varies: name -> (the setting in `predict.POSTPROCESS`, default values). The
#: inner threshold makes the markers of the inner/contour path; slope and Sobel size those of the
#: distance-map path (weights with `Nuclei-HV`), which does not read the inner threshold. The
#: minimum area (µm²) drops specks on both.
PARAMETERS = {
    "inner": (("inner_threshold", "Nuclei"), (0.5, 0.6, 0.7, 0.8, 0.9)),
    "foreground": (("foreground_threshold",), (0.4, 0.5, 0.6, 0.7)),
    "min_area": (("min_area_um2", "Nuclei"), (3.0, 8.0, 15.0)),
    "slope": (("hv_slope_threshold",), (0.02, 0.05, 0.08, 0.12)),
    "sobel": (("hv_sobel_px",), (5, 7, 11)),
}
FIGURES = ("aji", "pq", "dice")


def default_grid(info) -> dict[str, tuple]:
    """The parameters that matter for the weights' post-processing, with default values."""
    if info.preset.nucleus_hv:
        names = ("foreground", "min_area", "slope", "sobel")
    else:
        names = ("inner", "foreground", "min_area")
    return {name: PARAMETERS[name][1] for name in names}


def nucleus_settings(info, grid: dict[str, tuple]) -> list[dict]:
    """The weights' post-processing with every combination of the `grid`'s values (a name of
    `PARAMETERS` -> values), in row-major order."""
    base = {**POSTPROCESS, **info.postprocess}
    out = []
    for values in itertools.product(*grid.values()):
        setting = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        for name, value in zip(grid, values, strict=True):
            container, key = _slot(setting, name)
            container[key] = value
        out.append(setting)
    return out


def setting_values(setting: dict, names) -> tuple:
    """The values of `names` (of `PARAMETERS`) in a setting."""
    return tuple(container[key] for container, key in (_slot(setting, n) for n in names))


def _slot(setting: dict, name: str) -> tuple[dict, str]:
    """The dict of a setting that holds parameter `name`, and its key there."""
    *path, key = PARAMETERS[name][0]
    return (setting[path[0]] if path else setting), key


def sweep(
    folder: Path, net, info, settings: list[dict], device="cpu", progress=print, flips=False
) -> dict:
    """{"layout", "images", "figures": [mean figures per setting]} over the training images (with
    `flips`, the maps averaged over each tile's four flips)."""
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
        maps = predicted_maps(net, info, image, mpp / info.mpp, ("Nuclei",), device, flips)
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


def _numbers(text: str) -> tuple[float, ...]:
    return tuple(float(x) if "." in x else int(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--weights", type=Path, default=weights_file.DEFAULT_WEIGHTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flips", action="store_true", help="average each tile's four flips")
    for name, (_, values) in PARAMETERS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=_numbers,
            help=f"values, e.g. {','.join(map(str, values[:3]))}",
        )
    args = parser.parse_args(argv)
    try:
        net, info = weights_file.load(args.weights)
        net.to(args.device)
        grid = default_grid(info)
        grid.update({n: getattr(args, n) for n in PARAMETERS if getattr(args, n) is not None})
        settings = nucleus_settings(info, grid)
        started = time.monotonic()
        results = [
            sweep(folder, net, info, settings, args.device, lambda name: None, args.flips)
            for folder in args.folders
        ]
    except (weights_file.WeightsError, DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    now = setting_values({**POSTPROCESS, **info.postprocess}, grid)
    header = "  ".join(f"{n:>10}" for n in grid) + "  "
    header += "  ".join(f"{r['layout']} ({r['images']}) AJI / PQ / Dice" for r in results)
    print(f"{args.weights.name}, training images, {time.monotonic() - started:.0f} s")
    print(header + "  mean AJI / PQ")
    mean = {
        key: [np.mean([r["figures"][i][key] for r in results]) for i in range(len(settings))]
        for key in ("aji", "pq")
    }
    best = {key: int(np.argmax(values)) for key, values in mean.items()}
    for i, setting in enumerate(settings):
        values = setting_values(setting, grid)
        cells = "  ".join(
            " / ".join(f"{r['figures'][i][key]:.3f}" for key in FIGURES) for r in results
        )
        mark = "".join(f" best {key.upper()}" for key in best if best[key] == i)
        mark += " (current)" if values == now else ""
        columns = "  ".join(f"{v:>10g}" for v in values)
        print(f"{columns}  {cells}  {mean['aji'][i]:.3f} / {mean['pq'][i]:.3f}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
