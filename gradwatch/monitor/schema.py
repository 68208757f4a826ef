"""The monitor state's tables and database plumbing (SQLAlchemy schema, state URL, SQLite).

The monitor state's tables and database plumbing (see `gradwatch.monitor.state` for what
they hold and why): the SQLAlchemy schema, the state URL, and a SQLite engine whose transactions
begin with the write lock.

Imports: gradwatch.common only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from gradwatch.common.errors import ConfigError

__all__ = ["SCHEMA_VERSION", "default_state_url"]

#: Bumped whenever a table or the meaning of a column changes; a file with a larger number was
#: written by a newer gradwatch and is refused rather than misread. Version 2 added the lease,
#: the replicas and the outbox's claim columns (`upgrade` brings a version-1 state up).
SCHEMA_VERSION = 2

ERROR_LIMIT = 1000  # characters of a delivery error kept in the outbox
NAME_LIMIT = 200  # channel keys and rule names

# -- schema -----------------------------------------------------------------------------------

metadata = sa.MetaData()

schema_version_table = sa.Table(
    "gradwatch_schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
)
cursors_table = sa.Table(
    "gradwatch_cursors", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("last_step", sa.BigInteger, nullable=True),
    sa.Column("last_check_at", sa.Float, nullable=True),  # wall time of the newest check read
    sa.Column("check_interval", sa.Float, nullable=True),  # observed seconds between checks
    sa.Column("polled_at", sa.Float, nullable=True),
)
cursor_metrics_table = sa.Table(
    "gradwatch_cursor_metrics", metadata,
    sa.Column("run_id", sa.String(64),
              sa.ForeignKey("gradwatch_cursors.run_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("metric_key", sa.String(250), primary_key=True),  # MLflow's key limit
    sa.Column("last_step", sa.BigInteger, nullable=False),
)
alerts_table = sa.Table(
    "gradwatch_alerts", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("rule", sa.String(NAME_LIMIT), primary_key=True),
    sa.Column("state", sa.String(8), nullable=False),
    sa.Column("alerting_streak", sa.Integer, nullable=False),
    sa.Column("clear_streak", sa.Integer, nullable=False),
    sa.Column("since_notified", sa.Integer, nullable=False),
    sa.Column("active_since_step", sa.BigInteger, nullable=True),
    sa.Column("fired_at_step", sa.BigInteger, nullable=True),
    sa.Column("last_notified_step", sa.BigInteger, nullable=True),
    sa.Column("ever_fired", sa.Boolean, nullable=False),
    sa.Column("last_transition", sa.String(8), nullable=True),
    sa.Column("last_transition_step", sa.BigInteger, nullable=True),
    sa.Column("last_transition_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.CheckConstraint("state IN ('inactive', 'pending', 'firing')", name="alert_state_word"),
)
silences_table = sa.Table(
    "gradwatch_silences", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(NAME_LIMIT), nullable=True),
    sa.Column("experiment", sa.String(NAME_LIMIT), nullable=True),
    sa.Column("rule", sa.String(NAME_LIMIT), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("comment", sa.Text, nullable=False),
)
outbox_table = sa.Table(
    "gradwatch_outbox", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("notification_id", sa.String(64), nullable=False),
    sa.Column("channel", sa.String(NAME_LIMIT), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("status", sa.String(8), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_attempt_at", sa.Float, nullable=True),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("claimed_by", sa.String(64), nullable=True),  # the replica sending it (v2)
    sa.Column("claimed_at", sa.Float, nullable=True),
    sa.UniqueConstraint("notification_id", "channel", name="outbox_once_per_channel"),
    sa.CheckConstraint("status IN ('pending', 'sent', 'dead')", name="outbox_status_word"),
    sa.CheckConstraint("attempts >= 0", name="outbox_attempts_count"),
    sa.Index("gradwatch_outbox_due", "status", "next_attempt_at"),
)
meta_table = sa.Table(
    "gradwatch_monitor_meta", metadata,
    sa.Column("key", sa.String(NAME_LIMIT), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
lease_table = sa.Table(  # v2: which monitor replica is active (one row, name "monitor")
    "gradwatch_lease", metadata,
    sa.Column("name", sa.String(NAME_LIMIT), primary_key=True),
    sa.Column("holder", sa.String(64), nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
    sa.Column("renewed_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)
replicas_table = sa.Table(  # v2: every monitor replica's heartbeat
    "gradwatch_replicas", metadata,
    sa.Column("replica_id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(NAME_LIMIT), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("role", sa.String(8), nullable=False),
)
OUR_TABLES = frozenset(metadata.tables)

#: Columns added to existing tables after version 1, by the version that added them.
_ADDED_COLUMNS = {2: [(outbox_table, "claimed_by"), (outbox_table, "claimed_at")]}


def upgrade(connection: Connection, version: int) -> None:
    """Bring a state written at schema `version` up to SCHEMA_VERSION inside the caller's
    transaction: new columns are added (new tables are created by `metadata.create_all`)."""
    for added in range(version + 1, SCHEMA_VERSION + 1):
        for table, name in _ADDED_COLUMNS.get(added, []):
            column = table.c[name]
            kind = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}")
    connection.execute(sa.update(schema_version_table).values(version=SCHEMA_VERSION))


def default_state_url(environ: Mapping[str, str] | None = None) -> str:
    """SQLite in `$XDG_STATE_HOME/gradwatch/monitor.db`, else `~/.local/state/gradwatch/...`.

    >>> default_state_url({"XDG_STATE_HOME": "/var/state"})
    'sqlite:////var/state/gradwatch/monitor.db'
    >>> default_state_url({"HOME": "/home/me"})
    'sqlite:////home/me/.local/state/gradwatch/monitor.db'
    """
    env = os.environ if environ is None else environ
    state_home = env.get("XDG_STATE_HOME")
    if not (state_home and os.path.isabs(state_home)):  # the XDG spec ignores a relative path
        home = env.get("HOME") or str(Path.home())
        state_home = os.path.join(home, ".local", "state")
    return f"sqlite:///{os.path.join(state_home, 'gradwatch', 'monitor.db')}"


def upsert(
    connection: Connection, table: sa.Table, key: Mapping[str, Any], values: Mapping[str, Any]
) -> None:
    """Update the row with primary key `key`, or insert it (portable: no dialect upsert)."""
    where = [table.c[name] == value for name, value in key.items()]
    if connection.execute(sa.update(table).where(*where).values(**values)).rowcount == 0:
        connection.execute(sa.insert(table).values(**key, **values))


# -- database ---------------------------------------------------------------------------------


def parse_url(url: str | os.PathLike[str] | None) -> URL:
    if url is None:
        url = default_state_url()
    if isinstance(url, os.PathLike) or (isinstance(url, str) and "://" not in url):
        path = Path(os.fspath(url)).expanduser().absolute()
        return make_url(f"sqlite:///{path}")
    try:
        return make_url(url)
    except Exception as error:  # sqlalchemy.exc.ArgumentError, ValueError, TypeError
        raise ConfigError(
            f"url must be a SQLAlchemy URL such as 'sqlite:////var/lib/gradwatch/monitor.db' or "
            f"the path of a SQLite file, got {type(url).__name__} that does not parse "
            f"({type(error).__name__})."
        ) from None


def sqlite_file(url: URL) -> Path | None:
    """The SQLite file `url` names, None for another database or an in-memory one."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


def make_engine(url: URL) -> Engine:
    engine = sa.create_engine(url)
    if url.get_backend_name() == "sqlite":
        # pysqlite's own transaction handling begins lazily (a SELECT runs outside the
        # transaction) and not at all for DDL; take it over, as SQLAlchemy's docs recommend,
        # and take the write lock at BEGIN so two writers never deadlock on an upgrade.
        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
