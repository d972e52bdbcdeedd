"""The store's thread pool: a deadline on every call, and what a stalled database looks like."""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet import reactor, task

from bearerbridge.storage.pool import DatabaseUnavailable, StorePool


@pytest.fixture
def pool():
    store = SimpleNamespace(transaction=contextlib.nullcontext)
    running = StorePool(store, 1, deadline=0.2)
    running.startService()
    yield running
    running.stopService()


@pytest_twisted.ensureDeferred
async def test_a_call_past_the_deadline_fails_then_and_the_pool_says_it_is_stalled(pool):
    release = threading.Event()
    with pytest.raises(DatabaseUnavailable, match=r"did not answer within 0\.2 s"):
        await pool.run(release.wait, 5)
    assert pool.stalled()  # the thread is still on the call
    release.set()
    assert await pool.run(lambda: "answered") == "answered"
    await task.deferLater(reactor, 0.25)
    assert not pool.stalled()  # a deadline after the last timeout, with no thread held


@pytest_twisted.ensureDeferred
async def test_a_database_that_cannot_be_reached_fails_in_one_line(pool):
    def refused():
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused\nIs the server running?"))
    with pytest.raises(DatabaseUnavailable, match="^the database failed: connection refused$"):
        await pool.run(refused)
    assert not pool.stalled()


@pytest_twisted.ensureDeferred
async def test_other_errors_go_through_as_they_are(pool):
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 / 0)
