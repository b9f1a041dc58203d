"""The fault suite: its own PostGIS cluster (so that it can be stopped and restarted), small
slides cut from the bundled sample, and checks of what a reader can see after a fault.

Run it with `bash scripts/test.sh -m faults tests/faults` (CI does, after the default suite).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import text

from spatialdb.store.db import connect
from spatialdb.store.embedded import EmbeddedCluster
from spatialdb.store.schema import FEATURE_TABLES, OBJECT_TABLES
from tests.slides import SAMPLE, write_pyramid

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(item.fspath).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def cluster():
    home = Path(tempfile.mkdtemp(prefix="spatialdb-faults-"))
    cluster = EmbeddedCluster(home)
    cluster.ensure_running()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def fault_engine(cluster):
    engine = connect(cluster.url, migrate=True)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def env(cluster, tmp_path_factory):
    environment = dict(os.environ)
    environment["SPATIALDB_URL"] = cluster.url
    environment["SPATIALDB_HOME"] = str(tmp_path_factory.mktemp("unused-home"))
    return environment


@pytest.fixture(scope="session")
def crops(tmp_path_factory) -> list[Path]:
    """Seven small pyramidal TIFFs of real tissue (different regions of the sample, 2 x 2 model
    tiles each), so that their contents and fingerprints differ."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    folder = tmp_path_factory.mktemp("crops")
    reader = WSIReader.open(SAMPLE)
    mpp = float(reader.info.mpp[0])
    corners = [
        (700, 800), (1300, 800), (700, 1500), (1300, 1500), (700, 2100), (1300, 2100), (1000, 1150),
    ]  # fmt: skip
    return [
        write_pyramid(
            folder / f"crop{k}.tiff",
            reader.read_rect(corner, (740, 740), resolution=0, units="level"),
            mpp=mpp,
        )
        for k, corner in enumerate(corners)
    ]


@dataclass
class Ingest:
    """A running `spatialdb -v ingest` whose phase log lines are followed as they come."""

    process: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)
    ended: float | None = None  # when its stderr closed

    def __post_init__(self):
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()

    def _follow(self) -> None:
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
        self.ended = time.monotonic()

    def _phase_lines(self) -> list[tuple[float, str]]:
        """(time, phase) of each phase log line so far."""
        return [
            (at, line.split(": phase ")[1].split(":")[0])
            for at, line in self.lines
            if ": phase " in line
        ]

    def phases(self) -> list[str]:
        return [phase for _, phase in self._phase_lines()]

    def phase_durations(self) -> dict[str, float]:
        """Seconds from each phase's first log line to the next phase's (the last phase: to the
        end of the output), for an ingest that has finished."""
        starts: dict[str, float] = {}
        for at, phase in self._phase_lines():
            starts.setdefault(phase, at)
        ends = [*list(starts.values())[1:], self.ended]
        return {p: end - start for (p, start), end in zip(starts.items(), ends, strict=True)}

    def wait_for_phase(self, phase: str, timeout: float = 300) -> bool:
        """True once the ingest logged `phase`; False if it ended or timed out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if phase in self.phases():
                return True
            if self.process.poll() is not None:
                self._reader.join(5)
                return phase in self.phases()
            time.sleep(0.005)
        return False

    def kill(self) -> bool:
        """SIGKILL the ingest process; False if it had already exited."""
        if self.process.poll() is not None:
            return False
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(60)
        return True

    def finish(self, timeout: float = 600) -> tuple[int, list[str], str]:
        """(exit code, the stderr lines that are not log lines, stdout)."""
        stdout = self.process.stdout.read()
        code = self.process.wait(timeout)
        self._reader.join(10)
        errors = [
            line for _, line in self.lines
            if not line.startswith(("INFO ", "WARNING ", "DEBUG ")) and line.strip()
        ]  # fmt: skip
        return code, errors, stdout


def start_ingest(env: dict, *args: str) -> Ingest:
    process = subprocess.Popen(
        [sys.executable, "-m", "spatialdb", "-v", "ingest", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    return Ingest(process)


def run_ingest(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spatialdb", "ingest", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip


def group_gone(pgid: int, timeout: float = 30) -> bool:
    """Whether every process of the killed ingest's group (its post-processing workers too)
    has exited within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def slide_id_of(engine, path: Path) -> int | None:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT id FROM slide WHERE file_path = :p"), {"p": str(path.resolve())}
        ).scalar()


def snapshot(engine, slide_id: int) -> dict:
    """What a reader sees of a slide: its current run, run rows, and a digest of its objects and
    features per table."""
    digests = {}
    with engine.connect() as conn:
        current = conn.execute(
            text("SELECT current_run_id FROM slide WHERE id = :s"), {"s": slide_id}
        ).scalar()
        runs = conn.execute(
            text("SELECT id, status FROM run WHERE slide_id = :s ORDER BY id"), {"s": slide_id}
        ).all()
        for table in OBJECT_TABLES:
            digests[table] = conn.execute(
                text(
                    f"SELECT count(*), md5(string_agg(uuid::text || class || ST_AsEWKT(geom), "
                    f"',' ORDER BY uuid)) FROM {table} WHERE slide_id = :s"
                ),
                {"s": slide_id},
            ).one()
        for table in FEATURE_TABLES:
            digests[table] = conn.execute(
                text(f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM "
                     f"(SELECT * FROM {table} WHERE slide_id = :s) t"),
                {"s": slide_id},
            ).one()  # fmt: skip
    return {"current": current, "runs": [tuple(r) for r in runs], "tables": digests}


def assert_consistent(engine, slide_id: int) -> int:
    """The slide shows one complete run: exactly one run is 'complete' and current, every object
    row of the slide belongs to it and their counts are the run's recorded counts, and no lane
    table of a dead loader is attached. Returns the current run's id."""
    with engine.connect() as conn:
        current = conn.execute(
            text("SELECT current_run_id FROM slide WHERE id = :s"), {"s": slide_id}
        ).scalar()
        complete = conn.execute(
            text("SELECT id FROM run WHERE slide_id = :s AND status = 'complete'"), {"s": slide_id}
        ).scalars().all()  # fmt: skip
        assert complete == [current], (complete, current)
        recorded = conn.execute(
            text("SELECT object_counts FROM run WHERE id = :r"), {"r": current}
        ).scalar()
        for table in OBJECT_TABLES:
            by_run = dict(
                conn.execute(
                    text(f"SELECT run_id, count(*) FROM {table} WHERE slide_id = :s GROUP BY 1"),
                    {"s": slide_id},
                ).all()
            )
            expected = sum(recorded.get(table, {}).values())
            assert by_run == ({current: expected} if expected else {}), (table, by_run, expected)
    return current


def orphan_tables(engine) -> list[str]:
    """Lane tables that are not attached to any object table."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND NOT relispartition "
                "AND relnamespace = 'public'::regnamespace "
                "AND relname ~ '_s[0-9]+_r[0-9]+_l[0-9]+$'"
            )
        ).scalars().all()  # fmt: skip
