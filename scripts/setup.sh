#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine: PostgreSQL 15 + PostGIS 3 and Chromium (apt) and the Python
# environment in .venv (torch and tiatoolbox resolved from PyPI). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
dpkg -s postgresql-15-postgis-3 >/dev/null 2>&1 || need_apt+=(postgresql-15-postgis-3)
# Debian's Chromium: the dashboard's browser tests drive it with Playwright (no downloaded browser);
# SPATIALDB_NO_BROWSER=1 leaves it out (a benchmark machine).
if [ -z "${SPATIALDB_NO_BROWSER:-}" ]; then
    dpkg -s chromium >/dev/null 2>&1 || need_apt+=(chromium)
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]} with apt" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q uv
echo "setup: installing the Python environment in .venv" >&2
.venv/bin/uv pip install -q -p .venv/bin/python --compile-bytecode -e '.[dev]'
