"""Faults on a real Citus cluster (scripts/citus.sh, a coordinator and two workers of its own): the
worker that holds a slide stopped in immediate mode at chosen points of a load and of a feature
refresh, and a third worker added and the shards rebalanced while dashboard reads run.

A stopped worker must give one error line and exit 1, leave nothing of the command visible on
the coordinator (before and after the worker is back) and the command must succeed when run again
once it is back.
"""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from benchmarks.synthetic import gland_slide, load_slide
from dashboard.data import Box, Reader, Unavailable
from spatialdb.features.refresh import refresh
from spatialdb.store.db import connect
from spatialdb.store.schema import OBJECT_TABLES
from tests.citus import VENDOR, CitusCluster
from tests.faults.conftest import assert_consistent, run_ingest, slide_id_of
from tests.faults.test_restart import (
    INGEST,
    INGEST_LOST,
    LOST,
    REFRESH,
    Case,
    database_state,
    spatialdb,
    stopped,
)

CASES = [
    Case("load-copy-in", INGEST, "copy-in", "FROM STDIN", INGEST_LOST),
    Case("load-commit", INGEST, "commit", "UPDATE slide SET current_run_id", INGEST_LOST),
    Case("refresh-sql-function", REFRESH, "before", "gland_features("),
    Case("refresh-commit", REFRESH, "commit", "slide_feature"),
]


@pytest.fixture(scope="module")
def citus(crops, tmp_path_factory):
    """A cluster with the schema distributed, a crop ingested and a synthetic slide with
    features; `places` as tests/faults/test_restart.py names them."""
    if not VENDOR.is_dir():
        pytest.skip(f"no Citus source at {VENDOR}")
    cluster = CitusCluster()
    try:
        url = cluster.start()
        env = {
            **cluster.env,
            "SPATIALDB_URL": url,
            "SPATIALDB_HOME": str(tmp_path_factory.mktemp("unused-home")),
        }
        upgraded = spatialdb(env, "db", "upgrade", "--citus")
        assert upgraded.returncode == 0, upgraded.stderr
        engine = connect(url)
        crop = crops[2]
        ingested = run_ingest(env, str(crop))
        assert ingested.returncode == 0, ingested.stderr
        slide = load_slide(engine, "citus", gland_slide(glands=400, lumina=500, nuclei=40_000))
        refresh(engine, slide)
        places = {"crop": str(crop), "slide": str(slide), "small": str(slide_id_of(engine, crop))}
        yield SimpleNamespace(cluster=cluster, url=url, env=env, engine=engine, places=places)
        engine.dispose()
    finally:
        cluster.remove()


def worker_of(engine, slide_id: int) -> int:
    """The number of the worker holding the slide's nucleus shard (1, 2, ...)."""
    with engine.connect() as conn:
        port, coordinator = conn.execute(
            text(
                "SELECT n.nodeport, (SELECT nodeport FROM pg_dist_node WHERE groupid = 0) "
                "FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) "
                "WHERE p.shardid = get_shard_id_for_distribution_column('nucleus', :s)"
            ),
            {"s": slide_id},
        ).one()
    return port - coordinator


def reference_rows(engine) -> dict:
    """What the coordinator answers alone (its copy of the reference tables), a worker down."""
    with engine.connect() as conn:
        return {
            "slides": conn.execute(
                text("SELECT id, current_run_id, status FROM slide ORDER BY id")
            ).all(),
            "runs": conn.execute(text("SELECT id, status FROM run ORDER BY id")).all(),
        }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_worker_stopped_here_gives_one_line_and_leaves_nothing(citus, tmp_path, case):
    places = citus.places
    args = [a.format(**places) for a in case.args]
    target = int(places["small" if "{crop}" in case.args else "slide"])
    worker = worker_of(citus.engine, target)
    before, catalogue = database_state(citus.engine, places), reference_rows(citus.engine)

    command = stopped(citus.env, tmp_path / "pause", case, args)
    try:
        citus.cluster.stop_worker(worker, "immediate")
    finally:
        (tmp_path / "pause" / "go").touch()
        _, stderr = command.communicate(timeout=600)
    try:
        lost = rf"the connection to Citus worker 127\.0\.0\.1:{citus.cluster.worker_port(worker)} "
        lost += r"was lost \(.+\)"
        expected = [
            line.replace(LOST, lost).format(path=re.escape(places["crop"])) for line in case.lines
        ]
        lines = stderr.splitlines()
        assert command.returncode == 1, stderr
        assert len(lines) == len(expected), stderr
        for line, pattern in zip(lines, expected, strict=True):
            assert re.fullmatch(pattern, line), stderr
        assert reference_rows(citus.engine) == catalogue  # nothing new, the worker still down
    finally:
        citus.cluster.start()
        citus.engine.dispose()  # its sessions held connections to the stopped worker
    assert database_state(citus.engine, places) == before
    assert_consistent(citus.engine, int(places["small"]))
    retry = spatialdb(citus.env, *args)
    assert retry.returncode == 0, retry.stderr
    assert "error" not in retry.stderr, retry.stderr


def table_counts(engine) -> dict[str, int]:
    """Rows of every distributed and reference table."""
    with engine.connect() as conn:
        tables = conn.execute(
            text("SELECT logicalrelid::text FROM pg_dist_partition ORDER BY 1")
        ).scalars().all()  # fmt: skip
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}


def dashboard_answers(reader: Reader, slides: list[int]) -> tuple:
    """What the dashboard asks of the cohort and of each slide's view and features."""
    answers = [sorted(reader.cohort()["name"])]
    for slide in slides:
        run = reader.current_run(slide)
        box = Box(0, 0, 4000, 4000)
        answers += [
            run,
            {t: reader.count_in(t, slide, run, box, limit=10**7) for t in OBJECT_TABLES},
            len(reader.objects_in("nucleus", slide, run, Box(0, 0, 800, 800), 0.5, 10**6)[0]),
            len(reader.gland_features([slide])),
        ]
    return tuple(answers)


def concurrent_answers(reader: Reader, slides: list[int], threads: int = 3) -> list:
    """The dashboard's answers (or the error raised) in `threads` sessions at once."""
    results: list = [None] * threads

    def read(i: int) -> None:
        try:
            results[i] = dashboard_answers(reader, slides)
        except Exception as exc:
            results[i] = exc

    running = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(120)
    return results


def test_the_dashboard_reads_on_across_a_worker_restart(citus):
    """Pooled coordinator sessions keep connections to the workers; after a worker restarts those
    are dead. Every dashboard read after the restart must still answer, and one while the worker
    is down must name it."""
    slides = [int(citus.places["small"]), int(citus.places["slide"])]
    worker = worker_of(citus.engine, slides[1])
    reader = Reader(citus.url)
    try:
        expected = dashboard_answers(reader, slides)
        assert concurrent_answers(reader, slides) == [expected] * 3  # three pooled sessions

        citus.cluster.stop_worker(worker, "immediate")
        citus.cluster.start()
        assert concurrent_answers(reader, slides) == [expected] * 3

        citus.cluster.stop_worker(worker, "immediate")
        try:
            with pytest.raises(Unavailable) as down:
                dashboard_answers(reader, slides)
        finally:
            citus.cluster.start()
        port = citus.cluster.worker_port(worker)
        assert re.fullmatch(
            rf"the connection to Citus worker 127\.0\.0\.1:{port} was lost \(.+\)", str(down.value)
        ), down.value
        assert dashboard_answers(reader, slides) == expected
    finally:
        reader.engine.dispose()
        citus.engine.dispose()


@pytest.mark.timeout(900)
def test_a_third_worker_added_and_rebalanced_under_dashboard_reads(citus):
    slides = [int(citus.places["small"]), int(citus.places["slide"])]
    counts = table_counts(citus.engine)
    reader = Reader(citus.url)
    expected = dashboard_answers(reader, slides)
    done, answered, failures = threading.Event(), [], []

    def read() -> None:
        while not done.is_set():
            try:
                answered.append(dashboard_answers(reader, slides) == expected)
            except Exception as exc:
                failures.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        citus.cluster.start(workers=3)
        started = time.monotonic()
        # Autocommit: the background job only runs once the transaction that schedules it ends.
        with citus.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SELECT citus_rebalance_start()"))
            conn.execute(text("SELECT citus_rebalance_wait()"))
        took = time.monotonic() - started
        time.sleep(1)  # reads after the moves too
    finally:
        done.set()
        for thread in readers:
            thread.join(120)
    reader.engine.dispose()

    with citus.engine.connect() as conn:
        placed = dict(
            conn.execute(
                text(
                    "SELECT n.nodeport - :c, count(*) FROM pg_dist_placement p "
                    "JOIN pg_dist_node n USING (groupid) JOIN pg_dist_shard s USING (shardid) "
                    "JOIN pg_dist_partition d USING (logicalrelid) "
                    "WHERE d.partmethod = 'h' AND n.groupid <> 0 GROUP BY 1"
                ),
                {"c": citus.cluster.port},
            ).all()
        )
    print(f"rebalance onto a third worker: {took:.1f} s, hash shards per worker {placed}, "
          f"{len(answered)} dashboard reads during it")  # fmt: skip
    assert failures == []
    assert len(answered) >= 4 and all(answered)
    assert set(placed) == {1, 2, 3} and placed[3] > 0  # shards moved onto the new worker
    assert table_counts(citus.engine) == counts
    for slide in slides:
        assert worker_of(citus.engine, slide) in placed
    assert dashboard_answers(Reader(citus.url), slides) == expected
