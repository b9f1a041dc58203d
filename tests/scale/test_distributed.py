"""`spatialdb ingest --scheduler`: slides ingested on a real Dask cluster of worker processes."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from sqlalchemy import text

from spatialdb.pipeline.ingest import ingest_slide
from spatialdb.scale import dask_cluster
from tests.slides import tissue_image, write_pyramid
from tests.test_cli import assert_one_error_line, spatialdb

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    c = LocalCluster(n_workers=3, processes=True, threads_per_worker=1, dashboard_address=None)
    client = Client(c)
    yield c, client
    client.close()
    with contextlib.suppress(TimeoutError):  # Dask gives a worker 5 s to stop, then kills it
        c.close()


def test_slides_fan_out_to_workers_and_commit_like_the_serial_path(
    engine, cli_env, cluster, tmp_path
):
    address, client = cluster[0].scheduler_address, cluster[1]
    good = [
        write_pyramid(tmp_path / f"slide{k}.tiff", tissue_image(768, 768, seed=k), mpp=0.5)
        for k in range(3)
    ]
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n")
    result = spatialdb("ingest", *map(str, [*good[:2], bad, good[2]]), "--scheduler", address,
                       env=cli_env)  # fmt: skip

    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("spatialdb: error")]
    assert len(errors) == 2 and "notes.svs: not a readable slide" in errors[0], result.stderr
    assert errors[1] == "spatialdb: error: 1 of 4 slide(s) failed"
    for path in good:
        assert f"{path.name}: slide " in result.stdout

    with engine.connect() as conn:
        runs = conn.execute(
            text(
                "SELECT s.file_path, r.id, r.object_counts, r.started_at, r.finished_at "
                "FROM slide s JOIN run r ON r.id = s.current_run_id "
                "WHERE s.status = 'ready' AND r.status = 'complete' ORDER BY s.file_path"
            )
        ).all()
        assert [r.file_path for r in runs] == [str(p.resolve()) for p in good]
        for run in runs:
            for table, classes in run.object_counts.items():
                stored = conn.execute(
                    text(f"SELECT count(*) FROM {table} WHERE run_id = :r"), {"r": run.id}
                ).scalar_one()
                assert stored == sum(classes.values())
            assert sum(run.object_counts["nucleus"].values()) > 0
            features = conn.execute(
                text("SELECT run_id FROM slide_feature sf JOIN slide s ON s.id = sf.slide_id "
                     "WHERE s.file_path = :p"), {"p": run.file_path}
            ).scalar_one()  # fmt: skip
            assert features == run.id
    # The runs overlapped in time: the slides were loaded in parallel, not one after another.
    spans = sorted((r.started_at, r.finished_at) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    # Each worker that ingested a slide loaded the model once and kept it.
    loaded = client.run(lambda: len(dask_cluster._models))
    assert sorted(loaded.values())[-1] == 1 and sum(loaded.values()) >= 2

    # The serial path, on the same files, finds the same objects.
    from inference import weights
    from inference.engine import CerberusModel

    net, info = weights.load()
    model = CerberusModel(net, info), weights.DEFAULT_WEIGHTS
    for path, run in zip(good, runs, strict=True):
        serial = ingest_slide(engine, path, model, force=True, workers=0)
        assert serial.counts == run.object_counts


def test_an_unreachable_scheduler_is_one_line(engine, cli_env, tmp_path):
    path = write_pyramid(tmp_path / "slide.tiff", tissue_image(512, 512), mpp=0.5)
    result = spatialdb("ingest", str(path), "--scheduler", "tcp://127.0.0.1:9", env=cli_env)
    assert_one_error_line(result, "cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM slide")).scalar_one() == 0
