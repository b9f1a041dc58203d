"""`spatialdb features ...`: recompute the gland–nuclei features and export them as tables."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import text

from spatialdb.errors import UserError
from spatialdb.features.export import FORMATS, LEVELS, export
from spatialdb.features.refresh import refresh as refresh_slide
from spatialdb.store.catalog import find_slide
from spatialdb.store.db import connect

SLIDES_WITH_RUN = "SELECT id, name FROM slide WHERE current_run_id IS NOT NULL ORDER BY id"
FEATURE_STATE = """
SELECT s.id, s.name, s.current_run_id, f.run_id AS feature_run_id
FROM slide s LEFT JOIN slide_feature f ON f.slide_id = s.id
WHERE s.id = ANY(:ids) ORDER BY s.id
"""


@click.group()
def features() -> None:
    """Gland–nuclei features: recompute them, export them."""


@features.command()
@click.argument("slides", nargs=-1)
@click.pass_obj
def refresh(obj: dict, slides: tuple[str, ...]) -> None:
    """Recompute the features of SLIDES (ids, names or paths; default: every slide)."""
    engine = connect(obj["db_url"])
    targets = _slides(engine, slides)
    if not targets:
        click.echo("no slides with objects yet: ingest or import one")
        return
    for slide in targets:
        seconds = refresh_slide(engine, slide["id"])
        with engine.connect() as conn:
            glands = conn.execute(
                text("SELECT gland_count, nucleus_count FROM slide_feature WHERE slide_id = :id"),
                {"id": slide["id"]},
            ).first()
        counts = f"{glands[0]:,} glands, {glands[1]:,} nuclei" if glands else "no objects"
        click.echo(
            f"slide {slide['id']} ({slide['name']}): features of {counts} in {seconds:.1f} s"
        )


@features.command("export")
@click.option("--level", type=click.Choice(LEVELS), required=True, help="One row per ...")
@click.option(
    "--slide", "slides", multiple=True, help="Slide id, name or path (repeatable; default: all)."
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="csv", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file (default: LEVEL_features.EXT in the current directory).",
)
@click.option(
    "--radius-um",
    type=float,
    default=25.0,
    show_default=True,
    help="Neighbourhood radius of the nucleus level's neighbour count.",
)
@click.pass_obj
def export_features(obj: dict, level, slides, fmt, output, radius_um) -> None:
    """Write gland, nucleus or slide features as CSV, Parquet or GeoParquet (and nuclei as
    AnnData, .h5ad, for scverse)."""
    if radius_um <= 0:
        raise UserError("--radius-um must be positive")
    engine = connect(obj["db_url"])
    targets = _slides(engine, slides)
    if not targets:
        raise UserError("no slides with objects to export")
    if level != "nucleus":
        targets = _with_features(engine, targets, named=bool(slides))
    suffix = {"csv": "csv", "anndata": "h5ad"}.get(fmt, "parquet")
    out = output or Path(f"{level}_features.{suffix}")
    result = export(engine, level, fmt, out, [s["id"] for s in targets], radius_um=radius_um)
    click.echo(f"{result.path}: {result.rows:,} rows, {len(result.columns)} columns")


def _slides(engine, refs: tuple[str, ...]) -> list[dict]:
    """The slides named (each must exist and have a run), or every slide with a run."""
    if not refs:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(SLIDES_WITH_RUN)).mappings()]
    found = [find_slide(engine, ref) for ref in refs]
    return list({s["id"]: s for s in found}.values())


def _with_features(engine, slides: list[dict], named: bool) -> list[dict]:
    """Slides whose features describe their current run. A slide named on the command line
    without them is an error; otherwise it is left out with a note."""
    with engine.connect() as conn:
        rows = conn.execute(text(FEATURE_STATE), {"ids": [s["id"] for s in slides]}).mappings()
        state = [dict(r) for r in rows]
    ready = [s for s in state if s["feature_run_id"] and s["feature_run_id"] == s["current_run_id"]]
    for s in state:
        if s not in ready:
            message = (
                f"slide {s['id']} ({s['name']}) has no current features; "
                f"run: spatialdb features refresh {s['id']}"
            )
            if named:
                raise UserError(message)
            click.echo(f"spatialdb: note: {message}", err=True)
    if not ready:
        raise UserError("no slide has current features; run: spatialdb features refresh")
    return ready
