"""A real PostgreSQL server on 127.0.0.1 for tests, started by the tests themselves.

Debian's `postgresql` package provides `initdb`, `pg_ctl` and `postgres` (under
/usr/lib/postgresql/<version>/bin, often linked from PATH). The cluster lives in a temporary
directory, listens on an ephemeral port on 127.0.0.1 only (its Unix socket in the same
directory) and trusts local connections; PostgreSQL refuses to run as root, so as root the
commands run as the `postgres` user.

    server = PostgresServer()
    server.start()                          # initdb + pg_ctl start: ~2 s
    url = server.new_database()             # postgresql+psycopg://postgres@127.0.0.1:<port>/db_1
    server.stop()                           # pg_ctl stop -m fast, the directory removed

The directory is a fresh `tempfile.mkdtemp` under /tmp (pytest's temporary directories are
not traversable by the `postgres` user), owned by the user the server runs as.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.mlflow_server import free_port

__all__ = ["PostgresServer", "postgres_binary"]


def postgres_binary(name: str) -> str:
    """The path of a PostgreSQL server program, or a clear failure saying how to get it."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} was not found (PATH or /usr/lib/postgresql/*/bin): the "
            f"monitor's PostgreSQL tests start a real server. Install it with "
            f"`apt-get install -y postgresql` (the README's test command does).")
    return found


class PostgresServer:
    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="gradwatch-pg-"))
        self.data = self.directory / "data"
        self.port = 0
        self._databases = 0
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        argv = list(command)
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done

    def start(self) -> PostgresServer:
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        if not self.data.exists():
            self._run(postgres_binary("initdb"), "-D", str(self.data), "-U", "postgres",
                      "--auth=trust", "--encoding=UTF8", "--no-sync")
        self.port = free_port()
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.directory} -c fsync=off")
        self._run(postgres_binary("pg_ctl"), "-D", str(self.data), "-l",
                  str(self.directory / "server.log"), "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                (["runuser", "-u", "postgres", "--"] if self._as_postgres else [])
                + [postgres_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                   "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)

    def new_database(self) -> str:
        """A new, empty database: its SQLAlchemy URL (psycopg 3)."""
        import sqlalchemy as sa

        self._databases += 1
        name = f"db_{self._databases}"
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"
