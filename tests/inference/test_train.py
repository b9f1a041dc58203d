"""Sparse multi-task training: losses count only labelled samples, the typing phase freezes the
encoder, and a short run on generated data writes loadable weights and resumes."""

import numpy as np
import pytest
import torch

from inference import weights
from inference.network import build
from inference.train import (
    TaskSampler,
    TrainConfig,
    load_pools,
    patch_loss,
    phase_parameters,
    segmentation_loss,
    train,
)
from tests.fixture_datasets import write_all


def test_segmentation_loss_averages_over_labelled_samples_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 16, 16)
    classes = torch.randint(0, 3, (3, 16, 16))
    weight_map = torch.rand(3, 16, 16) + 0.5
    has = torch.tensor([True, False, True])
    mixed = segmentation_loss(logits, classes, weight_map, has)
    labelled_only = segmentation_loss(logits[has], classes[has], weight_map[has], has[has])
    torch.testing.assert_close(mixed, labelled_only)
    garbage = logits.clone()
    garbage[1] = 1e3  # an unlabelled sample's output must not matter
    torch.testing.assert_close(segmentation_loss(garbage, classes, weight_map, has), mixed)
    assert segmentation_loss(logits, classes, weight_map, torch.zeros(3, dtype=bool)) is None


def test_patch_loss_skips_unlabelled_patches():
    logits = torch.randn(4, 9)
    labels = torch.tensor([2, -1, 5, -1])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(patch_loss(logits, labels), expected)
    assert patch_loss(logits, torch.full((4,), -1)) is None


def test_typing_phase_trains_only_the_typing_decoder():
    net = build("cpu")
    trainable = {id(p) for p in phase_parameters(net, 2)}
    names = [n for n, p in net.named_parameters() if id(p) in trainable]
    assert names and all("Nuclei#TYPE" in n for n in names)
    assert not any(p.requires_grad for p in net.backbone.parameters())
    phase_one = {id(p) for p in phase_parameters(net, 1)}
    assert not phase_one & trainable


def test_task_sampler_mixes_datasets_and_carries_only_their_labels(tmp_path):
    config = TrainConfig(
        data=str(write_all(tmp_path / "data")),
        crop=128,
        glas_val_every=5,
        monuseg_held_out=["tile-b"],
    )
    pools, summary = load_pools(config, mpp=0.5)
    assert summary["glas"]["held_out"] == ["train_5"]
    assert [p.name for p in pools["monuseg"]] == ["tile-a"]
    sampler = TaskSampler(pools, {"glas": 0.5, "monuseg": 0.5}, 128, np.random.default_rng(0))
    batch = sampler.batch(32)
    has_gland, has_nuclei = batch["Gland"][2], batch["Nuclei"][2]
    assert has_gland.any() and has_nuclei.any()
    assert not (has_gland & has_nuclei).any()  # no dataset here labels both
    assert torch.equal(batch["Lumen"][2], has_gland)
    assert (batch["Patch-Class"][has_nuclei] == -1).all()
    assert batch["image"].shape == (32, 3, 128, 128)


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint_and_writes_weights(tmp_path):
    data = write_all(tmp_path / "data")
    config = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        crop=128,
        batch=2,
        steps=3,
        typing_steps=1,
        warmup=1,
        checkpoint_every=1,
        log_every=1,
        monuseg_held_out=["tile-b"],
    )

    def stop_at_step_2(line):
        if line.startswith("phase 1 step 2/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config, log=stop_at_step_2)
    assert not (tmp_path / "run" / "weights.pt").exists()
    lines = []
    path = train(config, resume=True, log=lines.append)
    assert "resumed at phase 1 step 1" in lines
    _net, info = weights.load(path)
    assert info.preset.name == "cpu"
    assert info.training["data"]["monuseg"]["held_out"] == ["tile-b"]
    assert [(h["phase"], h["step"]) for h in info.training["history"]] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
    ]
