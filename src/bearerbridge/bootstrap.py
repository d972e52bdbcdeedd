"""Opening the store the same way for the service and the admin command line."""

from __future__ import annotations

from . import migrations
from .config import Config, secret_key
from .crypto import Keyring
from .store import SqlStore, make_engine


def open_store(config: Config) -> SqlStore:
    """Read (or create) the secret key, connect, and bring the schema up to date."""
    keyring = Keyring(secret_key(config))
    engine = make_engine(config.database.url, config.database.threads)
    migrations.upgrade(engine)
    return SqlStore(engine, keyring)
