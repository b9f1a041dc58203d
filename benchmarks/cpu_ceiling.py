"""The machine's own ceilings and the network's achieved rate against them, per runtime.

Measures once: a large fp32 and a bf16 matrix product (GFLOP/s, torch on all cores) and the
memory bandwidth (GB/s of a large array copy, read + write). Then the default model's forward
pass over one tile (1,024 px) in each way it has run: eager PyTorch in NCHW with bf16 autocast
(the path before the speed work), eager PyTorch channels-last with bf16 autocast (`torch`), and
the OpenVINO graph (`openvino`), each computing the tile's kept head probabilities
(`inference.engine.TileHeads`), each as seconds per tile (median), GFLOP/s achieved (FLOPs
counted by torch's FlopCounterMode) and the share of the bf16 ceiling, and the speed-up over
the first.

    python benchmarks/cpu_ceiling.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ceilings(repeat: int) -> dict[str, float]:
    n = 4096
    out = {}
    for name, dtype in (
        ("fp32 matmul GFLOP/s", torch.float32),
        ("bf16 matmul GFLOP/s", torch.bfloat16),
    ):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[name] = 2 * n**3 / timed(lambda a=a, b=b: a @ b, repeat) / 1e9
    source = np.ones(1 << 28, np.uint8)  # 256 MiB, far beyond the caches
    target = np.empty_like(source)
    seconds = timed(lambda: np.copyto(target, source), repeat)
    out["memory copy GB/s (read + write)"] = 2 * source.nbytes / seconds / 1e9
    return out


def main() -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from inference import weights
    from inference.engine import SPATIAL_HEADS, TASKS, CerberusModel, TileHeads
    from inference.predict import autocast, trained_channels

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads")
    limits = ceilings(args.repeat)
    for name, value in limits.items():
        print(f"  {name:34s} {value:8.1f}")

    net, info = weights.load()
    size = info.preset.input_size
    images = torch.rand(1, 3, size, size) * 255
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(images, tasks=TASKS)
    gflop = counter.get_total_flops() / 1e9

    heads = TileHeads(net, TASKS, SPATIAL_HEADS, trained_channels(info))

    def eager_nchw(batch: torch.Tensor):
        with torch.inference_mode(), autocast("cpu"):
            return heads(batch)

    runs = {"eager NCHW bf16 (before)": eager_nchw}
    for backend in ("torch", "openvino"):
        runs[backend] = CerberusModel(weights.load()[0], info, backend=backend).run
    print(f"\n{info.preset.name}, one {size} px tile: {gflop:.1f} GFLOP")
    first = None
    for name, run in runs.items():
        seconds = timed(lambda run=run: run(images), args.repeat)
        first = first or seconds
        rate = gflop / seconds
        print(
            f"  {name:28s} {seconds:6.3f} s/tile  {rate:6.1f} GFLOP/s  "
            f"{rate / limits['bf16 matmul GFLOP/s']:6.1%} of the bf16 ceiling  "
            f"{first / seconds:5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
