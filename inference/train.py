"""Sparse multi-task training of the Cerberus network.

Every step trains all heads on two batches: a *region* batch of GlaS crops at the region tasks'
resolution (`Preset.gland_scale` times coarser than the input) for glands, lumina, gland type and
tissue class, and a *nuclear* batch at the input resolution for nuclei and their types, drawn from
the nuclear datasets by configured weights (they differ in size by orders of magnitude). Each
sample carries only its own labels, and each head's loss averages over the samples that have them.
A transfer step (`train_only`) trains some modules on a frozen rest, e.g. the nuclear decoders
on the shared encoder, which leaves every other head's output exactly as it was.

    python -m inference.train --config configs/cpu-multiscale.toml [--resume]

Checkpoints go to `<out>/checkpoint.pt` (resumable), the result to `<out>/weights.pt`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import subprocess
import sys
import time
import tomllib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed2rgb, rgb2hed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from inference import datasets, pack, weights
from inference.datasets import LabelledImage
from inference.network import (
    LABELLED_GLAND_TYPES,
    NUCLEI_HV,
    PATCH_HEAD,
    PRESETS,
    TISSUE_CLASSES,
    CerberusNet,
    Preset,
    build,
)
from inference.predict import POSTPROCESS, autocast, use_bf16
from inference.targets import hv_maps, inner_contour_map, unet_weight_map

SEGMENTATION_TASKS = ("Gland", "Lumen", "Nuclei")
TYPED_TASKS = ("Gland", "Nuclei")  # tasks whose instances have a type head, `<task>#TYPE`
REGION_TASKS = ("Gland", "Lumen", "Gland#TYPE", PATCH_HEAD)
NUCLEAR_TASKS = ("Nuclei", "Nuclei#TYPE")
#: Tissue classes the GlaS-derived labels give (see `datasets.tissue_class`).
LABELLED_TISSUE = ("background", "normal epithelium", "abnormal epithelium", "stroma")


@dataclass
class TrainConfig:
    """Everything a run depends on; read from a TOML file, overridable on the command line."""

    preset: str = "cpu-multiscale"
    data: str = "../shared/data"
    out: str = "runs/cpu-multiscale"
    device: str = "cpu"
    bf16: bool = True  # autocast on CPUs with AMX and on CUDA
    threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 0
    crop: int = 256  # nuclear crops, px at the input resolution
    region_crop: int = 320  # GlaS crops, px at the region resolution
    batch: int = 8
    region_batch: int = 6  # 0: no region batch (a nuclear transfer step)
    steps: int = 3000
    #: Fit the run into this many minutes of training (the step count timed over its first
    #: steps, at most `steps`); 0: exactly `steps`.
    minutes: float = 0.0
    #: Threads drawing batches ahead of the network (0: drawn in turn, as on a CPU).
    loader_threads: int = 0
    #: Augmentation beyond flips, rotations and colour jitter (`Augmentation`): scale, stain,
    #: blur.
    augment: dict[str, float] = field(default_factory=dict)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    init: str | None = None  # start from these weights (parameters of matching name and shape)
    mix: dict[str, float] = field(default_factory=lambda: {"monuseg": 0.4, "consep": 0.6})
    #: Decay of an exponential moving average of the weights (parameters and batch-norm
    #: statistics), updated every step and saved as the result; 0: none, the last weights saved.
    ema: float = 0.0
    patch_loss_weight: float = 0.5
    hv_loss_weight: float = 1.0
    #: Names (prefixes) of the parameters trained; empty: all. The rest is frozen, and its batch
    #: normalisation keeps its statistics.
    train_only: list[str] = field(default_factory=list)
    glas_val_every: int = 5  # every 5th GlaS image (train_5, train_10, ...) is held out
    consep_val_every: int = 5  # every 5th CoNSeP source image (train_5, ...) is held out
    monuseg_held_out: list[str] = field(
        default_factory=lambda: [
            "TCGA-A7-A13E-01Z-00-DX1",
            "TCGA-21-5786-01Z-00-DX1",
            "TCGA-B0-5710-01Z-00-DX1",
        ]
    )
    contour_um: dict[str, float] = field(
        default_factory=lambda: {"Gland": 3.0, "Lumen": 2.0, "Nuclei": 1.0}
    )
    checkpoint_every: int = 100
    log_every: int = 20

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        unknown = set(self.augment) - {f.name for f in fields(Augmentation)}
        if unknown:
            raise ValueError(f"unknown augment settings {sorted(unknown)}")
        if self.minutes and self.warmup < FIT_STEPS[1]:
            raise ValueError(f"minutes needs a warm-up of at least {FIT_STEPS[1]} steps")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> TrainConfig:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# --- data -------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A labelled image with its training targets precomputed at full size."""

    name: str
    source: str
    image: np.ndarray
    targets: dict[str, tuple[np.ndarray, np.ndarray]]  # task -> (classes, U-Net weights)
    instances: dict[str, np.ndarray]
    types: dict[str, np.ndarray]
    grade: str | None


def prepare(item: LabelledImage, contour_um: dict[str, float], mpp: float) -> Prepared:
    targets = {}
    for task, labels in item.instances.items():
        classes = inner_contour_map(labels, max(1, round(contour_um[task] / mpp)))
        targets[task] = (classes, unet_weight_map(labels, classes))
    return Prepared(
        item.name, item.source, item.image, targets, item.instances, item.types, item.grade
    )


def load_pools(config: TrainConfig, preset: Preset) -> tuple[dict[str, list[Prepared]], dict]:
    """Prepared training images per dataset, read from the dataset folders or, where
    `config.data` is an unpacked training pack (`inference.pack`), from the pack."""
    if pack.is_pack(config.data):
        items, summary = pack.read(config.data, config, preset)
    else:
        items, summary = datasets.read_training(config, preset)
    region_mpp = preset.mpp * preset.gland_scale
    pools = {
        source: [
            prepare(item, config.contour_um, region_mpp if source == "glas" else preset.mpp)
            for item in listed
        ]
        for source, listed in items.items()
    }
    return pools, summary


@dataclass(frozen=True)
class Augmentation:
    """What a crop undergoes besides flips, right-angle rotations and per-channel colour gain
    and bias (always on); each is off at 0."""

    #: Crops of 1 ± this times the crop size resampled to it (objects larger and smaller).
    scale: float = 0.0
    #: Haematoxylin, eosin and DAB densities (colour deconvolution) each scaled by 1 ± this and
    #: shifted by ± this × 0.02 (densities of H&E pixels reach about 0.1): other stainings.
    stain: float = 0.0
    #: Probability of a Gaussian blur of σ 0.5–1.5 px (focus).
    blur: float = 0.0


class TaskSampler:
    """Draws training samples: a dataset by the configured mix, an image by area, a random crop
    augmented (`Augmentation`); with `hv`, nuclei's distance maps."""

    def __init__(
        self,
        pools: dict[str, list[Prepared]],
        mix: dict[str, float],
        crop: int,
        hv=False,
        augment: Augmentation = Augmentation(),
    ):
        self.pools = {name: pools[name] for name in mix if mix[name] > 0 and pools.get(name)}
        if not self.pools:
            raise ValueError(f"no training images for {sorted(mix)}")
        weights_ = np.array([mix[name] for name in self.pools], dtype=float)
        self.mix = weights_ / weights_.sum()
        self.crop = crop
        self.hv = hv
        self.augment = augment

    def sample(self, rng: np.random.Generator) -> dict:
        source = list(self.pools)[rng.choice(len(self.pools), p=self.mix)]
        pool = self.pools[source]
        areas = np.array([p.image.shape[0] * p.image.shape[1] for p in pool], dtype=float)
        item = pool[rng.choice(len(pool), p=areas / areas.sum())]
        h, w = item.image.shape[:2]
        augment = self.augment
        size = self.crop
        if augment.scale:
            size = round(self.crop * rng.uniform(1 - augment.scale, 1 + augment.scale))
        top = int(rng.integers(0, max(h - size, 0) + 1))
        left = int(rng.integers(0, max(w - size, 0) + 1))
        window = (slice(top, top + size), slice(left, left + size))
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        nearest = ((np.arange(self.crop) + 0.5) * size / self.crop).astype(int)

        def view(array: np.ndarray, image: bool = False) -> np.ndarray:
            array = _pad_to(array[window], size)
            if size != self.crop:  # labels by nearest neighbour, the image bilinear
                array = (
                    cv2.resize(array, (self.crop, self.crop), interpolation=cv2.INTER_LINEAR)
                    if image
                    else array[nearest][:, nearest]
                )
            array = np.rot90(array, k, axes=(0, 1))
            return np.ascontiguousarray(array[:, ::-1] if flip else array)

        image = view(item.image, image=True)
        if augment.stain:
            densities = rgb2hed(image)
            scale = rng.uniform(1 - augment.stain, 1 + augment.stain, size=3)
            shift = rng.uniform(-augment.stain, augment.stain, size=3) * 0.02
            image = np.clip(hed2rgb(densities * scale + shift) * 255, 0, 255)
        if augment.blur and rng.random() < augment.blur:
            image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), rng.uniform(0.5, 1.5))
        image = image.astype(np.float32)
        gain = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
        bias = rng.uniform(-12, 12, size=3).astype(np.float32)
        image = np.clip(image * gain + bias, 0, 255)
        sample = {
            "image": image.transpose(2, 0, 1),
            "targets": {task: tuple(view(a) for a in t) for task, t in item.targets.items()},
            "types": {task: view(t) for task, t in item.types.items()},
            "patch": -1,
        }
        if self.hv and "Nuclei" in item.instances:
            sample["hv"] = hv_maps(view(item.instances["Nuclei"]))
        if "Gland" in item.instances:
            sample["patch"] = datasets.tissue_class(
                item.instances["Gland"][window], item.image[window], item.grade
            )
        return sample

    def batch(self, size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return collate([self.sample(rng) for _ in range(size)], self.crop)


def step_batches(samplers: dict[str, TaskSampler], config: TrainConfig, step: int) -> dict:
    """A step's region and nuclear batches, drawn with a generator seeded by (seed, step): the
    same whichever thread draws them and wherever a run resumes."""
    rng = np.random.default_rng((config.seed, step))
    sizes = {"region": config.region_batch, "nuclear": config.batch}
    return {name: samplers[name].batch(size, rng) for name, size in sizes.items() if size}


def batches(samplers: dict[str, TaskSampler], config: TrainConfig, first: int) -> Iterator[dict]:
    """Each step's batches from step `first` on; with `loader_threads`, drawn that many steps
    ahead on as many threads while the network trains (cropping is numpy, which releases the
    GIL: what keeps a GPU busy)."""
    if not config.loader_threads:
        yield from (step_batches(samplers, config, step) for step in itertools.count(first))
        return
    with ThreadPoolExecutor(config.loader_threads) as pool:
        ahead = deque(
            pool.submit(step_batches, samplers, config, step)
            for step in range(first, first + config.loader_threads)
        )
        for step in itertools.count(first + config.loader_threads):
            yield ahead.popleft().result()
            ahead.append(pool.submit(step_batches, samplers, config, step))


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    h, w = array.shape[:2]
    if h >= size and w >= size:
        return array
    pad = [(0, max(size - h, 0)), (0, max(size - w, 0))] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="reflect")


def collate(samples: list[dict], crop: int) -> dict[str, torch.Tensor]:
    n = len(samples)
    batch = {"image": torch.from_numpy(np.stack([s["image"] for s in samples]))}
    for task in SEGMENTATION_TASKS:
        has = [task in s["targets"] for s in samples]
        classes = np.zeros((n, crop, crop), dtype=np.int64)
        weight_map = np.zeros((n, crop, crop), dtype=np.float32)
        for i, s in enumerate(samples):
            if has[i]:
                classes[i], weight_map[i] = s["targets"][task]
        batch[task] = (torch.from_numpy(classes), torch.from_numpy(weight_map), torch.tensor(has))
    for task in TYPED_TASKS:
        has = [task in s["types"] for s in samples]
        types = np.zeros((n, crop, crop), dtype=np.int64)
        for i, s in enumerate(samples):
            if has[i]:
                types[i] = s["types"][task]
        batch[f"{task}#TYPE"] = (torch.from_numpy(types), torch.tensor(has))
    has = [("hv" in s) for s in samples]
    hv = np.zeros((n, 2, crop, crop), dtype=np.float32)
    for i, s in enumerate(samples):
        if has[i]:
            hv[i] = s["hv"]
    batch[NUCLEI_HV] = (torch.from_numpy(hv), torch.tensor(has))
    batch[PATCH_HEAD] = torch.tensor([s["patch"] for s in samples])
    return batch


# --- losses -----------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, target: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Per-sample soft Dice loss averaged over `classes`, shape (N,)."""
    probs = logits.softmax(dim=1)
    losses = []
    for c in classes:
        p, t = probs[:, c], (target == c).float()
        inter = (p * t).sum(dim=(1, 2))
        losses.append(1 - (2 * inter + 1) / (p.sum(dim=(1, 2)) + t.sum(dim=(1, 2)) + 1))
    return torch.stack(losses).mean(dim=0)


def segmentation_loss(logits, classes, weight_map, has) -> torch.Tensor | None:
    """U-Net-weighted cross-entropy plus Dice on inner and contour, averaged over the samples
    that carry this head's labels; None when no sample does."""
    if not bool(has.any()):
        return None
    logits, classes, weight_map = logits[has].float(), classes[has], weight_map[has]
    ce = (F.cross_entropy(logits, classes, reduction="none") * weight_map).mean(dim=(1, 2))
    return (ce + dice_loss(logits, classes, [1, 2])).mean()


def hv_loss(pred, target, has) -> torch.Tensor | None:
    """HoVer-Net's loss of the distance maps: squared error over all pixels plus squared error
    of their gradients (along x of the horizontal map, along y of the vertical) over the nuclei."""
    if not bool(has.any()):
        return None
    pred, target = pred[has].float(), target[has]
    nuclei = (target.abs().sum(dim=1, keepdim=True) > 0).float()
    mse = ((pred - target) ** 2).mean()
    gradient_error = (_hv_gradients(pred) - _hv_gradients(target)) ** 2 * nuclei
    msge = gradient_error.sum() / (2 * nuclei.sum()).clamp_min(1.0)
    return mse + msge


def _hv_gradients(maps: torch.Tensor) -> torch.Tensor:
    """d/dx of channel 0 and d/dy of channel 1 with HoVer-Net's 5x5 Sobel kernels."""
    steps = torch.arange(-2, 3, dtype=torch.float32, device=maps.device)
    across, along = steps.expand(5, 5), steps[:, None].expand(5, 5)
    kernel_x = across / (across * across + along * along).clamp_min(1e-15)
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None]
    return F.conv2d(maps, kernels, padding=2, groups=2)


def patch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    known = labels >= 0
    if not bool(known.any()):
        return None
    return F.cross_entropy(logits[known].float(), labels[known])


def typing_loss(logits, types, has) -> torch.Tensor | None:
    if not bool(has.any()):
        return None
    logits, types = logits[has].float(), types[has]
    present = [int(c) for c in torch.unique(types) if c > 0]
    loss = F.cross_entropy(logits, types)
    return loss + dice_loss(logits, types, present).mean() if present else loss


# --- the loop ---------------------------------------------------------------------------------


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch_losses(out: dict, batch: dict, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The losses of the heads in `out` that `batch` has labels for."""
    device = config.device
    losses = {}
    for task in SEGMENTATION_TASKS:
        if f"{task}-INST" in out:
            classes, weight_map, has = (t.to(device) for t in batch[task])
            loss = segmentation_loss(out[f"{task}-INST"], classes, weight_map, has)
            if loss is not None:
                losses[task] = loss
    for task in TYPED_TASKS:
        if f"{task}-TYPE" in out:
            types, has = (t.to(device) for t in batch[f"{task}#TYPE"])
            loss = typing_loss(out[f"{task}-TYPE"], types, has)
            if loss is not None:
                losses[f"{task}#TYPE"] = loss
    if NUCLEI_HV in out:
        target, has = (t.to(device) for t in batch[NUCLEI_HV])
        loss = hv_loss(out[NUCLEI_HV], target, has)
        if loss is not None:
            losses[NUCLEI_HV] = config.hv_loss_weight * loss
    if PATCH_HEAD in out:
        loss = patch_loss(out[PATCH_HEAD], batch[PATCH_HEAD].to(device))
        if loss is not None:
            losses[PATCH_HEAD] = config.patch_loss_weight * loss
    return losses


def step_losses(net: CerberusNet, step: dict, config: TrainConfig) -> dict[str, torch.Tensor]:
    """One step's losses: the region batch through the region tasks, the nuclear batch through
    the nuclear ones, each at its own resolution."""
    losses = {}
    passes = ((REGION_TASKS, "region", 1), (NUCLEAR_TASKS, "nuclear", net.preset.nucleus_scale))
    for tasks, name, pool in passes:
        if name not in step:
            continue
        batch = step[name]
        with autocast(config.device, enabled=config.bf16 and use_bf16(config.device)):
            image = batch["image"].to(config.device, non_blocking=True)
            out = net.decode(image, tasks=tasks, pool=pool)
        losses.update(batch_losses(out, batch, config))
    return losses


def _trained(name: str, prefixes: list[str]) -> bool:
    return not prefixes or any(name.startswith(prefix) for prefix in prefixes)


def trainable(net: CerberusNet, prefixes: list[str]) -> list[torch.nn.Parameter]:
    """The parameters named by `prefixes` (all when empty), the others frozen."""
    chosen = []
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(_trained(name, prefixes))
        if parameter.requires_grad:
            chosen.append(parameter)
    if not chosen:
        raise ValueError(f"train_only {prefixes} names no parameter")
    return chosen


def train_mode(net: CerberusNet, prefixes: list[str]) -> None:
    """Training mode, except the batch normalisation of frozen modules (their statistics stay)."""
    net.train()
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d) and not _trained(name, prefixes):
            module.eval()


def initialise(net: CerberusNet, path: str, log=print) -> None:
    """Parameters of a weights file copied where name and shape match (a warm start; new or
    reshaped parts keep their random initialisation)."""
    _, state = weights.read(path)
    own = net.state_dict()
    matched = {
        k: v.float() if v.is_floating_point() else v
        for k, v in state.items()
        if k in own and own[k].shape == v.shape
    }
    own.update(matched)
    net.load_state_dict(own)
    log(f"initialised {len(matched)} of {len(own)} tensors from {path}")


def train(config: TrainConfig, resume: bool = False, log=print) -> Path:
    """Run the schedule (or finish it from the last checkpoint); returns the weights path."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    net = build(config.preset).to(config.device)
    started = time.time()
    pools, summary = load_pools(config, net.preset)
    log(
        f"data ready in {time.time() - started:.0f} s: "
        + ", ".join(f"{name} {len(items)} images" for name, items in pools.items())
    )
    state = {"step": 0, "history": [], "seconds": 0.0}
    if config.init:
        initialise(net, config.init, log)
    trained = trainable(net, config.train_only)
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    average = (
        AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        if config.ema
        else None
    )
    if resume and checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location=config.device, weights_only=False)
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        if average is not None:
            average.load_state_dict(saved["average"])
        state = saved["state"]
        log(f"resumed at step {state['step']}")
    torch.manual_seed(config.seed + state["step"])
    if config.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # crops of fixed sizes
    augment = Augmentation(**config.augment)
    samplers = {
        "region": TaskSampler(pools, {"glas": 1.0}, config.region_crop, augment=augment),
        "nuclear": TaskSampler(
            pools, config.mix, config.crop, hv=net.preset.nucleus_hv, augment=augment
        ),
    }
    train_mode(net, config.train_only)
    window = []
    steps = iter(batches(samplers, config, state["step"]))
    total = state.get("total", config.steps)
    while state["step"] < total:
        tick = time.time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state["step"], total, config.lr, config.warmup)
        losses = step_losses(net, next(steps), config)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update_parameters(net)
        state["step"] += 1
        state["seconds"] += time.time() - tick
        if config.minutes and "total" not in state:
            _fit_schedule(state, config, log)
            total = state.get("total", total)
        window.append({k: float(v.detach()) for k, v in losses.items()})
        last = state["step"] == total
        if state["step"] % config.log_every == 0 or last:
            means = {
                k: float(np.mean([w[k] for w in window if k in w]))
                for k in {k for w in window for k in w}
            }
            state["history"].append({"step": state["step"], **means})
            log(
                f"step {state['step']}/{total} "
                + " ".join(f"{k}={v:.3f}" for k, v in sorted(means.items()))
                + f" ({(time.time() - tick):.2f} s/step, {state['seconds'] / 60:.1f} min)"
            )
            window = []
        if state["step"] % config.checkpoint_every == 0 or last:
            _checkpoint(checkpoint_path, net, optimizer, state, config, average)
    training = {
        "config": asdict(config),
        "data": summary,
        "steps": state["step"],
        "batch": {"nuclear": config.batch, "region": config.region_batch},
        "crop": {"nuclear": config.crop, "region": config.region_crop},
        "train_seconds": round(state["seconds"]),
        "history": state["history"],
        "code": _git_revision(),
    }
    path = out / "weights.pt"
    contour_px = {
        task: max(1, round(um / net.preset.mpp)) for task, um in config.contour_um.items()
    }
    weights.save(
        path,
        average.module if average is not None else net,
        untrained=untrained_classes(net.preset),
        postprocess={**POSTPROCESS, "contour_px": contour_px},
        training=training,
    )
    log(f"weights written to {path}")
    return path


#: Steps timed to fit a schedule into `minutes` (after 5 that warm caches and autotuning up).
FIT_STEPS = (5, 30)


def _fit_schedule(state: dict, config: TrainConfig, log=print) -> None:
    """Fix the run's length once FIT_STEPS are timed: the steps that fill `config.minutes` at
    their pace, at most `config.steps`; the cosine decay then spans exactly those."""
    first, last = FIT_STEPS
    if state["step"] == first:
        state["fit_from"] = state["seconds"]
    elif state["step"] == last:
        pace = (state["seconds"] - state.pop("fit_from")) / (last - first)
        left = config.minutes * 60 - state["seconds"]
        state["total"] = max(last, min(config.steps, last + int(left / pace)))
        log(f"{pace * 1000:.0f} ms/step: {state['total']} steps fill {config.minutes:g} min")


def run(config: TrainConfig, resume: bool = False, pack_to: str | None = None, log=print) -> Path:
    """Train (`train`), or with `pack_to` write the run's training data there as a pack
    (`inference.pack`) for a machine that cannot see the datasets; returns the file written."""
    if pack_to:
        return pack.write(config, PRESETS[config.preset], pack_to, log)
    return train(config, resume=resume, log=log)


def untrained_classes(preset: Preset) -> dict[str, list[str]]:
    """Heads' classes no dataset here labels (see the model card)."""
    nuclear = {datasets.LABELLED_NUCLEUS_TYPES[t] for t in datasets.CONSEP_TYPES.values()}
    return {
        "Nuclei#TYPE": [t for t in preset.nucleus_types[1:] if t not in nuclear],
        "Gland#TYPE": [t for t in preset.gland_types[1:] if t not in LABELLED_GLAND_TYPES],
        "Patch-Class": [c for c in TISSUE_CLASSES if c not in LABELLED_TISSUE],
    }


def _checkpoint(path: Path, net, optimizer, state: dict, config: TrainConfig, average=None) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(
        {
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
            "average": average.state_dict() if average is not None else None,
            "state": state,
            "config": asdict(config),
        },
        partial,
    )
    partial.replace(path)


def _git_revision() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--device")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--minutes", type=float)
    parser.add_argument(
        "--pack",
        metavar="FILE",
        help="write the run's training data as a pack (.tar.xz, inference.pack) instead of "
        "training: for a machine that cannot see the datasets",
    )
    args = parser.parse_args(argv)
    try:
        config = TrainConfig.from_toml(
            args.config,
            data=args.data,
            out=args.out,
            device=args.device,
            steps=args.steps,
            minutes=args.minutes,
        )
        run(config, args.resume, args.pack, log=lambda line: print(line, flush=True))
    except (OSError, ValueError) as exc:  # DatasetError and PackError are ValueErrors
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
