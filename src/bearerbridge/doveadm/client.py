"""The doveadm HTTP API client: one POST per revocation or disabled user, bounded by `[dovecot]
timeout`.

It never fails: a wrong key, a Dovecot that is down or silent, or an answer it cannot read is an
`Outcome`, logged (never the key) for the caller to audit and show. The revocation it follows is
already done by then, so nothing here can undo or delay it past the timeout.

Requests go without `Connection: close`: Dovecot 2.3.19.1 never answers a request carrying it
when the key is wrong (ran: treq with a non-persistent pool, urllib and curl alike waited for
ever; without the header the 401 came in milliseconds). So the pool is a persistent one, and the
connection is closed here once the answer is read: the next revocation, perhaps days later,
never POSTs on a connection Dovecot has dropped meanwhile (a POST is not retried).
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from bearerbridge import config as configuration
from bearerbridge.doveadm.protocol import (
    Kicked,
    Outcome,
    Reach,
    Target,
    all_sessions,
    read_answer,
    request_body,
    request_headers,
    target_for,
    unusable,
)
from bearerbridge.storage.models import User

log = Logger()


class Doveadm:
    """Ends a user's live Dovecot sessions (`doveadm kick`) when a way into their mail is revoked."""

    def __init__(self, settings: configuration.DovecotSettings, sasl: configuration.SaslSettings, key: bytes,
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor  # here: importing installs no reactor

            reactor = default_reactor
        self._settings = settings
        self._sasl = sasl
        self._url = settings.doveadm_url
        self._headers = Headers(request_headers(key))
        self._clock: IReactorTime = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._http = HTTPClient(Agent(reactor, connectTimeout=settings.timeout, pool=self._pool))

    @classmethod
    def from_config(cls, config: configuration.Config, reactor: Any = None) -> Doveadm | None:
        """The client `[dovecot]` asks for, its key read now; None when doveadm_url is empty.
        A key file that cannot be read raises ConfigError."""
        if not config.dovecot.doveadm_url:
            return None
        return cls(config.dovecot, config.sasl, configuration.doveadm_key(config.dovecot), reactor)

    def target(self, user: User, reach: Reach | None) -> Target | None:
        """Whose sessions revoking a way in (a grant's or an app password's `Reach`) must end
        (`protocol.target_for`); None: nobody's."""
        return target_for(user, reach, self._settings, self._sasl)

    def all_sessions(self, user: User) -> Target:
        """Every session of the user, named as Dovecot knows them (`protocol.all_sessions`)."""
        return all_sessions(user, self._settings, self._sasl)

    def kick(self, target: Target) -> defer.Deferred[Kicked]:
        """Ask Dovecot to end `target`'s sessions; fires with the outcome, within the timeout,
        never with a failure."""
        problem = unusable(target.user)
        if problem is not None:
            kicked = Kicked(Outcome.FAILED, reason=problem)
            self._log(target, kicked)
            return defer.succeed(kicked)
        d = defer.Deferred.fromCoroutine(self._exchange(target))
        d.addErrback(self._failed)
        d.addTimeout(self._settings.timeout, self._clock, onTimeoutCancel=self._timed_out)
        return d.addCallback(self._logged, target)

    async def _exchange(self, target: Target) -> Kicked:
        try:
            response = await self._http.post(self._url, data=request_body(target), headers=self._headers)
            return read_answer(response.code, await response.content(), target)
        finally:
            await self._pool.closeCachedConnections()

    def _timed_out(self, result: object, timeout: float) -> Kicked:
        """What a request cancelled at the timeout comes to, whatever the cancelling made of it."""
        return Kicked(Outcome.UNREACHABLE, reason=f"no answer within {timeout:g} s")

    def _failed(self, failure: Failure) -> Kicked:
        reason = failure.value
        if isinstance(reason, (defer.CancelledError, defer.TimeoutError)):  # cancelled at the timeout
            return Kicked(Outcome.UNREACHABLE, reason=f"no answer within {self._settings.timeout:g} s")
        if isinstance(reason, (error.ConnectError, error.DNSLookupError)):
            return Kicked(Outcome.UNREACHABLE, reason=f"cannot connect: {reason.__class__.__name__}")
        if isinstance(reason, (ResponseFailed, ResponseNeverReceived)):
            inner = reason.reasons[0].value if reason.reasons else reason
            return Kicked(Outcome.UNREACHABLE, reason=f"the connection failed: {inner.__class__.__name__}")
        log.failure("Asking Dovecot to end sessions failed unexpectedly", failure)
        return Kicked(Outcome.FAILED, reason=reason.__class__.__name__)

    def _logged(self, kicked: Kicked, target: Target) -> Kicked:
        self._log(target, kicked)
        return kicked

    def _log(self, target: Target, kicked: Kicked) -> None:
        where = ", ".join(target.networks) if target.networks else "everywhere"
        if kicked.outcome.reached:
            log.info("Dovecot ended {ended} session(s) of {user} ({where})", ended=kicked.ended, user=target.user,
                     where=where)
        else:
            log.warn("Could not end the Dovecot sessions of {user} ({where}) at {url}: {outcome}, {reason}",
                     user=target.user, where=where, url=self._url, outcome=kicked.outcome.value, reason=kicked.reason)
