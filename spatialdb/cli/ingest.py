"""`spatialdb ingest SLIDE...`: whole-slide images through the shared model into PostGIS.

Options, output and the exit code; each slide goes through `spatialdb.pipeline.ingest`, here or
on a Dask cluster (`--scheduler`).
"""

from __future__ import annotations

import time

import click

from spatialdb.errors import UserError
from spatialdb.pipeline.ingest import Outcome, ingest_many, load_model
from spatialdb.pipeline.slides import slide_paths
from spatialdb.store.db import connect


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
@click.option(
    "--batch-size",
    type=int,
    help="Patches per forward pass (default: 8 of 512 px, fewer of larger patches).",
)
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
    "--jobs",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Slides in flight at once: one slide's post-processing and loading overlap the next "
    "one's inference.",
)
@click.option(
    "--backend",
    type=click.Choice(["openvino", "torch"]),
    help="What runs the network (default: openvino on the CPU, torch on CUDA).",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Dask scheduler (tcp://host:8786): ingest the slides on its workers, in parallel.",
)
@click.pass_obj
def ingest(
    obj: dict,
    slides,
    mpp,
    force,
    weights,
    device,
    batch_size,
    compress_slides,
    workers,
    jobs,
    backend,
    scheduler,
):
    """Segment SLIDES (files, directories or globs) and store their objects, one atomic run per
    slide. Slides already stored with the same content and model are skipped unless --force."""
    paths = slide_paths(slides)
    if not paths:
        raise UserError("no slides found in " + " ".join(slides))
    engine = connect(obj["db_url"])
    options = dict(mpp=mpp, force=force, device=device, batch_size=batch_size)
    if scheduler:
        from spatialdb.scale.dask_cluster import ingest_on_cluster

        url = engine.url.render_as_string(hide_password=False)
        outcomes: list = [None] * len(paths)
        for k, outcome in ingest_on_cluster(
            scheduler, url, paths, weights=weights, compress=compress_slides, **options
        ):
            outcomes[k] = outcome
            _report(outcome)
    else:
        model = load_model(weights, device, embeddings=compress_slides, backend=backend)
        outcomes = [None] * len(paths)
        reported = 0
        started = time.perf_counter()
        for k, outcome in ingest_many(
            engine, paths, model, jobs=jobs, workers=workers, compress=compress_slides, **options
        ):
            outcomes[k] = outcome
            while reported < len(outcomes) and outcomes[reported] is not None:
                _report(outcomes[reported])  # in the order given, each as soon as it can be
                reported += 1
        _cohort(outcomes, time.perf_counter() - started)
    _summary(outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    if failed:
        click.echo(f"spatialdb: error: {failed} of {len(outcomes)} slide(s) failed", err=True)
    return 1 if failed else 0


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


def _cohort(outcomes: list[Outcome], seconds: float) -> None:
    """The rate over several ingested slides: tissue per minute of wall time."""
    done = [o for o in outcomes if o.status == "ingested"]
    if len(done) > 1:
        tissue = sum(o.tissue_mm2 for o in done)
        click.echo(
            f"{len(done)} slides, {tissue:.2f} mm² of tissue in {seconds:.1f} s: "
            f"{tissue / (seconds / 60):.2f} mm² per minute"
        )


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
