"""A real Citus cluster for the scale-out tests.

SPATIALDB_CITUS_URL names an existing coordinator; otherwise `scripts/citus.sh` builds Citus from
../shared/vendor/citus when the server lacks it and starts a throwaway coordinator and two workers
in a temporary directory (stopped and removed at the end). Only where that folder is absent do the
live tests skip, and they say so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "citus.sh"
VENDOR = ROOT.parent / "shared" / "vendor" / "citus"


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports nobody listens on."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65_000:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


@pytest.fixture(scope="session")
def citus_url():
    url = os.environ.get("SPATIALDB_CITUS_URL")
    if url:
        yield url
        return
    if not VENDOR.is_dir():
        pytest.skip(f"no Citus source at {VENDOR} and SPATIALDB_CITUS_URL is not set")
    home = Path(tempfile.mkdtemp(prefix="spatialdb-citus-"))
    env = {
        **os.environ,
        "SPATIALDB_CITUS_HOME": str(home),
        "SPATIALDB_CITUS_PORT": str(free_ports(3)),
    }
    try:
        started = subprocess.run(
            ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True
        )
        if started.returncode != 0:
            pytest.fail(f"scripts/citus.sh start failed:\n{started.stderr}")
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
