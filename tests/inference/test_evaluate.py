"""Whole-image prediction and `spatialdb evaluate` with the shipped weights."""

import json

import numpy as np
import pytest

from inference import weights
from inference.network import build
from inference.predict import instances, predict_image
from spatialdb.cli.main import main
from tests.conftest import SHARED_DATA
from tests.fixture_datasets import gland_image, write_consep, write_glas, write_monuseg


def test_tiled_prediction_covers_the_image_with_probabilities():
    net = build("cpu").eval()
    image, _ = gland_image(size=300)
    image = np.concatenate([image, image[:, :150]], axis=1)  # 300 x 450: not a tile multiple
    maps = predict_image(net, image, ("Gland", "Nuclei", "Patch-Class"))
    assert maps["Gland-INST"].shape == (3, 300, 450)
    assert maps["Nuclei-INST"].shape == (3, 300, 450)
    np.testing.assert_allclose(maps["Gland-INST"].sum(axis=0), 1.0, atol=1e-3)
    assert maps["Patch-Class"].shape == (9, 1, 2)  # one class vector per 384 px kept tile


def test_shipped_weights_find_the_glands_of_a_synthetic_image():
    net, info = weights.load()
    image, mask = gland_image(size=372)
    found = instances(predict_image(net, image, ("Gland", "Lumen")), info.postprocess, info.mpp)
    assert found["Gland"].shape == mask.shape
    assert found["Gland"].max() >= 1
    assert (found["Lumen"] > 0).sum() < (found["Gland"] > 0).sum()


def test_evaluate_command_scores_a_glas_folder(tmp_path, capsys):
    write_glas(tmp_path / "glas", count=2)
    out = tmp_path / "report.json"
    assert main(["evaluate", str(tmp_path / "glas"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "glas summary over 2 images" in printed and "object_f1" in printed
    assert "by_grade" in printed and "malignant" in printed and "pieces_object_f1" in printed
    report = json.loads(out.read_text())
    assert report["layout"] == "glas" and len(report["images"]) == 2
    summary = report["summary"]
    assert 0.0 <= summary["object_dice"] <= 1.0
    assert (
        summary["by_grade"]["benign"]["images"] == summary["by_grade"]["malignant"]["images"] == 1
    )
    assert summary["by_grade"]["all"]["object_f1"] == summary["object_f1"]
    assert [row["grade"] for row in report["images"]] == ["benign", "malignant"]


def test_evaluate_command_scores_a_consep_folder_with_per_type_f1(tmp_path, capsys):
    write_consep(tmp_path / "consep", images=1, patches=2)
    out = tmp_path / "report.json"
    assert main(["evaluate", str(tmp_path / "consep"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "consep summary over 2 images" in printed and "type_f1" in printed
    summary = json.loads(out.read_text())["summary"]
    assert {"aji", "pq", "dq", "sq", "dice", "detection_f1"} <= set(summary)
    assert set(summary["type_f1"]) == {"other", "inflammatory", "epithelial", "connective"}
    counts = summary["type_counts"]
    assert set(counts) == set(summary["type_f1"]) and "unpaired_predicted" in printed
    report = json.loads(out.read_text())
    assert sum(c["true"] for c in counts.values()) == sum(r["nuclei"] for r in report["images"])
    assert sum(c["predicted"] for c in counts.values()) <= sum(
        r["predicted"] for r in report["images"]
    )
    for c in counts.values():
        assert c["typed_right"] <= c["paired"] <= c["true"]
        assert c["unpaired_predicted"] <= c["predicted"]


def test_truth_pieces_splits_one_label_given_to_separate_glands():
    from inference.evaluate import truth_pieces

    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6] = 1
    labels[10:15, 10:15] = 1  # the same label on a second, separate gland
    labels[2:6, 12:18] = 2
    pieces = truth_pieces(labels)
    assert pieces.max() == 3
    assert len(np.unique(pieces[labels == 1])) == 2 and len(np.unique(pieces[labels == 2])) == 1


def test_evaluate_command_scores_a_monuseg_folder(tmp_path, capsys):
    write_monuseg(tmp_path / "monuseg", names=("tile",))
    assert main(["evaluate", str(tmp_path / "monuseg")]) == 0
    printed = capsys.readouterr().out
    assert "monuseg summary over 1 images" in printed and "aji" in printed


def test_evaluate_scores_images_as_scans_at_a_coarser_resolution(tmp_path, monkeypatch):
    """--scan-mpp predicts from each image area-averaged to that resolution (the fixture's tiles
    are 0.5 µm/px: a 1 µm/px scan is half their size) and scores against the same truth; images
    already coarser than the scan are used as they are; a scan resolution of zero is refused."""
    from inference import evaluate as evaluation

    folder = write_monuseg(tmp_path / "monuseg", names=("tile",))
    seen = []
    real = evaluation.predicted_maps

    def recording(net, info, image, scale, *rest):
        seen.append((image.shape[:2], scale))
        return real(net, info, image, scale, *rest)

    monkeypatch.setattr(evaluation, "predicted_maps", recording)
    rows = []
    for scan in (None, "1.0", "0.25"):
        report = tmp_path / "report.json"
        args = ["evaluate", str(folder), "--json", str(report)]
        assert main(args + (["--scan-mpp", scan] if scan else [])) == 0
        rows.append(json.loads(report.read_text())["images"][0])
    (own, own_scale), (scan, scan_scale), (finer, finer_scale) = seen
    assert scan == (own[0] // 2, own[1] // 2) and scan_scale == 2 * own_scale
    assert (finer, finer_scale) == (own, own_scale) and rows[2] == rows[0]
    assert rows[1]["nuclei"] == rows[0]["nuclei"] and rows[1]["aji"] != rows[0]["aji"]
    assert main(["evaluate", str(folder), "--scan-mpp", "0"]) == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.mkdir(), "not a GlaS folder"),
        (
            lambda p: write_glas(p, count=1) and (p.parent / "w.pt").write_text("x"),
            "not a readable weights file",
        ),
    ],
)
def test_evaluate_errors_are_one_line(tmp_path, capsys, setup, message):
    folder = tmp_path / "data"
    setup(folder)
    args = ["evaluate", str(folder)]
    if (tmp_path / "w.pt").exists():
        args += ["--weights", str(tmp_path / "w.pt")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.dataset
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_shipped_weights_on_the_held_out_monuseg_tiles():
    from inference.evaluate import evaluate

    net, info = weights.load()
    report = evaluate(SHARED_DATA / "monuseg", net, info, held_out_only=True)
    assert [row["name"] for row in report["images"]] == [
        "TCGA-21-5786-01Z-00-DX1",
        "TCGA-A7-A13E-01Z-00-DX1",
        "TCGA-B0-5710-01Z-00-DX1",
    ]
    assert report["summary"]["aji"] >= 0.50
    assert report["summary"]["dice"] >= 0.70
