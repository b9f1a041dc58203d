"""Gigapixel ingest: time and memory against tissue area, on slides of real tissue.

Builds (once, cached in `out/wsi-bench/`) the benchmark slides of `benchmarks/wsi_slides.py` at
the requested sizes (mm² of tissue) and ingests each (--force) in a child process, reporting wall
time, time per phase (post-processing in CPU seconds of the worker processes), tissue mm² per
minute (tissue as the ingest's own mask measures it), how many cores were busy on average (CPU
seconds of the process tree over wall seconds; the database server's work not counted) and the
peak memory of the whole process tree (the ingest and its post-processing workers, as
proportional set size: pages the forked workers share with the ingest counted once; sampled
every second, as reading it costs about 8 ms per process). Then a least-squares line of time
against tissue area, and peak memory at the largest size over the smallest: time must grow
linearly with area (seconds per mm² the same at every size) and memory stay flat.

    python benchmarks/wsi.py [--sizes 4 16 64] [--device cpu|cuda] [--data ../shared/data]
                             [--backend openvino|torch ...] [--repeat 1] [--batch-size N]
                             [--cohort]

With several `--backend`s every slide is ingested with each, alternating, so that the speed work
is measured before and after in one run. With `--cohort` the slides are then ingested together,
one at a time and two at a time (`spatialdb ingest --jobs`), and the cohort's rate reported.
Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import wsi_slides  # noqa: E402

CACHE = ROOT / "out" / "wsi-bench"
PHASES = ("open", "tissue_mask", "read", "infer", "postprocess", "wait", "load", "features")


def ingest_child(slide: Path, report: Path, device: str, backend: str, batch: int | None) -> None:
    """In the child process: ingest `slide` once (--force) and write its outcome as JSON."""
    import logging

    logging.disable(logging.INFO)
    from spatialdb.pipeline.ingest import ingest_slide, load_model
    from spatialdb.store.db import connect

    started = time.perf_counter()
    model = load_model(None, device, backend=backend)
    loaded = time.perf_counter() - started
    outcome = ingest_slide(connect(), slide, model, force=True, device=device, batch_size=batch)
    if outcome.status != "ingested":
        raise SystemExit(f"{slide}: {outcome.status}: {outcome.message}")
    cpu = sum(
        getattr(resource.getrusage(who), field)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for field in ("ru_utime", "ru_stime")
    )
    report.write_text(
        json.dumps(
            {
                "timings": {**outcome.timings, "model": loaded, "cpu": cpu},
                "tissue_mm2": outcome.tissue_mm2,
                "objects": {t: sum(c.values()) for t, c in outcome.counts.items()},
            }
        )
    )


def cohort_child(report: Path, jobs: int, device: str, slides: list[Path]) -> None:
    """In the child process: ingest `slides` together (`ingest_many`, `jobs` in flight)."""
    import logging

    from spatialdb.pipeline.ingest import ingest_many, load_model
    from spatialdb.store.db import connect

    logging.disable(logging.INFO)
    model = load_model(None, device)
    started = time.perf_counter()
    outcomes = [o for _, o in ingest_many(connect(), slides, model, jobs=jobs, force=True)]
    seconds = time.perf_counter() - started
    if any(o.status != "ingested" for o in outcomes):
        raise SystemExit("; ".join(o.message for o in outcomes if o.status != "ingested"))
    tissue = sum(o.tissue_mm2 for o in outcomes)
    report.write_text(json.dumps({"seconds": seconds, "tissue_mm2": tissue}))


def cohort(slides: list[Path], device: str) -> None:
    """The slides ingested one at a time and two at a time, each in a child process."""
    print(f"\ncohort of {len(slides)} slides ({', '.join(p.name for p in slides)}):")
    for jobs in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "cohort.json"
            command = [sys.executable, __file__, "--cohort-child", str(report), str(jobs)]
            subprocess.run([*command, *map(str, slides), "--device", device], check=True)
            result = json.loads(report.read_text())
        rate = result["tissue_mm2"] / (result["seconds"] / 60)
        print(
            f"  --jobs {jobs}: {result['tissue_mm2']:.1f} mm² in {result['seconds']:.1f} s, "
            f"{rate:.2f} mm² per minute",
            flush=True,
        )


def measured_ingest(slide: Path, device: str, backend: str, batch: int | None) -> dict:
    """Ingest `slide` in a child process; its outcome, wall time and peak process-tree RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "outcome.json"
        command = [sys.executable, __file__, "--child", str(slide), str(report)]
        command += ["--device", device, "--backend", backend]
        command += ["--batch-size", str(batch)] if batch else []
        started = time.perf_counter()
        child = subprocess.Popen(command)
        proc = psutil.Process(child.pid)
        peak = 0
        while child.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in tree))
            except psutil.Error:
                pass
            time.sleep(1.0)
        wall = time.perf_counter() - started
        if child.returncode:
            raise SystemExit(f"ingest of {slide} failed (exit {child.returncode})")
        result = json.loads(report.read_text())
    return {**result, "wall": wall, "peak_mb": peak / 2**20}


def fit(areas: list[float], seconds: list[float]) -> tuple[float, float, float]:
    """Slope (s per mm²), intercept (s) and R² of seconds against area."""
    slope, intercept = np.polyfit(areas, seconds, 1)
    predicted = slope * np.asarray(areas) + intercept
    total = np.sum((np.asarray(seconds) - np.mean(seconds)) ** 2)
    r2 = 1 - np.sum((np.asarray(seconds) - predicted) ** 2) / total if total else 1.0
    return float(slope), float(intercept), float(r2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[4, 16, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", nargs="+", default=["openvino"])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="tiles per forward pass (GPU)")
    parser.add_argument(
        "--cohort", action="store_true", help="also ingest the slides together, --jobs 1 and 2"
    )
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cohort-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ingest_child(*args.child, args.device, args.backend[0], args.batch_size)
        return 0
    if args.cohort_child:
        report, jobs, *slides = args.cohort_child
        cohort_child(Path(report), int(jobs), args.device, [Path(p) for p in slides])
        return 0

    data = args.data if (args.data / "glas" / "images").is_dir() else None
    slides = {}
    for size in args.sizes:
        path = CACHE / f"tissue-{size:g}mm2.tiff"
        started = time.perf_counter()
        meta = wsi_slides.build(path, size, data)
        h, w = meta["shape"]
        print(
            f"slide {path.name}: {w:,} x {h:,} px at {meta['mpp']} µm/px, {meta['blocks']} blocks "
            f"of {meta['sources']} sources, {path.stat().st_size / 2**20:.0f} MiB "
            f"(ready in {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        slides[size] = path

    runs: dict[tuple[float, str], list[dict]] = {}
    for k in range(args.repeat):
        for size, path in slides.items():
            for backend in args.backend:
                run = measured_ingest(path, args.device, backend, args.batch_size)
                runs.setdefault((size, backend), []).append(run)
                print(
                    f"run {k + 1} {path.name} {backend}: {run['wall']:.1f} s, "
                    f"{run['tissue_mm2']:.1f} mm², peak {run['peak_mb']:.0f} MiB, "
                    f"{run['objects']}",
                    flush=True,
                )

    cpus = os.cpu_count()
    print(f"\ndevice {args.device}, {cpus} cores, medians of {args.repeat}; post-process in CPU s")
    header = ["slide mm²", "backend", "tissue mm²", "model", *PHASES, "total", "wall"]
    header += ["cores busy", "mm²/min", "peak MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    table = {}
    for (size, backend), repeats in runs.items():
        med = {p: statistics.median(r["timings"].get(p, 0.0) for r in repeats) for p in PHASES}
        for key in ("total", "model", "cpu"):
            med[key] = statistics.median(r["timings"][key] for r in repeats)
        wall = statistics.median(r["wall"] for r in repeats)
        peak = statistics.median(r["peak_mb"] for r in repeats)
        tissue = repeats[0]["tissue_mm2"]
        table[(size, backend)] = (tissue, med["total"], peak)
        cells = [f"{size:g}", backend, f"{tissue:.1f}", f"{med['model']:.1f}"]
        cells += [f"{med[p]:.1f}" for p in (*PHASES, "total")]
        busy = med["cpu"] / wall
        cells += [
            f"{wall:.1f}",
            f"{busy:.2f}",
            f"{tissue / (med['total'] / 60):.2f}",
            f"{peak:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")

    for backend in args.backend:
        rows = [table[(size, backend)] for size in slides]
        areas, seconds, peaks = zip(*rows, strict=True)
        per_mm2 = [s / a for a, s in zip(areas, seconds, strict=True)]
        if len(rows) > 1:
            slope, intercept, r2 = fit(list(areas), list(seconds))
            print(
                f"{backend}: time = {slope:.2f} s/mm² x area + {intercept:.1f} s (R² {r2:.4f}); "
                f"s per mm² from {per_mm2[0]:.2f} to {per_mm2[-1]:.2f} "
                f"({per_mm2[-1] / per_mm2[0]:.2f}x); peak memory {peaks[0]:.0f} -> "
                f"{peaks[-1]:.0f} MiB ({peaks[-1] / peaks[0]:.2f}x for "
                f"{areas[-1] / areas[0]:.0f}x the tissue)"
            )
        print(
            f"{backend}: {areas[-1] / (seconds[-1] / 60):.2f} mm² of tissue per minute at "
            f"{areas[-1]:.0f} mm² (target >= 10 on the 2-core CPU)"
        )
    if args.cohort:
        cohort(list(slides.values()), args.device)
    if len(args.backend) > 1:
        base, *others = args.backend
        for backend in others:
            ratios = [table[(s, base)][1] / table[(s, backend)][1] for s in slides]
            print(f"{backend} vs {base}: " + ", ".join(f"{r:.2f}x" for r in ratios) + " faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
