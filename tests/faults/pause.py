"""Run a `spatialdb` command that stops at a chosen point of its database traffic until the test
lets it go on, so that the fault suite can restart PostgreSQL at that point on any machine.

    python -m tests.faults.pause DIR POINT MATCH -- ARGUMENTS...

runs `spatialdb ARGUMENTS...` with its psycopg2 connections made through the classes below, which
stop the thread that reaches POINT with a statement containing MATCH:

- `before`: just before that statement is sent (the connection idle in its transaction);
- `copy-in`: inside `COPY ... FROM STDIN`, after its first chunk was sent;
- `copy-out`: inside `COPY ... TO STDOUT`, after its first rows arrived;
- `fetch`: inside a server-side cursor's rows, after its first batch arrived;
- `commit`: at the commit of a transaction that ran the statement, before COMMIT is sent.

The first thread to get there creates DIR/paused; every thread that gets there (the command's
parallel connections run the same statements) waits until DIR/go exists, and none after that.
Nothing of the product is changed: the command runs as `spatialdb` would, with the same output.
"""

from __future__ import annotations

import sys
import threading
import time
from functools import partial
from pathlib import Path

import psycopg2
import psycopg2.extensions

POINTS = ("before", "copy-in", "copy-out", "fetch", "commit")


class Pause:
    """Where to stop, and the files that tell the test."""

    def __init__(self, folder: Path, point: str, match: str):
        if point not in POINTS:
            raise SystemExit(f"pause: POINT must be one of {', '.join(POINTS)}, not {point!r}")
        self.folder, self.point, self.match = folder, point, match
        self._lock = threading.Lock()

    def wants(self, point: str, statement: str) -> bool:
        return point == self.point and self.match in statement and not self._gone_on()

    def stop(self) -> None:
        """Tell the test (first time only) and wait for its go."""
        with self._lock:
            paused = self.folder / "paused"
            if not paused.exists():
                paused.write_text(f"{self.point} {self.match}\n")
        while not self._gone_on():
            time.sleep(0.01)

    def _gone_on(self) -> bool:
        return (self.folder / "go").exists()


PAUSE: Pause | None = None


class _Reader:
    """COPY FROM STDIN's source: stops before its second read (the first chunk has been sent)."""

    def __init__(self, source):
        self.source, self.reads = source, 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads == 2:
            PAUSE.stop()
        return self.source.read(size)


class _Writer:
    """COPY TO STDOUT's target: stops after its first write."""

    def __init__(self, target):
        self.target, self.writes = target, 0

    def write(self, data) -> int:
        written = self.target.write(data)
        self.writes += 1
        if self.writes == 1:
            PAUSE.stop()
        return written


class Cursor(psycopg2.extensions.cursor):
    def _sent(self, query) -> str:
        statement = query if isinstance(query, str) else query.as_string(self)
        self.connection.statements.append(statement)
        if PAUSE.wants("before", statement):
            PAUSE.stop()
        return statement

    def execute(self, query, vars=None):
        statement = self._sent(query)
        if self.name is not None and PAUSE.wants("fetch", statement):
            self.fetches = 0
        return super().execute(query, vars)

    def executemany(self, query, vars_list):
        self._sent(query)
        return super().executemany(query, vars_list)

    def copy_expert(self, sql, file, size=8192):
        statement = self._sent(sql)
        if "FROM STDIN" in statement and PAUSE.wants("copy-in", statement):
            file = _Reader(file)
        elif "TO STDOUT" in statement and PAUSE.wants("copy-out", statement):
            file = _Writer(file)
        return super().copy_expert(sql, file, size)

    def fetchmany(self, size=None):
        rows = super().fetchmany(size) if size is not None else super().fetchmany()
        if hasattr(self, "fetches"):
            self.fetches += 1
            if self.fetches == 1:
                PAUSE.stop()
        return rows


class Connection(psycopg2.extensions.connection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cursor_factory = Cursor
        self.statements: list[str] = []

    def commit(self):
        if PAUSE.wants("commit", "\n".join(self.statements)):
            PAUSE.stop()
        self.statements = []
        return super().commit()

    def rollback(self):
        self.statements = []
        return super().rollback()


def main(argv: list[str]) -> int:
    global PAUSE
    if len(argv) < 4 or argv[3] != "--":
        raise SystemExit("usage: python -m tests.faults.pause DIR POINT MATCH -- ARGUMENTS...")
    folder, point, match = Path(argv[0]), argv[1], argv[2]
    PAUSE = Pause(folder, point, match)
    psycopg2.connect = partial(psycopg2.connect, connection_factory=Connection)

    from spatialdb.cli.main import main as spatialdb

    return spatialdb(argv[4:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
