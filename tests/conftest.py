"""Test fixtures: a real PostGIS for the whole session.

By default a throwaway embedded cluster is created in a temporary directory (and removed at the
end); set SPATIALDB_TEST_URL to run against an existing PostGIS server instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import shapely
from sqlalchemy import text

from spatialdb.store.catalog import SlideRecord, delete_slide
from spatialdb.store.db import connect
from spatialdb.store.embedded import EmbeddedCluster

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    """The vendored headless QuPath for paquo, unless PAQUO_QUPATH_DIR names one already."""
    from tests.qupath import install

    install(Path(tempfile.mkdtemp(prefix="spatialdb-qupath-")))


@pytest.fixture(scope="session")
def db_url():
    url = os.environ.get("SPATIALDB_TEST_URL")
    if url:
        yield url
        return
    home = Path(tempfile.mkdtemp(prefix="spatialdb-test-"))
    cluster = EmbeddedCluster(home)
    url = cluster.ensure_running()
    yield url
    cluster.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def session_engine(db_url):
    engine = connect(db_url, migrate=True)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(session_engine):
    """The test database, emptied of slides and models after each test."""
    yield session_engine
    empty(session_engine)


def empty(engine) -> None:
    """Delete every slide (with its runs and objects) and every model."""
    with engine.connect() as conn:
        slide_ids = conn.execute(text("SELECT id FROM slide")).scalars().all()
    for slide_id in slide_ids:
        delete_slide(engine, slide_id)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM model"))


@pytest.fixture
def cli_env(db_url, tmp_path):
    """Environment for running the `spatialdb` program against the test database."""
    env = dict(os.environ)
    env["SPATIALDB_URL"] = db_url
    env["SPATIALDB_HOME"] = str(tmp_path / "unused-home")
    return env


def make_slide(name: str = "slide", width: int = 20_000, height: int = 20_000, mpp: float = 0.5):
    return SlideRecord(
        file_path=f"/data/{name}.svs",
        name=name,
        fingerprint=f"fp-{name}",
        width=width,
        height=height,
        mpp_x=mpp,
        mpp_y=mpp,
        level_count=3,
        objective_power=20.0,
        vendor="aperio",
    )


def blobs(n: int, seed: int = 0, size: int = 20_000) -> np.ndarray:
    """n non-overlapping-ish 20-gon nuclei with 3-8 px radius spread over a slide."""
    rng = np.random.default_rng(seed)
    angle = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    radius = rng.uniform(3, 8, (n, 1))
    centre = rng.uniform(10, size - 10, (n, 2))
    ring = np.stack(
        [centre[:, :1] + radius * np.cos(angle), centre[:, 1:] + radius * np.sin(angle)], -1
    )
    return shapely.polygons(ring)
