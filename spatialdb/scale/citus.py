"""Scale-out of the database with Citus: the tables distributed by slide (`sql/citus.sql`)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from spatialdb.config import database_url
from spatialdb.errors import DatabaseUnavailable, UserError
from spatialdb.store.db import first_line, make_engine, redact

SCRIPT = Path(__file__).resolve().parents[1] / "sql" / "citus.sql"


def require_citus(url: str | None) -> None:
    """`UserError` unless the database at `url` has the citus extension; changes nothing."""
    url = url or database_url()
    if not url:
        raise UserError("--citus: the embedded server has no Citus; give a Citus coordinator URL")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'citus'"))
            installed = found.first() is not None
    except OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot use the database at {redact(url)}: {first_line(exc.orig or exc)}"
        ) from None
    finally:
        engine.dispose()
    if not installed:
        raise UserError(
            f"--citus: the database at {redact(url)} has no citus extension (install Citus, add "
            "it to shared_preload_libraries, then CREATE EXTENSION citus); nothing was changed"
        )


def distribute(engine: Engine) -> None:
    """Run the Citus script in one transaction (idempotent)."""
    raw = engine.raw_connection()
    try:
        raw.cursor().execute(SCRIPT.read_text())
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()
