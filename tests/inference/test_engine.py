"""The network through tiatoolbox: `infer_batch` and whole-slide streaming segmentation."""

import numpy as np
import pytest

from inference import weights
from inference.engine import CerberusModel, segment_slide
from inference.slide import TissueMask


@pytest.fixture(scope="module")
def model():
    net, info = weights.load()
    return CerberusModel(net, info)


def test_infer_batch_returns_cropped_probabilities_per_head(model):
    preset, info = model.info.preset, model.info
    size, out = preset.input_size, preset.output_size
    batch = np.full((2, size, size, 3), 230, np.uint8)
    *heads, tissue = CerberusModel.infer_batch(model, batch, device="cpu")
    assert len(heads) == len(model.spatial_heads)
    heads = dict(zip(model.spatial_heads, heads, strict=True))
    assert heads["Gland-INST"].shape == (2, out, out, 3)
    assert heads["Nuclei-TYPE"].shape == (2, out, out, len(info.classes["Nuclei#TYPE"]))
    np.testing.assert_allclose(heads["Nuclei-INST"].astype(np.float32).sum(axis=-1), 1, atol=1e-2)
    if preset.nucleus_hv:  # distance maps, not probabilities
        assert heads["Nuclei-HV"].shape == (2, out, out, 2)
        assert np.abs(heads["Nuclei-HV"]).max() <= 1
    assert tissue.shape == (2, 9)
    np.testing.assert_allclose(tissue.sum(axis=1), 1.0, atol=1e-5)
    # classes the weights were never taught get nothing, so they are never emitted
    untrained = [info.classes["Patch-Class"].index(c) for c in info.untrained["Patch-Class"]]
    assert untrained and (tissue[:, untrained] == 0).all()


def test_segment_slide_reads_only_tissue_tiles(model, tmp_path):
    from inference.slide import open_slide
    from tests.slides import tissue_image, write_pyramid

    reader = open_slide(write_pyramid(tmp_path / "s.tiff", tissue_image(1200, 2400), 0.5))
    mask = np.zeros((150, 300), bool)
    mask[30:120, 60:140] = True  # the left part of the tissue block only
    calls = []
    objects = list(
        segment_slide(
            reader, model, TissueMask(mask, 4.0), workers=0, progress=lambda *a: calls.append(a)
        )
    )
    # the tiles whose input patch touches the mask (model px 240-960 down, 480-1120 across)
    kept = model.info.preset.output_size
    margin = (model.info.preset.input_size - kept) // 2

    def touching(low, high, size):
        return sum(
            1
            for t in range(-(-size // kept))
            if t * kept - margin < high and (t + 1) * kept + margin > low
        )

    expected = touching(240, 960, 1200) * touching(480, 1120, 2400)
    assert expected < -(-1200 // kept) * -(-2400 // kept)  # fewer than all the slide's tiles
    assert calls[-1] == (expected, expected)
    nuclei = [g for o in objects if o.task == "Nuclei" for g in o.geoms]
    assert nuclei and all(480 - 8 <= g.centroid.x <= 1120 + 8 for g in nuclei)
    assert objects[-1].task == "Tissue"


def test_small_regions_find_the_same_objects_as_one_region(model, tmp_path):
    """Real model output cut into 1-tile regions (every tile border a region border) gives the
    objects that one region over the whole slide gives: no seams, no duplicates."""
    from shapely import STRtree

    from inference import tiling
    from inference.slide import open_slide, tissue_mask
    from tests.slides import tissue_image, write_pyramid

    def grid_of(reader, mask):
        return tiling.Grid.over((2000, 2000), (1.0, 1.0), 384, 64, mask.mask)

    reader = open_slide(write_pyramid(tmp_path / "s.tiff", tissue_image(2000, 2000, 3), 0.5))
    mask = tissue_mask(reader)

    def nuclei(region_tiles):
        objects = segment_slide(reader, model, mask, workers=0, region_tiles=region_tiles)
        return [g for o in objects if o.task == "Nuclei" for g in o.geoms]

    assert len(tiling.regions(grid_of(reader, mask), 1, 2)) > 1  # the cut is real
    whole, cut = nuclei(8), nuclei(1)
    assert len(whole) > 50
    assert abs(len(cut) - len(whole)) <= 0.02 * len(whole)
    tree = STRtree(whole)
    matched = 0
    for g in cut:
        best = max(
            (g.intersection(whole[i]).area / g.union(whole[i]).area for i in tree.query(g)),
            default=0,
        )
        matched += best > 0.9
    assert matched >= 0.97 * len(cut)


def test_40x_weights_find_the_default_weights_nuclei_on_a_20x_slide(model, tmp_path):
    """The 40x weights run through the same engine on a 0.5 µm/px slide (read at 0.25 µm/px):
    their nuclei come back in level-0 pixels, where the default weights find them."""
    from shapely import STRtree

    from inference.slide import open_slide, tissue_mask
    from tests.slides import tissue_image, write_pyramid

    net, info = weights.load(weights.WEIGHTS_40X)
    fine = CerberusModel(net, info)
    reader = open_slide(write_pyramid(tmp_path / "s.tiff", tissue_image(1000, 1000, 5), 0.5))
    mask = tissue_mask(reader)

    def nuclei(m):
        objects = segment_slide(reader, m, mask, workers=0)
        return [g for o in objects if o.task == "Nuclei" for g in o.geoms]

    default, found = nuclei(model), nuclei(fine)
    assert len(default) > 100
    assert 0.8 * len(default) <= len(found) <= 1.2 * len(default)
    assert all(0 <= v <= 1000 for g in found for v in g.bounds)
    tree = STRtree(found)
    matched = sum(
        max(
            (g.intersection(found[i]).area / g.union(found[i]).area for i in tree.query(g)),
            default=0,
        )
        > 0.5
        for g in default
    )
    assert matched >= 0.9 * len(default)
