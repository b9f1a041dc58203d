"""Model speed: the CPU presets (the first `cpu`, the default `cpu-multiscale`, its distance-map
variant `cpu-multiscale-hv` and its 40x variant `cpu-multiscale-40x`, read at 0.25 µm/px) against
the published Cerberus tiling, in the same run.

For each preset: patches/s, µs per kept output pixel, time and FLOPs per mm² of tissue (kept
output area at the preset's resolution), and peak memory (each preset runs in its own process, so
VmHWM is its own). Inference as the product runs it: all heads, eval mode, bf16 autocast where the
CPU has bf16 matrix instructions (or on CUDA). Printed ratios: the published preset's time per
mm² to each CPU preset's (the first CPU preset was to be at least 10x faster), the default's cost
per mm² beside the first CPU preset's, and each variant's beside the default's.

    python benchmarks/model_speed.py [--repeat 5] [--batch 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
#: The published configuration, then the CPU presets in the order they were the default.
PRESETS = ("cerberus", "cpu", "cpu-multiscale", "cpu-multiscale-hv", "cpu-multiscale-40x")
#: Each later preset beside the one it is compared with.
BESIDE = {
    "cpu-multiscale": "cpu",
    "cpu-multiscale-hv": "cpu-multiscale",
    "cpu-multiscale-40x": "cpu-multiscale",
}


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(preset_name: str, repeat: int, batch: int, device: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from inference.network import build
    from inference.predict import autocast, use_bf16

    net = build(preset_name).eval().to(device)
    preset = net.preset
    tiles = torch.randint(0, 256, (batch, 3, preset.input_size, preset.input_size)).float()
    tiles = tiles.to(device)
    with torch.inference_mode(), autocast(device):
        with FlopCounterMode(display=False) as counter:
            net(tiles[:1])
        flops_per_tile = counter.get_total_flops()
        net(tiles)  # warm-up
        times = []
        for _ in range(repeat):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(tiles)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / batch)
    per_tile = statistics.median(times)
    kept_px = preset.output_size**2
    kept_mm2 = kept_px * (preset.mpp * 1e-3) ** 2
    return {
        "preset": preset_name,
        "device": device,
        "bf16": use_bf16(device),
        "parameters_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "tiling": f"{preset.input_size} in / {preset.output_size} kept",
        "patches_per_s": 1 / per_tile,
        "us_per_output_px": per_tile / kept_px * 1e6,
        "s_per_mm2": per_tile / kept_mm2,
        "gflop_per_mm2": flops_per_tile / kept_mm2 / 1e9,
        "peak_rss_mib": peak_rss_mib(),
        "runs": [round(t, 4) for t in times],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one preset
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeat, args.batch, args.device)))
        return 0
    results = {}
    for name in PRESETS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                name,
                "--repeat",
                str(args.repeat),
                "--batch",
                str(args.batch),
                "--device",
                args.device,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    header = f"{'preset':20s}{'params M':>10s}{'patches/s':>11s}{'µs/out px':>11s}"
    header += f"{'s/mm²':>9s}{'GFLOP/mm²':>11s}{'peak MiB':>10s}  tiling"
    print(
        f"device: {args.device}, bf16 autocast: {results['cpu']['bf16']}, batch {args.batch},"
        f" median of {args.repeat}"
    )
    print(header)
    for r in results.values():
        print(
            f"{r['preset']:20s}{r['parameters_M']:10.2f}{r['patches_per_s']:11.3f}"
            f"{r['us_per_output_px']:11.2f}{r['s_per_mm2']:9.2f}{r['gflop_per_mm2']:11.0f}"
            f"{r['peak_rss_mib']:10.0f}  {r['tiling']}"
        )
    for name in PRESETS[1:]:
        time_ratio = results["cerberus"]["s_per_mm2"] / results[name]["s_per_mm2"]
        flop_ratio = results["cerberus"]["gflop_per_mm2"] / results[name]["gflop_per_mm2"]
        print(
            f"{name} vs published tiling per mm²: {time_ratio:.1f}x faster, "
            f"{flop_ratio:.1f}x fewer FLOPs"
        )
    for after, before in BESIDE.items():
        new, old = results[after], results[before]
        print(
            f"{after} vs {before} per mm²: {new['s_per_mm2'] / old['s_per_mm2']:.2f}x the time, "
            f"{new['gflop_per_mm2'] / old['gflop_per_mm2']:.2f}x the FLOPs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
