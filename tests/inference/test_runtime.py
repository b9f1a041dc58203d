"""The network's runtimes: OpenVINO on the CPU finds the objects PyTorch finds, and a wrong
choice of runtime is one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference import runtime, weights
from inference.engine import CerberusModel, segment_slide
from inference.metrics import polygon_agreement
from inference.slide import open_slide, tissue_mask
from tests.slides import SAMPLE


@pytest.fixture(scope="module")
def sample_objects(tmp_path_factory):
    """The sample slide's objects from each runtime; the OpenVINO graph exported afresh."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPATIALDB_CACHE", str(cache))
        reader = open_slide(SAMPLE)
        mask = tissue_mask(reader)
        found = {}
        for backend in ("torch", "openvino"):
            net, info = weights.load()
            model = CerberusModel(net, info, backend=backend)
            found[backend] = {}
            for o in segment_slide(reader, model, mask, workers=0):
                geoms, classes = found[backend].setdefault(o.task, ([], []))
                geoms.extend(o.geoms)
                classes.extend(o.classes)
        exported = sorted(p.suffix for p in (cache / "openvino").iterdir())
    return found, exported


def test_the_exported_graph_is_cached_whole(sample_objects):
    _, exported = sample_objects
    assert exported == [".bin", ".xml"]  # no partial files left


@pytest.mark.parametrize("task", ["Nuclei", "Gland", "Lumen"])
def test_openvino_finds_the_objects_torch_finds(sample_objects, task):
    found, _ = sample_objects
    (torch_objects, _), (openvino_objects, _) = found["torch"][task], found["openvino"][task]
    assert len(torch_objects) > 0
    agree = polygon_agreement(torch_objects, openvino_objects)
    # bf16 in both runtimes, in different orders of operations: a few borderline objects differ
    # (about 1 % on the 4 mm² benchmark slide; among the sample's few dozen lumina, one or two)
    allowed = max(2, round(0.05 * len(torch_objects)))
    assert len(torch_objects) - agree["pairs"] <= allowed, agree
    assert len(openvino_objects) - agree["pairs"] <= allowed, agree
    assert agree["median_iou"] >= 0.95, agree
    assert found["torch"]["Tissue"][1] == found["openvino"]["Tissue"][1]


def test_the_default_runtime_is_openvino_on_the_cpu_and_torch_on_cuda():
    assert runtime.default_backend("cpu") == "openvino"
    assert runtime.default_backend("cuda") == "torch"


def test_a_wrong_runtime_is_a_value_error():
    _, info = weights.load()
    module = torch.nn.Identity()
    with pytest.raises(ValueError, match="unknown backend 'onnx'"):
        runtime.forward_for(module, 64, "cpu", "onnx", info.sha256)
    with pytest.raises(ValueError, match="runs on the CPU, not on cuda"):
        runtime.forward_for(module, 64, "cuda", "openvino", info.sha256)


def test_both_runtimes_give_the_same_outputs_in_the_same_layout(sample_objects):
    _, info = weights.load()
    images = np.random.default_rng(0).integers(0, 255, (2, 1024, 1024, 3)).astype(np.uint8)
    outputs = {}
    for backend in ("torch", "openvino"):
        model = CerberusModel(weights.load()[0], info, backend=backend)
        outputs[backend] = CerberusModel.infer_batch(model, images, device="cpu")
    for a, b in zip(outputs["torch"], outputs["openvino"], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        # probabilities in bf16 arithmetic, each runtime in its own order of operations
        assert np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() < 0.01
