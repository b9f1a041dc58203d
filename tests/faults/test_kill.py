"""SIGKILL of `spatialdb ingest` at random points of every phase."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from tests.faults.conftest import (
    assert_consistent,
    group_gone,
    orphan_tables,
    run_ingest,
    slide_id_of,
    snapshot,
    start_ingest,
)

PHASES = ["read", "infer", "post-process", "load", "commit", "features"]
TRIALS = 24  # 4 aimed at each phase


@pytest.mark.timeout(2400)
def test_sigkill_at_random_points_leaves_no_partial_run(fault_engine, env, crops):
    slide = crops[0]
    # --force: an earlier fault test may have ingested this slide already, and an unchanged
    # slide is skipped after its read phase.
    first = start_ingest(env, "--force", str(slide))
    code, errors, _ = first.finish()
    assert code == 0, errors
    # The kill comes within the first 3/4 of how long each phase lasted in this run.
    delay = first.phase_durations()
    assert set(delay) == set(PHASES), delay
    slide_id = slide_id_of(fault_engine, slide)
    before = snapshot(fault_engine, slide_id)
    rng = random.Random(20261201)
    killed_in = Counter()
    for trial in range(TRIALS):
        aim = PHASES[trial % len(PHASES)]
        ingest = start_ingest(env, "--force", str(slide))
        assert ingest.wait_for_phase(aim), ingest.lines[-5:]
        time.sleep(rng.uniform(0, 0.75 * delay[aim]))
        reached = ingest.phases()[-1]
        if ingest.kill():
            killed_in[reached] += 1
        assert group_gone(ingest.process.pid), f"trial {trial}: workers outlived the ingest"

        current = assert_consistent(fault_engine, slide_id)
        after = snapshot(fault_engine, slide_id)
        if current == before["current"]:  # the previous run, untouched
            assert after["tables"] == before["tables"], f"trial {trial} ({reached})"
        else:  # killed after the commit: the new run is whole
            assert reached in ("commit", "features"), f"trial {trial}: new run after {reached}"
            before = after

    print(f"SIGKILLs by the phase they hit: {dict(killed_in)}; completed before the kill: "
          f"{TRIALS - sum(killed_in.values())}")  # fmt: skip
    assert sum(killed_in.values()) >= 20, killed_in
    assert set(killed_in) >= {"read", "infer", "post-process", "load", "commit"}, killed_in
    again = run_ingest(env, "--force", str(slide))
    assert again.returncode == 0, again.stderr
    final = assert_consistent(fault_engine, slide_id)
    assert final != before["current"]
    assert (
        snapshot(fault_engine, slide_id)["tables"]["nucleus"][0] == before["tables"]["nucleus"][0]
    )
    assert orphan_tables(fault_engine) == []  # the re-run's loader swept any left behind
