"""Alembic environment for the whetstone store.

Programmatic use (data.db.migrate) passes an open connection in config.attributes. From the
command line the database URL comes from ``-x url=...``, else $WHETSTONE_DB_URL, else
sqlalchemy.url in the ini file.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from data.db import make_engine, write_engine
from data.models import Base, include_name

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("WHETSTONE_DB_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit(
            "no database URL: pass -x url=sqlite:///path/to/whetstone.db or set WHETSTONE_DB_URL"
        )
    return url


def _configure(**kwargs: object) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds tables instead.
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        include_name=include_name,  # the full-text index tables are not the ORM's
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return

    engine = make_engine(_url())
    try:
        with write_engine(engine).connect() as connection:
            # make_engine hands SQLite transactions to us (explicit BEGIN), so DDL is
            # transactional there: a failed migration leaves nothing half done.
            _configure(connection=connection, transactional_ddl=connection.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


# Only the command line configures logging; inside the app it would clobber the app's own.
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
