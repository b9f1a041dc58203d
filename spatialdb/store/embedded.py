"""The managed local PostgreSQL + PostGIS cluster used when no `SPATIALDB_URL` is set.

The cluster lives in `SPATIALDB_HOME` (data in `pgdata/`, log in `postgres.log`), listens only on
a Unix socket (no TCP) and trusts local connections. PostgreSQL refuses to run as root, so when the
program runs as root the server runs as an unprivileged system account (`SPATIALDB_SERVER_USER`,
default `spatialdb`, created on first use).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from spatialdb.config import DEFAULT_SERVER_USER, ENV_PG_BIN, ENV_SERVER_USER
from spatialdb.errors import DatabaseUnavailable

INSTALL_HINT = "install it with: apt-get install postgresql-15-postgis-3"
DATABASE = "spatialdb"
SUPERUSER = "spatialdb"
PORT = 5432
#: Unix socket paths are limited to 107 bytes; longer homes put the socket in /tmp.
_MAX_SOCKET_DIR = 90

#: Server settings for an analytics workload on one machine. wal_level=minimal lets COPY into a
#: table created in the same transaction skip WAL, which is how the bulk loader writes.
SERVER_SETTINGS = {
    "listen_addresses": "''",
    "shared_buffers": "'512MB'",
    "work_mem": "'64MB'",
    "maintenance_work_mem": "'1GB'",
    "max_wal_size": "'4GB'",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "jit": "off",
    "log_min_messages": "warning",
}


def find_pg_bin() -> Path:
    """The PostgreSQL server binaries: `SPATIALDB_PG_BIN`, the newest Debian install, or PATH."""
    if os.environ.get(ENV_PG_BIN):
        candidates = [Path(os.environ[ENV_PG_BIN])]
    else:
        debian = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
        on_path = shutil.which("pg_ctl")
        candidates = [*debian, *([Path(on_path).resolve().parent] if on_path else [])]
    for bin_dir in candidates:
        if all((bin_dir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return bin_dir
    raise DatabaseUnavailable(f"PostgreSQL server binaries not found; {INSTALL_HINT}")


def require_postgis(pg_bin: Path) -> None:
    """Fail with the install command when the PostGIS extension is missing for this server."""
    pg_config = pg_bin / "pg_config"
    if pg_config.exists():
        sharedir = Path(
            subprocess.run(
                [str(pg_config), "--sharedir"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    else:
        sharedir = Path("/usr/share/postgresql") / pg_bin.parent.name
    if not (sharedir / "extension" / "postgis.control").exists():
        raise DatabaseUnavailable(
            f"PostGIS is not installed for the server in {pg_bin}; {INSTALL_HINT}"
        )


@dataclass
class EmbeddedCluster:
    """A PostgreSQL cluster owned by this program, in `home`."""

    home: Path

    @property
    def data_dir(self) -> Path:
        return self.home / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.home / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        own = self.home / "run"
        if len(str(own)) <= _MAX_SOCKET_DIR:
            return own
        return Path("/tmp") / f"spatialdb-{hashlib.sha1(str(self.home).encode()).hexdigest()[:12]}"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@/{DATABASE}?host={self.socket_dir}&port={PORT}"

    def ensure_running(self) -> str:
        """Initialise (first time) and start the cluster if needed; return its URL."""
        with self._lock():
            pg_bin = find_pg_bin()
            require_postgis(pg_bin)
            user = _server_user()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(pg_bin, user)
            if not self._running(pg_bin, user):
                self._start(pg_bin, user)
            self._create_database()
        return self.url

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server if it runs (pg_ctl's `fast`, `smart` or `immediate` mode); True when
        it was running."""
        with self._lock():
            pg_bin = find_pg_bin()
            user = _server_user()
            if not self.data_dir.exists() or not self._running(pg_bin, user):
                return False
            self._pg_ctl(pg_bin, user, "stop", "-m", mode, "-w")
            return True

    def running(self) -> bool:
        if not self.data_dir.exists():
            return False
        return self._running(find_pg_bin(), _server_user())

    # -- steps ---------------------------------------------------------------------------------

    @contextmanager
    def _lock(self):
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o755)
        with open(self.home / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _prepare_dirs(self, user: pwd.struct_passwd) -> None:
        for path in (self.data_dir, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, user.pw_uid, user.pw_gid)
            path.chmod(0o700)
        self.log_file.touch()
        os.chown(self.log_file, user.pw_uid, user.pw_gid)
        probe = subprocess.run(["test", "-w", str(self.data_dir)], **_as_user(user))
        if probe.returncode != 0:
            raise DatabaseUnavailable(
                f"the server account '{user.pw_name}' cannot reach {self.home} "
                f"(a parent directory is private); set SPATIALDB_HOME to a directory outside it"
            )

    def _initdb(self, pg_bin: Path, user: pwd.struct_passwd) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # an earlier initdb was interrupted before PG_VERSION
        self._prepare_dirs(user)
        _check(
            subprocess.run(
                [
                    str(pg_bin / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                ],
                capture_output=True,
                text=True,
                **_as_user(user),
            ),
            "initdb",
        )
        settings = "".join(f"{key} = {value}\n" for key, value in SERVER_SETTINGS.items())
        settings += f"unix_socket_directories = '{self.socket_dir}'\nport = {PORT}\n"
        with open(self.data_dir / "postgresql.auto.conf", "a") as conf:
            conf.write(settings)

    def _start(self, pg_bin: Path, user: pwd.struct_passwd) -> None:
        self._prepare_dirs(user)
        self._pg_ctl(pg_bin, user, "start", "-w", "-t", "120", "-l", str(self.log_file))

    def _running(self, pg_bin: Path, user: pwd.struct_passwd) -> bool:
        status = subprocess.run(
            [str(pg_bin / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            **_as_user(user),
        )
        return status.returncode == 0

    def _pg_ctl(self, pg_bin: Path, user: pwd.struct_passwd, *args: str) -> None:
        result = subprocess.run(
            [str(pg_bin / "pg_ctl"), "-D", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            **_as_user(user),
        )
        _check(result, f"pg_ctl {args[0]}", log=self.log_file)

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(
            host=str(self.socket_dir), port=PORT, user=SUPERUSER, dbname="postgres"
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            conn.close()


def _server_user() -> pwd.struct_passwd:
    """The account that runs the server: ourselves, or an unprivileged one when we are root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    name = os.environ.get(ENV_SERVER_USER, DEFAULT_SERVER_USER)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _as_user(user: pwd.struct_passwd) -> dict:
    if os.geteuid() != 0:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "cwd": "/"}


def _check(result: subprocess.CompletedProcess, what: str, log: Path | None = None) -> None:
    if result.returncode == 0:
        return
    detail = (result.stderr or result.stdout or "").strip().splitlines()
    if log is not None and log.exists():
        detail += log.read_text(errors="replace").strip().splitlines()[-3:]
    last = detail[-1] if detail else f"exit code {result.returncode}"
    raise DatabaseUnavailable(f"embedded PostgreSQL: {what} failed: {last}")
