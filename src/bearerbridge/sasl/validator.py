"""`Validator`: the one decision (`sasl.judge`) with the store behind it.

`Validator` wraps `judge` with the store's memory of recent reads
(`storage.recent`) and a batching lookup: the Dovecot socket can ask tens of
thousands of times a second, so tokens read in the last `[sasl] cache_ttl` seconds
are answered from memory, and the misses that arrive while a lookup is in flight go
to the pool together, as one query. A token still in use when its record is half
that old is read again in the background, so that busy tokens never wait for the
database. Revocations made in this process take effect at once; those made by other
processes sharing the database within `cache_ttl`.

A password (PLAIN's, or HTTP Basic's at forward-auth) may also be an app password, where the
operator allows them (`[sasl] app_passwords`): one remembered is judged at once; else the
password is looked up as a token first (as it always was), and only if no token has it, as an
app password: one more indexed read, in the pool, remembered as tokens are.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from bearerbridge.config import SaslSettings
from bearerbridge.sasl.judge import judge, judge_app_password, judge_token
from bearerbridge.sasl.mechanisms import Bearer
from bearerbridge.sasl.verdict import Reason, Verdict
from bearerbridge.storage.models import Token
from bearerbridge.storage.pool import StorePool

MAX_BATCH = 512


class Validator:
    """`validate(bearer, service) -> Verdict | Deferred[Verdict]`, shared by every SASL surface.

    A token read within `cache_ttl` is judged at once and the Verdict returned as it is:
    at tens of thousands of checks a second, even a fired Deferred costs (bench/README.md).
    """

    def __init__(self, pool: StorePool, settings: SaslSettings, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self._pool = pool
        self._store = pool.store
        self._recent = pool.store.recent
        self._settings = settings
        self._clock: IReactorTime = clock
        self._waiting: dict[str, list[defer.Deferred[Token | None]]] = {}  # misses, by digest
        self._rereads: dict[str, None] = {}  # remembered tokens to renew (a dict keeps the order)
        self._in_flight: dict[str, list[defer.Deferred[Token | None]]] | None = None  # the batch being read
        self._no_rereads_until = 0.0  # after a failed re-read: the database is not asked again at once

    def validate(self, bearer: Bearer, service: str) -> Verdict | defer.Deferred[Verdict]:
        """Decide a SASL login; a database failure gives a temporary verdict, never an error."""
        def decide(token: Token | None, now: float) -> Verdict:
            return judge(token, now, bearer, service, self._settings)
        settings = self._settings
        if bearer.mechanism == "PLAIN" and service in settings.plain and settings.app_passwords_at(service):
            return self._password(bearer.token, bearer.identity, service, settings.usernames.get(service, "username"),
                                  decide)
        return self._decide(bearer.token, decide)

    def check_scope(self, access_token: str, identity: str | None, scope: str, service: str | None = None
                    ) -> Verdict | defer.Deferred[Verdict]:
        """Decide whether a token (of `identity`, if named) holds `scope`: for forward-auth. With
        `service` (the password of HTTP Basic, at a rule guarding that service), an app password
        made for that service passes too, where the operator allows them."""
        def decide(token: Token | None, now: float) -> Verdict:
            return judge_token(token, now, identity, scope, self._settings)
        if service is not None and self._settings.app_passwords_at(service):
            return self._password(access_token, identity, service, "username", decide)
        return self._decide(access_token, decide)

    def _password(self, secret: str, identity: str | None, service: str, reported: str,
                  decide: Callable[[Token | None, float], Verdict]) -> Verdict | defer.Deferred[Verdict]:
        """A password that may be a token or an app password: see the module's docstring."""
        digest = self._store.keyring.digest(secret)
        remembered = self._recent.app_password(digest)
        if remembered is not None:
            return judge_app_password(remembered, self._clock.seconds(), identity, service, self._settings, reported)

        def unless_token(verdict: Verdict) -> Verdict | defer.Deferred[Verdict]:
            if verdict.reason is not Reason.UNKNOWN:
                return verdict
            d = self._pool.run(self._store.find_app_password, digest)
            d.addCallback(lambda found: judge_app_password(found, self._clock.seconds(), identity, service,
                                                           self._settings, reported))
            return cast("defer.Deferred[Verdict]", d.addErrback(self._database_failed))

        as_token = self._decide(secret, decide, digest)
        if isinstance(as_token, Verdict):
            return unless_token(as_token)
        return as_token.addCallback(unless_token)

    def _decide(self, access_token: str, decide: Callable[[Token | None, float], Verdict], digest: str | None = None
                ) -> Verdict | defer.Deferred[Verdict]:
        digest = digest or self._store.keyring.digest(access_token)
        remembered = self._recent.token(digest)
        if remembered is not None:
            token, age = remembered
            if age >= self._recent.ttl / 2:
                self._read_again(digest)
            return decide(token, self._clock.seconds())
        d: defer.Deferred[Token | None] = defer.Deferred()
        self._waiting.setdefault(digest, []).append(d)
        if self._in_flight is None:
            self._send_batch()
        # One chain (addCallback returns d itself), so that the type checker sees the Verdict.
        return d.addCallback(lambda token: decide(token, self._clock.seconds())).addErrback(self._database_failed)

    @staticmethod
    def _database_failed(failure: Failure) -> Verdict:
        if failure.check(defer.CancelledError):  # the caller gave up (a timeout) and says so itself
            # Returned, the Failure goes on failing the chain. Twisted's types have no word for an
            # errback that recovers from some failures only, so this one is typed by its recoveries.
            return failure  # type: ignore[return-value]
        return Verdict(False, temporary=True, reason=Reason.DATABASE_UNAVAILABLE)

    def _read_again(self, digest: str) -> None:
        """Renew a remembered token before it expires, with no one waiting for it."""
        if (digest in self._rereads or digest in self._waiting or self._clock.seconds() < self._no_rereads_until
                or (self._in_flight is not None and digest in self._in_flight)):
            return
        self._rereads[digest] = None
        if self._in_flight is None:
            self._send_batch()

    def _send_batch(self) -> None:
        """Read the misses, which someone waits for, first; renewals fill the rest of a batch."""
        batch = {digest: self._waiting[digest] for digest in itertools.islice(self._waiting, MAX_BATCH)}
        for digest in itertools.islice(self._rereads, MAX_BATCH - len(batch)):
            batch.setdefault(digest, [])
        for digest in batch:
            self._waiting.pop(digest, None)
            self._rereads.pop(digest, None)
        self._in_flight = batch
        d = self._pool.run(self._store.find_access_tokens, list(batch))
        d.addBoth(self._batch_done, batch)

    def _batch_done(self, result: dict[str, Token] | Failure,
                    batch: dict[str, list[defer.Deferred[Token | None]]]) -> None:
        self._in_flight = None
        if isinstance(result, Failure) and not all(batch.values()):
            # A renewal failed: leave the records to expire rather than ask again on every hit.
            self._no_rereads_until = self._clock.seconds() + self._recent.ttl / 2
            self._rereads.clear()
        if self._waiting or self._rereads:
            self._send_batch()
        if isinstance(result, Failure):
            for waiters in batch.values():
                for d in waiters:
                    d.errback(result)
            return
        # The store noted what it found; unknown tokens are not remembered, so guessing
        # cannot fill memory.
        for digest, waiters in batch.items():
            token = result.get(digest)
            for d in waiters:
                d.callback(token)
