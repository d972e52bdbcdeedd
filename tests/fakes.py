"""Test doubles shared by the in-process tests: pools without threads, a migrated SQLite store,
the HTTP tree driven through treq's StubTreq with no socket (over a store holding a test's clients
and users: `sqlite_bridge`), and a browser's part of the code grant."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from argon2 import PasswordHasher
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.resource import IResource

from bearerbridge.audit import AuditLog
from bearerbridge.config import Config
from bearerbridge.crypto import Keyring
from bearerbridge.metrics import Metrics
from bearerbridge.sasl.validator import Validator
from bearerbridge.storage import migrations
from bearerbridge.storage.models import Client
from bearerbridge.storage.pool import DatabaseUnavailable
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.store import SqlStore, make_engine
from bearerbridge.uses import LastUses

from .support import authorize_url, form_fields, pkce_pair

BASE = "http://127.0.0.1:8080"
PASSWORD = "correct horse battery"  # the password of every user `sqlite_bridge` adds
CODE_GRANTS = ("authorization_code", "refresh_token")  # what a web app's client is registered for


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

    def stalled(self) -> bool:
        return False


class DeadPool:
    """A StorePool whose database has gone away: the store is there (its keyring and memory of
    recent reads too), but no call reaches it; each fails at once, as StorePool fails it."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.fail(DatabaseUnavailable("the database failed: connection refused"))

    def stalled(self) -> bool:
        return False

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
        answers = self.pending(method, path, **kwargs)
        assert answers, f"{method} {path} got no answer"
        return answers[0]

    def pending(self, method: str, path: str, **kwargs: Any) -> list[Answer]:
        """Send a request and return the list its answer is put in: empty while a throttle holds
        it (advance the clock, then `flush`)."""
        answers: list[Answer] = []
        failures: list[Any] = []
        d = self.treq.request(method, BASE + path, allow_redirects=False, **kwargs)
        d.addCallback(lambda r: r.content().addCallback(lambda body: answers.append(Answer(r.code, r.headers, body))))
        d.addErrback(failures.append)
        self.treq.flush()
        if failures:
            failures[0].raiseException()
        return answers

    def flush(self) -> None:
        self.treq.flush()

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.request("POST", path, **kwargs)


class MemoryAudit(AuditLog):
    """An audit log keeping its events in a list, each the dict its JSON line holds. Fields are
    checked as the real log checks them: one named like a secret raises ValueError."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def _write(self, data: bytes) -> None:
        self.events.append(json.loads(data))

    def of(self, event: str) -> list[dict[str, Any]]:
        """The events of one name, oldest first, without their time."""
        return [{k: v for k, v in e.items() if k not in ("time", "event")} for e in self.events if e["event"] == event]


# -- the whole HTTP tree in process, and a browser's part of the code grant ---------------------

_CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def cheap_password_hash(password: str) -> str:
    """An argon2id hash at the lowest cost argon2 allows. The server verifies a hash with the
    parameters written in it, so a login checks this one in microseconds instead of the
    ~150 ms a `crypto.hash_password` hash costs: the same code path, only faster."""
    return _CHEAP.hash(password)


@dataclass
class Bridge:
    """bearerbridge's whole HTTP tree (`tap.http_root`) over a real store and a SyncPool."""

    store: SqlStore
    config: Config
    pool: SyncPool
    metrics: Metrics
    audit: MemoryAudit
    root: IResource
    clock: Clock
    uses: LastUses  # what the tree noted as grants' uses (write it with a UseRecorder)

    @classmethod
    def over(cls, store: SqlStore, config: Config | None = None, clock: Clock | None = None) -> Bridge:
        """The tree over `store`; its throttles' delays run on `clock` (a fresh Clock: advance it
        to see a held answer)."""
        from bearerbridge import tap  # here: tap imports the reactor, which not every user of fakes wants

        config = config or Config()
        pool = SyncPool(store)
        metrics, audit, clock = Metrics(), MemoryAudit(), clock or Clock()
        uses = LastUses()
        return cls(store, config, pool, metrics, audit,
                   tap.http_root(config, pool, metrics, Validator(pool, config.sasl), audit, clock=clock, uses=uses),
                   clock, uses)

    def browser(self) -> Http:
        """A new browser (or program): no cookies yet."""
        return Http(self.root)

    def without_database(self) -> Http:
        """A program talking to a second tree over the same store, keyring and memory of recent
        reads, whose database has gone (a DeadPool): only memory can answer it."""
        from bearerbridge import tap

        pool = DeadPool(self.store)
        return Http(tap.http_root(self.config, pool, Metrics(), Validator(pool, self.config.sasl), self.audit))

    def count(self, name: str, **labels: str) -> float:
        """A sample of the service's Prometheus counters; 0 when never counted."""
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the store's connections (a test's SQLite file stays)."""
        self.store.engine.dispose()


@dataclass(frozen=True)
class NewUser:
    """A user for `sqlite_bridge` to add, who signs in with PASSWORD."""

    name: str
    email: str | None = None
    display_name: str | None = None
    is_admin: bool = False


def sqlite_bridge(path: Path, clients: Iterable[Client], users: Iterable[NewUser], config: Config | None = None
                  ) -> Bridge:
    """The whole tree over a new SQLite store at `path` holding `clients` (a confidential one's secret
    is `<client_id>-secret`) and `users`. A context manager: leaving it closes the store."""
    store = sqlite_store(path)
    with store.transaction():
        for client in clients:
            store.add_client(client, None if client.public else f"{client.client_id}-secret")
        for user in users:
            store.add_user(user.name, user.email, cheap_password_hash(PASSWORD), display_name=user.display_name,
                           is_admin=user.is_admin)
    return Bridge.over(store, config)


def tokens_of(answer: Answer) -> dict:
    """The JSON of a 200 answer (a token response)."""
    assert answer.code == 200, (answer.code, answer.body)
    return json.loads(answer.body)


def error_of(answer: Answer, status: int = 400) -> str:
    """The OAuth `error` of an answer with `status`."""
    assert answer.code == status, (answer.code, answer.body)
    return json.loads(answer.body)["error"]


def form_of(answer: Answer) -> tuple[str, dict[str, str]]:
    """The action and the fields of the first form on a page."""
    return form_fields(answer.body.decode())


def redirect_params(answer: Answer) -> dict[str, str]:
    """The query of a redirect's Location: the answer the client's redirect URI receives (302
    after a GET, 303 after a form's POST: see `login_and_consent`)."""
    assert answer.code in (302, 303), (answer.code, answer.body[:500])
    location = answer.header("Location")
    assert location is not None
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def login_and_consent(http: Http, path: str, username: str, password: str, decision: str = "approve") -> Answer:
    """Drive /authorize's login and consent forms as a browser would, from `path`
    (`/authorize?...`); returns the final answer: a redirect when all went well, a 302 when
    consent was remembered and a 303 answering a form (RFC 9700 §4.12)."""
    page = http.get(path)
    if page.code == 302:
        return page
    assert page.code == 200, page.body
    action, fields = form_of(page)
    if fields.get("step") == "login":
        page = http.post(action, data={**fields, "username": username, "password": password})
        if page.code == 303:
            return page
        assert page.code == 200, page.body
        action, fields = form_of(page)
    assert fields.get("step") == "consent", page.body
    return http.post(action, data={**fields, "decision": decision})


def code_grant(bridge: Bridge, browser: Http, client_id: str, redirect_uri: str, scope: str,
               username: str = "alice", **extra: str) -> dict:
    """`browser` signs in as `username` (unless it already has) and approves `client_id` for `scope`
    (`extra`: more parameters of the authorization request); the token response to the code, the
    client authenticating with `<client_id>-secret` (RFC 6749 §4.1.3, with PKCE: RFC 7636 §4.5)."""
    verifier, challenge = pkce_pair()
    answer = login_and_consent(browser, authorize_url("", client_id, redirect_uri, challenge, scope, **extra),
                               username, PASSWORD)
    return tokens_of(bridge.browser().post("/token", data={
        "grant_type": "authorization_code", "code": redirect_params(answer)["code"], "redirect_uri": redirect_uri,
        "code_verifier": verifier, "client_id": client_id, "client_secret": f"{client_id}-secret"}))
