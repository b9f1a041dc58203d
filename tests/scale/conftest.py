"""A real Citus cluster for the scale-out tests.

SPATIALDB_CITUS_URL names an existing coordinator; otherwise `scripts/citus.sh` builds Citus from
../shared/vendor/citus when the server lacks it and starts a throwaway coordinator and two workers
in a temporary directory (stopped and removed at the end). Only where that folder is absent do the
live tests skip, and they say so.
"""

from __future__ import annotations

import os

import pytest

from tests.citus import VENDOR, CitusCluster


@pytest.fixture(scope="session")
def citus_url():
    url = os.environ.get("SPATIALDB_CITUS_URL")
    if url:
        yield url
        return
    if not VENDOR.is_dir():
        pytest.skip(f"no Citus source at {VENDOR} and SPATIALDB_CITUS_URL is not set")
    cluster = CitusCluster()
    try:
        try:
            url = cluster.start()
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield url
    finally:
        cluster.remove()
