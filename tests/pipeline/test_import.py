"""`spatialdb import`: Cerberus `.dat` and GeoJSON results into a run of kind `import`."""

from __future__ import annotations

import json
import subprocess
import sys

import joblib
import numpy as np
import pytest
from sqlalchemy import text

from tests.slides import SAMPLE

MPP = 0.499  # the sample slide's level 0


def spatialdb(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "spatialdb", *args], capture_output=True, text=True, env=env
    )


def ellipse(cx, cy, rx, ry, n=24):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def cerberus_dat(path, nuclei, glands):
    """A `.dat` as Cerberus writes it: contours at 0.5 µm/px, `resolution` entry, type indices."""

    def entry(contour, kind, prob):
        return {
            "box": np.r_[contour.min(0), contour.max(0)].astype(int),
            "centroid": contour.mean(0),
            "contour": contour.astype(np.int32),
            "type": kind,
            "type_prob": prob,
        }

    data = {
        "Nuclei": {f"n{i}": entry(c, k, 0.9) for i, (c, k) in enumerate(nuclei)},
        "Gland": {f"g{i}": entry(c, 1, 0.8) for i, c in enumerate(glands)},
        "Lumen": {},
        "resolution": {"resolution": 0.5, "units": "mpp"},
    }
    joblib.dump(data, path)
    return path


def test_dat_round_trip_keeps_counts_classes_and_areas(engine, cli_env, tmp_path):
    rng = np.random.default_rng(0)
    nuclei = [
        (ellipse(*rng.uniform(50, 1000, 2), 6, 4), int(rng.choice([2, 3, 6]))) for _ in range(200)
    ]
    glands = [ellipse(600, 700, 120, 80, n=64)]
    dat = cerberus_dat(tmp_path / "sample.dat", nuclei, glands)
    result = spatialdb("import", str(dat), "--slide", str(SAMPLE), env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "nucleus 200" in result.stdout and "gland 1" in result.stdout

    with engine.connect() as conn:
        run = conn.execute(text("SELECT kind, parameters FROM run")).one()
        classes = dict(conn.execute(text("SELECT class, count(*) FROM nucleus GROUP BY 1")).all())
        area = conn.execute(text("SELECT sum(area_um2) FROM nucleus")).scalar_one()
        gland = conn.execute(text("SELECT class, area_um2, probability FROM gland")).one()
    assert run.kind == "import" and run.parameters["format"] == "cerberus-dat"
    names = {2: "epithelial", 3: "lymphocyte", 6: "connective"}
    expected = {}
    for _, k in nuclei:
        expected[names[k]] = expected.get(names[k], 0) + 1
    assert classes == expected
    # Contours at 0.5 µm/px: an area in µm² independent of the slide's 0.499 µm/px.
    true_area = sum(0.5**2 * _shoelace(c.astype(np.int32)) for c, _ in nuclei)
    assert area == pytest.approx(true_area, rel=0.01)
    assert gland[0] == "gland"
    assert gland[1] == pytest.approx(np.pi * 120 * 80 * 0.25, rel=0.02)
    assert gland[2] == pytest.approx(0.8)


def _shoelace(c):
    x, y = c[:, 0].astype(float), c[:, 1].astype(float)
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_qupath_geojson_goes_to_the_tables_its_classes_name(engine, cli_env, tmp_path):
    def feature(coords, name, object_type="detection"):
        ring = [*coords.tolist(), coords[0].tolist()]
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": object_type, "classification": {"name": name}},
        }

    features = [feature(ellipse(300 + 20 * i, 300, 6, 5), "Tumor") for i in range(5)]
    features.append(feature(ellipse(800, 800, 100, 60), "Gland"))
    features.append(feature(ellipse(800, 800, 20, 10), "Lumen"))
    features.append(feature(ellipse(1000, 1500, 400, 300), "stroma", "annotation"))
    features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}})
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    result = spatialdb("import", str(path), "--slide", str(SAMPLE), env=cli_env)
    assert result.returncode == 0, result.stderr
    with engine.connect() as conn:
        counts = {
            t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
            for t in ("nucleus", "gland", "lumen", "tissue_region")
        }
        tumour = conn.execute(text("SELECT DISTINCT class FROM nucleus")).scalar_one()
    assert counts == {"nucleus": 5, "gland": 1, "lumen": 1, "tissue_region": 1}
    assert tumour == "Tumor"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json at all", "not a GeoJSON file"),
        (b'{"type": "Topology"}', "not a GeoJSON FeatureCollection"),
        (
            b'{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
            b'{"type": "Polygon", "coordinates": [[[90000, 90000], [90010, 90000], '
            b'[90010, 90010], [90000, 90000]]]}, "properties": {}}]}',
            "lie outside the 2220 x 2967 slide",
        ),
    ],
)
def test_bad_results_are_one_line_and_store_nothing(engine, cli_env, tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_bytes(content)
    result = spatialdb("import", str(path), "--slide", str(SAMPLE), env=cli_env)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("spatialdb:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM slide")).scalar_one() == 0


def test_a_file_that_is_not_a_dat_is_refused(engine, cli_env, tmp_path):
    path = tmp_path / "x.dat"
    path.write_bytes(b"\x00garbage")
    result = spatialdb("import", str(path), "--slide", str(SAMPLE), env=cli_env)
    assert result.returncode == 1 and "not a Cerberus .dat file" in result.stderr
