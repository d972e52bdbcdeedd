"""Opening the store the same way for the service and the admin command line."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.util import CommandError as AlembicError

from bearerbridge.config import Config, secret_key
from bearerbridge.crypto import Keyring
from bearerbridge.storage import migrations
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.store import SqlStore, make_engine


class OpenError(Exception):
    """The store cannot be opened. The message is one line saying what and where; the CLI and
    twistd print it instead of a traceback."""


def open_store(config: Config) -> SqlStore:
    """Read (or create) the secret key, connect, and bring the schema up to date. The store
    remembers what it reads for `[sasl] cache_ttl` seconds (`storage.recent`).

    A key that cannot be read or made raises `ConfigError`; a database that cannot be created,
    reached or migrated raises `OpenError`."""
    keyring = Keyring(secret_key(config))
    where = describe_url(config.database.url)
    try:
        engine = make_engine(config.database.url, config.database.threads, config.database.deadline)
    except OSError as e:  # an SQLite file, or its directory
        reason = "a file is in the way of its directory" if isinstance(e, FileExistsError) else e.strerror
        raise OpenError(f"[database] url: cannot create {where}: {reason}") from None
    except ImportError as e:
        raise OpenError(f"[database] url: no driver for {where} is installed ({e})") from None
    except sa.exc.SQLAlchemyError as e:
        raise OpenError(f"[database] url: {where}: {one_line(e)}") from None
    try:
        _migrate(engine, config)
    except sa.exc.DBAPIError as e:
        engine.dispose()
        raise OpenError(f"[database] url: cannot use {where}: {one_line(e.orig or e)}") from None
    except sa.exc.SQLAlchemyError as e:
        engine.dispose()
        raise OpenError(f"[database] url: cannot use {where}: {one_line(e)}") from None
    except (RuntimeError, AlembicError) as e:  # a migration that refuses (0003: names equal but for case)
        engine.dispose()
        raise OpenError(f"database {where}: the schema cannot be brought up to date: {one_line(e)}") from None
    return SqlStore(engine, keyring, RecentReads(config.sasl.cache_ttl))


def _migrate(engine: sa.engine.Engine, config: Config) -> None:
    """Apply the migrations in one transaction, DDL included, on an engine of their own: a
    migration that refuses leaves the database as it found it, to be fixed and started again."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        migrations.upgrade(engine)  # PostgreSQL's DDL is transactional; a memory database is one engine's
        return
    migrator = make_engine(config.database.url, 1, config.database.deadline, transactional_ddl=True)
    try:
        migrations.upgrade(migrator)
    finally:
        migrator.dispose()


def describe_url(url: str) -> str:
    """The database URL as an operator may see it: without its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return repr(url)


def one_line(error: BaseException) -> str:
    """The first line of an error's message: drivers add hints and SQLAlchemy the statement and
    its parameters, which may hold digests, on the lines after."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__
