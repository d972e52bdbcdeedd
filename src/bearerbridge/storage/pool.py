"""Runs blocking store work on a dedicated thread pool and hands back Deferreds.

The only module that knows about threads. Each `run` is one hop to the pool and one
database transaction, however many queries the function makes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from bearerbridge.storage.store import SqlStore

T = TypeVar("T")


class StorePool(Service):
    """A `Service` owning the thread pool; add it to the MultiService first so it stops last."""

    name = "store-pool"

    def __init__(self, store: SqlStore, size: int) -> None:
        from twisted.internet import reactor  # here: importing this module installs no reactor

        self.store = store
        self._reactor: Any = reactor  # IReactorFromThreads and IReactorThreads; no one interface says both
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name="bearerbridge-store")

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()

    def _in_transaction(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        with self.store.transaction():
            return fn(*args, **kwargs)

    def run_apart(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Call `fn` in the reactor's own thread pool, away from the store's threads: for slow
        CPU work (password hashing) that must not hold up database work."""
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn, *args)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Call `fn(*args, **kwargs)` in a pool thread, inside one store transaction."""
        return threads.deferToThreadPool(self._reactor, self._pool, self._in_transaction, fn, args, kwargs)
