"""The network inside tiatoolbox, and whole-slide segmentation streamed region by region.

tiatoolbox's segmentors stitch every head into a full-slide canvas (in RAM, or on disk above a
memory threshold) and cannot carry the patch-classification vector. `segment_slide` therefore
drives tiatoolbox's own patch dataset (`WSIPatchDataset`, reading at the model's resolution) and
the model's `infer_batch` itself, in the order `inference.tiling` needs the tiles, hands each
finished region to a pool of post-processing processes (at idle priority) and yields its
polygons while the next tiles are inferred. Memory stays bounded by the tiles still needed by the
current band of regions, not the slide. The forward pass itself, and the per-tile head outputs
(`TileHeads`), run in the runtime the model was made with (`inference.runtime`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from tiatoolbox.models.models_abc import ModelABC

from inference import tiling
from inference.compress import place, tile_embeddings
from inference.network import BOTTLENECK, NUCLEI_HV, CerberusNet
from inference.predict import POSTPROCESS, head_values, trained_channels
from inference.runtime import forward_for
from inference.slide import TissueMask, default_batch, tile_loader
from inference.weights import WeightsInfo

#: Heads returned by `infer_batch`, in order (each NHWC, centre-cropped to the kept output), and
#: last `Nuclei-HV` for weights with distance maps (`CerberusModel.spatial_heads`).
SPATIAL_HEADS = ("Gland-INST", "Gland-TYPE", "Lumen-INST", "Nuclei-INST", "Nuclei-TYPE")
TASKS = ("Gland", "Gland#TYPE", "Lumen", "Nuclei", "Nuclei#TYPE", "Patch-Class")


class TileHeads(torch.nn.Module):
    """What `infer_batch` returns, computed in one module so that a runtime (`inference.runtime`)
    runs all of it, fused into its graph: the kept centre of each spatial head as NHWC float16
    probabilities (distance maps as they are) with untrained classes at zero, the tissue-class
    vector, and optionally the NIC cell embeddings."""

    def __init__(self, net: CerberusNet, tasks: tuple[str, ...], heads: tuple[str, ...], trained):
        super().__init__()
        self.net, self.tasks, self.heads = net, tasks, heads
        preset = net.preset
        self.margin = (preset.input_size - preset.output_size) // 2
        self.kept = preset.output_size
        for name, keep in trained.items():
            self.register_buffer(_buffer(name), torch.from_numpy(keep).float(), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(images, tasks=self.tasks)
        keep = slice(self.margin, self.margin + self.kept)
        arrays = []
        for name in self.heads:
            probs = head_values(name, out[name][..., keep, keep])
            if hasattr(self, _buffer(name)):
                probs = probs * getattr(self, _buffer(name)).view(1, -1, 1, 1)
            arrays.append(probs.permute(0, 2, 3, 1).half())
        patch = out["Patch-Class"].float().softmax(dim=1) * getattr(self, _buffer("Patch-Class"))
        arrays.append(patch / patch.sum(dim=1, keepdim=True).clamp_min(1e-12))
        if BOTTLENECK in out:  # NIC cell embeddings of each tile, (N, C, k, k)
            arrays.append(tile_embeddings(self.net, out[BOTTLENECK]).float())
        return tuple(arrays)


def _buffer(head: str) -> str:
    return "trained_" + head.replace("-", "_")


class CerberusModel(ModelABC):
    """A `CerberusNet` as a tiatoolbox model. `infer_batch` returns softmax probabilities (the
    distance maps as they are): one NHWC float16 array per spatial head (`spatial_heads`), then
    the (N, 9) tissue-class vector,
    and with `embeddings` the tiles' NIC cell embeddings (N, C, k, k). Classes the weights were
    not trained on get probability zero (`inference.predict.without_untrained`). `backend`
    chooses the runtime of the forward pass (`inference.runtime`)."""

    def __init__(
        self,
        net: CerberusNet,
        info: WeightsInfo,
        *,
        embeddings: bool = False,
        device: str = "cpu",
        backend: str = "torch",
    ):
        super().__init__()
        self.net = net
        self.info = info
        self.class_dict = dict(enumerate(info.classes["Patch-Class"]))
        self.tasks = (*TASKS, BOTTLENECK) if embeddings else TASKS
        self.spatial_heads = SPATIAL_HEADS + ((NUCLEI_HV,) if net.preset.nucleus_hv else ())
        heads = TileHeads(net, self.tasks, self.spatial_heads, trained_channels(info))
        self.backend = backend
        key = f"{info.sha256}|{','.join(self.tasks)}"
        self.run = forward_for(heads, net.preset.input_size, device, backend, key)
        #: Held during each forward pass: slides ingested at once share the model in turns.
        self.lock = threading.Lock()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(images, tasks=self.tasks)

    @staticmethod
    def infer_batch(model, batch_data, *, device: str) -> tuple[np.ndarray, ...]:
        model = getattr(model, "module", model)
        images = torch.as_tensor(batch_data).to(device, torch.float32).permute(0, 3, 1, 2)
        with model.lock:
            out = model.run(images)
        return tuple(array.cpu().numpy() for array in out)


def segment_slide(
    reader,
    model: CerberusModel,
    tissue: TissueMask,
    *,
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int | None = None,
    timings: dict | None = None,
    progress=None,
    region_tiles: int | None = None,
    embeddings: np.ndarray | None = None,
) -> Iterator[tiling.Objects]:
    """Nuclei, glands, lumina (per region, as they are finished) and then tissue regions of a
    slide, as polygons in level-0 pixels. `workers` post-processing processes (default: one per
    core; 0 = in this process). `timings` receives seconds per phase (`read`, `infer`, `wait`
    for post-processing, and `postprocess`, summed over workers); `progress(done, total)` is
    called after each batch of tiles (`batch_size` of them; default `default_batch`).
    `region_tiles` sets the post-processing regions' size (default `tiling.region_shape`).
    `embeddings` (an `inference.compress.empty_grid`, with a model made with `embeddings=True`)
    receives the slide's NIC grid from the same forward passes."""
    release_large_frees()
    timings = timings if timings is not None else {}
    for phase in ("read", "infer", "postprocess", "wait"):
        timings.setdefault(phase, 0.0)
    info, preset = model.info, model.info.preset
    mpp = np.asarray(reader.info.mpp, dtype=float)
    w, h = reader.slide_dimensions(resolution=preset.mpp, units="mpp")
    grid = tiling.Grid.over(
        (int(h), int(w)),
        (preset.mpp / mpp[0], preset.mpp / mpp[1]),
        preset.output_size,
        (preset.input_size - preset.output_size) // 2,
        tissue.mask,
    )
    size, margin = tiling.region_shape(grid.tile, preset.mpp)
    plan = tiling.regions(grid, region_tiles or size, margin)
    sched = tiling.schedule(grid, plan)
    fields = {
        "settings": {**POSTPROCESS, **info.postprocess},
        "mpp": preset.mpp,
        "nucleus_types": list(info.classes["Nuclei#TYPE"]),
        "gland_types": list(info.classes["Gland#TYPE"]),
        "hv": preset.nucleus_hv,
    }
    tile_classes = {}
    if sched.order:
        tiles = tiling.TileStore()
        loader = tile_loader(reader, preset, sched.order, batch_size or default_batch(preset))
        workers = (os.cpu_count() or 1) if workers is None else workers
        pool = (
            ProcessPoolExecutor(workers, initializer=_worker_start, initargs=(os.getpid(),))
            if workers > 0
            else None
        )
        pending: deque = deque()
        next_region, done = 0, 0
        try:
            batches = iter(loader)
            while True:
                started = time.perf_counter()
                batch = next(batches, None)
                timings["read"] += time.perf_counter() - started
                if batch is None:
                    break
                started = time.perf_counter()
                out = CerberusModel.infer_batch(model, batch["image"], device=device)
                count = len(model.spatial_heads)
                heads, classes = out[:count], out[count]
                timings["infer"] += time.perf_counter() - started
                for i, (x0, y0, _, _) in enumerate(batch["output_locs"].numpy()):
                    rc = (int(y0) // grid.tile, int(x0) // grid.tile)
                    if embeddings is not None:
                        place(embeddings, rc, out[count + 1][i])
                    maps = {
                        name: head[i].transpose(2, 0, 1)
                        for name, head in zip(model.spatial_heads, heads, strict=True)
                    }
                    tiles[rc] = tiling.reduce_tile(maps, kept_rgb(batch["image"][i], preset))
                    tile_classes[rc] = classes[i]
                done += len(classes)
                if progress:
                    progress(done, len(sched.order))
                while next_region < len(plan) and sched.ready_after[next_region] <= done:
                    region = plan[next_region]
                    job = tiling.region_job(grid, region, tiles, **fields)
                    for rc in sched.done_after[region.index]:
                        tiles.pop(rc)
                    for rc in sched.idle_after[region.index]:
                        tiles.spill(rc)
                    pending.append(_submit(pool, job))
                    next_region += 1
                # Regions wait for a worker in memory: at most one more than there are workers.
                while pending and (len(pending) > max(workers, 1) or pending[0].done()):
                    yield from _collect(pending.popleft(), timings)
            while pending:
                yield from _collect(pending.popleft(), timings)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            tiles.close()
    yield tiling.tissue_regions(grid, tile_classes, tissue.mask, list(info.classes["Patch-Class"]))


def kept_rgb(patch, preset) -> np.ndarray:
    """The RGB pixels of a patch (H, W, 3) under its kept output, as (3, out, out) uint8."""
    margin = (preset.input_size - preset.output_size) // 2
    kept = np.asarray(patch)[
        margin : margin + preset.output_size, margin : margin + preset.output_size
    ]
    return kept.transpose(2, 0, 1).astype(np.uint8)


def release_large_frees() -> None:
    """Large arrays straight from the OS and back (glibc's mmap threshold fixed at 1 MiB). By
    default glibc raises the threshold after each large free and serves later arrays of that
    size from its heap, where a slide's thousands of tile-sized arrays fragment it: the ingest
    process grew from 1.8 to 3.1 GB over a 16 mm² slide, and stays near 2 GB with the fixed
    threshold. Elsewhere than glibc, nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _worker_start(parent: int) -> None:
    """Post-processing worker start-up: at idle priority, and exiting as soon as the ingest
    process is gone (even SIGKILLed, when no clean-up of the pool can run), instead of computing
    for nobody. The network's threads wait for one another after every layer, so a worker that
    preempts one of them stalls them all: OpenVINO's 0.19 s per tile became 0.37 s beside two
    busy processes at nice 10, 0.24 s beside two at idle priority. Workers take the cores the
    network leaves idle, and all of them once the last tiles are inferred."""
    release_large_frees()
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux
        os.nice(19)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _timed_region(job: tiling.RegionJob):
    started = time.process_time()
    objects, counts = tiling.process_region(job)
    return objects, counts, time.process_time() - started


class _Done:
    """A finished computation with a `Future`'s `done`/`result`, for in-process work."""

    def __init__(self, value):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


def _submit(pool, job):
    return pool.submit(_timed_region, job) if pool else _Done(_timed_region(job))


def _collect(future, timings: dict) -> Iterator[tiling.Objects]:
    started = time.perf_counter()
    objects, counts, seconds = future.result()
    timings["wait"] += time.perf_counter() - started
    timings["postprocess"] += seconds
    timings["truncated"] = timings.get("truncated", 0) + counts["truncated"]
    yield from objects
