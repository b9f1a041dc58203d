"""A throwaway local Citus cluster from `scripts/citus.sh` for the scale-out and fault tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "citus.sh"
VENDOR = ROOT.parent / "shared" / "vendor" / "citus"
PG_CTL = "/usr/lib/postgresql/15/bin/pg_ctl"
MAX_WORKERS = 3  # ports are kept free for a worker added by a test


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


class CitusCluster:
    """A coordinator and its workers in a temporary directory, on free loopback ports."""

    def __init__(self):
        self.home = Path(tempfile.mkdtemp(prefix="spatialdb-citus-"))
        self.port = free_ports(1 + MAX_WORKERS)
        self.env = {
            **os.environ,
            "SPATIALDB_CITUS_HOME": str(self.home),
            "SPATIALDB_CITUS_PORT": str(self.port),
        }
        self.url: str | None = None

    def start(self, workers: int = 2) -> str:
        """Start (or complete) the cluster with `workers` workers; its coordinator URL."""
        started = subprocess.run(
            ["bash", str(SCRIPT), "start", "--workers", str(workers)],
            env=self.env, capture_output=True, text=True,
        )  # fmt: skip
        if started.returncode != 0:
            raise RuntimeError(f"scripts/citus.sh start failed:\n{started.stderr}")
        self.url = started.stdout.strip().splitlines()[-1]
        return self.url

    def worker_port(self, worker: int) -> int:
        return self.port + worker

    def stop_worker(self, worker: int, mode: str = "immediate") -> None:
        """Stop worker number `worker` (1, 2, ...) in `mode` (pg_ctl's fast or immediate)."""
        command = [PG_CTL, "-D", str(self.home / f"worker{worker}"), "-m", mode, "-w", "stop"]
        if os.geteuid() == 0:  # the nodes run as the server account
            command = ["runuser", "-u", os.environ.get("SPATIALDB_SERVER_USER", "spatialdb"),
                       "--", *command]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)

    def remove(self) -> None:
        """Stop every node and delete the cluster."""
        subprocess.run(["bash", str(SCRIPT), "stop"], env=self.env, capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)
