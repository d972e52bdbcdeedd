"""Runs blocking store work on a dedicated thread pool and hands back Deferreds.

The only module that knows about threads. Each `run` is one hop to the pool and one
database transaction, however many queries the function makes. Each has a deadline
(`[database] deadline`): a database that stops answering makes callers fail with a
`TimeoutError` then, not wait for ever (the thread itself waits for the driver's own
timeouts; its late result is dropped).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from bearerbridge.storage.store import SqlStore

T = TypeVar("T")


class DatabaseUnavailable(Exception):
    """The database did not answer within the deadline, or could not be reached: callers answer
    "try later" (HTTP 503, a temporary SASL failure) and log one line, not a traceback."""


class StorePool(Service):
    """A `Service` owning the thread pool; add it to the MultiService first so it stops last."""

    name = "store-pool"

    def __init__(self, store: SqlStore, size: int, deadline: float = 5.0) -> None:
        from twisted.internet import reactor  # here: importing this module installs no reactor

        self.store = store
        self.deadline = deadline
        self._reactor: Any = reactor  # IReactorFromThreads and IReactorThreads; no one interface says both
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name="bearerbridge-store")
        self._running: dict[int, float] = {}  # thread -> when its current call began
        self._timed_out_at = -float("inf")

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()

    def _in_transaction(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        me = threading.get_ident()
        self._running[me] = time.monotonic()
        try:
            with self.store.transaction():
                return fn(*args, **kwargs)
        finally:
            del self._running[me]

    def run_apart(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Call `fn` in the reactor's own thread pool, away from the store's threads: for slow
        CPU work (password hashing) that must not hold up database work."""
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn, *args)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Call `fn(*args, **kwargs)` in a pool thread, inside one store transaction; fails with
        `defer.TimeoutError` if the answer takes longer than the deadline."""
        d = threads.deferToThreadPool(self._reactor, self._pool, self._in_transaction, fn, args, kwargs)
        return d.addTimeout(self.deadline, self._reactor, onTimeoutCancel=self._timed_out).addErrback(
            self._unavailable)

    @staticmethod
    def _unavailable(failure: Failure) -> Failure:
        """A timeout, or a database that cannot be reached or used, as DatabaseUnavailable."""
        error = failure.value
        if isinstance(error, defer.TimeoutError):
            raise DatabaseUnavailable(f"the database did not answer within {error.args[0]} s")
        if isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)):
            reason = (str(error.orig).strip().splitlines() or ["no reason given"])[0]
            raise DatabaseUnavailable(f"the database failed: {reason}")
        return failure

    def _timed_out(self, result: Any, timeout: float) -> Any:
        self._timed_out_at = time.monotonic()
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise defer.TimeoutError(timeout, "the database did not answer in time")
        return result

    def stalled(self) -> bool:
        """Whether the database is not keeping up: a thread has been on one call past the
        deadline (a database that stopped answering), or a call timed out within the last
        deadline (a pool with more work than it can do)."""
        now = time.monotonic()
        oldest = min(list(self._running.values()), default=now)  # list(): threads change the dict
        return now - oldest >= self.deadline or now - self._timed_out_at < self.deadline
