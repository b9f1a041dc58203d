"""Test-time flips: maps averaged over a tile's four flips, each flipped back."""

import json

import numpy as np
import torch

from inference import weights
from inference.compare import main as compare_main
from inference.predict import FLIPS, flip_averaged, predict_image
from spatialdb.cli.main import main
from tests.fixture_datasets import gland_image, write_consep


def _gradients(images: torch.Tensor) -> torch.Tensor:
    """Central differences along x and y (zero-padded): they change sign under a flip."""
    padded = torch.nn.functional.pad(images[:, :1], (1, 1, 1, 1))
    dx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]
    dy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    return torch.cat([dx, dy], dim=1)


def test_flips_are_undone_and_distance_maps_change_sign():
    images = torch.rand(2, 3, 8, 10)

    def values(batch):
        return {
            "Nuclei-INST": batch.softmax(dim=1),  # commutes with flips
            "Nuclei-HV": _gradients(batch),  # x/y values that flip sign with their axis
            "Patch-Class": batch[:, :, 0, 0],  # the top-left pixel: not flip-invariant
        }

    plain = values(images)
    averaged = flip_averaged(values, images)
    torch.testing.assert_close(averaged["Nuclei-INST"], plain["Nuclei-INST"])
    torch.testing.assert_close(averaged["Nuclei-HV"], plain["Nuclei-HV"])
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean(dim=2)
    torch.testing.assert_close(averaged["Patch-Class"], corners)
    assert len(FLIPS) == 4
    torch.testing.assert_close(
        flip_averaged(values, images, flips=False)["Patch-Class"], plain["Patch-Class"]
    )


def test_flipped_prediction_stays_a_probability_map_near_the_plain_one():
    net, _ = weights.load()
    image, _ = gland_image(size=300)
    plain = predict_image(net, image, ("Nuclei", "Patch-Class"))
    flipped = predict_image(net, image, ("Nuclei", "Patch-Class"), flips=True)
    assert flipped["Nuclei-INST"].shape == plain["Nuclei-INST"].shape
    np.testing.assert_allclose(flipped["Nuclei-INST"].sum(axis=0), 1.0, atol=1e-3)
    difference = np.abs(flipped["Nuclei-INST"] - plain["Nuclei-INST"])
    assert 0 < difference.mean() < 0.05  # the network is not flip-invariant, but nearly


def test_evaluate_and_compare_take_flips(tmp_path, capsys):
    write_consep(tmp_path / "consep", images=5, patches=1)  # train_5 is held out
    plain, flipped = tmp_path / "plain.json", tmp_path / "flipped.json"
    assert main(["evaluate", str(tmp_path / "consep"), "--json", str(plain)]) == 0
    assert main(["evaluate", str(tmp_path / "consep"), "--flips", "--json", str(flipped)]) == 0
    plain, flipped = (json.loads(p.read_text())["summary"] for p in (plain, flipped))
    assert flipped["aji"] > 0.5 and flipped != plain  # other maps, nuclei still found
    assert compare_main([str(tmp_path), str(weights.DEFAULT_WEIGHTS), "--flips"]) == 0
    assert "| consep (1) | AJI |" in capsys.readouterr().out  # the held-out patch
