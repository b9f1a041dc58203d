"""PostgreSQL stopped (fast and immediate modes) and restarted in the middle of an ingest and of a
feature refresh; a dashboard Reader across the restart."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from benchmarks.synthetic import gland_slide, load_slide
from dashboard.data import Reader
from spatialdb import features
from tests.faults.conftest import (
    ROOT,
    assert_consistent,
    run_ingest,
    slide_id_of,
    snapshot,
    start_ingest,
)

PSYCOPG2_NOISE = ("psycopg2.errors.AdminShutdown: ", "The above exception was", "SystemError: <")


def restart(cluster, mode: str) -> None:
    assert cluster.stop(mode)
    cluster.ensure_running()


def wait_for_query(engine, fragment: str, timeout: float = 120) -> bool:
    """Wait until another session runs a statement containing `fragment`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            running = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND pid <> pg_backend_pid() AND position(:f in query) > 0"
                ),
                {"f": fragment},
            ).scalar()
        if running:
            return True
        time.sleep(0.02)
    return False


def database_errors(errors: list[str]) -> list[str]:
    return [line for line in errors if line.startswith("spatialdb: error: ")]


@pytest.mark.parametrize(
    ("mode", "phase"), [("fast", "post-process"), ("immediate", "load"), ("immediate", "infer")]
)
def test_ingest_across_a_restart_fails_cleanly_and_a_retry_succeeds(
    fault_engine, cluster, env, crops, mode, phase
):
    slide = crops[1]
    first = run_ingest(env, "--force", str(slide))
    assert first.returncode == 0, first.stderr
    slide_id = slide_id_of(fault_engine, slide)
    before = snapshot(fault_engine, slide_id)

    ingest = start_ingest(env, "--force", str(slide))
    assert ingest.wait_for_phase(phase)
    restart(cluster, mode)
    code, errors, _ = ingest.finish()
    reached = ingest.phases()[-1]
    if reached != "features":  # the run had not been committed when the server went away
        assert code == 1
        assert database_errors(errors) == errors, errors  # no traceback, no pool noise
        assert "the database connection was lost" in errors[0], errors
        assert "nothing of this ingest was stored" in errors[0]
        assert errors[1:] == ["spatialdb: error: 1 of 1 slide(s) failed"]
        assert snapshot(fault_engine, slide_id) == before
    assert_consistent(fault_engine, slide_id)

    retry = run_ingest(env, "--force", str(slide))
    assert retry.returncode == 0, retry.stderr
    assert assert_consistent(fault_engine, slide_id) != before["current"]


@pytest.fixture(scope="module")
def feature_slide(fault_engine):
    """A synthetic slide whose feature refresh takes long enough to be interrupted."""
    slide_id = load_slide(
        fault_engine, "refresh", gland_slide(glands=3_000, lumina=4_000, nuclei=300_000)
    )
    features.refresh(fault_engine, slide_id)
    return slide_id


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_feature_refresh_across_a_restart_keeps_the_old_features(
    fault_engine, cluster, env, feature_slide, mode
):
    before = snapshot(fault_engine, feature_slide)
    assert before["tables"]["gland_feature"][0] == 3_000
    refresh = subprocess.Popen(
        [sys.executable, "-m", "spatialdb", "features", "refresh", str(feature_slide)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert wait_for_query(fault_engine, "gland_features("), "the refresh never ran"
    restart(cluster, mode)
    _, stderr = refresh.communicate(timeout=300)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert refresh.returncode == 1
    assert lines[-1].startswith("spatialdb: error: the database connection was lost"), stderr
    assert [line for line in lines if line.startswith("spatialdb: ")] == lines[-1:]
    # A fast shutdown that interrupts a COPY makes psycopg2's C code print the server's
    # message and its own SystemError (no traceback): the only lines allowed besides ours.
    assert all(line.startswith(PSYCOPG2_NOISE) for line in lines[:-1]), stderr
    assert snapshot(fault_engine, feature_slide) == before

    retry = subprocess.run(
        [sys.executable, "-m", "spatialdb", "features", "refresh", str(feature_slide)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert retry.returncode == 0, retry.stderr
    after = snapshot(fault_engine, feature_slide)
    assert after["tables"]["gland_feature"] == before["tables"]["gland_feature"]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_dashboard_reader_recovers_after_a_restart(cluster, feature_slide, mode):
    reader = Reader(cluster.url)
    names = reader.cohort()["name"].tolist()
    assert "benchmark-refresh" in names
    restart(cluster, mode)
    assert reader.cohort()["name"].tolist() == names  # the same Reader: no dashboard restart
    reader.engine.dispose()
