"""Dataset readers and derived labels, on generated folders; the real datasets where present."""

import numpy as np
import pytest

from inference import datasets
from inference.network import LABELLED_GLAND_TYPES, LABELLED_NUCLEUS_TYPES, TISSUE_CLASSES
from tests.conftest import SHARED_DATA
from tests.fixture_datasets import gland_image, write_consep, write_glas, write_monuseg


def test_glas_reader_resamples_to_the_network_resolution_and_derives_lumina(tmp_path):
    write_glas(tmp_path / "glas", count=2)
    items = datasets.read_glas(tmp_path / "glas", mpp=0.5)
    assert [item.name for item in items] == ["train_1", "train_2"]
    item = items[0]
    assert item.image.shape == (372, 372, 3)  # 300 px at 0.62 µm/px -> 0.5 µm/px
    assert item.grade == "benign" and items[1].grade == "malignant"
    glands, lumina = item.instances["Gland"], item.instances["Lumen"]
    assert glands.max() == 2
    assert lumina.max() == 2  # one white lumen enclosed by each gland
    for lumen in (1, 2):
        inside = glands[lumina == lumen]
        assert inside.min() > 0 and len(np.unique(inside)) == 1
    # every gland pixel carries its image's grade as the gland type, nothing else does
    benign, malignant = (LABELLED_GLAND_TYPES.index(f"{g} gland") for g in ("benign", "malignant"))
    assert set(np.unique(item.types["Gland"][glands > 0])) == {benign}
    assert (item.types["Gland"][glands == 0] == 0).all()
    assert set(np.unique(items[1].types["Gland"])) == {0, malignant}


def test_original_flat_glas_layout_is_read(tmp_path):
    from PIL import Image

    image, mask = gland_image()
    Image.fromarray(image).save(tmp_path / "testA_1.bmp")
    Image.fromarray(mask).save(tmp_path / "testA_1_anno.bmp")
    assert [(n, i.name) for n, i, _ in datasets.glas_pairs(tmp_path)] == [
        ("testA_1", "testA_1.bmp")
    ]


def test_lumen_pseudo_labels_ignore_white_space_outside_glands():
    image, mask = gland_image()
    image[:, -40:] = 245  # empty glass at the right edge, outside any gland
    lumina = datasets.lumen_pseudo_labels(image, mask.astype(np.int32), mpp=0.5)
    assert lumina[:, -40:].max() == 0
    assert lumina.max() == 2


def test_tissue_class_rules():
    image, mask = gland_image()
    glass = np.full((100, 100, 3), 245, np.uint8)
    assert datasets.tissue_class(np.zeros((100, 100)), glass, "benign") == TISSUE_CLASSES.index(
        "background"
    )
    gland = (slice(40, 140), slice(40, 140))  # inside the first gland
    assert datasets.tissue_class(mask[gland], image[gland], "benign") == TISSUE_CLASSES.index(
        "normal epithelium"
    )
    assert datasets.tissue_class(mask[gland], image[gland], "malignant") == TISSUE_CLASSES.index(
        "abnormal epithelium"
    )
    stroma = np.full((100, 100, 3), (225, 170, 200), np.uint8)
    assert datasets.tissue_class(np.zeros((100, 100)), stroma, None) == TISSUE_CLASSES.index(
        "stroma"
    )
    assert datasets.tissue_class(mask[gland], image[gland], None) == -1  # gland, grade unknown


def test_monuseg_reader_rasterises_outlines_at_the_network_resolution(tmp_path):
    write_monuseg(tmp_path / "monuseg", names=("tile",))
    (item,) = datasets.read_monuseg(tmp_path / "monuseg", mpp=0.5)
    assert item.image.shape == (300, 300, 3)  # the XML says 0.5 µm/px already
    nuclei = item.instances["Nuclei"]
    assert nuclei.max() == 81
    areas = np.bincount(nuclei.ravel())[1:]
    assert 150 < np.median(areas) < 320  # radius 7-10 px discs


def test_broken_monuseg_xml_is_one_clear_error(tmp_path):
    write_monuseg(tmp_path / "monuseg", names=("tile",))
    (tmp_path / "monuseg" / "tile.xml").write_text("<Annotations><Region")
    with pytest.raises(datasets.DatasetError, match="not a readable ImageScope XML"):
        datasets.read_monuseg(tmp_path / "monuseg", mpp=0.5)


def test_consep_patches_read_with_their_classes_as_the_project_types(tmp_path):
    write_consep(tmp_path / "consep", images=2)
    patches = datasets.consep_patches(tmp_path / "consep")
    assert [p[0] for p in patches[:5]] == [
        "train_1_000",
        "train_1_001",
        "train_1_002",
        "train_1_003",
        "train_2_000",
    ]
    _, instances, types = datasets.read_consep_patch(*patches[0][1:])
    for label in np.unique(instances)[1:]:  # fixture classes are 1 + id % 4
        kind = LABELLED_NUCLEUS_TYPES[np.unique(types[instances == label]).item()]
        assert kind == ("other", "inflammatory", "epithelial", "connective")[label % 4]
    assert (types[instances == 0] == 0).all()


def test_consep_mosaic_keeps_each_patch_nucleus_its_own_instance(tmp_path):
    write_consep(tmp_path / "consep", images=2)
    items = datasets.read_consep(tmp_path / "consep", mpp=0.5, images={"train_2"})
    (item,) = items
    assert item.name == "train_2_0" and item.image.shape == (250, 250, 3)  # 2 x 125 px
    parts = [
        datasets.read_consep_patch(*p[1:]) for p in datasets.consep_patches(tmp_path / "consep")[4:]
    ]
    expected = sum(len(np.unique(inst)) - 1 for _, inst, _ in parts)
    nuclei = item.instances["Nuclei"]
    found = len(np.unique(nuclei)) - 1
    assert 0.9 * expected <= found <= expected  # halving may lose a sliver cut by the edge
    left, right = nuclei[:, :125], nuclei[:, 125:]
    assert not set(np.unique(left)[1:]) & set(np.unique(right)[1:])


def test_consep_types_that_do_not_match_the_instances_are_one_clear_error(tmp_path):
    from scipy.io import savemat

    write_consep(tmp_path / "consep", images=1)
    savemat(tmp_path / "consep" / "types" / "train_1_000.mat", {"inst_type": [[1], [2]]})
    with pytest.raises(datasets.DatasetError, match=r"2 classes for \d+ instances"):
        datasets.read_consep(tmp_path / "consep", mpp=0.5)


def test_split_holds_out_every_nth_name():
    names = [f"train_{i}" for i in range(1, 12)]
    train, held_out = datasets.split_names(names, 5)
    assert held_out == ["train_5", "train_10"]
    assert len(train) == 9 and not set(train) & set(held_out)


@pytest.mark.dataset
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_real_datasets_read_with_their_published_counts():
    pairs = datasets.glas_pairs(SHARED_DATA / "glas")
    assert len(pairs) == 85
    grades = datasets.glas_grades(SHARED_DATA / "glas")
    assert sorted(set(grades.values())) == ["benign", "malignant"]
    assert sum(g == "benign" for g in grades.values()) == 37
    outlines, mpp = datasets.read_monuseg_outlines(
        SHARED_DATA / "monuseg" / "TCGA-21-5784-01Z-00-DX1.xml"
    )
    assert len(outlines) == 398 and mpp == pytest.approx(0.2527)
    (item,) = datasets.read_glas(SHARED_DATA / "glas", mpp=0.5, names={"train_1"})
    assert item.image.shape == (647, 961, 3)
    assert item.instances["Gland"].max() == 7 and item.instances["Lumen"].max() > 0
    patches = datasets.consep_patches(SHARED_DATA / "consep")
    assert len(patches) == 432
    assert len({datasets.consep_image_of(p[0]) for p in patches}) == 27
