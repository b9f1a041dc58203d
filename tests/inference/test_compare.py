"""`python -m inference.compare`: two weights files scored on the same held-out images in one
run, the figures side by side; the first file's split decides which images."""

import json
import shutil

import pytest

from inference import compare, weights
from tests.fixture_datasets import write_all


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("data"))


def shipped_with_split(path, held_out: dict) -> str:
    """The shipped weights, saying they held out `held_out` ({layout: names})."""
    shutil.copy(weights.DEFAULT_WEIGHTS, path)
    info, _ = weights.read(path)
    split = {layout: {"held_out": names} for layout, names in held_out.items()}
    weights.update(path, training={**info.training, "data": split})
    return str(path)


@pytest.mark.slow
def test_two_files_are_scored_on_the_first_ones_held_out_images(data, tmp_path, capsys):
    first = shipped_with_split(
        tmp_path / "a.pt", {"glas": ["train_5"], "monuseg": ["tile-b"], "consep": ["train_5"]}
    )
    second = shipped_with_split(
        tmp_path / "b.pt", {"glas": ["train_1", "train_2"], "monuseg": [], "consep": []}
    )
    out = tmp_path / "scores.json"
    assert compare.main([str(data), first, second, "--json", str(out)]) == 0
    printed = capsys.readouterr()
    results = json.loads(out.read_text())
    assert list(results) == [first, second]
    for path in results:
        assert results[path]["glas"]["images"] == 1  # train_5, the first file's choice
        assert results[path]["monuseg"]["images"] == 1
        assert results[path]["consep"]["images"] == 4  # train_5's four patches
    # the same parameters: the same figures in both columns
    assert results[first] == results[second]
    lines = printed.out.splitlines()
    assert lines[0] == "| held-out | figure | a.pt | b.pt |"
    rows = {line.split(" | ")[1] for line in lines[2:]}
    assert {"object F1, all images", "object F1, benign", "AJI", "PQ", "F_c epithelial"} <= rows
    assert "object F1, malignant" not in rows  # train_5 is benign: no figure, no row
    assert "a.pt: consep, 4 images" in printed.err


def test_no_dataset_in_the_folder_is_one_error_line(tmp_path, capsys):
    assert compare.main([str(tmp_path), str(weights.DEFAULT_WEIGHTS)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none of glas, monuseg, consep" in err
    assert err.count("\n") == 1
