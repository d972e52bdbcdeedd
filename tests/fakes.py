"""Test doubles shared by the in-process tests: pools without threads, a migrated SQLite store,
and the HTTP tree driven through treq's StubTreq with no socket."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.web.resource import IResource

from bearerbridge.crypto import Keyring
from bearerbridge.storage import migrations
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.store import SqlStore, make_engine

BASE = "http://127.0.0.1:8080"


def sqlite_store(path: Path, ttl: float = 1.0, clock: Callable[[], float] | None = None) -> SqlStore:
    """A store on a migrated SQLite file, remembering reads for `ttl` seconds of `clock`."""
    engine = make_engine(f"sqlite:///{path}")
    migrations.upgrade(engine)
    recent = RecentReads(ttl) if clock is None else RecentReads(ttl, clock)
    return SqlStore(engine, Keyring(b"k" * 32), recent)


class SyncPool:
    """A StorePool that runs store work at once on the calling thread, counting the hops."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.hops = 0
        self.broken = False
        self.held: list[tuple[defer.Deferred, Any]] | None = None

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        self.hops += 1
        if self.broken:
            return defer.fail(RuntimeError("database gone"))
        with self.store.transaction():
            result = fn(*args, **kwargs)
        if self.held is not None:  # let the test decide when the "thread" answers
            d: defer.Deferred = defer.Deferred()
            self.held.append((d, result))
            return d
        return defer.succeed(result)

    def run_apart(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        return defer.maybeDeferred(fn, *args)


class DeadPool:
    """A StorePool whose database has gone away: the store is there (its keyring and memory of
    recent reads too), but no call reaches it."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.fail(OperationalError("SELECT 1", {}, Exception("connection refused")))

    def run_apart(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        return defer.maybeDeferred(fn, *args)


@dataclass
class Answer:
    code: int
    headers: Any  # twisted.web.http_headers.Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class Http:
    """A resource tree driven through StubTreq, answering at once: with a SyncPool behind it,
    a request is served in full before `request` returns. Cookies are kept between requests,
    as a browser keeps them; redirects are returned, not followed."""

    def __init__(self, resource: IResource) -> None:
        self.treq = StubTreq(resource)

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        answers: list[Answer] = []
        failures: list[Any] = []
        d = self.treq.request(method, BASE + path, allow_redirects=False, **kwargs)
        d.addCallback(lambda r: r.content().addCallback(lambda body: answers.append(Answer(r.code, r.headers, body))))
        d.addErrback(failures.append)
        self.treq.flush()
        if failures:
            failures[0].raiseException()
        assert answers, f"{method} {path} got no answer"
        return answers[0]

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.request("POST", path, **kwargs)
