"""The network through tiatoolbox: `infer_batch` and whole-slide streaming segmentation."""

import numpy as np
import pytest

from inference import weights
from inference.engine import SPATIAL_HEADS, CerberusModel, segment_slide
from inference.slide import TissueMask


@pytest.fixture(scope="module")
def model():
    net, info = weights.load()
    return CerberusModel(net, info)


def test_infer_batch_returns_cropped_probabilities_per_head(model):
    batch = np.full((2, 512, 512, 3), 230, np.uint8)
    *heads, tissue = CerberusModel.infer_batch(model, batch, device="cpu")
    assert len(heads) == len(SPATIAL_HEADS)
    assert heads[0].shape == (2, 384, 384, 3) and heads[3].shape == (2, 384, 384, 7)
    np.testing.assert_allclose(heads[2].astype(np.float32).sum(axis=-1), 1.0, atol=1e-2)
    assert tissue.shape == (2, 9)


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
    # 4 x 7 tiles of 384; those whose 512 input touches the mask: rows 0-2, cols 1-3.
    assert calls[-1] == (9, 9)
    nuclei = [g for o in objects if o.task == "Nuclei" for g in o.geoms]
    assert nuclei and all(480 - 8 <= g.centroid.x <= 1120 + 8 for g in nuclei)
    assert objects[-1].task == "Tissue"
