#!/usr/bin/env bash
# The main job on a fresh machine: set up, start the embedded PostGIS database and show it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/spatialdb db upgrade
.venv/bin/spatialdb status
