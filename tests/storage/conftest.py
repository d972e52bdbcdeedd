"""The stores every storage test runs on: SQLite (a file) and the machine's PostgreSQL."""

from __future__ import annotations

import pytest

from bearerbridge.crypto import Keyring
from bearerbridge.storage import migrations
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.store import SqlStore, make_engine

from ..support import postgres_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        yield engine
        engine.dispose()
        return
    with postgres_schema() as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def store(engine) -> SqlStore:
    migrations.upgrade(engine)
    return SqlStore(engine, Keyring(b"k" * 32), RecentReads(1.0))
