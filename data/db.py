"""Engine setup and schema migrations.

The schema comes only from the Alembic migrations in data/migrations, run here in code (no
alembic.ini needed at runtime). data/alembic.ini is for developers:
``alembic -c data/alembic.ini -x url=sqlite:///path/to/whetstone.db upgrade head``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from data.errors import SchemaTooNewError, StoreError

__all__ = [
    "MIGRATIONS_DIR",
    "SchemaTooNewError",
    "StoreError",
    "check_schema",
    "head_revision",
    "known_revisions",
    "make_engine",
    "migrate",
    "schema_version",
]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE: it takes the
# write lock up front (waiting up to busy_timeout), so a transaction that reads then writes
# never fails half-way with SQLITE_BUSY when another connection wrote in between.
WRITE_OPTION = "whetstone_write"


def make_engine(url: str, *, busy_timeout_ms: int = 5000, **engine_kwargs: Any) -> Engine:
    """An Engine for any SQLAlchemy URL; SQLite gets WAL, busy_timeout, foreign keys.

    For a SQLite file the parent folder is created. Extra keyword arguments go to
    ``sqlalchemy.create_engine``.
    """
    sa_url = make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        return create_engine(sa_url, **engine_kwargs)

    database = sa_url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    engine = create_engine(sa_url, **engine_kwargs)
    timeout = int(busy_timeout_ms)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The sqlite3 module's own implicit BEGIN handling is turned off so that the "begin"
        # hook below decides how transactions start (and PRAGMAs run outside a transaction).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={timeout}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            # Deleted rows (forgotten conversations) are overwritten, not left in free pages.
            cursor.execute("PRAGMA secure_delete=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def write_engine(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions take the SQLite write lock at BEGIN."""
    return engine.execution_options(**{WRITE_OPTION: True})


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


def head_revision() -> str:
    """The newest schema revision this version of whetstone knows."""
    heads = _script().get_heads()
    if len(heads) != 1:
        raise StoreError(f"data/migrations has {len(heads)} heads ({heads}); expected one")
    return heads[0]


def known_revisions() -> list[str]:
    """Every schema revision this version of whetstone can read, oldest first."""
    return [rev.revision for rev in reversed(list(_script().walk_revisions()))]


def _current_revisions(connection: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(connection).get_current_heads())


def _check(connection: Connection, script: ScriptDirectory) -> tuple[str, ...]:
    current = _current_revisions(connection)
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = [rev for rev in current if rev not in known]
    if unknown:
        raise SchemaTooNewError(
            f"the database is at schema revision {', '.join(unknown)}, which this whetstone "
            f"does not know (the newest it knows is {head_revision()}); a newer whetstone "
            "wrote it: upgrade whetstone to use this database. The database was not changed."
        )
    return current


def check_schema(engine: Engine) -> str | None:
    """Raise SchemaTooNewError if a newer whetstone migrated this database; else its revision."""
    with engine.connect() as connection:
        current = _check(connection, _script())
    return ",".join(current) or None


def migrate(engine: Engine) -> str:
    """Upgrade the database to the newest revision and return it.

    Refuses (SchemaTooNewError) and changes nothing when the database carries a revision this
    code does not know. Check and upgrade share one transaction, which on SQLite holds the
    write lock, so two processes starting at once do not both migrate.
    """
    script = _script()
    head = head_revision()
    with write_engine(engine).begin() as connection:
        current = _check(connection, script)
        if current == (head,):
            return head
        log.info("migrating the store from %s to %s", ",".join(current) or "empty", head)
        command.upgrade(_alembic_config(connection), "head")
        current = _current_revisions(connection)
    return ",".join(current)


def schema_version(engine: Engine) -> str | None:
    """The database's Alembic revision, or None for a database never migrated."""
    with engine.connect() as connection:
        return ",".join(_current_revisions(connection)) or None
