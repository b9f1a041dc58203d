#!/usr/bin/env bash
# Train the shared model on a GPU and score it beside the shipped weights, in one call of under
# 10 minutes on a lent GPU machine (which reaches no package registry and cannot see ../shared).
#
# Here, first (and again whenever the data, the split or the preset changes):
#   .venv/bin/python -m inference.train --config configs/gpu.toml --pack .gpu/pack.tar.xz
# Then through the device tool, carrying the pack (51 MiB; with the repository under 64 MiB):
#   command "bash scripts/gpu_train.sh", carry [".gpu"], timeout_s 600
# There it opens the pack, checks the Python packages the model needs (installing them from the
# registry only where one is missing), trains configs/gpu.toml on the GPU for TRAIN_MINUTES
# (default 6), scores the new and the shipped weights on the same held-out images
# (python -m inference.compare) and prints the table. Into $OUT (else out/gpu-train): weights.pt,
# train.log, scores.md, scores.json. Commit the weights only where they beat the shipped ones on
# the held-out images (inference/weights/MODEL_CARD.md).
# A dry run on a CPU: PYTHON=.venv/bin/python DEVICE=cpu TRAIN_STEPS=3 bash scripts/gpu_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
out=${OUT:-out/gpu-train}
pack=${PACK:-.gpu/pack.tar.xz}
shipped=inference/weights/cerberus-cpu-multiscale.pt
elapsed() { echo "$(($(date +%s) - started)) s"; }

if [ ! -f "$pack" ]; then
    echo "gpu_train: no training pack at $pack (make it first:" \
        "python -m inference.train --config configs/gpu.toml --pack $pack)" >&2
    exit 1
fi
if ! "$python" -c "import torch, torchvision, cv2, scipy, skimage, PIL" 2>/dev/null; then
    echo "gpu_train: installing the model's Python packages" >&2
    "$python" -m pip install -q torch torchvision opencv-python-headless scipy scikit-image pillow
fi
"$python" - "$device" <<'PY'
import sys

import torch

device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu_train: no CUDA device here (DEVICE=cpu for a dry run)")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
print(f"gpu_train: {name}, torch {torch.__version__}", flush=True)
PY

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
data=$("$python" -c 'import sys; from inference.pack import unpack; print(unpack(*sys.argv[1:]))' \
    "$pack" "$work")
echo "gpu_train: pack opened in $(elapsed)" >&2
"$python" -m inference.train --config configs/gpu.toml --data "$data" --out "$work/run" \
    --device "$device" --minutes "${TRAIN_MINUTES:-6}" ${TRAIN_STEPS:+--steps "$TRAIN_STEPS"} \
    2>&1 | tee "$out/train.log"
cp "$work/run/weights.pt" "$out/weights.pt"
echo "gpu_train: trained in $(elapsed)" >&2
"$python" -m inference.compare "$data/held_out" "$out/weights.pt" "$shipped" \
    --device "$device" --json "$out/scores.json" | tee "$out/scores.md"
echo "gpu_train: done in $(elapsed)" >&2
