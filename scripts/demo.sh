#!/usr/bin/env bash
# The main job on a fresh machine: set up, start the embedded PostGIS database, ingest the bundled
# sample slide with the shipped model and print what was found.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/spatialdb db upgrade
.venv/bin/spatialdb ingest data/sample/CMU-1-Small-Region.svs
.venv/bin/spatialdb status
