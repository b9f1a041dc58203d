"""Whole-image prediction with a preset's tiling, and head maps to instances.

Tiles are `input_size` wide and step by `output_size`; only the central `output_size` of each
tile's output is kept, so every kept pixel saw the preset's full context margin. The image is
padded by reflection so that its borders get the same context.
"""

from __future__ import annotations

import numpy as np
import torch

from inference import postprocess
from inference.network import NUCLEI_HV, CerberusNet

#: Post-processing settings a weights file may override (its `postprocess`): thresholds on the
#: inner-class probability, on the nuclear foreground, and the smallest instance kept (µm²).
#: The gland values were chosen on GlaS training images (not the held-out ones).
POSTPROCESS = {
    "inner_threshold": {"Gland": 0.3, "Lumen": 0.5, "Nuclei": 0.5},
    "foreground_threshold": 0.5,
    "min_area_um2": {"Gland": 600.0, "Lumen": 10.0, "Nuclei": 3.0},
    # Nuclei from distance maps (weights with a `Nuclei-HV` output): see
    # `postprocess.nuclei_instances_hv`.
    "hv_slope_threshold": 0.0,
    "hv_sobel_px": 11,
}
SEGMENTATION_HEADS = {"Gland": "Gland-INST", "Lumen": "Lumen-INST", "Nuclei": "Nuclei-INST"}
#: Classifying heads: decoder (as in a weights file's `classes`) -> output name.
CLASS_HEADS = {
    "Nuclei#TYPE": "Nuclei-TYPE",
    "Gland#TYPE": "Gland-TYPE",
    "Patch-Class": "Patch-Class",
}


def trained_channels(info) -> dict[str, np.ndarray]:
    """Per classifying output, which channels may be emitted: those of classes the weights were
    trained on (a weights file's `untrained` lists the others), and channel 0 of the type heads
    (no label)."""
    out = {}
    for decoder, head in CLASS_HEADS.items():
        names = info.classes[decoder]
        untrained = set(info.untrained.get(decoder, []))
        keep = np.array([name not in untrained for name in names])
        if decoder != "Patch-Class":
            keep[0] = True
        out[head] = keep
    return out


def without_untrained(maps: dict[str, np.ndarray], info, axis: int = 0) -> dict[str, np.ndarray]:
    """Head probabilities with the channels of untrained classes set to zero (and the tissue
    classes renormalised), so that no class the model was never taught is chosen."""
    out = dict(maps)
    for head, keep in trained_channels(info).items():
        if head in out:
            shape = [1] * out[head].ndim
            shape[axis] = len(keep)
            masked = out[head] * keep.reshape(shape)
            if head == "Patch-Class":
                masked = masked / np.maximum(masked.sum(axis=axis, keepdims=True), 1e-12)
            out[head] = masked
    return out


def use_bf16(device: str) -> bool:
    """bf16 autocast where it is fast: CUDA, and CPUs with bf16 matrix instructions (Intel's AMX,
    AVX-512 BF16 as on AMD Zen 4 and later: a training step of the nuclear decoders 2.4x faster
    than float32 on a 2-core Zen 5)."""
    if device.startswith("cuda"):
        return True
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(handle.read().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def autocast(device: str, enabled: bool | None = None):
    enabled = use_bf16(device) if enabled is None else enabled
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def head_values(name: str, logits: torch.Tensor) -> torch.Tensor:
    """What a head's logits mean: class probabilities (softmax over channels), or for the
    distance maps their values clipped to [-1, 1]."""
    if name == NUCLEI_HV:
        return logits.float().clamp(-1, 1)
    return logits.float().softmax(dim=1)


#: Test-time flips of an NCHW batch: none, left-right, up-down, both.
FLIPS = ((), (3,), (2,), (2, 3))


def flip_averaged(values, images: torch.Tensor, flips: bool = True) -> dict[str, torch.Tensor]:
    """`values(images)` ({head: values}) averaged over `FLIPS` of the images: spatial outputs
    (N, C, H, W) flipped back, the distance maps' horizontal (channel 0) and vertical (channel 1)
    values negated along a flipped axis, vectors (N, C) averaged as they are. Without `flips`,
    `values(images)`."""
    if not flips:
        return values(images)
    total: dict[str, torch.Tensor] = {}
    for axes in FLIPS:
        out = values(images.flip(axes) if axes else images)
        for name, value in out.items():
            if value.ndim == 4 and axes:
                value = value.flip(axes)
                if name == NUCLEI_HV:
                    sign = [-1.0 if 3 in axes else 1.0, -1.0 if 2 in axes else 1.0]
                    value = value * value.new_tensor(sign).view(1, 2, 1, 1)
            total[name] = total[name] + value if name in total else value
    return {name: value / len(FLIPS) for name, value in total.items()}


@torch.inference_mode()
def predict_tiles(
    net: CerberusNet,
    tiles: np.ndarray,
    tasks: tuple[str, ...],
    device: str = "cpu",
    flips: bool = False,
) -> dict[str, np.ndarray]:
    """Softmax probabilities of the kept centre of each tile: (N, C, out, out) per head, and
    `Patch-Class` as (N, C); with `flips`, averaged over the tiles' four flips. `tiles` is
    (N, input, input, 3) uint8."""
    preset = net.preset
    margin = (preset.input_size - preset.output_size) // 2
    keep = slice(margin, margin + preset.output_size)
    images = torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))).float()

    def values(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(device):
            out = net(batch, tasks=tasks)
        return {name: head_values(name, logits) for name, logits in out.items()}

    result = {}
    for name, probs in flip_averaged(values, images.to(device), flips).items():
        if probs.ndim == 4:
            probs = probs[..., keep, keep]
        result[name] = probs.cpu().numpy()
    return result


def predict_image(
    net: CerberusNet,
    image: np.ndarray,
    tasks: tuple[str, ...],
    device: str = "cpu",
    batch: int = 4,
    flips: bool = False,
) -> dict[str, np.ndarray]:
    """Head probabilities over a whole (H, W, 3) uint8 image at the network's resolution:
    (C, H, W) per segmentation head, and `Patch-Class` as (C, rows, cols) per kept tile; with
    `flips`, each tile's averaged over its four flips."""
    preset = net.preset
    size, out = preset.input_size, preset.output_size
    margin = (size - out) // 2
    h, w = image.shape[:2]
    rows, cols = -(-h // out), -(-w // out)
    padded = np.pad(
        image,
        ((margin, rows * out - h + margin), (margin, cols * out - w + margin), (0, 0)),
        mode="reflect",
    )
    corners = [(r * out, c * out) for r in range(rows) for c in range(cols)]
    maps: dict[str, np.ndarray] = {}
    for start in range(0, len(corners), batch):
        chunk = corners[start : start + batch]
        tiles = np.stack([padded[y : y + size, x : x + size] for y, x in chunk])
        for name, probs in predict_tiles(net, tiles, tasks, device, flips).items():
            if probs.ndim == 2:
                grid = maps.setdefault(name, np.zeros((probs.shape[1], rows, cols), np.float32))
                for (y, x), p in zip(chunk, probs, strict=True):
                    grid[:, y // out, x // out] = p
                continue
            canvas = maps.setdefault(
                name, np.zeros((probs.shape[1], rows * out, cols * out), np.float32)
            )
            for (y, x), p in zip(chunk, probs, strict=True):
                canvas[:, y : y + out, x : x + out] = p
    return {name: grid if name == "Patch-Class" else grid[:, :h, :w] for name, grid in maps.items()}


def instances(maps: dict[str, np.ndarray], settings: dict, mpp: float) -> dict[str, np.ndarray]:
    """Instance label maps per task from head probabilities, as in Cerberus: watershed for
    nuclei (on the distance maps where the weights have them); threshold, dilate and fill for
    glands and lumina; lumina outside glands dropped.
    `settings` is a weights file's `postprocess` (contour widths, and overrides of POSTPROCESS)."""
    settings = {**POSTPROCESS, **settings}
    threshold = settings["inner_threshold"]
    min_px = {task: max(1, round(a / mpp**2)) for task, a in settings["min_area_um2"].items()}
    out = {}
    if "Nuclei-INST" in maps and NUCLEI_HV in maps:
        out["Nuclei"] = postprocess.nuclei_instances_hv(
            maps["Nuclei-INST"],
            maps[NUCLEI_HV],
            foreground_threshold=settings["foreground_threshold"],
            slope_threshold=settings["hv_slope_threshold"],
            sobel_px=int(settings["hv_sobel_px"]),
            min_area_px=min_px["Nuclei"],
        )
    elif "Nuclei-INST" in maps:
        out["Nuclei"] = postprocess.nuclei_instances(
            maps["Nuclei-INST"],
            inner_threshold=threshold["Nuclei"],
            foreground_threshold=settings["foreground_threshold"],
            min_area_px=min_px["Nuclei"],
        )
    for task in ("Gland", "Lumen"):
        head = SEGMENTATION_HEADS[task]
        if head in maps:
            out[task] = postprocess.region_instances(
                maps[head],
                contour_px=int(settings["contour_px"][task]),
                inner_threshold=threshold[task],
                min_area_px=min_px[task],
            )
    if "Lumen" in out and "Gland" in out:
        out["Lumen"] = postprocess.lumina_inside_glands(out["Lumen"], out["Gland"])
    return out
