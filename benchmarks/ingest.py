"""Ingest speed: the bundled sample slide end to end, with time per phase.

Each repeat re-ingests `data/sample/CMU-1-Small-Region.svs` (--force) into the database, once
with post-processing in worker processes (the default) and once serially in the main process (the
baseline, measured in the same run), alternating. Reported per mode, as medians: time per phase
(open, tissue mask, read, infer, post-process in CPU seconds, waiting on post-processing, load),
wall time and tissue mm² per minute. The target on the 2-core CPU machine is the sample fully
ingested in under 60 s. A slide the benchmark adds to the database is deleted when it ends; one
stored before it is left there, as the last mode ingested it. With `--baseline-weights FILE` (e.g.
the previous default weights, from the repository's history) a third mode ingests with those
weights in worker processes, so that the shipped weights' cost is measured beside the old one's in
the same run.

It also reports the compute the product's tiling (512 in / 384 kept) saves against the published
one (448 in / 144 kept) at equal outputs: patches needed over the slide's tissue × FLOPs per
patch, for the same tissue mask.

    python benchmarks/ingest.py [--repeat 3] [--device cpu|cuda] [--slide FILE]
                                [--baseline-weights FILE]

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "data" / "sample" / "CMU-1-Small-Region.svs"
PHASES = ("open", "tissue_mask", "read", "infer", "postprocess", "wait", "load", "total")


def tiling_compute(slide: Path) -> dict:
    """Patches and GFLOPs over the slide's tissue at equal outputs, for: the published network
    and tiling; the CPU network with the published tiling (what the tiling alone saves); and the
    product (CPU network, 512 in / 384 kept)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from inference.network import build
    from inference.slide import open_slide, tissue_mask
    from inference.tiling import Grid

    reader = open_slide(slide)
    mask = tissue_mask(reader).mask
    w, h = reader.slide_dimensions(resolution=0.5, units="mpp")
    out = {}
    for label, name, size, kept in (
        ("published network, 448/144", "cerberus", 448, 144),
        ("cpu network, 448/144", "cpu", 448, 144),
        ("cpu network, 512/384", "cpu", 512, 384),
    ):
        net = build(name).eval()
        grid = Grid.over((int(h), int(w)), (1.0, 1.0), kept, (size - kept) // 2, mask)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 3, size, size))
        patches = int(grid.tissue.sum())
        flops = counter.get_total_flops() / 1e9
        out[label] = {"patches": patches, "gflop_per_patch": flops, "gflop": patches * flops}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slide", type=Path, default=SAMPLE)
    parser.add_argument("--baseline-weights", help="also ingest with these weights (workers)")
    args = parser.parse_args()

    from spatialdb.pipeline.ingest import ingest_slide, load_model
    from spatialdb.store.catalog import delete_slide, slide_summaries
    from spatialdb.store.db import connect

    engine = connect()
    model = load_model(None, args.device)
    modes = {"parallel": (model, None), "serial": (model, 0)}
    if args.baseline_weights:
        modes["baseline"] = (load_model(args.baseline_weights, args.device), None)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    tissue = 0.0
    stored_before = {s["id"] for s in slide_summaries(engine)}
    added: set[int] = set()
    try:
        for k in range(args.repeat):
            for mode, (chosen, workers) in modes.items():
                started = time.perf_counter()
                outcome = ingest_slide(
                    engine, args.slide, chosen, force=True, device=args.device, workers=workers
                )
                added |= {outcome.slide_id} - stored_before
                timings = dict(outcome.timings, wall=time.perf_counter() - started)
                runs[mode].append(timings)
                tissue = outcome.tissue_mm2
                objects = {t: sum(c.values()) for t, c in outcome.counts.items()}
                print(f"run {k + 1} {mode:8s} {timings['wall']:6.1f} s  {objects}", flush=True)
    finally:
        for slide_id in added:
            delete_slide(engine, slide_id)

    print(f"\n{args.slide.name}: {tissue:.3f} mm² of tissue, device {args.device}, "
          f"medians of {args.repeat}")  # fmt: skip
    header = f"{'mode':10s}" + "".join(f"{p:>12s}" for p in (*PHASES, "mm²/min"))
    print(header)
    medians = {}
    for mode, timings in runs.items():
        medians[mode] = {p: statistics.median(t.get(p, 0.0) for t in timings) for p in PHASES}
        rate = tissue / (medians[mode]["total"] / 60)
        row = "".join(f"{medians[mode][p]:12.2f}" for p in PHASES)
        print(f"{mode:10s}{row}{rate:12.3f}")
    total = medians["parallel"]["total"]
    print(
        f"parallel vs serial post-processing: {medians['serial']['total'] / total:.2f}x; "
        f"sample ingested in {total:.1f} s (target < 60 s: {'met' if total < 60 else 'NOT met'})"
    )
    if "baseline" in medians:
        print(
            f"shipped vs baseline weights ({Path(args.baseline_weights).name}): "
            f"{total / medians['baseline']['total']:.2f}x the time, inference "
            f"{medians['parallel']['infer'] / medians['baseline']['infer']:.2f}x, post-processing "
            f"{medians['parallel']['postprocess'] / medians['baseline']['postprocess']:.2f}x"
        )

    compute = tiling_compute(args.slide)
    print("\ntiling over the same tissue, equal outputs:")
    for name, c in compute.items():
        print(
            f"  {name:28s} {c['patches']:5d} patches x {c['gflop_per_patch']:7.1f} GFLOP "
            f"= {c['gflop']:9.0f} GFLOP"
        )
    published, same_net, product = compute.values()
    print(
        f"  the tiling alone saves {same_net['gflop'] / product['gflop']:.1f}x compute "
        f"({same_net['patches'] / product['patches']:.1f}x fewer patches); with the CPU network, "
        f"{published['gflop'] / product['gflop']:.0f}x less than the published configuration"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
