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

# OpenLayers for the dashboard's slide viewer: the npm registry's package, checked against the
# sha512 the registry publishes for it, unpacked into dashboard/viewer/ol (served offline from there).
OL_VERSION=10.11.0
OL_INTEGRITY=sha512-OJ+lrx7kx/1O7Xx18Ff9QkVnwZIEL0OuhJQSy2sYgzzDvyZ2qHvuZEGAajbSstUyBwaS1OtQ4RWnY84tRMDdqg==
if [ "$(cat dashboard/viewer/ol/VERSION 2>/dev/null)" != "$OL_VERSION" ]; then
    echo "setup: installing OpenLayers $OL_VERSION from registry.npmjs.org" >&2
    .venv/bin/python - "$OL_VERSION" "$OL_INTEGRITY" <<'PY'
import base64, hashlib, io, pathlib, shutil, sys, tarfile, urllib.request

version, integrity = sys.argv[1:]
url = f"https://registry.npmjs.org/ol/-/ol-{version}.tgz"
data = urllib.request.urlopen(url, timeout=120).read()
digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
if digest != integrity:
    sys.exit(f"setup: {url} does not match its published sha512")
target = pathlib.Path("dashboard/viewer/ol")
partial = target.with_name("ol.partial")
shutil.rmtree(partial, ignore_errors=True)
partial.mkdir()
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    for name in ("package/dist/ol.js", "package/ol.css", "package/LICENSE.md", "package/package.json"):
        (partial / pathlib.Path(name).name).write_bytes(tar.extractfile(name).read())
(partial / "VERSION").write_text(version + "\n")
shutil.rmtree(target, ignore_errors=True)
partial.rename(target)
PY
fi
