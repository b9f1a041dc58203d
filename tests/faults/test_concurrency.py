"""Ingests at once from several processes, and dashboard reads while a slide is re-ingested."""

from __future__ import annotations

import json
import subprocess
import sys

from dashboard.data import Box, Reader
from dashboard.overlay import fetch_layers
from tests.faults.conftest import ROOT, assert_consistent, slide_id_of, start_ingest

LAYERS = ["tissue_region", "gland", "lumen", "nucleus"]


def test_four_slides_at_once_and_one_slide_twice_at_once(fault_engine, env, crops):
    slides, twice = crops[2:5] + crops[:1], crops[5]
    jobs = [start_ingest(env, "--workers", "0", str(s)) for s in slides]
    jobs += [start_ingest(env, "--workers", "0", "--force", str(twice)) for _ in range(2)]
    results = [job.finish() for job in jobs]
    for code, errors, _ in results:
        assert code == 0, errors
    for slide in slides:
        assert_consistent(fault_engine, slide_id_of(fault_engine, slide))
    doubled = slide_id_of(fault_engine, twice)
    current = assert_consistent(fault_engine, doubled)
    with fault_engine.connect() as conn:
        runs = conn.exec_driver_sql(
            "SELECT id, status FROM run WHERE slide_id = %s ORDER BY id", (doubled,)
        ).all()
    # Both ingests committed; the later commit is current, the other superseded.
    assert [status for _, status in runs] == ["superseded", "complete"]
    assert runs[-1][0] == current


def test_dashboard_reads_during_an_ingest_see_one_run(fault_engine, cluster, env, crops, tmp_path):
    slide = crops[3]
    # The current run before the ingest: ten imported nuclei, so that the old and the new run
    # differ in every layer and a view mixing them would show in its counts.
    few = tmp_path / "few.geojson"
    few.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[x, 10], [x + 20, 10], [x + 20, 30], [x, 30], [x, 10]]]},
         "properties": {"objectType": "detection", "classification": {"name": "epithelial"}}}
        for x in range(10, 400, 40)
    ]}))  # fmt: skip
    imported = subprocess.run(
        [sys.executable, "-m", "spatialdb", "import", str(few), "--slide", str(slide)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    slide_id = slide_id_of(fault_engine, slide)
    old_run = assert_consistent(fault_engine, slide_id)

    reader = Reader(cluster.url)
    width, height = 740, 740
    box, scale = Box(0, 0, width, height), 1024 / 740
    ingest = start_ingest(env, "--workers", "0", str(slide))
    views = []
    while ingest.process.poll() is None:
        run_id, fetched = fetch_layers(reader, slide_id, LAYERS, box, scale)
        views.append((run_id, {t: len(objects[1]) for t, (_, objects) in fetched.items()}))
    code, errors, _ = ingest.finish()
    assert code == 0, errors
    new_run = assert_consistent(fault_engine, slide_id)
    views.append((new_run, {t: len(o[1]) for t, (_, o) in fetch_layers(
        reader, slide_id, LAYERS, box, scale)[1].items()}))  # fmt: skip
    reader.engine.dispose()

    with fault_engine.connect() as conn:
        recorded = dict(conn.exec_driver_sql(
            "SELECT id, object_counts FROM run WHERE id IN (%s, %s)", (old_run, new_run)
        ).all())  # fmt: skip
    expected = {
        run: {t: sum(counts.get(t, {}).values()) for t in LAYERS}
        for run, counts in recorded.items()
    }
    assert expected[old_run] != expected[new_run]
    for run_id, counts in views:
        assert run_id in (old_run, new_run)
        assert counts == expected[run_id], (run_id, counts)
    seen = {run_id for run_id, _ in views}
    assert seen == {old_run, new_run}, f"{len(views)} views did not span the swap"
