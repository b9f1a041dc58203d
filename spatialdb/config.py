"""Settings resolved from the environment (`SPATIALDB_*`); command-line flags override them."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ENV_URL = "SPATIALDB_URL"
ENV_HOME = "SPATIALDB_HOME"
ENV_PG_BIN = "SPATIALDB_PG_BIN"
ENV_SERVER_USER = "SPATIALDB_SERVER_USER"
#: The database URL `spatialdb dashboard` hands to the Streamlit app it starts.
ENV_DASHBOARD_URL = "SPATIALDB_DASHBOARD_URL"
#: The port of the dashboard's slide viewer tiles (default: the dashboard's port + 1).
ENV_VIEWER_PORT = "SPATIALDB_VIEWER_PORT"

#: Unprivileged account that runs the embedded server when the program runs as root.
DEFAULT_SERVER_USER = "spatialdb"


def database_url() -> str | None:
    """The external server's URL, or None for the embedded default."""
    return os.environ.get(ENV_URL) or None


def home_dir() -> Path:
    """Where the embedded cluster lives.

    Root's own data dir (/root/...) cannot be entered by the unprivileged server account,
    so root defaults to the system-wide data dir instead.
    """
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser().resolve()
    if os.geteuid() == 0:
        return Path("/var/lib/spatialdb")
    return Path(platformdirs.user_data_dir("spatialdb"))
