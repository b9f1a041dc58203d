"""PostgreSQL stopped (fast and immediate modes) and restarted at chosen points of every command
that writes or streams: ingest, import, feature refresh, the feature and QuPath exports, compress.

Each command runs under `tests.faults.pause`, which stops it at one point of its database traffic
(before a statement, inside COPY in or out, inside a server-side cursor, at a commit); for a point
inside an SQL function the test also locks a table the function reads, so that the statement
waits inside the server. The server is restarted there, the command goes on, and then it must
print exactly its one error line (plus the failed-slides summary of ingest and compress), exit 1,
leave the database as it was (or, where its run was committed before the fault, that run whole)
and no output file, and succeed when run again as its message says.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from benchmarks.synthetic import gland_slide, load_slide
from dashboard.data import Reader
from spatialdb.errors import DatabaseUnavailable
from spatialdb.features.refresh import refresh
from spatialdb.store.catalog import delete_slide
from tests.faults.conftest import (
    ROOT,
    assert_consistent,
    run_ingest,
    slide_id_of,
    snapshot,
)

MODES = ("fast", "immediate")
LOST = r"the database connection was lost \(.+\)"
STORED_NOTHING = "nothing of this {work} was stored: run it again"
COMMAND_LOST = rf"spatialdb: error: {LOST}; " + STORED_NOTHING.format(
    work="command's unfinished work"
)
SLIDE_LOST = rf"spatialdb: error: {{path}}: {LOST}; " + STORED_NOTHING
FEATURES_LOST = (
    r"spatialdb: error: {path}: stored as slide {slide}, but computing its features failed "
    r"\(.+\); retry with: spatialdb features refresh {slide}"
)
ONE_FAILED = r"spatialdb: error: 1 of 1 slide\(s\) failed"


@dataclass(frozen=True)
class Case:
    """A command, the point it is stopped at, and what it must print after the restart."""

    name: str
    args: tuple[str, ...]  # placeholders: {crop} {fresh} {geojson} {slide} {small} {out}
    point: str
    match: str
    lines: tuple[str, ...] = (COMMAND_LOST,)
    lock: str | None = None  # locked after the stop: the statement then waits inside the server
    committed: bool = False  # the run was committed before the fault; the retry is the message's


INGEST = ("ingest", "--force", "{crop}")
INGEST_LOST = (SLIDE_LOST.replace("{work}", "ingest"), ONE_FAILED)
IMPORT = ("import", "{geojson}", "--slide", "{crop}")
REFRESH = ("features", "refresh", "{slide}")
GLANDS = ("features", "export", "--level", "gland", "--slide", "{slide}")
# fmt: off
CASES = [
    # The connection idle in its transaction, as it is while the model runs.
    Case("ingest-idle-before-copy", INGEST, "before", "FROM STDIN", INGEST_LOST),
    Case("ingest-copy-in", INGEST, "copy-in", "FROM STDIN", INGEST_LOST),
    Case("ingest-commit-of-a-lane", INGEST, "commit", "CREATE INDEX", INGEST_LOST),
    Case("ingest-commit-of-the-swap", INGEST, "commit", "ATTACH PARTITION", INGEST_LOST),
    Case(
        "ingest-features-sql-function", INGEST, "before", "gland_features(",
        (FEATURES_LOST, ONE_FAILED), lock="lumen", committed=True,
    ),
    Case("import-copy-in", IMPORT, "copy-in", "FROM STDIN"),
    Case("import-commit", IMPORT, "commit", "ATTACH PARTITION"),
    Case("refresh-sql-function", REFRESH, "before", "gland_features(", lock="lumen"),
    Case("refresh-copy-out", REFRESH, "copy-out", "gland_features("),
    Case("refresh-copy-in", REFRESH, "copy-in", "COPY gland_feature FROM"),
    Case("refresh-commit", REFRESH, "commit", "slide_feature"),
    Case("export-csv-copy-out", (*GLANDS, "-o", "{out}/glands.csv"), "copy-out", "gland_feature"),
    Case(
        "export-parquet-cursor", (*GLANDS, "--format", "parquet", "-o", "{out}/glands.parquet"),
        "fetch", "gland_feature",
    ),
    Case(
        "export-nuclei-sql-function",
        ("features", "export", "--level", "nucleus", "--slide", "{small}", "-o", "{out}/n.csv"),
        "before", "nucleus_features(", lock="tissue_region",
    ),
    Case(
        "export-qupath-cursor", ("export-qupath", "{out}", "--slide", "{slide}"),
        "fetch", '"nucleus"',
    ),
    Case(
        "compress-idle-before-insert", ("compress", "{fresh}"), "before", "slide_embedding",
        (SLIDE_LOST.replace("{work}", "compression"), ONE_FAILED),
    ),
    Case(
        "compress-commit", ("compress", "{fresh}"), "commit", "slide_embedding",
        (SLIDE_LOST.replace("{work}", "compression"), ONE_FAILED),
    ),
]
# fmt: on


def restart(cluster, mode: str, meanwhile=None) -> None:
    """Stop the server and start it again; `meanwhile` runs once the stop has been asked for,
    while the server shuts down."""
    with ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(cluster.stop, mode)
        if meanwhile is not None:
            time.sleep(0.5)  # the backends have their signal
            meanwhile()
        try:
            assert stopping.result()
        except DatabaseUnavailable as exc:  # which server processes did not stop, and where
            processes = subprocess.run(
                ["ps", "-o", "pid,stat,wchan:24,args", "-u", "spatialdb"],
                capture_output=True, text=True,
            )  # fmt: skip
            raise AssertionError(f"{exc}\n{processes.stdout}") from exc
    cluster.ensure_running()


def spatialdb(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spatialdb", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def places(fault_engine, env, crops, tmp_path_factory) -> dict:
    """What the cases' placeholders stand for: an ingested crop, a crop never stored, a GeoJSON
    of nuclei on the crop, the synthetic feature slide, a small slide with features."""
    crop, fresh = crops[1], crops[6]
    ingested = run_ingest(env, "--force", str(crop))
    assert ingested.returncode == 0, ingested.stderr
    folder = tmp_path_factory.mktemp("restart")
    geojson = folder / "nuclei.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[x, y], [x + 9, y], [x + 9, y + 9], [x, y + 9], [x, y]]]},
         "properties": {"objectType": "detection", "classification": {"name": "epithelial"}}}
        for x in range(10, 700, 20) for y in range(10, 700, 20)
    ]}))  # fmt: skip
    slide_id = load_slide(
        fault_engine, "refresh", gland_slide(glands=3_000, lumina=4_000, nuclei=300_000)
    )
    refresh(fault_engine, slide_id)
    return {
        "crop": str(crop), "fresh": str(fresh), "geojson": str(geojson), "slide": str(slide_id),
        "small": str(slide_id_of(fault_engine, crop)),
    }  # fmt: skip


def stopped(env: dict, folder: Path, case: Case, args: list[str]) -> subprocess.Popen:
    """The case's command, once it has stopped at its point."""
    folder.mkdir()
    command = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.pause", str(folder), case.point, case.match, "--",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not (folder / "paused").exists():
        if command.poll() is not None or time.monotonic() > deadline:
            command.kill()
            out, err = command.communicate()
            pytest.fail(f"{case.name} never reached {case.point} {case.match!r}:\n{out}\n{err}")
        time.sleep(0.01)
    return command


def wait_for_lock(engine, fragment: str, timeout: float = 60) -> None:
    """Until another session's statement containing `fragment` waits for a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND pid <> pg_backend_pid() AND position(:f in query) > 0"
                ),
                {"f": fragment},
            ).scalar()
        if waiting:
            return
        time.sleep(0.01)
    pytest.fail(f"no statement with {fragment!r} came to wait for the lock")


def database_state(engine, places: dict) -> dict:
    """What the cases may not change: the stored slides, and everything of the two they write."""
    with engine.connect() as conn:
        slides = conn.execute(text("SELECT id, file_path, current_run_id FROM slide ORDER BY id"))
        embeddings = conn.execute(
            text("SELECT slide_id, md5(embeddings) FROM slide_embedding ORDER BY 1, 2")
        )
        state = {"slides": slides.all(), "embeddings": embeddings.all()}
    for key in ("small", "slide"):
        state[key] = snapshot(engine, int(places[key]))
    return state


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_restart_at_this_point_prints_one_line_and_stores_nothing(
    fault_engine, cluster, env, places, tmp_path, case, mode
):
    out = tmp_path / "out"
    out.mkdir()
    fresh_id = slide_id_of(fault_engine, Path(places["fresh"]))
    if fresh_id is not None:  # stored by the previous mode's retry: a never-stored slide again
        delete_slide(fault_engine, fresh_id)
    args = [a.format(**places, out=out) for a in case.args]
    before = database_state(fault_engine, places)

    go, holder = tmp_path / "pause" / "go", None
    command = stopped(env, tmp_path / "pause", case, args)
    try:
        if case.lock:
            holder = fault_engine.raw_connection()  # fails, not waits, on the command's locks
            holder.cursor().execute("SET lock_timeout = '10s'")
            holder.cursor().execute(f"LOCK TABLE {case.lock} IN ACCESS EXCLUSIVE MODE")
            go.touch()
            wait_for_lock(fault_engine, case.match)
        # A backend ending with rows for a client that reads none blocks on sending its last
        # message with interrupts held, and the shutdown waits for it: inside a COPY out, the
        # command reads on as soon as the server has been told to stop.
        restart(cluster, mode, meanwhile=go.touch if case.point == "copy-out" else None)
    finally:  # the command goes on (and the next test finds no stopped client) in any case
        go.touch()
        _, stderr = command.communicate(timeout=600)
        if holder is not None:
            holder.invalidate()

    expected = [
        line.format(path=re.escape(places["crop"] if "{crop}" in case.args else places["fresh"]),
                    slide=places["small"])
        for line in case.lines
    ]  # fmt: skip
    lines = stderr.splitlines()
    assert command.returncode == 1, stderr
    assert len(lines) == len(expected), stderr
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), stderr
    assert list(out.iterdir()) == []  # no export, whole or partial
    after = database_state(fault_engine, places)
    if case.committed:  # the new run whole, without features until they are refreshed
        slide_id = int(places["small"])
        assert assert_consistent(fault_engine, slide_id) != before["small"]["current"]
        assert after["small"]["tables"]["slide_feature"][0] == 0
        retry = spatialdb(env, "features", "refresh", places["small"])
    else:
        assert after == before
        retry = spatialdb(env, *args)
    assert retry.returncode == 0, retry.stderr
    assert "error" not in retry.stderr, retry.stderr


@pytest.mark.parametrize("mode", MODES)
def test_a_dashboard_reader_recovers_after_a_restart(cluster, places, mode):
    reader = Reader(cluster.url)
    names = reader.cohort()["name"].tolist()
    assert "benchmark-refresh" in names
    restart(cluster, mode)
    assert reader.cohort()["name"].tolist() == names  # the same Reader: no dashboard restart
    reader.engine.dispose()
