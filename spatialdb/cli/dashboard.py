"""`spatialdb dashboard`: the Streamlit dashboard on the database in use (read-only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from spatialdb.config import ENV_DASHBOARD_URL, ENV_VIEWER_PORT
from spatialdb.store.db import connect, redact, resolve_url

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@click.command()
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8501, show_default=True, type=int)
@click.option(
    "--viewer-port", type=int, help="Port of the slide viewer's tiles [default: PORT + 1]."
)
@click.pass_obj
def dashboard(obj: dict, address: str, port: int, viewer_port: int | None) -> int:
    """Serve the dashboard (cohort, slide viewer, features, QuPath export) until Ctrl+C.

    The slide viewer's tiles are served beside it, on the same address."""

    url, _ = resolve_url(obj["db_url"])
    connect(url).dispose()  # one clear line now if the database is unusable
    viewer_port = viewer_port or port + 1
    click.echo(
        f"dashboard on {redact(url)}: open http://{address}:{port} (slide viewer tiles on port "
        f"{viewer_port}; Ctrl+C stops it)"
    )
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", address, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
    ]  # fmt: skip
    try:
        env = {**os.environ, ENV_DASHBOARD_URL: url, ENV_VIEWER_PORT: str(viewer_port)}
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0
