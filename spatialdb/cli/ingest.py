"""`spatialdb ingest SLIDE...`: whole-slide images through the shared model into PostGIS.

This is where inference meets storage: `inference.engine.segment_slide` yields polygons region by
region and a `RunWriter` streams them into the slide's new run, committed at the end (or not at
all). torch and tiatoolbox are imported only when a slide is ingested.
"""

from __future__ import annotations

import glob
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from spatialdb.catalog import ModelRecord, SlideRecord, find_ingested, fingerprint
from spatialdb.db import connect, first_line, lost_connection
from spatialdb.errors import UserError

#: Files a directory argument contributes (what tiatoolbox's WSIReader opens).
SLIDE_SUFFIXES = (
    ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".svslide", ".bif", ".vms", ".qptiff",
    ".dcm", ".jp2", ".png", ".jpg", ".jpeg",
)  # fmt: skip
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


def slide_paths(arguments: tuple[str, ...]) -> list[Path]:
    """Files named, slides inside directories (recursively) and glob matches, in order, once
    each. A name that matches nothing is kept, so that it fails as a missing file."""
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file()
            )
        elif glob.has_magic(argument):
            found = sorted(Path(p) for p in glob.glob(argument, recursive=True))
        else:
            found = [path]
        paths += [p for p in found if p not in paths]
    return paths


@click.command()
@click.argument("slides", nargs=-1, required=True)
@click.option("--mpp", type=float, help="µm per pixel, for slides whose file does not record it.")
@click.option("--force", is_flag=True, help="Re-ingest slides already stored with this model.")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    help="Weights file (default: the shipped CPU weights).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--batch-size", default=8, show_default=True, help="Patches per forward pass.")
@click.option(
    "--compress",
    "compress_slides",
    is_flag=True,
    help="Also store each slide's NIC grid of encoder embeddings (same forward passes).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Post-processing processes (default: one per core; 0 = in the main process).",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Dask scheduler (tcp://host:8786): ingest the slides on its workers, in parallel.",
)
@click.pass_obj
def ingest(
    obj: dict, slides, mpp, force, weights, device, batch_size, compress_slides, workers, scheduler
):
    """Segment SLIDES (files, directories or globs) and store their objects, one atomic run per
    slide. Slides already stored with the same content and model are skipped unless --force."""
    paths = slide_paths(slides)
    if not paths:
        raise UserError("no slides found in " + " ".join(slides))
    engine = connect(obj["db_url"])
    options = dict(mpp=mpp, force=force, device=device, batch_size=batch_size)
    if scheduler:
        from spatialdb.distributed import ingest_on_cluster

        url = engine.url.render_as_string(hide_password=False)
        outcomes: list = [None] * len(paths)
        for k, outcome in ingest_on_cluster(
            scheduler, url, paths, weights=weights, compress=compress_slides, **options
        ):
            outcomes[k] = outcome
            _report(outcome)
    else:
        model = load_model(weights, device, embeddings=compress_slides)
        outcomes = []
        for path in paths:
            outcome = attempt(
                engine, path, model, workers=workers, compress=compress_slides, **options
            )
            outcomes.append(outcome)
            _report(outcome)
    _summary(outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    if failed:
        click.echo(f"spatialdb: error: {failed} of {len(outcomes)} slide(s) failed", err=True)
    return 1 if failed else 0


def attempt(engine, path: Path, model, **options) -> Outcome:
    """`ingest_slide` with its failure turned into a failed Outcome: one slide's failure must not
    stop the others."""
    try:
        return ingest_slide(engine, path, model, **options)
    except UserError as exc:
        return Outcome(path, "failed", str(exc))
    except Exception as exc:
        log.debug("ingest of %s failed", path, exc_info=True)
        return Outcome(path, "failed", failure(path, exc))


def failure(path: Path, exc: Exception, work: str = "ingest") -> str:
    """One line on a slide whose `work` (ingest, compression) raised `exc` before it committed."""
    lost = lost_connection(exc)
    if lost is not None:
        return (
            f"{path}: the database connection was lost ({first_line(lost)}); nothing of this "
            f"{work} was stored: run it again"
        )
    return f"{path}: {type(exc).__name__}: {first_line(exc)}"


def load_model(weights: str | None, device: str, *, embeddings: bool = False):
    """(CerberusModel on `device`, weights path): the shipped weights or a weights file; with
    `embeddings`, one that also yields the compressed grid (`ingest --compress`)."""
    import torch

    from inference import weights as weights_io
    from inference.compress import CompressError, cells_per_tile
    from inference.engine import CerberusModel

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
    model = CerberusModel(net.to(device), info, embeddings=embeddings)
    return model, Path(weights or weights_io.DEFAULT_WEIGHTS)


def ingest_slide(
    engine,
    path: Path,
    model,
    *,
    mpp: float | None = None,
    force: bool = False,
    device: str = "cpu",
    batch_size: int = 8,
    workers: int | None = None,
    compress: bool = False,
) -> Outcome:
    """Ingest one slide; `model` is `(CerberusModel, weights path)`. Raises `UserError` for a
    file that is not a usable slide; nothing is stored then."""
    from inference.engine import segment_slide
    from inference.slide import tissue_mask
    from spatialdb.loader import RunWriter

    network, weights_path = model
    info = network.info
    begun = started = time.perf_counter()
    log.info("%s: phase read: opening", path.name)
    reader = open_reader(path, mpp)
    content = fingerprint(path)
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
    from spatialdb.embeddings import store_grid

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
    from spatialdb import features

    try:
        return features.refresh(engine, slide_id)
    except Exception as exc:
        raise UserError(
            f"{source}: stored as slide {slide_id}, but computing its features failed "
            f"({first_line(exc)}); retry with: spatialdb features refresh {slide_id}"
        ) from exc


def open_reader(path: Path, mpp: float | None):
    """The slide's tiatoolbox reader; `UserError` with one line if it is not a usable slide.

    A slide is refused when the level its tissue thumbnail is read from (the coarsest level at
    least as fine as `MASK_MPP`) has more than 2^30 pixels: without a pyramid that small, finding
    its tissue would decode the level whole (a 10^6 x 10^6 px TIFF: 3 TB)."""
    from inference.slide import MASK_MPP, SlideError, open_slide

    try:
        reader = open_slide(path, mpp)
    except SlideError as exc:
        raise UserError(str(exc)) from exc
    except ZeroDivisionError as exc:  # tiatoolbox divides by the file's resolution tags
        raise UserError(f"{path}: not a readable slide (its resolution tags are zero)") from exc
    info = reader.info
    finer = [k for k, d in enumerate(info.level_downsamples) if d * max(info.mpp) <= MASK_MPP]
    width, height = info.level_dimensions[finer[-1] if finer else 0]
    if width * height > 2**30:
        raise UserError(
            f"{path}: {int(width):,} x {int(height):,} px without a smaller pyramid level is "
            "too large to read (at most 2^30 px in the level read for the tissue thumbnail)"
        )
    return reader


def slide_record(path: Path, reader, content: str) -> SlideRecord:
    """What the database keeps about a slide, from its reader's metadata."""
    meta = reader.info
    return SlideRecord(
        file_path=str(path.resolve()),
        name=path.stem,
        fingerprint=content,
        width=int(meta.slide_dimensions[0]),
        height=int(meta.slide_dimensions[1]),
        mpp_x=float(meta.mpp[0]),
        mpp_y=float(meta.mpp[1]),
        level_count=int(meta.level_count),
        objective_power=float(meta.objective_power) if meta.objective_power else None,
        vendor=meta.vendor,
    )


def _flush(run, table: str, pending: list) -> float:
    """Hand buffered objects of one table to the loader; the seconds it took."""
    started = time.perf_counter()
    geoms = [g for o in pending for g in o.geoms]
    if geoms:
        classes = [c for o in pending for c in o.classes]
        probability = np.concatenate([o.probability for o in pending])
        run.add(table, geoms, classes, probability)
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


def _report(outcome: Outcome) -> None:
    name = outcome.path.name
    if outcome.status == "failed":
        click.echo(f"spatialdb: error: {outcome.message}", err=True)
        return
    if outcome.status == "skipped":
        click.echo(f"{name}: skipped, {outcome.message}")
        return
    click.echo(
        f"{name}: slide {outcome.slide_id}, {outcome.tissue_mm2:.2f} mm² of tissue, "
        f"{outcome.timings['total']:.1f} s" + (f" ({outcome.message})" if outcome.message else "")
    )
    for table, classes in outcome.counts.items():
        if classes:
            ranked = sorted(classes.items(), key=lambda item: -item[1])
            listed = ", ".join(f"{c} {n:,}" for c, n in ranked)
            click.echo(f"  {table}: {sum(classes.values()):,} ({listed})")


PHASES = ("open", "tissue_mask", "read", "infer", "wait", "load", "features", "total")


def _phases(outcome: Outcome) -> dict[str, float]:
    return {p: outcome.timings.get(p, 0.0) for p in PHASES}


def _summary(outcomes: list[Outcome]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ingest summary (times in s; post-process = CPU s in workers)")
    columns = ("slide", "status", "nucleus", "gland", "lumen", "tissue mm²")
    for column in (*columns, *PHASES, "post-process"):
        table.add_column(column, justify="left" if column in ("slide", "status") else "right")
    for o in outcomes:
        tables = ("nucleus", "gland", "lumen")
        totals = [f"{sum(o.counts[t].values()):,}" if o.counts else "" for t in tables]
        times = [f"{v:.1f}" for v in _phases(o).values()] if o.timings else [""] * len(PHASES)
        post = f"{o.timings['postprocess']:.1f}" if "postprocess" in o.timings else ""
        table.add_row(
            o.path.name, o.status, *totals, f"{o.tissue_mm2:.2f}" if o.timings else "", *times, post
        )
    Console(width=200, stderr=False).print(table)
