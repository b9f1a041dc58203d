#!/usr/bin/env bash
# Set up (if needed) and run the test suite against a throwaway PostGIS cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
