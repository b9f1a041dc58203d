#!/usr/bin/env bash
# The main job on a fresh machine: set up, start the embedded PostGIS database, ingest the bundled
# sample slide with the shipped model (which computes its features), print what was found and
# export the gland and slide features and the QuPath files to out/, and say how to open the
# dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/spatialdb db upgrade
.venv/bin/spatialdb ingest data/sample/CMU-1-Small-Region.svs
.venv/bin/spatialdb status
mkdir -p out
.venv/bin/spatialdb features export --level gland --slide CMU-1-Small-Region -o out/gland_features.csv
.venv/bin/spatialdb features export --level slide --slide CMU-1-Small-Region -o out/slide_features.csv
if [ -z "${PAQUO_QUPATH_DIR:-}" ] && [ -d ../shared/vendor/qupath-0.6.0-headless ]; then
    # no QuPath named: the vendored headless QuPath 0.6.0 writes the QuPath project
    eval "$(.venv/bin/python -m tests.qupath .qupath)"
fi
.venv/bin/spatialdb export-qupath out/qupath --slide CMU-1-Small-Region
echo "dashboard: .venv/bin/spatialdb dashboard, then open http://127.0.0.1:8501 (the Slide page has the slide viewer)"
