"""Opening the store the same way for the service and the admin command line."""

from __future__ import annotations

from bearerbridge.config import Config, secret_key
from bearerbridge.crypto import Keyring
from bearerbridge.storage import migrations
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.store import SqlStore, make_engine


def open_store(config: Config) -> SqlStore:
    """Read (or create) the secret key, connect, and bring the schema up to date. The store
    remembers what it reads for `[sasl] cache_ttl` seconds (`storage.recent`)."""
    keyring = Keyring(secret_key(config))
    engine = make_engine(config.database.url, config.database.threads, config.database.deadline)
    migrations.upgrade(engine)
    return SqlStore(engine, keyring, RecentReads(config.sasl.cache_ttl))
