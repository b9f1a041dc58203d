"""The weights file: round trip, hash check, clear errors, and the shipped CPU weights."""

import pytest
import torch

from inference import weights
from inference.network import PRESETS, build
from inference.train import untrained_classes


def save_cpu(path, **extra):
    net = build("cpu")
    info = weights.save(
        path,
        net,
        untrained=untrained_classes(net.preset),
        postprocess={"contour_px": {"Gland": 6, "Lumen": 4, "Nuclei": 2}},
        training={"data": {"glas": {"held_out": ["train_5"]}}},
        **extra,
    )
    return net, info


def test_round_trip_keeps_parameters_metadata_and_hash(tmp_path):
    net, info = save_cpu(tmp_path / "w.pt", metrics={"glas": {"object_f1": 0.5}})
    loaded, read = weights.load(tmp_path / "w.pt")
    assert read.sha256 == info.sha256 and len(read.sha256) == 64
    assert read.preset == net.preset and read.mpp == 0.5
    assert read.classes["Patch-Class"][0] == "background"
    assert "eosinophil" in read.untrained["Nuclei#TYPE"]  # the cpu preset's Cerberus types
    assert read.metrics == {"glas": {"object_f1": 0.5}}
    for key, value in net.state_dict().items():  # stored as float16
        torch.testing.assert_close(loaded.state_dict()[key], value.half().to(value.dtype))
    assert not (tmp_path / "w.pt.partial").exists()


def test_metadata_update_keeps_the_hash(tmp_path):
    _, info = save_cpu(tmp_path / "w.pt")
    weights.update(tmp_path / "w.pt", metrics={"monuseg": {"aji": 0.6}})
    read, _ = weights.read(tmp_path / "w.pt")
    assert read.sha256 == info.sha256 and read.metrics["monuseg"]["aji"] == 0.6
    with pytest.raises(ValueError):
        weights.update(tmp_path / "w.pt", state_dict={})


def test_tampered_parameters_are_refused(tmp_path):
    save_cpu(tmp_path / "w.pt")
    payload = torch.load(tmp_path / "w.pt", weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] += 1
    torch.save(payload, tmp_path / "w.pt")
    with pytest.raises(weights.WeightsError, match="do not match the recorded hash"):
        weights.load(tmp_path / "w.pt")


def test_missing_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(weights.WeightsError, match="not found"):
        weights.load(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(weights.WeightsError, match="not a readable weights file"):
        weights.load(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(weights.WeightsError, match="neither"):
        weights.load(tmp_path / "other.pt")


def test_shipped_weights_are_the_multiscale_preset_with_their_provenance():
    info, _state = weights.read(weights.DEFAULT_WEIGHTS)
    assert info.preset.name == "cpu-multiscale" and info.mpp == 0.5
    assert weights.DEFAULT_WEIGHTS.stat().st_size < 12 * 2**20
    assert "TCGA-21-5786-01Z-00-DX1" in info.training["data"]["monuseg"]["held_out"]
    assert "train_5" in info.training["data"]["glas"]["held_out"]
    assert "train_5" in info.training["data"]["consep"]["held_out"]
    # every type head taught by manual labels; only unlabelled tissue classes untrained
    assert info.untrained["Gland#TYPE"] == [] and info.untrained["Nuclei#TYPE"] == []
    assert "adipose" in info.untrained["Patch-Class"]
    assert {"glas", "monuseg", "consep"} <= set(info.metrics)
    assert set(info.postprocess["contour_px"]) == {"Gland", "Lumen", "Nuclei"}


def test_a_preset_with_its_own_classes_round_trips_them(tmp_path):
    net = build("cpu-multiscale")
    weights.save(tmp_path / "w.pt", net, untrained={}, postprocess={}, training={})
    info, _ = weights.read(tmp_path / "w.pt")
    assert info.preset == PRESETS["cpu-multiscale"]
    assert info.classes["Nuclei#TYPE"] == [
        "nolabel",
        "other",
        "inflammatory",
        "epithelial",
        "connective",
    ]
    assert info.classes["Gland#TYPE"] == ["nolabel", "benign gland", "malignant gland"]


def test_40x_weights_share_the_default_weights_regions_and_split():
    """`cerberus-cpu-multiscale-40x.pt` is the default weights with nuclear decoders retrained to
    0.25 µm/px: every region tensor (encoder, gland, lumen and tissue heads) is the default's, the
    held-out images are the same, and its held-out figures are recorded."""
    path = weights.WEIGHTS_40X
    info, state = weights.read(path)
    default_info, default_state = weights.read(weights.DEFAULT_WEIGHTS)
    assert info.preset.name == "cpu-multiscale-40x" and info.mpp == 0.25
    assert path.stat().st_size < 12 * 2**20
    nuclear = ("decoder_head.Nuclei", "output_head.Nuclei", "fine_skip", "finer_skip")
    shared = [k for k in state if not k.startswith(nuclear)]
    assert len(shared) > 300
    assert all(torch.equal(state[k], default_state[k]) for k in shared)
    assert info.training["data"] == default_info.training["data"]
    assert {"glas", "monuseg", "consep"} <= set(info.metrics)
    assert info.untrained == default_info.untrained
