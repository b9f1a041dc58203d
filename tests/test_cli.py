"""The `spatialdb` program: status, delete, URLs, and one clear line for user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import shapely

from spatialdb.store.db import head_revision
from spatialdb.store.loader import RunWriter
from tests.conftest import blobs, make_slide


def spatialdb(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spatialdb", *args], capture_output=True, text=True, env=env
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spatialdb: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_status_lists_slides_with_counts_and_delete_removes_one(engine, cli_env):
    empty = spatialdb("status", env=cli_env)
    assert empty.returncode == 0 and "no slides yet" in empty.stdout
    for name, n in (("alpha", 40), ("beta", 7)):
        with RunWriter(engine, make_slide(name)) as run:
            run.add("nucleus", blobs(n), "epithelial")
            run.add("gland", [shapely.box(0, 0, 100, 100)], "benign")
            run.commit()

    table = spatialdb("status", env=cli_env)
    assert table.returncode == 0, table.stderr
    assert "alpha" in table.stdout and "beta" in table.stdout
    rows = [
        json.loads(line) for line in spatialdb("status", "--json", env=cli_env).stdout.splitlines()
    ]
    assert [(r["name"], r["nucleus"], r["gland"], r["status"]) for r in rows] == [
        ("alpha", 40, 1, "ready"),
        ("beta", 7, 1, "ready"),
    ]

    deleted = spatialdb("delete", "alpha", "--yes", env=cli_env)
    assert deleted.returncode == 0 and "deleted slide" in deleted.stdout
    rows = [
        json.loads(line) for line in spatialdb("status", "--json", env=cli_env).stdout.splitlines()
    ]
    assert [r["name"] for r in rows] == ["beta"]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM nucleus").scalar() == 7
        assert conn.exec_driver_sql("SELECT count(*) FROM run").scalar() == 1


def test_delete_of_an_unknown_slide_is_one_line(engine, cli_env):
    assert_one_error_line(spatialdb("delete", "nope", "-y", env=cli_env), "no slide matches 'nope'")


def test_db_url_and_upgrade_report_the_server_in_use(engine, cli_env, db_url):
    url = spatialdb("db", "url", env=cli_env)
    assert url.returncode == 0 and url.stdout.strip().startswith("postgresql")
    upgrade = spatialdb("db", "upgrade", env=cli_env)
    assert upgrade.returncode == 0 and f"at revision {head_revision()}" in upgrade.stdout
    flag = spatialdb("--db-url", db_url, "db", "url", env={**cli_env, "SPATIALDB_URL": "x"})
    assert flag.returncode == 0 and flag.stdout.strip().startswith("postgresql")


def test_unreachable_or_wrong_databases_are_one_line(cli_env):
    refused = spatialdb("--db-url", "postgresql://someone@127.0.0.1:9/none", "status", env=cli_env)
    assert_one_error_line(refused, "cannot use the database", "127.0.0.1")
    assert_one_error_line(
        spatialdb("--db-url", "mysql://a@b/c", "status", env=cli_env), "PostgreSQL"
    )
    assert_one_error_line(
        spatialdb("--db-url", "::not a url::", "status", env=cli_env), "bad database URL"
    )


def test_a_server_without_the_schema_asks_for_an_upgrade(engine, cli_env, db_url):
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE spatialdb_blank")
    try:
        blank = db_url.replace("/spatialdb?", "/spatialdb_blank?")
        assert blank != db_url
        assert_one_error_line(
            spatialdb("--db-url", blank, "status", env=cli_env), "spatialdb db upgrade"
        )
    finally:
        with autocommit.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE spatialdb_blank")
