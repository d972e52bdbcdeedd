"""Bearer-token SASL for Twisted's own IMAP and SMTP servers, through ``twisted.cred``.

Three pieces, as ``twisted.cred`` wants them:

- :class:`BearerChallenger`, an ``IChallengeResponse`` that runs one
  :class:`~bearerbridge.sasl.mechanisms.ServerExchange` and is itself the credentials
  (:class:`IOAuthBearer`) handed to the portal;
- :class:`BearerChecker`, which asks bearerbridge's one validation function
  and turns its :class:`~bearerbridge.sasl.verdict.Verdict` into an avatar id or
  a typed error;
- :class:`BearerIMAP4Server` and :class:`BearerESMTP`, small subclasses
  that relay the RFC 7628 §3.2.2 error challenge after the portal refuses.

Stock ``IMAP4Server`` and ``ESMTP`` accept the challengers too, but they
answer a refused token with a bare ``NO``/``535``: they call the portal
only after the last challenge, and have no way to send one afterwards.
Neither refuses ``AUTHENTICATE``/``AUTH`` before TLS, so serve them over TLS.
Wiring, in a factory's ``buildProtocol``::

    portal = Portal(realm, [BearerChecker(validate)])
    server = BearerIMAP4Server(chal=bearer_challengers("imap"))  # or BearerESMTP, "smtp"
    server.portal = portal
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable, Iterable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import imap4, smtp
from twisted.mail.interfaces import IChallengeResponse
from twisted.python.failure import Failure as TwistedFailure
from zope.interface import Attribute, Interface, implementer

from bearerbridge.sasl.mechanisms import (
    Bearer,
    Challenge,
    Check,
    Failure,
    ProtocolStateError,
    ServerExchange,
    Step,
    checked_mechanisms,
)
from bearerbridge.sasl.verdict import Reason, Validate, Verdict

log = Logger()


class IOAuthBearer(ICredentials):
    """Credentials holding an OAuth 2.0 bearer token (RFC 6750) from SASL (RFC 7628)."""

    bearer = Attribute(
        "The sasl.Bearer awaiting validation, or None when there is none: the"
        " client has not sent it yet, or the exchange has already failed."
    )
    service = Attribute(
        "The service name (e.g. 'imap', 'smtp') the token must be good for;"
        " the validator maps it to the scope it requires."
    )


class BearerRejected(UnauthorizedLogin):
    """The validator refused the token.

    ``verdict`` holds the RFC 7628 §3.2.2 ``status`` and ``scope`` for the
    error challenge, which ``credentials`` (the exchange that asked) builds.
    """

    def __init__(self, verdict: Verdict, credentials: IOAuthBearer) -> None:
        super().__init__(verdict.reason or verdict.status)
        self.verdict = verdict
        self.credentials = credentials


class BearerBackendUnavailable(LoginFailed):
    """The token could not be judged now; the client should try again later.

    Not an ``UnauthorizedLogin``: the credentials may well be good, and a
    client told they are bad could throw away a valid token.
    """


@implementer(IChallengeResponse, IOAuthBearer)
class BearerChallenger:
    """One server-side OAUTHBEARER, XOAUTH2 or PLAIN exchange, as Twisted drives it.

    ``IMAP4Server`` and ``ESMTP`` build one per ``AUTHENTICATE``/``AUTH``
    with no arguments (see :func:`bearer_challengers`), call
    ``getChallenge()`` first, then ``setResponse()`` and ``moreChallenges()``
    in turn, and give the object to ``Portal.login`` once no challenge is
    left. A malformed message gets its RFC 7628 §3.2.2 error round here,
    before the portal is asked, so even stock servers relay it.
    """

    def __init__(
        self, mechanism: str, service: str, openid_configuration: str | None = None
    ) -> None:
        self.exchange = ServerExchange(mechanism, openid_configuration)
        self.service = service
        self.bearer: Bearer | None = None
        # Set once the exchange has failed; for logs, never holds the token.
        self.failure_reason: str | None = None
        self._challenge: bytes | None = None
        self._started = False

    def getChallenge(self) -> bytes:
        """The challenge to send now (base64-encoding is the server's job).

        Twisted asks before the client's first message. RFC 4422 §5 makes
        that the empty challenge; ``ESMTP`` discards it when the client gave
        an initial response (RFC 4954 §4).
        """
        if not self._started:
            self._started = True
            self._take(self.exchange.receive(None))
        if self._challenge is None:
            raise ProtocolStateError("no challenge to send")
        return self._challenge

    def setResponse(self, response: bytes) -> None:
        """Feed the client's decoded response to the exchange."""
        self._started = True
        self._take(self.exchange.receive(response))

    def moreChallenges(self) -> bool:
        """Whether the server must send ``getChallenge()`` before asking the portal."""
        return self._challenge is not None

    def reject(self, verdict: Verdict) -> None:
        """Enter the error round for a refused token (RFC 7628 §3.2.2).

        Afterwards ``moreChallenges()`` is true for OAUTHBEARER and XOAUTH2,
        whose error challenge the client must answer (RFC 7628 §3.2.3);
        PLAIN has none and simply fails.
        """
        self._take(self.exchange.reject(verdict.status, verdict.scope, verdict.reason))

    def _take(self, step: Step) -> None:
        self._challenge = step.data if isinstance(step, Challenge) else None
        if isinstance(step, Check):
            self.bearer = step.bearer
        elif isinstance(step, Failure):
            # A portal asked after a failure must find nothing to accept.
            self.bearer = None
            self.failure_reason = step.reason


def bearer_challengers(
    service: str,
    mechanisms: Iterable[str] = ("OAUTHBEARER", "XOAUTH2"),
    openid_configuration: str | None = None,
) -> dict[bytes, Callable[[], BearerChallenger]]:
    """Challenger factories for ``IMAP4Server(chal=...)`` or ``ESMTP(chal=...)``.

    ``service`` travels with every credential to the validator, which needs
    it to pick the scope. ``openid_configuration`` is the RFC 7628 §3.2.2
    discovery URL put in OAUTHBEARER error challenges; with a stock
    ``IMAP4Server`` keep it unset, as such a challenge exceeds the 57 bytes
    that its line-wrapping base64 encoder (``encodebytes``) keeps on one line.
    """
    return {
        name.encode("ascii"): functools.partial(
            BearerChallenger, name, service, openid_configuration
        )
        for name in checked_mechanisms(mechanisms)
    }


@implementer(ICredentialsChecker)
class BearerChecker:
    """Accepts :class:`IOAuthBearer` credentials that ``validate`` finds good.

    The avatar id is the token owner's name as UTF-8 bytes, as Twisted's
    mail realms expect, never the identity the client claimed.
    """

    credentialInterfaces = (IOAuthBearer,)

    def __init__(self, validate: Validate) -> None:
        self._validate = validate

    def requestAvatarId(self, credentials: IOAuthBearer) -> defer.Deferred[bytes | tuple[()]]:
        """Fire with the avatar id, or fail with :class:`BearerRejected`,
        :class:`BearerBackendUnavailable` or a plain ``UnauthorizedLogin``."""
        bearer = credentials.bearer
        if bearer is None:
            return defer.fail(UnauthorizedLogin("no bearer token to check"))
        # maybeDeferred waits for a Deferred the validator returns; its overloads cannot follow a
        # function that returns either a Verdict or a Deferred.
        d: defer.Deferred[Verdict] = defer.maybeDeferred(  # type: ignore[call-overload]
            self._validate, bearer, credentials.service)
        # Before the callback, so that only the validator's own errors land here.
        d.addErrback(self._validator_failed)
        return d.addCallback(self._judged, bearer, credentials)

    def _validator_failed(self, failure: TwistedFailure) -> Verdict:
        log.failure("token validation failed", failure)
        return Verdict(ok=False, temporary=True, reason=Reason.VALIDATOR_ERROR)

    def _judged(self, verdict: Verdict, bearer: Bearer, credentials: IOAuthBearer) -> bytes:
        if verdict.accepted:
            assert verdict.username is not None  # accepted means there is a name
            return verdict.username.encode("utf-8")
        reason = str(verdict.unavailable or verdict.reason or verdict.status)
        log.info(
            # The token is never logged.
            "bearer token refused: service={service!r} mechanism={mechanism} reason={reason!r}",
            service=credentials.service, mechanism=bearer.mechanism, reason=reason,
        )
        if verdict.unavailable is not None:
            raise BearerBackendUnavailable(reason)
        raise BearerRejected(verdict, credentials)


class BearerIMAP4Server(imap4.IMAP4Server):
    """``IMAP4Server`` that completes RFC 7628 exchanges, error round included.

    For :class:`BearerChallenger` it replaces the stock ``AUTHENTICATE``
    loop, whose login step and error handling are private
    (``__cbAuthChunk``/``__ebAuthResp``) and so cannot send a challenge
    after the portal refuses. It also sends each challenge on one line, as
    RFC 3501 §7.5 requires, where the stock loop wraps base64 at 76 columns.
    Other challengers take the stock path. Usable as a mixin ahead of
    another ``IMAP4Server`` subclass.
    """

    # IMAP4Server's `portal = None` leaves the setting to its user, and mypy reads it as always None.
    portal: Portal | None  # type: ignore[assignment]

    def authenticate(self, chal: IChallengeResponse, tag: bytes) -> None:
        if self.portal is None or not isinstance(chal, BearerChallenger):
            super().authenticate(chal, tag)
            return
        self._bearerChallenge(chal, tag, chal.getChallenge())

    def _bearerChallenge(self, chal: BearerChallenger, tag: bytes, challenge: bytes) -> None:
        # RFC 3501 §7.5: continue-req = "+" SP base64, on one line.
        self.sendLine(b"+ " + base64.b64encode(challenge))
        # The stock way to route the next line here (see parse_pending).
        self.parseState = "pending"
        response: defer.Deferred[bytes] = defer.Deferred()
        # The stock loop puts a Deferred here too; the attribute's declared type knows only literals.
        self._pendingLiteral = response  # type: ignore[assignment]
        response.addCallback(self._bearerResponse, chal, tag)
        response.addErrback(self._bearerServerError, tag)

    def _bearerResponse(self, line: bytes, chal: BearerChallenger, tag: bytes) -> None:
        if line == b"*":
            # RFC 3501 §6.2.2: the client cancelled.
            self.sendBadResponse(tag, b"AUTHENTICATE cancelled")
            return
        try:
            response = base64.b64decode(line, validate=True)
        except binascii.Error:
            self.sendBadResponse(tag, b"Malformed response: not base64")
            return
        chal.setResponse(response)
        self._bearerNext(chal, tag)

    def _bearerNext(self, chal: BearerChallenger, tag: bytes) -> None:
        """Send the next challenge, the failure, or ask the portal."""
        if chal.moreChallenges():
            self._bearerChallenge(chal, tag, chal.getChallenge())
        elif chal.failure_reason is not None:
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
        else:
            assert self.portal is not None  # authenticate() comes this way only with a portal
            d = self.portal.login(chal, None, imap4.IAccount)
            d.addCallbacks(
                self._bearerLoggedIn, self._bearerRefused,
                callbackArgs=(tag,), errbackArgs=(chal, tag),
            )
            d.addErrback(self._bearerServerError, tag)

    def _bearerLoggedIn(self, result: tuple[type[Interface], object, Callable[[], None]], tag: bytes) -> None:
        # What the private IMAP4Server.__cbAuthResp does on success.
        _, self.account, self._onLogout = result
        self.state = "auth"
        self.sendPositiveResponse(tag, b"Authentication successful")
        self.setTimeout(self.POSTAUTH_TIMEOUT)

    def _bearerRefused(self, failure: TwistedFailure, chal: BearerChallenger, tag: bytes) -> None:
        """Map login errors to RFC 5530 response codes, relaying the error challenge."""
        error = failure.value
        if isinstance(error, BearerRejected) and error.credentials is chal:
            chal.reject(error.verdict)
            self._bearerNext(chal, tag)
        elif failure.check(UnauthorizedLogin):
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
        else:
            if not failure.check(BearerBackendUnavailable):
                log.failure("IMAP bearer login failed unexpectedly", failure)
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Temporary authentication failure")

    def _bearerServerError(self, failure: TwistedFailure, tag: bytes) -> None:
        log.failure("IMAP bearer authentication broke", failure)
        self.sendBadResponse(tag, b"Server error")


# ESMTP dispatches each line to state_<mode>; this mode awaits the answer
# to an error challenge.
_AWAIT_ACK = "BEARER_ACK"


class BearerESMTP(smtp.ESMTP):
    """``ESMTP`` that relays the RFC 7628 error challenge and says 454 when it should.

    The stock ``_ebAuthenticated`` answers every refusal with ``535``; this
    override first sends the error challenge as ``334`` (RFC 4954 §4) and
    waits for the client's answer. Usable as a mixin ahead of another
    ``ESMTP`` subclass.
    """

    def _ebAuthenticated(self, reason: TwistedFailure) -> None:
        error = reason.value
        chal = self.challenger
        # Only the exchange still in progress may get the error round.
        if (
            isinstance(chal, BearerChallenger)
            and isinstance(error, BearerRejected)
            and error.credentials is chal
        ):
            chal.reject(error.verdict)
            if chal.moreChallenges():
                self.mode = _AWAIT_ACK
                self.sendCode(334, base64.b64encode(chal.getChallenge()))
                return
        if reason.check(BearerBackendUnavailable):
            self.challenger = None
            # RFC 4954 §6: temporary failure, the client should retry later.
            self.sendCode(454, b"4.7.0 Temporary authentication failure")
            return
        super()._ebAuthenticated(reason)

    def state_BEARER_ACK(self, line: bytes) -> None:
        # RFC 7628 §3.2.3: whatever the client answers, the exchange failed.
        self.challenger = None
        self.mode = smtp.COMMAND
        self.sendCode(535, b"5.7.8 Authentication credentials invalid")
