"""`spatialdb status`: slides, their current runs and object counts."""

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from spatialdb.store.catalog import slide_summaries
from spatialdb.store.db import connect
from spatialdb.store.schema import OBJECT_TABLES


@click.command()
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per slide instead of a table."
)
@click.pass_obj
def status(obj: dict, as_json: bool) -> None:
    """Show slides, their current run, model and object counts."""
    rows = slide_summaries(connect(obj["db_url"]))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str))
        return
    if not rows:
        click.echo("no slides yet: ingest or import one")
        return
    table = Table(title=f"{len(rows)} slide(s)")
    columns = (
        "id",
        "name",
        "status",
        "run",
        "kind",
        "model",
        *OBJECT_TABLES,
        "features",
        "finished",
    )
    for column in columns:
        table.add_column(column, justify="right" if column in OBJECT_TABLES else "left")
    for row in rows:
        finished = row["finished_at"].strftime("%Y-%m-%d %H:%M") if row["finished_at"] else ""
        table.add_row(
            str(row["id"]),
            row["name"],
            row["status"],
            str(row["run_id"] or ""),
            row["kind"] or "",
            row["model"] or "",
            *(f"{row[t]:,}" for t in OBJECT_TABLES),
            "current" if row["features_current"] else "missing",
            finished,
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)
