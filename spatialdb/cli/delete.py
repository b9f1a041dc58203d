"""`spatialdb delete SLIDE`: remove a slide with its runs and objects."""

import sys

import click

from spatialdb.store.catalog import delete_slide, find_slide
from spatialdb.store.db import connect


@click.command()
@click.argument("slide")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def delete(obj: dict, slide: str, yes: bool) -> None:
    """Delete SLIDE (id, name or file path), its runs and all its objects."""
    engine = connect(obj["db_url"])
    found = find_slide(engine, slide)
    if not yes and sys.stdin.isatty():
        click.confirm(
            f"delete slide {found['id']} ({found['name']}) and all its objects?", abort=True
        )
    delete_slide(engine, found["id"])
    click.echo(f"deleted slide {found['id']} ({found['name']})")
