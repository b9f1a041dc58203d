"""Sparse multi-task training of the Cerberus network.

Phase 1 trains the encoder with the gland, lumen and nucleus segmentation heads and the patch
classifier on mixed batches: a task sampler draws each sample's dataset by configured weights
(the datasets differ in size by orders of magnitude), each sample carries only its own labels,
and each head's loss averages over the samples that have them. Phase 2 is the transfer step of
the paper: the encoder is frozen and only the nuclear-typing decoder learns.

    python -m inference.train --config configs/cpu.toml [--resume]

Checkpoints go to `<out>/checkpoint.pt` (resumable), the result to `<out>/weights.pt`.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference import datasets, weights
from inference.datasets import LabelledImage
from inference.network import NUCLEUS_TYPES, TISSUE_CLASSES, CerberusNet, build
from inference.predict import POSTPROCESS, autocast, use_bf16
from inference.targets import inner_contour_map, unet_weight_map

SEGMENTATION_TASKS = ("Gland", "Lumen", "Nuclei")
OUTPUT = {"Gland": "Gland-INST", "Lumen": "Lumen-INST", "Nuclei": "Nuclei-INST"}


@dataclass
class TrainConfig:
    """Everything a run depends on; read from a TOML file, overridable on the command line."""

    preset: str = "cpu"
    data: str = "../shared/data"
    out: str = "runs/cpu"
    device: str = "cpu"
    bf16: bool = True  # autocast on CPUs with AMX and on CUDA
    threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 0
    crop: int = 256
    batch: int = 8
    steps: int = 3000  # phase 1
    typing_steps: int = 400  # phase 2 (frozen encoder)
    lr: float = 1e-3
    typing_lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: int = 100
    init: str | None = None  # start from these weights (a second schedule) instead of scratch
    mix: dict[str, float] = field(default_factory=lambda: {"glas": 0.55, "monuseg": 0.45})
    patch_loss_weight: float = 0.5
    glas_val_every: int = 5  # every 5th GlaS image (train_5, train_10, ...) is held out
    monuseg_held_out: list[str] = field(default_factory=lambda: ["TCGA-A7-A13E-01Z-00-DX1"])
    contour_um: dict[str, float] = field(
        default_factory=lambda: {"Gland": 3.0, "Lumen": 2.0, "Nuclei": 1.0}
    )
    checkpoint_every: int = 100
    log_every: int = 20

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
    nucleus_types: np.ndarray | None
    grade: str | None


def prepare(item: LabelledImage, contour_px: dict[str, int]) -> Prepared:
    targets = {}
    for task, labels in item.instances.items():
        classes = inner_contour_map(labels, contour_px[task])
        targets[task] = (classes, unet_weight_map(labels, classes))
    return Prepared(
        item.name, item.source, item.image, targets, item.instances, item.nucleus_types, item.grade
    )


def load_pools(config: TrainConfig, mpp: float) -> tuple[dict[str, list[Prepared]], dict]:
    """Training images per dataset, and a summary naming what was held out."""
    root = Path(config.data)
    contour_px = {task: max(1, round(um / mpp)) for task, um in config.contour_um.items()}
    glas_names = [name for name, *_ in datasets.glas_pairs(root / "glas")]
    glas_train, glas_val = datasets.split_names(glas_names, config.glas_val_every)
    monuseg_names = [name for name, *_ in datasets.monuseg_pairs(root / "monuseg")]
    missing = set(config.monuseg_held_out) - set(monuseg_names)
    if missing:
        raise ValueError(f"held-out MoNuSeg tiles not found: {sorted(missing)}")
    monuseg_train = [n for n in monuseg_names if n not in config.monuseg_held_out]
    pools = {
        "glas": datasets.read_glas(root / "glas", mpp, set(glas_train)),
        "monuseg": datasets.read_monuseg(root / "monuseg", mpp, set(monuseg_train)),
        "histolytics": datasets.read_histolytics(root / "histolytics-hgsc", mpp),
    }
    prepared = {
        source: [prepare(item, contour_px) for item in items] for source, items in pools.items()
    }
    summary = {
        "glas": {"train": glas_train, "held_out": glas_val},
        "monuseg": {"train": monuseg_train, "held_out": list(config.monuseg_held_out)},
        "histolytics": {"train": ["hgsc_nest"], "held_out": []},
        "contour_px": contour_px,
    }
    return prepared, summary


class TaskSampler:
    """Draws training samples: a dataset by the configured mix, an image by area, a random crop
    with flips, right-angle rotations and colour jitter."""

    def __init__(self, pools: dict[str, list[Prepared]], mix: dict[str, float], crop: int, rng):
        self.pools = {name: pools[name] for name in mix if pools.get(name)}
        weights_ = np.array([mix[name] for name in self.pools], dtype=float)
        self.mix = weights_ / weights_.sum()
        self.crop = crop
        self.rng = rng

    def sample(self) -> dict:
        source = list(self.pools)[self.rng.choice(len(self.pools), p=self.mix)]
        pool = self.pools[source]
        areas = np.array([p.image.shape[0] * p.image.shape[1] for p in pool], dtype=float)
        item = pool[self.rng.choice(len(pool), p=areas / areas.sum())]
        h, w = item.image.shape[:2]
        top = int(self.rng.integers(0, max(h - self.crop, 0) + 1))
        left = int(self.rng.integers(0, max(w - self.crop, 0) + 1))
        window = (slice(top, top + self.crop), slice(left, left + self.crop))
        k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))

        def view(array: np.ndarray) -> np.ndarray:
            array = _pad_to(array[window], self.crop)
            array = np.rot90(array, k, axes=(0, 1))
            return np.ascontiguousarray(array[:, ::-1] if flip else array)

        image = view(item.image).astype(np.float32)
        gain = self.rng.uniform(0.9, 1.1, size=3).astype(np.float32)
        bias = self.rng.uniform(-12, 12, size=3).astype(np.float32)
        image = np.clip(image * gain + bias, 0, 255)
        sample = {"image": image.transpose(2, 0, 1), "targets": {}, "types": None, "patch": -1}
        for task, (classes, weight_map) in item.targets.items():
            sample["targets"][task] = (view(classes), view(weight_map))
        if item.nucleus_types is not None:
            sample["types"] = view(item.nucleus_types)
        if "Gland" in item.instances:
            sample["patch"] = datasets.tissue_class(
                item.instances["Gland"][window], item.image[window], item.grade
            )
        return sample

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        return collate([self.sample() for _ in range(size)], self.crop)


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    h, w = array.shape[:2]
    if h >= size and w >= size:
        return array
    pad = [(0, size - h), (0, size - w)] + [(0, 0)] * (array.ndim - 2)
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
    has_types = [s["types"] is not None for s in samples]
    types = np.zeros((n, crop, crop), dtype=np.int64)
    for i, s in enumerate(samples):
        if has_types[i]:
            types[i] = s["types"]
    batch["Nuclei#TYPE"] = (torch.from_numpy(types), torch.tensor(has_types))
    batch["Patch-Class"] = torch.tensor([s["patch"] for s in samples])
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
    return F.cross_entropy(logits, types) + dice_loss(logits, types, present).mean()


# --- the loop ---------------------------------------------------------------------------------


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def phase_parameters(net: CerberusNet, phase: int) -> list[torch.nn.Parameter]:
    typing = ("decoder_head.Nuclei#TYPE.", "output_head.Nuclei#TYPE.")
    for name, param in net.named_parameters():
        in_typing = name.startswith(typing)
        param.requires_grad = in_typing if phase == 2 else not in_typing
    return [p for p in net.parameters() if p.requires_grad]


def set_modes(net: CerberusNet, phase: int) -> None:
    """Phase 2 freezes the encoder's batch-norm statistics too; only the typing decoder trains."""
    if phase == 1:
        net.train()
    else:
        net.eval()
        net.decoder_head["Nuclei#TYPE"].train()
        net.output_head["Nuclei#TYPE"].train()


def step_losses(net, batch, phase: int, config: TrainConfig) -> dict[str, torch.Tensor]:
    images = batch["image"].to(config.device)
    losses = {}
    with autocast(config.device, enabled=config.bf16 and use_bf16(config.device)):
        if phase == 1:
            out = net(images, tasks=(*SEGMENTATION_TASKS, "Patch-Class"))
        else:
            out = net(images, tasks=("Nuclei#TYPE",))
    if phase == 1:
        for task in SEGMENTATION_TASKS:
            classes, weight_map, has = (t.to(config.device) for t in batch[task])
            loss = segmentation_loss(out[OUTPUT[task]], classes, weight_map, has)
            if loss is not None:
                losses[task] = loss
        loss = patch_loss(out["Patch-Class"], batch["Patch-Class"].to(config.device))
        if loss is not None:
            losses["Patch-Class"] = config.patch_loss_weight * loss
    else:
        types, has = (t.to(config.device) for t in batch["Nuclei#TYPE"])
        loss = typing_loss(out["Nuclei-TYPE"], types, has)
        if loss is not None:
            losses["Nuclei#TYPE"] = loss
    return losses


def train(config: TrainConfig, resume: bool = False, log=print) -> Path:
    """Run both phases (or finish them from the last checkpoint); returns the weights path."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    net = build(config.preset).to(config.device)
    started = time.time()
    pools, summary = load_pools(config, net.preset.mpp)
    log(
        f"data ready in {time.time() - started:.0f} s: "
        + ", ".join(f"{name} {len(items)} images" for name, items in pools.items())
    )
    state = {"phase": 1, "step": 0, "history": [], "seconds": 0.0}
    optimizer = None
    if config.init:
        _, init_state = weights.read(config.init)
        net.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in init_state.items()}
        )
        log(f"initialised from {config.init}")
    if resume and checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location=config.device, weights_only=False)
        net.load_state_dict(saved["net"])
        state = saved["state"]
        if saved["optimizer"] is not None:
            optimizer = _optimizer(net, state["phase"], config)
            optimizer.load_state_dict(saved["optimizer"])
        log(f"resumed at phase {state['phase']} step {state['step']}")
    rng = np.random.default_rng(config.seed + state["step"] + 100_000 * state["phase"])
    torch.manual_seed(config.seed + state["step"])
    phases = {
        1: (config.steps, config.lr, TaskSampler(pools, config.mix, config.crop, rng)),
        2: (
            config.typing_steps,
            config.typing_lr,
            TaskSampler(pools, {"histolytics": 1.0}, config.crop, rng),
        ),
    }
    while state["phase"] <= 2:
        phase = state["phase"]
        total, peak, sampler = phases[phase]
        if optimizer is None:
            optimizer = _optimizer(net, phase, config)
        set_modes(net, phase)
        window = []
        while state["step"] < total:
            tick = time.time()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state["step"], total, peak, config.warmup)
            losses = step_losses(net, sampler.batch(config.batch), phase, config)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] += 1
            state["seconds"] += time.time() - tick
            window.append({k: float(v.detach()) for k, v in losses.items()})
            if state["step"] % config.log_every == 0 or state["step"] == total:
                means = {
                    k: float(np.mean([w[k] for w in window if k in w]))
                    for k in {k for w in window for k in w}
                }
                state["history"].append({"phase": phase, "step": state["step"], **means})
                log(
                    f"phase {phase} step {state['step']}/{total} "
                    + " ".join(f"{k}={v:.3f}" for k, v in sorted(means.items()))
                    + f" ({(time.time() - tick):.2f} s/step, {state['seconds'] / 60:.1f} min)"
                )
                window = []
            if state["step"] % config.checkpoint_every == 0 or state["step"] == total:
                _checkpoint(checkpoint_path, net, optimizer, state, config)
        state = {**state, "phase": phase + 1, "step": 0}
        optimizer = None
        _checkpoint(checkpoint_path, net, None, state, config)
    contour_px = summary.pop("contour_px")
    training = {
        "config": asdict(config),
        "data": summary,
        "steps": {"segmentation": config.steps, "typing": config.typing_steps},
        "batch": config.batch,
        "crop": config.crop,
        "train_seconds": round(state["seconds"]),
        "history": state["history"],
        "code": _git_revision(),
    }
    path = out / "weights.pt"
    postprocess = {**POSTPROCESS, "contour_px": contour_px}
    weights.save(
        path, net, untrained=untrained_classes(), postprocess=postprocess, training=training
    )
    log(f"weights written to {path}")
    return path


def untrained_classes() -> dict[str, list[str]]:
    """Heads and classes no dataset here labels (see the model card)."""
    typed = {NUCLEUS_TYPES[t] for t in datasets.HISTOLYTICS_TYPES.values()}
    labelled_tissue = {"background", "normal epithelium", "abnormal epithelium", "stroma"}
    return {
        "Nuclei#TYPE": [t for t in NUCLEUS_TYPES[1:] if t not in typed],
        "Gland#TYPE": ["gland", "surface-epi"],
        "Patch-Class": [c for c in TISSUE_CLASSES if c not in labelled_tissue],
    }


def _optimizer(net: CerberusNet, phase: int, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        phase_parameters(net, phase), lr=config.lr, weight_decay=config.weight_decay
    )


def _checkpoint(path: Path, net, optimizer, state: dict, config: TrainConfig) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(
        {
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
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
    parser.add_argument("--typing-steps", type=int)
    args = parser.parse_args(argv)
    config = TrainConfig.from_toml(
        args.config,
        data=args.data,
        out=args.out,
        device=args.device,
        steps=args.steps,
        typing_steps=args.typing_steps,
    )
    train(config, resume=args.resume, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
