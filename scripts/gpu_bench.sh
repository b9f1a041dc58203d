#!/usr/bin/env bash
# One prepared run on a GPU machine, under 10 minutes: install what the benchmark needs (PostGIS with
# apt, the Python environment with CUDA torch), build a benchmark slide of about 100 mm² of real
# tissue and ingest it with --device cuda (inference on the GPU, post-processing in one process per
# CPU core), printing the table of benchmarks/wsi.py. Extra arguments go to benchmarks/wsi.py.
# It needs the package registries (apt, PyPI): the GPU machines this workplace lends reach none
# and have no PostgreSQL, so there the wheels and a PostGIS would have to be carried in first.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
SPATIALDB_NO_BROWSER=1 bash scripts/setup.sh
.venv/bin/python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print("gpu:", torch.cuda.get_device_name(0), "| cpu cores:", __import__("os").cpu_count())
PY
.venv/bin/spatialdb db upgrade >/dev/null
echo "gpu_bench: set up in $(( $(date +%s) - started )) s" >&2
.venv/bin/python benchmarks/wsi.py --sizes 100 --device cuda --backend torch --batch-size 16 "$@"
echo "gpu_bench: done in $(( $(date +%s) - started )) s" >&2
