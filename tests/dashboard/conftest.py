"""The dashboard served by `streamlit run` on a free local port, and Debian's Chromium driven by
Playwright (no downloaded browser)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spatialdb.config import ENV_DASHBOARD_URL, ENV_VIEWER_PORT

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def viewer_port() -> int:
    return free_port()


@pytest.fixture
def dashboard_url(db_url, viewer_port):
    """The dashboard on a free local port, its slide viewer on `viewer_port`."""
    port = free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
        "--server.address", "127.0.0.1", "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
    ]  # fmt: skip
    server = subprocess.Popen(
        command,
        env={**os.environ, ENV_DASHBOARD_URL: db_url, ENV_VIEWER_PORT: str(viewer_port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("the dashboard did not start: " + server.stdout.read().decode()[-2000:])
    yield url
    server.terminate()
    server.wait(timeout=20)


def launch(playwright):
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"],
    )  # fmt: skip


def viewer_frame(page, timeout_s: float = 60):
    """The slide viewer's frame inside the dashboard's slide page."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for frame in page.frames:
            if "/viewer?slide=" in frame.url:
                return frame
        page.wait_for_timeout(250)
    raise AssertionError("the slide page holds no viewer")
