"""The ingest pipeline: one slide file through the shared model into one atomic run.

`ingest_one` opens the slide, skips it when its content is already stored with the same weights,
segments it with `inference.engine.segment_slide` region by region into a `RunWriter`, commits
the run, computes its features and, with `compress`, stores its NIC grid from the same forward
passes. A slide's failure becomes a failed `Outcome`, so that the other slides go on; the CLI and
the Dask workers (`spatialdb.scale.dask_cluster`) both call it. torch and tiatoolbox are
imported only when a slide is ingested.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spatialdb.errors import UserError
from spatialdb.pipeline.slides import open_reader, slide_record
from spatialdb.store.catalog import ModelRecord, find_ingested, fingerprint
from spatialdb.store.db import first_line, lost_database

TASK_TABLES = {"Nuclei": "nucleus", "Gland": "gland", "Lumen": "lumen", "Tissue": "tissue_region"}
#: Objects buffered per table before they are handed to the loader.
FLUSH_OBJECTS = 20_000


@dataclass
class Outcome:
    """What happened to one slide."""

    path: Path
    status: str  # ingested | skipped | failed
    message: str = ""
    slide_id: int | None = None
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    tissue_mm2: float = 0.0


log = logging.getLogger(__name__)


def ingest_one(engine, path: Path, model, **options) -> Outcome:
    """Ingest one slide (`ingest_slide`), its failure turned into a failed Outcome: one slide's
    failure must not stop the others."""
    try:
        return ingest_slide(engine, path, model, **options)
    except UserError as exc:
        return Outcome(path, "failed", str(exc))
    except Exception as exc:
        log.debug("ingest of %s failed", path, exc_info=True)
        return Outcome(path, "failed", failure(path, exc))


def ingest_many(engine, paths: list[Path], model, *, jobs: int = 2, **options):
    """Ingest `paths` (`ingest_one`) with up to `jobs` slides in flight, yielding (index in
    `paths`, Outcome) as they finish. The slides share one model whose forward passes take turns
    (`CerberusModel.lock`), so that one slide's reading, post-processing, loading and feature
    refresh overlap the next one's inference. Files of the same content go one after the other,
    so that the later ones are skipped as before."""
    if jobs <= 1 or len(paths) <= 1:
        for k, path in enumerate(paths):
            yield k, ingest_one(engine, path, model, **options)
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed

    groups: dict[str, list[int]] = {}
    for k, path in enumerate(paths):
        key = fingerprint(path) if path.is_file() else f"unreadable:{k}"
        groups.setdefault(key, []).append(k)

    def chain(key: str, indices: list[int]) -> list[tuple[int, Outcome]]:
        content = None if key.startswith("unreadable:") else key
        return [
            (k, ingest_one(engine, paths[k], model, content=content, **options)) for k in indices
        ]

    with ThreadPoolExecutor(jobs, thread_name_prefix="ingest") as pool:
        chains = [pool.submit(chain, key, group) for key, group in groups.items()]
        for future in as_completed(chains):
            yield from future.result()


def failure(path: Path, exc: Exception, work: str = "ingest") -> str:
    """One line on a slide whose `work` (ingest, compression) raised `exc` before it committed."""
    lost = lost_database(exc)
    if lost is not None:
        return f"{path}: {lost}; nothing of this {work} was stored: run it again"
    return f"{path}: {type(exc).__name__}: {first_line(exc)}"


def load_model(
    weights: str | None, device: str, *, embeddings: bool = False, backend: str | None = None
):
    """(CerberusModel on `device`, weights path): the shipped weights or a weights file; with
    `embeddings`, one that also yields the compressed grid (`ingest --compress`). `backend`
    runs its forward pass (`inference.runtime`; default OpenVINO on the CPU)."""
    import torch

    from inference import weights as weights_io
    from inference.compress import CompressError, cells_per_tile
    from inference.engine import CerberusModel
    from inference.runtime import default_backend

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    try:
        net, info = weights_io.load(weights or weights_io.DEFAULT_WEIGHTS)
    except (weights_io.WeightsError, OSError) as exc:
        raise UserError(f"weights: {exc}") from exc
    if embeddings:
        try:
            cells_per_tile(info.preset)
        except CompressError as exc:
            raise UserError(f"--compress: {exc}") from exc
    backend = backend or default_backend(device)
    try:
        model = CerberusModel(
            net.to(device), info, embeddings=embeddings, device=device, backend=backend
        )
    except ValueError as exc:
        raise UserError(f"--backend: {exc}") from exc
    return model, Path(weights or weights_io.DEFAULT_WEIGHTS)


def ingest_slide(
    engine,
    path: Path,
    model,
    *,
    mpp: float | None = None,
    force: bool = False,
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int | None = None,
    compress: bool = False,
    content: str | None = None,
) -> Outcome:
    """Ingest one slide; `model` is `(CerberusModel, weights path)`; `content` its fingerprint
    when the caller has it already. Raises `UserError` for a file that is not a usable slide;
    nothing is stored then."""
    from inference.engine import segment_slide
    from inference.slide import default_batch, tissue_mask
    from spatialdb.store.loader import RunWriter

    network, weights_path = model
    info = network.info
    begun = started = time.perf_counter()
    log.info("%s: phase read: opening", path.name)
    reader = open_reader(path, mpp)
    content = content or fingerprint(path)
    existing = find_ingested(engine, content, info.sha256)
    if existing and not force:
        elsewhere = existing["file_path"] != str(path.resolve())
        where = f" from {existing['file_path']}" if elsewhere else ""
        return Outcome(
            path,
            "skipped",
            f"already stored as slide {existing['id']}{where} with this model (--force redoes it)",
            slide_id=existing["id"],
        )

    timings = {"open": time.perf_counter() - started}
    started = time.perf_counter()
    mask = tissue_mask(reader)
    timings["tissue_mask"] = time.perf_counter() - started
    slide = slide_record(path, reader, content)
    record = ModelRecord(
        name=weights_path.name,
        preset=info.preset.name,
        weights_hash=info.sha256,
        class_names=info.classes,
        mpp=info.mpp,
        info={"untrained": info.untrained, "postprocess": info.postprocess},
    )
    batch_size = batch_size or default_batch(info.preset)
    parameters = {"device": device, "batch_size": batch_size, "mpp_override": mpp}
    progress = _Progress(path.name)
    grid = None
    if compress:
        from inference.compress import empty_grid

        w, h = reader.slide_dimensions(resolution=info.preset.mpp, units="mpp")
        grid = empty_grid((int(h), int(w)), info.preset.widths[-1])
    with RunWriter(engine, slide, model=record, parameters=parameters) as run:
        log.info("%s: phase infer: %.2f mm² of tissue", path.name, mask.area_mm2)
        buffers: dict[str, list] = {table: [] for table in TASK_TABLES.values()}
        load = 0.0
        for objects in segment_slide(
            reader,
            network,
            mask,
            device=device,
            batch_size=batch_size,
            workers=workers,
            timings=timings,
            progress=progress,
            embeddings=grid,
        ):
            table = TASK_TABLES[objects.task]
            log.info("%s: phase load: %d %s objects", path.name, len(objects), objects.task)
            buffers[table].append(objects)
            if sum(len(o) for o in buffers[table]) >= FLUSH_OBJECTS:
                load += _flush(run, table, buffers[table])
        progress.close()
        for table, pending in buffers.items():
            load += _flush(run, table, pending)
        started = time.perf_counter()
        log.info("%s: phase commit: indexes, swap, commit", path.name)
        timings["truncated_glands"] = timings.pop("truncated", 0)
        phase = {k: round(v, 3) for k, v in timings.items()}
        result = run.commit({**phase, "load": round(load, 3)})
        phase["load"] = load + time.perf_counter() - started
    log.info("%s: phase features: run %d committed", path.name, result.run_id)
    phase["features"] = refresh_features(engine, result.slide_id, path)
    if grid is not None:
        try:
            _store_grid(engine, result, reader, mask, network, weights_path, grid)
        except Exception as exc:
            raise UserError(
                f"{path}: stored as slide {result.slide_id}, but storing its grid failed "
                f"({first_line(exc)}); retry with: spatialdb compress {path}"
            ) from exc
    phase["total"] = time.perf_counter() - begun
    message = "" if mask.mask.any() else "no tissue found: stored with zero objects"
    return Outcome(
        path,
        "ingested",
        message,
        slide_id=result.slide_id,
        counts=result.object_counts,
        timings=phase,
        tissue_mm2=mask.area_mm2,
    )


def _store_grid(engine, result, reader, mask, network, weights_path: Path, grid) -> None:
    """The slide's NIC grid from the ingest's own forward passes, cells without tissue zeroed."""
    from inference.compress import CELL_PX, tissue_cells
    from spatialdb.nic.embeddings import store_grid

    tissue = tissue_cells(reader, mask, network.info.preset)
    grid[~tissue] = 0
    with engine.begin() as conn:
        store_grid(
            conn, result.slide_id, grid, tissue, encoder=weights_path.name,
            encoder_sha256=network.info.sha256, mpp=network.info.preset.mpp, cell_px=CELL_PX,
            source_run_id=result.run_id,
        )  # fmt: skip


def refresh_features(engine, slide_id: int, source: Path) -> float:
    """Compute the new run's features; the seconds it took. The run is stored either way."""
    from spatialdb.features.refresh import refresh

    try:
        return refresh(engine, slide_id)
    except Exception as exc:
        raise UserError(
            f"{source}: stored as slide {slide_id}, but computing its features failed "
            f"({first_line(exc)}); retry with: spatialdb features refresh {slide_id}"
        ) from exc


def _flush(run, table: str, pending: list) -> float:
    """Hand buffered objects of one table to the loader; the seconds it took."""
    started = time.perf_counter()
    geoms = [g for o in pending for g in o.geoms]
    if geoms:
        classes = [c for o in pending for c in o.classes]
        probability = np.concatenate([o.probability for o in pending])
        measured = [o.measurements for o in pending if len(o.geoms)]
        names = set(measured[0]) if measured else set()
        if not all(set(m) == names for m in measured):
            raise ValueError(f"{table}: regions measured different columns")
        measurements = {n: np.concatenate([m[n] for m in measured]) for n in sorted(names)}
        run.add(table, geoms, classes, probability, measurements=measurements)
    pending.clear()
    return time.perf_counter() - started


class _Progress:
    """A progress bar over a slide's tissue tiles (shown on a terminal only)."""

    def __init__(self, name: str):
        from tqdm import tqdm

        self.name = name
        self.bar = tqdm(desc=f"{name}: tiles", unit="tile", disable=None, leave=False)

    def __call__(self, done: int, total: int) -> None:
        if done == total:
            log.info("%s: phase post-process: %d tiles inferred", self.name, total)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()
