"""The bad-input corpus (`tests/data/bad_inputs/cases.toml`), case by case: one clear error line
and a database unchanged row for row, or the documented repair stored valid inside the slide.

`ingest` and `compress` cases run as one `spatialdb` process per command (the model loads once);
`import` and `import-qupath` cases call the program's entry point in this process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from sqlalchemy import text

from spatialdb.cli.main import main
from spatialdb.store.catalog import delete_slide
from spatialdb.store.loader import RunWriter
from spatialdb.store.schema import OBJECT_TABLES
from tests.conftest import blobs, empty, make_slide
from tests.slides import SAMPLE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CORPUS = Path(__file__).parent / "data" / "bad_inputs"
CASES = tomllib.loads((CORPUS / "cases.toml").read_text())["case"]
BATCH_COMMANDS = ("ingest", "compress")
#: Post-processing in the ingest process itself: no worker processes to start for one tile.
OPTIONS = {"ingest": ["--workers", "0"], "compress": []}
ERROR = "spatialdb: error: "


def snapshot(engine) -> dict[str, tuple[int, str]]:
    """Row count and md5 of the ordered rows of every table (and partition) of the schema."""
    with engine.connect() as conn:
        tables = conn.execute(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') ORDER BY 1"
            )
        ).scalars()
        return {
            table: tuple(
                conn.execute(
                    text(
                        f"SELECT count(*), md5(coalesce(string_agg(r::text, '|' ORDER BY "
                        f"r::text), '')) FROM \"{table}\" r"
                    )
                ).one()
            )
            for table in tables
        }


def case_file(case: dict, folder: Path) -> Path:
    """The case's input: a corpus file, or one generated into `folder`."""
    generate = case.get("generate")
    if generate is None:
        return CORPUS / case["file"]
    if "flip" in generate:
        data = bytearray(SAMPLE.read_bytes())
        data[generate["flip"]["offset"]] ^= 1 << generate["flip"]["bit"]
        path = folder / f"{case['id']}.svs"
        path.write_bytes(bytes(data))
        return path
    path = folder / f"{case['id']}.geojson"
    # One ring of `vertices` positions, written in blocks (the text is some 60 MB).
    block = ",".join(f"[{10 + i % 200},{10 + i % 7}]" for i in range(10_000))
    with open(path, "w") as out:
        out.write('{"type":"FeatureCollection","features":[{"type":"Feature","geometry":')
        out.write('{"type":"Polygon","coordinates":[[')
        out.write(",".join([block] * (generate["vertices"] // 10_000)))
        out.write(']]},"properties":{"objectType":"detection"}}]}')
    return path


@pytest.fixture(scope="module")
def seeded(session_engine):
    """The database with one stored slide (`seed`, the target of import-qupath cases) and its
    objects; emptied of slides and models at the end."""
    with RunWriter(session_engine, make_slide("seed", 2000, 2000)) as run:
        run.add("nucleus", blobs(50, size=2000), "epithelial")
        run.commit()
    yield session_engine
    empty(session_engine)


@pytest.fixture(scope="module")
def batches(seeded, db_url, tmp_path_factory):
    """Per batch command: its finished process, its input per case id, and the database before
    and after. Inputs are copied under the case id, so that each error line names its case; the
    commands run at the same time."""
    env = {**os.environ, "SPATIALDB_URL": db_url}
    inputs = {}
    for command in BATCH_COMMANDS:
        folder = tmp_path_factory.mktemp(command)
        inputs[command] = {}
        for case in (c for c in CASES if c["command"] == command):
            source = case_file(case, folder)
            inputs[command][case["id"]] = folder / f"{case['id']}{source.suffix}"
            if source != inputs[command][case["id"]]:
                shutil.copy(source, inputs[command][case["id"]])
    before = snapshot(seeded)
    processes = {
        command: subprocess.Popen(
            [sys.executable, "-m", "spatialdb", command, *OPTIONS[command], *map(str, paths)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for command, paths in ((c, inputs[c].values()) for c in inputs)
    }
    stderr = {command: p.communicate()[1] for command, p in processes.items()}
    after = snapshot(seeded)
    return {c: (processes[c].returncode, stderr[c], inputs[c], before, after) for c in inputs}


def run_cli(capsys, db_url: str, *args: str) -> tuple[int, str, str]:
    code = main(["--db-url", db_url, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def in_process_args(case: dict, path: Path, folder: Path) -> list[str]:
    if case["command"] == "import-qupath":
        return ["import-qupath", str(path), "--slide", "seed", *case.get("options", [])]
    slide = CORPUS / case.get("slide", "slide.tif")
    if "slide_as" in case:
        slide = shutil.copy(slide, folder / case["slide_as"])
    return ["import", str(path), "--slide", str(slide), *case.get("options", [])]


def assert_stored_valid_inside(engine) -> None:
    for table in OBJECT_TABLES:
        with engine.connect() as conn:
            bad = conn.execute(
                text(
                    f"SELECT count(*) FROM {table} o JOIN slide s ON s.id = o.slide_id WHERE NOT "
                    "(ST_IsValid(o.geom) AND NOT ST_IsEmpty(o.geom) AND ST_CoveredBy(o.geom, "
                    "ST_MakeEnvelope(0, 0, s.width, s.height)))"
                )
            ).scalar_one()
        assert bad == 0, table


@pytest.mark.parametrize(
    "case", [c for c in CASES if c["command"] in BATCH_COMMANDS], ids=lambda c: c["id"]
)
def test_batch_case(batches, case):
    returncode, stderr, paths, before, after = batches[case["command"]]
    lines = stderr.strip().splitlines()
    assert returncode == 1
    assert lines[-1] == f"{ERROR}{len(paths)} of {len(paths)} slide(s) failed", stderr
    # Nothing but error lines and tiatoolbox's logged warnings: no traceback.
    assert all(line.startswith((ERROR, "WARNING ")) for line in lines), stderr
    own = [line for line in lines if f"{paths[case['id']]}:" in line]
    assert len(own) == 1 and case["error"] in own[0], own
    assert after == before


@pytest.mark.parametrize(
    "case", [c for c in CASES if c["command"] not in BATCH_COMMANDS], ids=lambda c: c["id"]
)
def test_in_process_case(seeded, db_url, capsys, tmp_path, case):
    path = case_file(case, tmp_path)
    before = snapshot(seeded)
    code, out, err = run_cli(capsys, db_url, *in_process_args(case, path, tmp_path))
    if "error" in case:
        assert code == 1 and err.count("\n") == 1 and err.startswith(ERROR), err
        assert case["error"] in err
        assert snapshot(seeded) == before
        return
    assert code == 0 and case["repair"] in out, (out, err)
    assert_stored_valid_inside(seeded)
    if case["command"] == "import":  # a new slide: without it the database is as it was
        with seeded.connect() as conn:
            new = conn.execute(text("SELECT id, name FROM slide WHERE name <> 'seed'")).one()
        assert new.name == Path(in_process_args(case, path, tmp_path)[3]).stem
        delete_slide(seeded, new.id)
        assert snapshot(seeded) == before


def test_class_names_with_sql_are_stored_literally(seeded, db_url, capsys):
    name = "x'); DROP TABLE nucleus; --"
    code, _, err = run_cli(
        capsys, db_url, "import-qupath", str(CORPUS / "sql_class.geojson"), "--slide", "seed"
    )
    assert code == 0, err
    with seeded.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT DISTINCT class FROM nucleus WHERE slide_id = "
                "(SELECT id FROM slide WHERE name = 'seed')"
            )
        ).scalars()
        assert list(stored) == [name]
        assert conn.execute(
            text("SELECT color FROM object_class WHERE name = :n"), {"n": name}
        ).scalar_one() == [1, 2, 3]
