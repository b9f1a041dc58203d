"""`python -m inference.sweep`: nuclear post-processing chosen on the weights' training images."""

import pytest

from inference import weights
from inference.datasets import DatasetError
from inference.evaluate import evaluate
from inference.sweep import main, nucleus_settings, sweep
from tests.fixture_datasets import write_consep, write_glas


def test_the_sweep_scores_each_setting_and_agrees_with_evaluate(tmp_path):
    folder = write_consep(tmp_path / "consep", images=2, patches=2)  # train_1, train_2: training
    net, info = weights.load()
    settings = nucleus_settings(info, {"inner": (0.5, 0.9), "foreground": (0.5,)})
    result = sweep(folder, net, info, settings, progress=lambda name: None)
    assert result["layout"] == "consep" and result["images"] == 4
    current, strict = result["figures"]
    scored = evaluate(folder, net, info)["summary"]  # every patch, the weights' own settings
    assert current["aji"] == pytest.approx(scored["aji"])
    assert current["pq"] == pytest.approx(scored["pq"])
    assert strict != current  # a different marker threshold gives other nuclei


def test_the_sweep_skips_held_out_images(tmp_path):
    folder = write_consep(tmp_path / "consep", images=5, patches=1)  # train_5 is held out
    net, info = weights.load()
    result = sweep(
        folder,
        net,
        info,
        nucleus_settings(info, {"inner": (0.5,), "foreground": (0.5,)}),
        progress=print,
    )
    assert result["images"] == 4


def test_the_sweep_prints_a_table_and_refuses_gland_folders(tmp_path, capsys):
    write_consep(tmp_path / "consep", images=1, patches=1)
    argv = [
        str(tmp_path / "consep"),
        "--inner",
        "0.5,0.7",
        "--foreground",
        "0.5",
        "--min-area",
        "3",
    ]
    assert main(argv) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4 and "(current)" in rows[2]
    assert sum("best AJI" in r for r in rows) == 1 and sum("best PQ" in r for r in rows) == 1
    write_glas(tmp_path / "glas", count=1)
    assert main([str(tmp_path / "glas")]) == 1
    assert "the sweep scores nuclei" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="no consep training images"):
        sweep(tmp_path / "consep", *weights.random_weights(weights.load()[1].preset), [])


def test_the_sweep_varies_the_minimum_nucleus_area(tmp_path, capsys):
    write_consep(tmp_path / "consep", images=1, patches=1)
    argv = [str(tmp_path / "consep"), "--inner", "0.5", "--foreground", "0.5"]
    assert main([*argv, "--min-area", "3,1000"]) == 0
    header, kept, none = capsys.readouterr().out.splitlines()[1:]
    assert "min_area" in header and "(current)" in kept and "best AJI" in kept
    assert none.split()[:3] == ["0.5", "0.5", "1000"]
    assert none.split()[3:6] == ["0.000", "/", "0.000"]  # no nucleus is 1,000 µm²: AJI, PQ 0
