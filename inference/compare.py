"""Weights files side by side: each scored on the same held-out images of GlaS, MoNuSeg and
CoNSeP in one run, the figures the model card reports in one table (and all of them as JSON).

    python -m inference.compare ../shared/data runs/gpu/weights.pt \
        inference/weights/cerberus-cpu-multiscale.pt

The images are those the first file held out of its training (its split decides for all). The
data folder holds `glas/`, `monuseg/` and `consep/`; any of them may be missing. Needs no
database: it runs where the model trains (`scripts/gpu_train.sh`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from inference import weights as weights_file
from inference.datasets import DatasetError
from inference.evaluate import evaluate

LAYOUTS = ("glas", "monuseg", "consep")

#: (dataset, label, path into the summary) of each reported figure.
FIGURES = [
    ("glas", "object F1, all images", ("by_grade", "all", "object_f1")),
    ("glas", "object F1, benign", ("by_grade", "benign", "object_f1")),
    ("glas", "object F1, malignant", ("by_grade", "malignant", "object_f1")),
    ("glas", "object F1, truth's pieces", ("pieces_object_f1",)),
    ("glas", "object Dice", ("object_dice",)),
    ("glas", "object Hausdorff (px)", ("object_hausdorff",)),
    ("monuseg", "Dice", ("dice",)),
    ("monuseg", "AJI", ("aji",)),
    ("monuseg", "PQ", ("pq",)),
    ("consep", "Dice", ("dice",)),
    ("consep", "AJI", ("aji",)),
    ("consep", "PQ", ("pq",)),
    ("consep", "detection F1", ("detection_f1",)),
    ("consep", "F_c inflammatory", ("type_f1", "inflammatory")),
    ("consep", "F_c epithelial", ("type_f1", "epithelial")),
    ("consep", "F_c connective", ("type_f1", "connective")),
]


def _figure(summary: dict, path: tuple[str, ...]) -> float | None:
    value = summary
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def compare(
    data: str | Path,
    paths: list[str | Path],
    device: str = "cpu",
    log=print,
    scan_mpp: float | None = None,
    flips: bool = False,
) -> dict:
    """{weights path: {layout: summary}} for the held-out images of the first file's split (with
    `scan_mpp`, as scans at that resolution would give them; with `flips`, the maps averaged over
    each tile's four flips: `inference.evaluate`)."""
    data = Path(data)
    split = weights_file.read(paths[0])[0]
    layouts = [layout for layout in LAYOUTS if (data / layout).is_dir()]
    if not layouts:
        raise DatasetError(f"{data}: none of {', '.join(LAYOUTS)}")
    results = {}
    for path in paths:
        net, info = weights_file.load(path)
        net = net.to(device)
        results[str(path)] = {}
        for layout in layouts:
            started = time.time()
            report = evaluate(
                data / layout,
                net,
                info,
                held_out_only=True,
                split=split,
                scan_mpp=scan_mpp,
                device=device,
                flips=flips,
            )
            results[str(path)][layout] = report["summary"]
            log(
                f"{path}: {layout}, {report['summary']['images']} images, "
                f"{time.time() - started:.0f} s"
            )
    return results


def table(results: dict) -> str:
    """The figures as a Markdown table, one column per weights file."""
    paths = list(results)
    lines = [
        "| held-out | figure | " + " | ".join(Path(p).name for p in paths) + " |",
        "|---|---|" + "---|" * len(paths),
    ]
    for layout, label, path in FIGURES:
        values = [_figure(results[p].get(layout, {}), path) for p in paths]
        if all(v is None for v in values):
            continue
        images = next(results[p][layout]["images"] for p in paths if layout in results[p])
        cells = ["–" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"| {layout} ({images}) | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder with glas/, monuseg/ and consep/")
    parser.add_argument("weights", nargs="+", help="weights files; the first one's split counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scan-mpp", type=float, help="score finer images as scans at this µm/px")
    parser.add_argument("--flips", action="store_true", help="average each tile's four flips")
    parser.add_argument("--json", help="also write every summary figure as JSON")
    args = parser.parse_args(argv)
    try:
        results = compare(
            args.data,
            args.weights,
            args.device,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            scan_mpp=args.scan_mpp,
            flips=args.flips,
        )
    except (weights_file.WeightsError, DatasetError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
