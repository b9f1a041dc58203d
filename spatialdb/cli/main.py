"""The `spatialdb` command: parses arguments, delegates, and turns user errors into one line."""

from __future__ import annotations

import logging
import sys

import click

from spatialdb.cli import (
    compress,
    dashboard,
    db,
    delete,
    features,
    imports,
    ingest,
    model,
    qupath,
    slide_model,
    status,
)
from spatialdb.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db-url",
    envvar="SPATIALDB_URL",
    default=None,
    help="PostGIS server to use (default: $SPATIALDB_URL, else the embedded cluster).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
@click.pass_context
def cli(ctx: click.Context, db_url: str | None, verbose: bool) -> None:
    """QuPath-interoperable spatial analytics database for histology."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_tiatoolbox)
    ctx.obj = {"db_url": db_url}


def _quiet_tiatoolbox(record: logging.LogRecord) -> bool:
    """tiatoolbox warns on every read of a plain image given --mpp, and on every opening of a
    TIFF that records no objective power; the user can do nothing about those warnings, so they
    are shown with --verbose only."""
    return not record.getMessage().startswith(TIATOOLBOX_NOISE)


TIATOOLBOX_NOISE = (
    "Read: Scale > 1",
    "Raw data is None",
    "Unknown scale",
    "Metadata: Objective power inferred",
)

cli.add_command(db.db)
cli.add_command(status.status)
cli.add_command(delete.delete)
cli.add_command(ingest.ingest)
cli.add_command(imports.import_results)
cli.add_command(features.features)
cli.add_command(qupath.export_qupath)
cli.add_command(qupath.import_qupath)
cli.add_command(dashboard.dashboard)
cli.add_command(compress.compress)
cli.add_command(slide_model.slide_model)
cli.add_command(model.train)
cli.add_command(model.evaluate)


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 1 with one `spatialdb: error: ...` line on user errors."""
    from sqlalchemy.exc import OperationalError

    from spatialdb.store.db import first_line, hide_lost_connection_reports, lost_database

    hide_lost_connection_reports()
    try:
        result = cli.main(args=argv, prog_name="spatialdb", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("spatialdb: aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except UserError as exc:
        click.echo(f"spatialdb: error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("spatialdb: interrupted", err=True)
        return 130
    except Exception as exc:
        lost = lost_database(exc)
        if lost is not None:
            click.echo(
                f"spatialdb: error: {lost}; "
                "nothing of this command's unfinished work was stored: run it again",
                err=True,
            )
            return 1
        if not isinstance(exc, OperationalError):
            raise
        click.echo(f"spatialdb: error: database: {first_line(exc.orig or exc)}", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
