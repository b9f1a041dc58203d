"""Where the network's forward pass runs: PyTorch, or an OpenVINO graph on the CPU.

`torch` runs the `CerberusNet` eagerly in channels-last memory order with bf16 autocast where
the device has it (CUDA, CPUs with bf16 instructions); it serves CUDA and every CPU. `openvino`
runs the same network exported once to an OpenVINO graph (`openvino.convert_model`: batch norm
folded into the convolutions, ReLU, additions and upsampling fused) and compiled for this CPU,
in bf16 where the CPU has bf16 instructions: on a 2-core Zen 5 a 1,024 px tile of the default
model takes 0.17 s against 1.13 s eagerly. The exported graph is cached on disk per weights,
tasks, tile size and OpenVINO version (`cache_dir`), since exporting takes about 10 s.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from inference.predict import autocast, use_bf16

BACKENDS = ("openvino", "torch")
#: Bump when the exported graph changes for the same weights and tasks.
EXPORT_VERSION = 2


def default_backend(device: str) -> str:
    """OpenVINO on the CPU where it is installed, PyTorch otherwise."""
    if device == "cpu":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "torch"
        return "openvino"
    return "torch"


def cache_dir() -> Path:
    """`$SPATIALDB_CACHE`, else the user's cache directory for spatialdb."""
    if os.environ.get("SPATIALDB_CACHE"):
        return Path(os.environ["SPATIALDB_CACHE"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("spatialdb"))


class TorchForward:
    """A module (`inference.engine.TileHeads`) run eagerly by PyTorch on `device`, with
    channels-last inputs and bf16 autocast where the device has it."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.module = module.to(device, memory_format=torch.channels_last).eval()
        self.device = device

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device):
            return self.module(images)


class OpenVINOForward:
    """A module (`inference.engine.TileHeads`) as a compiled OpenVINO graph on the CPU, one
    tile per inference (the same throughput per tile as larger batches there). `key` names what
    the graph computes (weights and outputs): the exported graph is cached under it."""

    def __init__(self, module: torch.nn.Module, input_size: int, key: str):
        import openvino as ov

        module = module.to("cpu").eval()
        digest = hashlib.sha256(
            f"{key}|{input_size}|{ov.__version__}|{EXPORT_VERSION}".encode()
        ).hexdigest()[:24]
        path = cache_dir() / "openvino" / f"cerberus-{digest}.xml"
        if not path.exists():
            _export(module, input_size, path)
        core = ov.Core()
        precision = "bf16" if use_bf16("cpu") else "f32"
        self.compiled = core.compile_model(
            core.read_model(path),
            "CPU",
            {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"},
        )
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = images.detach().to("cpu", torch.float32).numpy()
        outs: list[np.ndarray] = []
        for i, image in enumerate(batch):
            result = self.request.infer([image[None]])  # views of the request's own buffers
            values = [result[k] for k in range(len(self.compiled.outputs))]
            if not outs:
                outs = [np.empty((len(batch), *v.shape[1:]), v.dtype) for v in values]
            for out, value in zip(outs, values, strict=True):
                out[i] = value[0]
        return tuple(torch.from_numpy(out) for out in outs)


def _export(module: torch.nn.Module, size: int, path: Path) -> None:
    """Export `module` for (1, 3, size, size) inputs to an OpenVINO graph at `path`, written
    under temporary names and renamed, so that a crash leaves no half-written graph."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's notes on shapes taken as constants: they are
        model = ov.convert_model(module, example_input=torch.zeros(1, 3, size, size))
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.xml")
    ov.save_model(model, partial, compress_to_fp16=False)
    partial.with_suffix(".bin").replace(path.with_suffix(".bin"))
    partial.replace(path)


def forward_for(module: torch.nn.Module, input_size: int, device: str, backend: str, key: str):
    """`module`'s forward pass with `backend` ('openvino' only on the CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "openvino":
        if device != "cpu":
            raise ValueError(f"the openvino backend runs on the CPU, not on {device}")
        return OpenVINOForward(module, input_size, key)
    return TorchForward(module, device)
