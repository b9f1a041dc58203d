"""Sparse multi-task training: losses count only labelled samples, region and nuclear batches
each carry their own labels at their own resolution, warm starts copy what fits, and a short run on
generated data writes loadable weights and resumes."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from inference import weights
from inference.network import PRESETS, build
from inference.targets import hv_maps
from inference.train import (
    Augmentation,
    TaskSampler,
    TrainConfig,
    _fit_schedule,
    batches,
    hv_loss,
    initialise,
    load_pools,
    patch_loss,
    segmentation_loss,
    step_batches,
    step_losses,
    train,
    train_mode,
    trainable,
    typing_loss,
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


def test_typing_loss_without_typed_pixels_is_cross_entropy_alone():
    logits = torch.randn(2, 5, 8, 8)
    background = torch.zeros(2, 8, 8, dtype=torch.long)
    has = torch.tensor([True, True])
    expected = torch.nn.functional.cross_entropy(logits, background)
    torch.testing.assert_close(typing_loss(logits, background, has), expected)
    assert typing_loss(logits, background, torch.tensor([False, False])) is None


def test_hv_loss_is_zero_for_the_true_maps_and_counts_labelled_samples_only():
    labels = np.zeros((2, 24, 24), dtype=np.int32)
    labels[0, 4:12, 4:14] = 1
    labels[0, 12:20, 6:16] = 2  # touching the first
    labels[1, 8:16, 8:16] = 1
    target = torch.from_numpy(np.stack([hv_maps(x) for x in labels]))
    has = torch.tensor([True, True])
    assert float(hv_loss(target.clone(), target, has)) == 0.0
    flat = torch.zeros_like(target)  # right on background, no gradient inside the nuclei
    assert float(hv_loss(flat, target, has)) > float(((flat - target) ** 2).mean())
    garbage = target.clone()
    garbage[1] = 5.0
    assert float(hv_loss(garbage, target, torch.tensor([True, False]))) == 0.0
    assert hv_loss(target, target, torch.tensor([False, False])) is None


def test_a_transfer_step_trains_the_named_modules_and_nothing_else(tmp_path):
    """`train_only` the nuclear decoders: after a step the encoder, its batch statistics and
    the region decoders are bit for bit as they were; the nuclear decoders and the new
    distance-map output moved."""
    config = TrainConfig(
        data=str(write_all(tmp_path / "data")),
        preset="cpu-multiscale-hv",
        crop=64,
        batch=2,
        region_batch=0,
        monuseg_held_out=["tile-b"],
        bf16=False,
        train_only=["decoder_head.Nuclei", "output_head.Nuclei", "fine_skip"],
    )
    net = build(config.preset)
    pools, _ = load_pools(config, net.preset)
    samplers = {"nuclear": TaskSampler(pools, config.mix, config.crop, hv=True)}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(trainable(net, config.train_only), lr=0.1)
    train_mode(net, config.train_only)
    losses = step_losses(net, step_batches(samplers, config, 0), config)
    assert set(losses) == {"Nuclei", "Nuclei#TYPE", "Nuclei-HV"}
    sum(losses.values()).backward()
    optimizer.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(tuple(config.train_only)) for k in changed)
    assert any(k.startswith("output_head.Nuclei.HV") for k in changed)
    assert any(k.startswith("decoder_head.Nuclei#TYPE") for k in changed)
    with pytest.raises(ValueError, match="names no parameter"):
        trainable(net, ["no_such_module"])


def test_region_and_nuclear_pools_carry_their_own_labels_at_their_own_resolution(tmp_path):
    config = TrainConfig(
        data=str(write_all(tmp_path / "data")),
        monuseg_held_out=["tile-b"],
        consep_val_every=5,
    )
    preset = PRESETS["cpu-multiscale"]
    pools, summary = load_pools(config, preset)
    assert summary["glas"]["held_out"] == ["train_5"] and summary["glas"]["mpp"] == 1.0
    assert summary["consep"]["held_out"] == ["train_5"]
    assert [p.name for p in pools["monuseg"]] == ["tile-a"]
    assert pools["glas"][0].image.shape == (186, 186, 3)  # 300 px at 0.62 µm/px -> 1 µm/px
    assert {p.name.rsplit("_", 1)[0] for p in pools["consep"]} == {
        f"train_{n}" for n in (1, 2, 3, 4)
    }
    rng = np.random.default_rng(0)
    region = TaskSampler(pools, {"glas": 1.0}, 128).batch(4, rng)
    assert region["Gland"][2].all() and region["Gland#TYPE"][1].all()
    assert not region["Nuclei"][2].any() and not region["Nuclei#TYPE"][1].any()
    nuclear = TaskSampler(pools, config.mix, 96).batch(32, rng)
    has_nuclei, has_types = nuclear["Nuclei"][2], nuclear["Nuclei#TYPE"][1]
    assert has_nuclei.all() and has_types.any() and not has_types.all()  # MoNuSeg has no types
    assert not nuclear["Gland"][2].any() and (nuclear["Patch-Class"] == -1).all()
    assert nuclear["image"].shape == (32, 3, 96, 96)


def test_batches_drawn_ahead_on_threads_are_the_batches_of_their_steps(tmp_path):
    """Each step's batches depend on (seed, step) alone: drawn ahead on three threads, from step
    4 of a resumed run, they are what step_batches draws in turn for steps 4, 5, 6."""
    config = TrainConfig(
        data=str(write_all(tmp_path / "data")),
        monuseg_held_out=["tile-b"],
        crop=64,
        region_crop=64,
        batch=3,
        region_batch=2,
        loader_threads=3,
    )
    pools, _ = load_pools(config, PRESETS["cpu-multiscale"])
    samplers = {
        "region": TaskSampler(pools, {"glas": 1.0}, config.region_crop),
        "nuclear": TaskSampler(pools, config.mix, config.crop),
    }
    ahead = batches(samplers, config, 4)
    drawn = [next(ahead) for _ in range(3)]
    ahead.close()
    for step, got in zip((4, 5, 6), drawn, strict=True):
        expected = step_batches(samplers, config, step)
        for name in ("region", "nuclear"):
            assert torch.equal(got[name]["image"], expected[name]["image"])
            assert torch.equal(got[name]["Gland"][0], expected[name]["Gland"][0])
    assert not torch.equal(drawn[0]["nuclear"]["image"], drawn[1]["nuclear"]["image"])


def nucleus_size(classes: np.ndarray) -> float:
    """Median area in px of the nuclei's inner parts in a class map."""
    labels, count = ndimage.label(classes == 1)
    return float(np.median(np.bincount(labels.ravel())[1:])) if count else 0.0


def test_augmented_crops_keep_their_labels_on_their_nuclei(tmp_path):
    """Scale, stain and blur augmentation: the nuclei of the generated tiles (dark on pink) stay
    under their labels whatever the draw, their size varies with the scale drawn, and the
    colours move."""
    config = TrainConfig(data=str(write_all(tmp_path / "data")), monuseg_held_out=["tile-b"])
    pools, _ = load_pools(config, PRESETS["cpu-multiscale"])
    plain = TaskSampler(pools, {"monuseg": 1.0}, 96)
    augment = Augmentation(scale=0.3, stain=0.3, blur=0.5)
    varied = TaskSampler(pools, {"monuseg": 1.0}, 96, augment=augment)
    sizes, colours = [], []
    for seed in range(24):
        sample = varied.sample(np.random.default_rng(seed))
        image = sample["image"].transpose(1, 2, 0)
        classes = sample["targets"]["Nuclei"][0]
        assert image.shape == (96, 96, 3) and classes.shape == (96, 96)
        dark = image.sum(axis=2) < 400  # nuclei ~200, stroma ~595 before jitter
        assert dark[classes == 1].mean() > 0.9 and (~dark[classes == 0]).mean() > 0.9
        sizes.append(nucleus_size(classes))
        colours.append(image[classes == 0].mean(axis=0))
    plain_sizes = [
        nucleus_size(plain.sample(np.random.default_rng(seed))["targets"]["Nuclei"][0])
        for seed in range(24)
    ]
    assert np.ptp(sizes) > 2 * np.ptp(plain_sizes)  # the scale drawn changes nuclei's size
    assert np.ptp(np.array(colours), axis=0).max() > 30
    with pytest.raises(ValueError, match="unknown augment settings"):
        TrainConfig(augment={"rotate": 0.1})


def test_a_schedule_in_minutes_is_fitted_to_the_pace_of_its_first_steps():
    config = TrainConfig(minutes=1.0, steps=10_000, warmup=30)
    state = {"step": 0, "seconds": 0.0}
    while "total" not in state:
        state["step"] += 1
        state["seconds"] += 0.5 if state["step"] <= 5 else 0.1  # slow first steps not counted
        _fit_schedule(state, config, log=lambda line: None)
    assert state["step"] == 30
    assert abs(state["total"] - (30 + (60 - 5.0) / 0.1)) <= 1  # 55 s left at 0.1 s a step
    capped = TrainConfig(minutes=60.0, steps=1_000, warmup=30)
    state = {"step": 0, "seconds": 0.0}
    while "total" not in state:
        state["step"] += 1
        state["seconds"] += 0.1
        _fit_schedule(state, capped, log=lambda line: None)
    assert state["total"] == 1_000
    with pytest.raises(ValueError, match="warm-up"):
        TrainConfig(minutes=5.0, warmup=10)


def test_warm_start_copies_the_tensors_whose_name_and_shape_match(tmp_path):
    source = build("cpu")
    with torch.no_grad():
        source.backbone.conv1.weight.fill_(0.5)
    weights.save(tmp_path / "old.pt", source, untrained={}, postprocess={}, training={})
    target = build("cpu-multiscale")
    before = target.output_head["Nuclei#TYPE"]["TYPE"].x[1].conv.weight.clone()
    lines = []
    initialise(target, tmp_path / "old.pt", lines.append)
    assert torch.all(target.backbone.conv1.weight == 0.5)
    # 5 nuclear types instead of 7: kept as initialised
    assert torch.equal(target.output_head["Nuclei#TYPE"]["TYPE"].x[1].conv.weight, before)
    assert lines[0].startswith("initialised ") and " of " in lines[0]


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint_and_writes_weights(tmp_path):
    data = write_all(tmp_path / "data")
    config = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        crop=128,
        region_crop=96,
        batch=2,
        region_batch=2,
        steps=3,
        warmup=1,
        checkpoint_every=1,
        log_every=1,
        monuseg_held_out=["tile-b"],
    )

    def stop_at_step_2(line):
        if line.startswith("step 2/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config, log=stop_at_step_2)
    assert not (tmp_path / "run" / "weights.pt").exists()
    lines = []
    path = train(config, resume=True, log=lines.append)
    assert "resumed at step 1" in lines
    _net, info = weights.load(path)
    assert info.preset.name == "cpu-multiscale"
    assert info.training["data"]["monuseg"]["held_out"] == ["tile-b"]
    assert [h["step"] for h in info.training["history"]] == [1, 2, 3]
    trained = {key for h in info.training["history"] for key in h}
    assert trained >= {"Gland", "Gland#TYPE", "Lumen", "Nuclei", "Patch-Class"}
    assert info.untrained["Nuclei#TYPE"] == [] and info.untrained["Gland#TYPE"] == []
    assert "adipose" in info.untrained["Patch-Class"]
