"""The speed work changes no objects beyond a stated tolerance: one slide segmented with each
network runtime (`inference.runtime`), in this process, without the database.

Prints per runtime the inference seconds and per object kind the count, then per kind how many
objects the two runs pair at IoU > 0.5, the share of each run paired and the median IoU.

    python benchmarks/runtime_agreement.py [--slide FILE] [--backend torch openvino]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def by_task(objects) -> dict[str, tuple[list, list]]:
    """(geometries, classes) per task from `segment_slide`'s stream of region results."""
    out: dict[str, tuple[list, list]] = {}
    for o in objects:
        geoms, classes = out.setdefault(o.task, ([], []))
        geoms.extend(o.geoms)
        classes.extend(o.classes)
    return out


def main() -> int:
    from inference import weights
    from inference.engine import CerberusModel, segment_slide
    from inference.metrics import polygon_agreement
    from inference.slide import open_slide, tissue_mask

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=ROOT / "out/wsi-bench/tissue-4mm2.tiff")
    parser.add_argument("--backend", nargs=2, default=["torch", "openvino"])
    args = parser.parse_args()
    reader = open_slide(args.slide)
    mask = tissue_mask(reader)
    found = {}
    for backend in args.backend:
        net, info = weights.load()
        model = CerberusModel(net, info, backend=backend)
        timings: dict = {}
        started = time.perf_counter()
        found[backend] = by_task(segment_slide(reader, model, mask, timings=timings))
        counts = {task: len(geoms) for task, (geoms, _) in found[backend].items()}
        print(
            f"{backend}: inference {timings['infer']:.1f} s, segmentation "
            f"{time.perf_counter() - started:.1f} s, {counts}",
            flush=True,
        )
    first, second = (found[b] for b in args.backend)
    print(f"\n{args.slide.name}, {mask.area_mm2:.2f} mm² of tissue: {' vs '.join(args.backend)}")
    for task in ("Nuclei", "Gland", "Lumen", "Tissue"):
        (geoms_a, classes_a), (geoms_b, classes_b) = first[task], second[task]
        if task == "Tissue":
            print(f"  tissue classes: {classes_a} vs {classes_b} ({classes_a == classes_b})")
            continue
        agree = polygon_agreement(geoms_a, geoms_b)
        print(
            f"  {task:6s} {len(geoms_a):6d} vs {len(geoms_b):6d}: {agree['pairs']} pairs, "
            f"{agree['share_a']:.2%} / {agree['share_b']:.2%} paired, median IoU "
            f"{agree['median_iou']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
