"""The weights file: a network's parameters with everything needed to use and trust them.

A weights file is a `torch.save`d dict:

- `format`: "spatialdb-weights/1"
- `preset`: the `Preset` fields; `mpp`: the resolution the network was trained at (µm/px)
- `classes`: class names per head (nuclear types, gland types, tissue classes)
- `untrained`: heads and classes that saw no labels in training, so callers can flag them
- `postprocess`: the parameters post-processing needs (contour widths of the targets, px)
- `training`: data summary, splits, steps and timings; `metrics`: held-out evaluation
- `state_dict`: parameters stored as float16 (floating point) to keep the file small
- `sha256`: hash of the parameter bytes, checked on load

The hash identifies the weights in the database (`model.weights_sha256`). Nothing is ever
downloaded: the default file ships inside the package.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from inference.network import PRESETS, TISSUE_CLASSES, CerberusNet, Preset, build

FORMAT = "spatialdb-weights/1"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "cerberus-cpu-multiscale.pt"
#: The shipped weights for slides scanned at 40x: nuclear decoders ending at 0.25 µm/px.
WEIGHTS_40X = DEFAULT_WEIGHTS.with_name("cerberus-cpu-multiscale-40x.pt")
#: Preset fields stored as lists in a weights file and as tuples in a `Preset`.
_TUPLE_FIELDS = ("widths", "blocks", "nucleus_types", "gland_types")
#: Contour widths (px at 0.5 µm/px) assumed for the published checkpoint's targets.
PUBLISHED_CONTOUR_PX = {"Gland": 6, "Lumen": 4, "Nuclei": 2}


class WeightsError(ValueError):
    """A weights file that cannot be used."""


@dataclass
class WeightsInfo:
    """Everything in a weights file except the parameters."""

    preset: Preset
    sha256: str
    classes: dict[str, list[str]] = field(default_factory=dict)
    untrained: dict[str, list[str]] = field(default_factory=dict)
    postprocess: dict[str, float] = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def mpp(self) -> float:
        return self.preset.mpp


def parameters_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _compact(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        key: value.detach().cpu().half() if value.is_floating_point() else value.detach().cpu()
        for key, value in state.items()
    }


def save(
    path: str | Path,
    net: CerberusNet,
    *,
    untrained: dict[str, list[str]],
    postprocess: dict[str, float],
    training: dict,
    metrics: dict | None = None,
) -> WeightsInfo:
    """Write `net` and its metadata atomically (temporary file, then rename)."""
    state = _compact(net.state_dict())
    info = WeightsInfo(
        preset=net.preset,
        sha256=parameters_hash(state),
        classes=class_names(net.preset),
        untrained=untrained,
        postprocess=postprocess,
        training=training,
        metrics=metrics or {},
    )
    payload = {"format": FORMAT, **asdict(info), "state_dict": state}
    payload["preset"] = asdict(net.preset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    return info


def read(path: str | Path) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """Metadata and parameters of a weights file, after checking its format and hash."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise WeightsError(f"{path}: not a readable weights file ({type(exc).__name__})") from None
    if isinstance(payload, dict) and "desc" in payload and "format" not in payload:
        return _published(payload["desc"])
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"{path}: neither a {FORMAT} file nor a published Cerberus checkpoint")
    state = payload["state_dict"]
    if parameters_hash(state) != payload["sha256"]:
        raise WeightsError(f"{path}: parameters do not match the recorded hash (file damaged?)")
    preset = payload["preset"]
    info = WeightsInfo(
        preset=Preset(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in preset.items()}),
        sha256=payload["sha256"],
        classes=payload["classes"],
        untrained=payload["untrained"],
        postprocess=payload["postprocess"],
        training=payload["training"],
        metrics=payload["metrics"],
    )
    return info, state


def _published(state: dict) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """A published Cerberus `weights.tar` ('desc' state dict, maybe with DataParallel's
    'module.' prefix) as the `cerberus` preset with default post-processing."""
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    info = WeightsInfo(
        preset=PRESETS["cerberus"],
        sha256=parameters_hash(state),
        classes=class_names(PRESETS["cerberus"]),
        postprocess={"contour_px": PUBLISHED_CONTOUR_PX},
        training={"source": "published Cerberus checkpoint (Graham et al. 2023)"},
    )
    return info, state


def class_names(preset: Preset) -> dict[str, list[str]]:
    """Class names of each classifying head of a preset, in channel order."""
    return {
        "Nuclei#TYPE": list(preset.nucleus_types),
        "Gland#TYPE": list(preset.gland_types),
        "Patch-Class": list(TISSUE_CLASSES),
    }


def load(path: str | Path = DEFAULT_WEIGHTS) -> tuple[CerberusNet, WeightsInfo]:
    """The network (float32, eval mode) and its metadata."""
    info, state = read(path)
    net = build(info.preset)
    net.load_state_dict(
        {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    )
    return net.eval(), info


def update(path: str | Path, **fields) -> None:
    """Rewrite metadata fields (`metrics`, `postprocess`, `training`) of an existing weights file;
    the parameters and their hash stay as they are."""
    allowed = {"metrics", "postprocess", "training"}
    if set(fields) - allowed:
        raise ValueError(f"only {sorted(allowed)} can be updated")
    path = Path(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload.update(fields)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)


def random_weights(preset: Preset, seed: int = 0) -> tuple[CerberusNet, WeightsInfo]:
    """An untrained network of `preset` (the baseline of slide-level learning), seeded."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = build(preset).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    info = WeightsInfo(
        preset=preset,
        sha256=parameters_hash(net.state_dict()),
        classes=class_names(preset),
        training={"source": f"random initialisation, seed {seed}"},
    )
    return net, info


def default_sha256() -> str:
    """The parameter hash of the shipped weights."""
    return read(DEFAULT_WEIGHTS)[0].sha256
