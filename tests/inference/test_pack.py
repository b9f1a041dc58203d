"""Training packs: the training images come back exactly as training reads them from the
datasets, the held-out images' own files in their layouts, and a pack made for other settings,
a broken archive or a wrong name is refused without leaving a file behind."""

import tarfile

import numpy as np
import pytest

from inference import pack
from inference.datasets import read_training
from inference.evaluate import detect_layout
from inference.network import PRESETS
from inference.train import TrainConfig, load_pools
from inference.train import main as train_main
from spatialdb.cli.main import main as spatialdb_main
from tests.fixture_datasets import write_all


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("data"))


def config_of(data, **settings) -> TrainConfig:
    return TrainConfig(data=str(data), monuseg_held_out=["tile-b"], **settings)


@pytest.fixture(scope="module")
def unpacked(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack")
    config = config_of(data)
    archive = pack.write(config, PRESETS[config.preset], out / "pack.tar.xz", log=lambda _: None)
    assert [p.name for p in out.iterdir()] == ["pack.tar.xz"]
    return pack.unpack(archive, out / "opened")


def test_a_pack_holds_the_training_images_exactly_as_training_reads_them(data, unpacked):
    config = config_of(data)
    preset = PRESETS[config.preset]
    expected, expected_summary = read_training(config, preset)
    got, summary = pack.read(unpacked, config, preset)
    assert summary == expected_summary
    assert list(got) == list(expected) == ["glas", "monuseg", "consep"]
    for source in expected:
        assert [i.name for i in got[source]] == [i.name for i in expected[source]]
        for a, b in zip(got[source], expected[source], strict=True):
            assert a.image.dtype == np.uint8 and np.array_equal(a.image, b.image)
            assert a.instances.keys() == b.instances.keys()
            for task in a.instances:
                assert a.instances[task].dtype == np.int32
                assert np.array_equal(a.instances[task], b.instances[task])
            assert a.types.keys() == b.types.keys()
            for task in a.types:
                assert np.array_equal(a.types[task], b.types[task])
            assert (a.grade, a.scale) == (b.grade, b.scale)
    # training takes the unpacked folder as its data
    from_pack, _ = load_pools(config_of(unpacked), preset)
    from_data, _ = load_pools(config, preset)
    for a, b in zip(from_pack["consep"], from_data["consep"], strict=True):
        assert np.array_equal(a.targets["Nuclei"][0], b.targets["Nuclei"][0])


def test_the_held_out_images_travel_as_their_own_files_in_their_layouts(data, unpacked):
    held = unpacked / "held_out"
    assert {p.name for p in held.iterdir()} == {"glas", "monuseg", "consep"}
    for layout in ("glas", "monuseg", "consep"):
        assert detect_layout(held / layout) == layout
    assert sorted(p.name for p in (held / "glas" / "images").iterdir()) == ["train_5.png"]
    assert (held / "glas" / "Grade.csv").read_text() == (data / "glas" / "Grade.csv").read_text()
    assert sorted(p.name for p in (held / "monuseg").iterdir()) == ["tile-b.tif", "tile-b.xml"]
    assert (held / "monuseg" / "tile-b.xml").read_bytes() == (
        data / "monuseg" / "tile-b.xml"
    ).read_bytes()
    patches = sorted(p.name for p in (held / "consep" / "images").iterdir())
    assert patches == [f"train_5_{k:03d}.png" for k in range(4)]
    assert len(list((held / "consep" / "types").iterdir())) == 4
    assert not (unpacked / "train" / "glas-0004.webp").exists()  # 4 GlaS training images: 0-3


def test_a_pack_made_for_other_settings_is_refused(data, unpacked):
    with pytest.raises(pack.PackError, match=r"other settings .*glas_val_every"):
        pack.read(unpacked, config_of(data, glas_val_every=4), PRESETS["cpu-multiscale"])
    with pytest.raises(pack.PackError, match=r"other settings .*sources"):
        pack.read(unpacked, config_of(data, mix={"consep": 1.0}), PRESETS["cpu-multiscale"])


def test_bad_archives_and_names_are_refused_without_leaving_files(data, tmp_path):
    broken = tmp_path / "broken.tar.xz"
    broken.write_bytes(b"not xz at all")
    with pytest.raises(pack.PackError, match="not a readable pack"):
        pack.unpack(broken, tmp_path / "a")
    empty = tmp_path / "empty.tar.xz"
    with tarfile.open(empty, "w:xz") as archive:
        archive.add(data / "glas" / "Grade.csv", arcname="pack/Grade.csv")
    with pytest.raises(pack.PackError, match=r"no pack\.json"):
        pack.unpack(empty, tmp_path / "b")
    config = config_of(data)
    with pytest.raises(pack.PackError, match=r"is a \.tar\.xz"):
        pack.write(config, PRESETS[config.preset], tmp_path / "pack.zip")
    missing = config_of(tmp_path / "nowhere")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="no GlaS images"):
        pack.write(missing, PRESETS[missing.preset], out / "pack.tar.xz")
    assert list(out.iterdir()) == []


def test_the_pack_command_writes_one_line_on_bad_input(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{tmp_path / "nowhere"}"\n')
    out = tmp_path / "p.tar.xz"
    assert train_main(["--config", str(config), "--pack", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no GlaS images" in err and err.count("\n") == 1
    assert not out.exists()
    config.write_text('preset = "no-such"\n')
    assert train_main(["--config", str(config), "--pack", str(out)]) == 1
    assert "unknown preset 'no-such'" in capsys.readouterr().err


def test_spatialdb_train_writes_a_pack_that_training_reads(data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{data}"\nmonuseg_held_out = ["tile-b"]\n')
    out = tmp_path / "p.tar.xz"
    assert spatialdb_main(["train", "--config", str(config), "--pack", str(out)]) == 0
    opened = pack.unpack(out, tmp_path / "opened")
    items, summary = pack.read(opened, config_of(data), PRESETS["cpu-multiscale"])
    assert summary["monuseg"]["train"] == ["tile-a"] and len(items["glas"]) == 4
