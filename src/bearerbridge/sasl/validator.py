"""`Validator`: the one decision (`sasl.judge`) with the store behind it.

`Validator` wraps `judge` with the store's memory of recent reads
(`storage.recent`) and a batching lookup: the Dovecot socket can ask tens of
thousands of times a second, so tokens read in the last `[sasl] cache_ttl` seconds
are answered from memory, and the misses that arrive while a lookup is in flight go
to the pool together, as one query. A token still in use when its record is half
that old is read again in the background, so that busy tokens never wait for the
database. Revocations made in this process take effect at once; those made by other
processes sharing the database within `cache_ttl`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from bearerbridge.config import SaslSettings
from bearerbridge.sasl.judge import judge, judge_token
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
        return self._decide(bearer.token, lambda token, now: judge(token, now, bearer, service, self._settings))

    def check_scope(self, access_token: str, identity: str | None, scope: str) -> Verdict | defer.Deferred[Verdict]:
        """Decide whether a token (of `identity`, if named) holds `scope`: for forward-auth."""
        return self._decide(access_token,
                            lambda token, now: judge_token(token, now, identity, scope, self._settings))

    def _decide(self, access_token: str, decide: Callable[[Token | None, float], Verdict]
                ) -> Verdict | defer.Deferred[Verdict]:
        digest = self._store.keyring.digest(access_token)
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
