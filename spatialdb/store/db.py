"""Connections: the URL in use (external server or the embedded cluster) and schema migrations."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from spatialdb.config import database_url, home_dir
from spatialdb.errors import DatabaseUnavailable
from spatialdb.store.embedded import EmbeddedCluster

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = PROJECT_ROOT / "migrations"


def resolve_url(url: str | None = None) -> tuple[str, bool]:
    """The URL to use and whether it is the embedded cluster (started here if needed)."""
    url = url or database_url()
    if url:
        return url, False
    return EmbeddedCluster(home_dir()).ensure_running(), True


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUnavailable(f"bad database URL {url!r}: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    if not parsed.drivername.startswith("postgresql"):
        raise DatabaseUnavailable(
            f"bad database URL {redact(url)}: PostgreSQL with PostGIS is required"
        )
    return create_engine(parsed, pool_pre_ping=True, future=True)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def alembic_config(url: str):
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('alembic_version')")).scalar()
        if exists is None:
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine) -> None:
    """Migrate the database to the newest schema (creates PostGIS if it can)."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def connect(url: str | None = None, *, migrate: bool | None = None) -> Engine:
    """An engine on a reachable database whose schema is current.

    The embedded cluster is started and migrated automatically; an external server is migrated
    only when asked (`spatialdb db upgrade`, migrate=True), since its schema belongs to its
    administrator.
    """
    resolved, embedded = resolve_url(url)
    engine = make_engine(resolved)
    try:
        at_head = current_revision(engine) == head_revision()
        if (migrate if migrate is not None else embedded) and not at_head:
            upgrade(engine)
        elif not at_head and not migrate:
            raise DatabaseUnavailable(
                f"the database at {redact(resolved)} is not at the current schema; "
                "run: spatialdb db upgrade"
            )
    except OperationalError as exc:
        engine.dispose()
        raise DatabaseUnavailable(
            f"cannot use the database at {redact(resolved)}: {first_line(exc.orig or exc)}"
        ) from None
    return engine


def rollback_or_discard(conn) -> None:
    """Roll back a pooled DBAPI connection; one the server has dropped (restart, crash) is
    discarded instead: the server rolled its transaction back already."""
    import psycopg2

    try:
        conn.rollback()
    except psycopg2.Error:  # a connection that cannot roll back is of no further use
        conn.invalidate()


def lost_connection(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain (itself, what it wraps or was raised from) that says the
    database connection went away, if any: a psycopg2 error with no SQLSTATE (the client saw
    the socket close), a connection exception (08...) or a server shutdown (57P...)."""
    import psycopg2

    for seen in _chain(exc):
        if isinstance(seen, psycopg2.Error) and (
            seen.pgcode is None or seen.pgcode.startswith(("08", "57P"))
        ):
            return seen
    return None


# How a Citus coordinator reports a worker it lost: the worker's address, and a connection failure.
_WORKER = re.compile(
    r"connection to the remote node (?:\S+@)?(?P<a>[^\s:]+:\d+) failed|"
    r"while executing command on (?P<b>[^\s:]+:\d+)"
)
_LOST_LINK = re.compile(
    r"SSL SYSCALL error|EOF detected|server closed the connection|connection not open|"
    r"could not connect|failed with the following error|terminating connection|invalid socket"
)


def lost_worker(exc: BaseException) -> tuple[str, BaseException] | None:
    """(host:port, the error) where `exc`'s chain says a Citus coordinator lost its connection to
    a worker (the worker stopped or unreachable), if it does. A worker's own SQL error (a
    constraint, say) is not one."""
    import psycopg2

    for seen in _chain(exc):
        if not isinstance(seen, psycopg2.Error):
            continue
        context = getattr(seen.diag, "context", None) or ""
        found = _WORKER.search(f"{seen}\n{context}")
        if found and _LOST_LINK.search(str(seen)):
            return found["a"] or found["b"], seen
    return None


def lost_database(exc: BaseException) -> str | None:
    """What was lost, for an error line, where `exc`'s chain says a connection went away: the
    connection to a Citus worker or the database connection itself."""
    worker = lost_worker(exc)
    if worker is not None:
        return f"the connection to Citus worker {worker[0]} was lost ({first_line(worker[1])})"
    lost = lost_connection(exc)
    if lost is not None:
        return f"the database connection was lost ({first_line(lost)})"
    return None


def _chain(exc: BaseException):
    """`exc`, what it wraps (`orig`) or was raised from, and so on."""
    seen = exc
    while seen is not None:
        yield seen
        seen = getattr(seen, "orig", None) or seen.__cause__ or seen.__context__


def hide_lost_connection_reports() -> None:
    """Keep reports of a lost database connection off stderr, for a command that reports the loss
    itself, in one line, when the error reaches it.

    psycopg2 (2.9) prints one such report itself: when the server goes away inside a COPY, libpq
    gives two error results, and psycopg2 raises for the second while the first is still set, so
    its C code (pq_raise) prints the first with `PyErr_Print` — through `sys.excepthook` — and
    raises the second. Thread exceptions and exceptions ignored in finalizers (a cursor closed on
    a dead connection) are hidden the same way; every other report is shown as before.
    """
    if getattr(sys.excepthook, "hides_lost_connections", False):
        return
    shown_by = (sys.excepthook, threading.excepthook, sys.unraisablehook)

    def excepthook(kind, value, traceback):
        if lost_database(value) is None:
            shown_by[0](kind, value, traceback)

    def thread_excepthook(args):
        if lost_database(args.exc_value) is None:
            shown_by[1](args)

    def unraisablehook(unraisable):
        if lost_database(unraisable.exc_value) is None:
            shown_by[2](unraisable)

    excepthook.hides_lost_connections = True
    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
