"""The one decision every SASL surface uses: may this token log in to this service as this user?

`judge` is pure. `Validator` wraps it with the store's memory of recent reads
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
from bearerbridge.sasl.mechanisms import Bearer
from bearerbridge.sasl.verdict import Reason, Verdict
from bearerbridge.storage.models import Token
from bearerbridge.storage.pool import StorePool

MAX_BATCH = 512
# Bound once for the hot path: on Python 3.11 `Reason.OK` costs 114 ns a lookup, a module global 11.
_OK = Reason.OK


def reported_name(token: Token, form: str, realm: str) -> str:
    """The user's name in the form a service expects (`[sasl.usernames]`).

    Prosody, for one, escapes an `@` in the name it is given, so it wants the localpart.
    """
    username = token.username or ""
    if form == "email" and token.email:
        return token.email
    if form == "localpart":
        return username.split("@", 1)[0]
    if form == "user@realm":
        return f"{username}@{realm}"
    return username


def identity_matches(identity: str, token: Token, settings: SaslSettings) -> bool:
    """Whether the name the client gave is one of the token user's names (`[sasl] identity`)."""
    for rule in settings.identity:
        if rule == "username" and identity == token.username:
            return True
        if rule == "email" and token.email and identity.casefold() == token.email.casefold():
            return True
        if rule == "user@realm" and identity == f"{token.username}@{settings.realm}":
            return True
    return False


def judge(token: Token | None, now: float, bearer: Bearer, service: str, settings: SaslSettings) -> Verdict:
    """Decide one SASL login to `service` (RFC 7628 §3.2.2 statuses; `reason` is for logs and metrics)."""
    required = settings.services.get(service)
    if required is None:
        return Verdict(False, status="invalid_request", reason=Reason.UNKNOWN_SERVICE)
    if bearer.mechanism == "PLAIN" and service not in settings.plain:
        return Verdict(False, status="invalid_request", reason=Reason.PLAIN_NOT_ALLOWED)
    return judge_token(token, now, bearer.identity, required, settings, settings.usernames.get(service, "username"))


def judge_token(token: Token | None, now: float, identity: str | None, required: str, settings: SaslSettings,
                reported: str = "username") -> Verdict:
    """May `token` act as `identity` (if one is named) with scope `required`? The same rules for
    SASL and forward-auth (RFC 6750 §3.1 errors are RFC 7628's statuses too)."""
    if token is None:
        return Verdict(False, reason=Reason.UNKNOWN)
    if token.revoked:
        return Verdict(False, reason=Reason.REVOKED)
    if token.user_disabled:
        return Verdict(False, reason=Reason.USER_DISABLED)
    if token.is_expired(now):
        return Verdict(False, reason=Reason.EXPIRED)
    if token.user_id is None:
        return Verdict(False, reason=Reason.NO_USER)  # a client-credentials token names no one to log in
    if identity is not None and not identity_matches(identity, token, settings):
        return Verdict(False, reason=Reason.IDENTITY_MISMATCH)
    if required not in token.scope.split():
        return Verdict(False, status="insufficient_scope", scope=required, reason=Reason.INSUFFICIENT_SCOPE)
    return Verdict(True, username=reported_name(token, reported, settings.realm), reason=_OK)


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
