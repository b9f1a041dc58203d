"""A connection lost inside a COPY: psycopg2's own report of it, and the CLI keeping it off stderr
(`spatialdb.store.db.hide_lost_connection_reports`). The fault suite restarts the server under every
command; this is the same loss in a second, on the default suite's server."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from spatialdb.store.db import make_engine

#: A COPY that streams for minutes, through a file that reads nothing back; it prints one line
#: of its own when the connection goes.
COPY_OUT = """
import io, sys
import psycopg2
from spatialdb.store.db import hide_lost_connection_reports
if sys.argv[2] == "hidden":
    hide_lost_connection_reports()
conn = psycopg2.connect(sys.argv[1])
try:
    conn.cursor().copy_expert(
        "COPY (SELECT g, pg_sleep(0.001) FROM generate_series(1, 10000000) g) TO STDOUT",
        io.BytesIO(),
    )
except psycopg2.Error as exc:
    print("lost:", type(exc).__name__, file=sys.stderr)
"""


def copy_cut_short(db_url: str, reports: str) -> list[str]:
    """stderr's lines of the COPY above, its backend terminated while it streams."""
    libpq_url = db_url.replace("postgresql+psycopg2://", "postgresql://")
    copying = subprocess.Popen(
        [sys.executable, "-c", COPY_OUT, libpq_url, reports], stderr=subprocess.PIPE, text=True
    )
    engine = make_engine(db_url)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:  # a transaction sees one snapshot of the activity
                pid = conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE state = 'active' "
                        "AND starts_with(query, 'COPY (SELECT g, pg_sleep')"
                    )
                ).scalar()
                if pid is not None:
                    time.sleep(0.3)  # well inside the COPY
                    conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                    break
            time.sleep(0.02)
    finally:
        engine.dispose()
    if pid is None:
        copying.kill()
    _, stderr = copying.communicate(timeout=60)
    assert pid is not None, stderr
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("reports", ["shown", "hidden"])
def test_a_copy_cut_short_reports_only_to_its_caller_when_hidden(db_url, reports):
    lines = copy_cut_short(db_url, reports)
    assert lines[-1].startswith("lost: "), lines
    if reports == "hidden":
        assert lines == lines[-1:]
    else:  # psycopg2 2.9 prints the server's message and a SystemError on its own
        assert any(line.startswith("SystemError: ") for line in lines), lines
