"""The embedded default: with no SPATIALDB_URL the program runs its own PostGIS cluster."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import text

from spatialdb.store.db import connect
from spatialdb.store.embedded import EmbeddedCluster, find_pg_bin


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spatialdb", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture
def home():
    """A fresh SPATIALDB_HOME the unprivileged server account can reach (pytest's own
    temporary directories are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="spatialdb-home-"))
    yield path
    EmbeddedCluster(path).stop()
    shutil.rmtree(path, ignore_errors=True)


def test_a_home_the_server_cannot_reach_is_one_clear_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root runs the server under another account")
    env = {k: v for k, v in os.environ.items() if k != "SPATIALDB_URL"}
    env["SPATIALDB_HOME"] = str(tmp_path / "home")  # pytest-of-root is mode 0700
    result = run_cli("db", "url", env=env)
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and result.stderr.count("\n") == 1


def test_first_use_creates_migrates_and_restarts_the_cluster(home):
    env = {k: v for k, v in os.environ.items() if k != "SPATIALDB_URL"}
    env["SPATIALDB_HOME"] = str(home)
    first = run_cli("db", "url", env=env)
    assert first.returncode == 0, first.stderr
    assert f"host={home}/run".replace("/", "%2F") in first.stdout
    cluster = EmbeddedCluster(home)
    assert cluster.running()
    owner = pwd.getpwuid((home / "pgdata").stat().st_uid).pw_name
    if os.geteuid() == 0:
        assert owner != "root"  # PostgreSQL must run unprivileged

    status = run_cli("status", env=env)
    assert status.returncode == 0 and "no slides yet" in status.stdout
    engine = connect(cluster.url, migrate=False)  # the schema is there already
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model (name, preset, weights_hash, class_names, mpp) "
                "VALUES ('kept', 'cpu', 'h', '{}', 0.5)"
            )
        )
    engine.dispose()

    assert run_cli("db", "stop", env=env).returncode == 0
    assert not cluster.running()
    again = run_cli("status", env=env)  # restarts on demand, data intact
    assert again.returncode == 0, again.stderr
    engine = connect(cluster.url, migrate=False)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM model")).scalar() == "kept"
    engine.dispose()


def test_external_url_never_starts_a_cluster(engine, cli_env):  # engine: the schema is current
    result = run_cli("status", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert not Path(cli_env["SPATIALDB_HOME"]).exists()


def test_missing_postgis_is_one_clear_line(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    real = find_pg_bin()
    for tool in ("initdb", "pg_ctl", "postgres"):
        (fake_bin / tool).symlink_to(real / tool)
    sharedir = tmp_path / "share"
    (sharedir / "extension").mkdir(parents=True)
    (fake_bin / "pg_config").write_text(f"#!/bin/sh\necho {sharedir}\n")
    (fake_bin / "pg_config").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SPATIALDB_URL"}
    env.update(SPATIALDB_HOME=str(tmp_path / "home"), SPATIALDB_PG_BIN=str(fake_bin))
    result = run_cli("status", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "PostGIS is not installed" in result.stderr
    assert "apt-get install postgresql-15-postgis-3" in result.stderr
    assert not (tmp_path / "home" / "pgdata").exists()


def test_missing_server_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPATIALDB_URL"}
    env.update(SPATIALDB_HOME=str(tmp_path / "home"), SPATIALDB_PG_BIN=str(tmp_path))
    result = run_cli("db", "url", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "spatialdb: error: PostgreSQL server binaries not found; "
        "install it with: apt-get install postgresql-15-postgis-3"
    )
