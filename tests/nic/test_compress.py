"""Neural Image Compression: grids line up with the tissue, travel through the database, and a
slide-level CNN learns from them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import text

from inference import slide_model
from inference.compress import CELL_PX, compress_slide
from inference.slide import open_slide, tissue_mask
from spatialdb.nic.embeddings import export_npy, load_grids, store_grid
from spatialdb.pipeline.ingest import ingest_slide
from spatialdb.store.catalog import upsert_slide
from tests.conftest import make_slide
from tests.slides import tissue_image, write_pyramid
from tests.test_cli import assert_one_error_line, spatialdb

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    from inference import weights
    from inference.engine import CerberusModel

    net, info = weights.load()
    return CerberusModel(net, info, embeddings=True), weights.DEFAULT_WEIGHTS


def test_grid_cells_line_up_with_the_tissue(model, tmp_path):
    # 2048 x 1536 px at 0.5 µm/px: 16 x 12 cells; tissue is the middle two thirds (tissue_image).
    path = write_pyramid(tmp_path / "slide.tiff", tissue_image(1536, 2048), mpp=0.5)
    reader = open_slide(path)
    grid = compress_slide(reader, model[0], tissue_mask(reader))
    assert grid.embeddings.shape == (12, 16, 256) and grid.embeddings.dtype == np.float16
    assert grid.cell_px == CELL_PX and grid.mpp == 0.5
    rows, cols = np.nonzero(grid.tissue)
    # The block spans y 256..1280 and x 341..1707 px: cells 2..9 and 2..13, give or take one
    # for the tissue mask's 8 µm pixels.
    assert rows.min() in (1, 2) and rows.max() in (9, 10)
    assert cols.min() in (2, 3) and cols.max() in (13, 14)
    assert not grid.embeddings[~grid.tissue].any()  # background cells are zero
    inside = grid.embeddings[3:9, 4:12].astype(np.float32)
    assert (np.abs(inside).sum(axis=2) > 0).all()
    # Cells of the same tissue look alike; glass differs: neighbours inside are more similar.
    assert np.linalg.norm(inside[0, 0] - inside[0, 1]) < np.linalg.norm(inside[0, 0])


def test_ingest_compress_gives_the_same_grid_as_compress(engine, model, tmp_path):
    path = write_pyramid(tmp_path / "slide.tiff", tissue_image(1024, 1280), mpp=0.5)
    outcome = ingest_slide(engine, path, model, workers=0, compress=True)
    assert outcome.status == "ingested"
    (stored,) = load_grids(engine, model[0].info.sha256)
    reader = open_slide(path)
    direct = compress_slide(reader, model[0], tissue_mask(reader))
    assert stored.slide_id == outcome.slide_id
    np.testing.assert_array_equal(stored.embeddings, direct.embeddings)
    np.testing.assert_array_equal(stored.tissue, direct.tissue)
    with engine.connect() as conn:
        source = conn.execute(text("SELECT source_run_id FROM slide_embedding")).scalar()
        current = conn.execute(text("SELECT current_run_id FROM slide")).scalar()
    assert source == current


def slide_ids(engine, n: int) -> list[int]:
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            ids = [upsert_slide(cur, make_slide(f"s{k:02d}")) for k in range(n)]
        raw.commit()
    finally:
        raw.close()
    return ids


def synthetic_grids(n: int, seed: int = 0):
    """Grids whose label is in their tissue cells: class 'high' has channel 0 raised by 1."""
    rng = np.random.default_rng(seed)
    grids, masks, labels = [], [], []
    for k in range(n):
        h, w = rng.integers(4, 9, 2)
        grid = rng.normal(size=(h, w, 8)).astype(np.float16)
        mask = rng.random((h, w)) < 0.8
        mask[0, 0] = True
        label = "high" if k % 2 else "low"
        grid[..., 0] += np.float16(1.0 if label == "high" else 0.0)
        grid[~mask] = 0
        grids.append(grid)
        masks.append(mask)
        labels.append(label)
    return grids, masks, labels


def test_grids_round_trip_through_the_database_and_npy(engine, tmp_path):
    ids = slide_ids(engine, 2)
    grids, masks, _ = synthetic_grids(2)
    with engine.begin() as conn:
        for slide_id, grid, mask in zip(ids, grids, masks, strict=True):
            store_grid(
                conn, slide_id, grid, mask, encoder="test", encoder_sha256="abc123", mpp=0.5,
                cell_px=128,
            )  # fmt: skip
    # A second store of the same slide and encoder replaces the first.
    with engine.begin() as conn:
        store_grid(
            conn, ids[0], grids[1], masks[1], encoder="test", encoder_sha256="abc123", mpp=0.5,
            cell_px=128,
        )  # fmt: skip
    loaded = load_grids(engine, "abc123")
    assert [g.slide_id for g in loaded] == ids
    np.testing.assert_array_equal(loaded[0].embeddings, grids[1])
    np.testing.assert_array_equal(loaded[1].tissue, masks[1])
    assert loaded[1].embeddings.dtype == np.float16
    files = export_npy(loaded, tmp_path)
    np.testing.assert_array_equal(np.load(files[1]), grids[1])
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["slide_id"] for e in index] == ids and index[0]["shape"] == list(grids[1].shape)


def test_the_cnn_learns_a_label_that_is_in_the_grid():
    grids, masks, labels = synthetic_grids(40)
    settings = slide_model.Settings(epochs=30)
    predicted, metrics = slide_model.cross_validate(
        grids, masks, labels, "classification", 4, settings
    )
    assert predicted.shape == (40, 2)
    assert metrics["auc"] > 0.9 and metrics["accuracy"] > 0.8
    # Shuffled labels carry nothing: chance level.
    shuffled = list(np.random.default_rng(1).permutation(labels))
    _, chance = slide_model.cross_validate(grids, masks, shuffled, "classification", 4, settings)
    assert chance["auc"] < 0.8


def test_folds_never_split_a_patient():
    labels = ["benign", "malignant"] * 15
    patients = [k // 3 for k in range(30)]  # three slides per patient
    for task in ("classification", "regression"):
        targets = labels if task == "classification" else list(range(30))
        splits = slide_model.fold_indices(targets, task, 5, seed=0, groups=patients)
        assert len(splits) == 5
        assert sorted(np.concatenate([test for _, test in splits])) == list(range(30))
        for train, test in splits:
            assert not {patients[i] for i in train} & {patients[i] for i in test}


def test_regression_targets_are_learned_too():
    grids, masks, _ = synthetic_grids(40)
    values = [
        float(g[m][:, 0].astype(np.float32).mean()) for g, m in zip(grids, masks, strict=True)
    ]
    _, metrics = slide_model.cross_validate(
        grids, masks, values, "regression", 4, slide_model.Settings(epochs=40)
    )
    assert metrics["spearman"] > 0.7


def test_train_and_predict_commands_store_predictions(engine, cli_env, tmp_path):
    ids = slide_ids(engine, 20)
    grids, masks, labels = synthetic_grids(20)
    random_grids, random_masks, _ = synthetic_grids(20, seed=5)  # no label in them
    with engine.begin() as conn:
        for slide_id, grid, mask, random_grid, random_mask in zip(
            ids, grids, masks, random_grids, random_masks, strict=True
        ):
            for grid_, mask_, encoder, sha in (
                (grid, mask, "ours", "feedbeef"),
                (random_grid, random_mask, "random (seed 0)", "0badcafe"),
            ):
                store_grid(
                    conn, slide_id, grid_, mask_, encoder=encoder, encoder_sha256=sha, mpp=0.5,
                    cell_px=128,
                )  # fmt: skip
    csv = tmp_path / "labels.csv"
    csv.write_text(  # GlaS-style header: spaces after the commas, patients of two slides
        "slide, grade, patient\n"
        + "".join(f"s{k:02d}, {lab}, p{k // 2}\n" for k, lab in enumerate(labels))
    )
    model_file = tmp_path / "grade.pt"
    trained = spatialdb(
        "slide-model", "train", "--labels", str(csv), "--target", "grade", "--encoder", "feed",
        "--group-column", "patient", "--folds", "4", "--epochs", "30", "-o", str(model_file),
        env=cli_env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "grade (classification), 20 slides, 4-fold CV: auc" in trained.stdout
    assert "baseline, same CNN on random (seed 0) grids of 20 slides" in trained.stdout
    assert model_file.exists()

    predicted = spatialdb("slide-model", "predict", str(model_file), env=cli_env)
    assert predicted.returncode == 0, predicted.stderr
    assert "20 prediction(s) of 'grade' stored" in predicted.stdout
    with engine.connect() as conn:
        rows = (
            conn.execute(
                text(
                    "SELECT slide_id, label, value, details FROM slide_prediction ORDER BY slide_id"
                )
            )
            .mappings()
            .all()
        )
    assert [r["slide_id"] for r in rows] == ids
    correct = sum(r["label"] == lab for r, lab in zip(rows, labels, strict=True))
    assert correct >= 18  # trained on these very slides
    assert all(set(r["details"]["probabilities"]) == {"high", "low"} for r in rows)

    from dashboard.data import Reader

    cohort = Reader(cli_env["SPATIALDB_URL"]).cohort().set_index("name")
    assert cohort.loc["s01", "prediction"].startswith("grade: ")

    bad = tmp_path / "bad.csv"
    bad.write_text("slide,other\ns00,1\n")
    missing = spatialdb(
        "slide-model", "train", "--labels", str(bad), "--target", "grade", env=cli_env
    )
    assert_one_error_line(missing, "no column 'grade'")
    nofile = spatialdb("slide-model", "predict", str(tmp_path / "none.pt"), env=cli_env)
    assert_one_error_line(nofile, "no such file")
