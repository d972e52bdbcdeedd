"""Tests for bearerbridge.sasl.cred: challengers, the checker, the IMAP/SMTP hooks, the example.

The challengers and checker are tested alone, the servers on a StringTransport,
and then end to end over loopback sockets against Python's own imaplib and smtplib.
"""

from __future__ import annotations

import base64
import imaplib
import importlib.util
import json
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StringStubbingResource, StubTreq
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.mail import imap4, smtp
from twisted.mail.interfaces import IChallengeResponse
from twisted.python.failure import Failure as TwistedFailure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from bearerbridge.sasl.cred import (
    BearerBackendUnavailable,
    BearerChallenger,
    BearerChecker,
    BearerESMTP,
    BearerIMAP4Server,
    BearerRejected,
    IOAuthBearer,
    bearer_challengers,
)
from bearerbridge.sasl.mechanisms import Bearer, ProtocolStateError
from bearerbridge.sasl.verdict import Verdict

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "rfc7628.json").read_text())
EXAMPLE = Path(__file__).parents[2] / "examples" / "imap_server.py"


def oauthbearer(token: str, authzid: str = "alice") -> bytes:
    return f"n,a={authzid},\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(token: str, user: str = "alice") -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


MESSAGES = {"OAUTHBEARER": oauthbearer, "XOAUTH2": xoauth2}
# RFC 7628 §3.2.3: the client answers an error challenge with 0x01; XOAUTH2 clients send nothing.
ACKS = {"OAUTHBEARER": b"\x01", "XOAUTH2": b""}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class FakeValidator:
    """bearerbridge's validate, by token: good, scopeless, down, or unknown."""

    def __init__(self) -> None:
        self.calls: list[tuple[Bearer, str]] = []
        self.pending: defer.Deferred[Verdict] | None = None

    def __call__(self, bearer: Bearer, service: str) -> defer.Deferred[Verdict]:
        self.calls.append((bearer, service))
        if bearer.token == "goodtoken":
            return defer.succeed(Verdict(ok=True, username="alice"))
        if bearer.token == "scopeless":
            return defer.succeed(
                Verdict(ok=False, status="insufficient_scope", scope=service, reason="scope")
            )
        if bearer.token == "down":
            return defer.succeed(Verdict(ok=False, temporary=True, reason="store down"))
        if bearer.token == "slow":
            self.pending = defer.Deferred()
            return self.pending
        return defer.succeed(Verdict(ok=False, status="invalid_token", reason="unknown"))


@implementer(smtp.IMessageDelivery)
class Delivery:
    """An SMTP avatar; these tests never send mail."""


@implementer(IRealm)
class Realm:
    """Hands out IMAP accounts and SMTP deliveries, recording whom for."""

    def __init__(self) -> None:
        self.avatar_ids: list[bytes] = []

    def requestAvatar(self, avatar_id: bytes, mind: object, *interfaces: Any) -> tuple:
        self.avatar_ids.append(avatar_id)
        if imap4.IAccount in interfaces:
            return imap4.IAccount, imap4.MemoryAccount(avatar_id), lambda: None
        return smtp.IMessageDelivery, Delivery(), lambda: None


@pytest.fixture
def validator() -> FakeValidator:
    return FakeValidator()


@pytest.fixture
def realm() -> Realm:
    return Realm()


@pytest.fixture
def portal(realm: Realm, validator: FakeValidator) -> Portal:
    return Portal(realm, [BearerChecker(validator)])


def result_of(d: defer.Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


# The challenger


def challenger(mechanism: str = "OAUTHBEARER", **options: Any) -> BearerChallenger:
    return bearer_challengers("imap", (mechanism,), **options)[mechanism.encode()]()


def test_challenger_provides_both_interfaces():
    chal = challenger()
    assert verifyObject(IChallengeResponse, chal)
    assert verifyObject(IOAuthBearer, chal)
    assert chal.service == "imap"


def test_challenger_without_initial_response():
    chal = challenger()
    assert chal.getChallenge() == b""  # RFC 4422 §5: the empty challenge
    chal.setResponse(oauthbearer("goodtoken"))
    assert not chal.moreChallenges()
    assert chal.bearer == Bearer("OAUTHBEARER", "alice", "goodtoken")
    assert chal.failure_reason is None


def test_challenger_initial_response_needs_no_challenge():
    chal = challenger("XOAUTH2")
    chal.setResponse(xoauth2("goodtoken"))
    assert not chal.moreChallenges()
    assert chal.bearer == Bearer("XOAUTH2", "alice", "goodtoken")


def test_malformed_message_gets_its_error_round_before_the_portal():
    chal = challenger()
    chal.getChallenge()
    chal.setResponse(b"n,,auth=Bearer x")
    assert chal.moreChallenges()
    assert json.loads(chal.getChallenge()) == {"status": "invalid_request"}
    chal.setResponse(b"\x01")
    assert not chal.moreChallenges()
    assert chal.bearer is None  # so a portal asked anyway refuses
    assert chal.failure_reason.startswith("malformed")


def test_rejected_token_gets_the_rfc7628_challenge():
    vector = VECTORS["failed_exchange_imap"]
    chal = challenger(openid_configuration=vector["openid_configuration"])
    chal.setResponse(base64.b64decode(vector["client_response"]))
    chal.reject(Verdict(ok=False, status=vector["status"], scope=vector["scope"]))
    assert chal.moreChallenges()
    assert b64(chal.getChallenge()).decode() == vector["server_challenge"]
    chal.setResponse(base64.b64decode(vector["client_ack"]))
    assert not chal.moreChallenges()
    assert chal.bearer is None
    assert chal.failure_reason == "invalid_token"


def test_rejected_plain_fails_without_challenge():
    chal = challenger("PLAIN")
    chal.setResponse(b"\x00alice\x00goodtoken")
    chal.reject(Verdict(ok=False, reason="expired"))
    assert not chal.moreChallenges()
    assert chal.failure_reason == "expired"


def test_challenger_with_nothing_to_say_refuses():
    chal = challenger()
    chal.setResponse(oauthbearer("goodtoken"))
    with pytest.raises(ProtocolStateError):
        chal.getChallenge()


@pytest.mark.parametrize("mechanisms", [(), ("OAUTHBEARER", "SCRAM-SHA-1")])
def test_bearer_challengers_refuses_unknown_mechanisms(mechanisms):
    with pytest.raises(ValueError):
        bearer_challengers("imap", mechanisms)


# The checker


def checked(validate: Callable, chal: BearerChallenger) -> Any:
    return result_of(BearerChecker(validate).requestAvatarId(chal))


def presented(token: str) -> BearerChallenger:
    chal = challenger()
    chal.setResponse(oauthbearer(token))
    return chal


def test_checker_returns_owner_as_bytes(validator):
    assert checked(validator, presented("goodtoken")) == b"alice"
    assert [(bearer.token, service) for bearer, service in validator.calls] == [
        ("goodtoken", "imap")
    ]


def test_checker_rejection_carries_verdict_and_credentials(validator):
    chal = presented("scopeless")
    failure = checked(validator, chal)
    assert isinstance(failure.value, BearerRejected)
    assert isinstance(failure.value, UnauthorizedLogin)
    assert failure.value.verdict.scope == "imap"
    assert failure.value.credentials is chal


@pytest.mark.parametrize(
    "validate",
    [
        lambda bearer, service: defer.succeed(Verdict(ok=False, temporary=True)),
        lambda bearer, service: defer.succeed(Verdict(ok=True)),  # no user name
    ],
)
def test_checker_temporary_is_not_unauthorized(validate):
    failure = checked(validate, presented("goodtoken"))
    assert failure.check(BearerBackendUnavailable)
    assert not failure.check(UnauthorizedLogin)


def test_checker_survives_a_broken_validator():
    def broken(bearer: Bearer, service: str) -> defer.Deferred[Verdict]:
        raise RuntimeError("boom")

    with capturedLogs() as events:
        failure = checked(broken, presented("goodtoken"))
    assert failure.check(BearerBackendUnavailable)
    assert any(event.get("log_failure") for event in events)


def test_checker_refuses_credentials_without_bearer(validator):
    failure = checked(validator, challenger())
    assert failure.check(UnauthorizedLogin)
    assert validator.calls == []


# IMAP on a StringTransport


def imap_connection(
    portal: Portal, server_class: type = BearerIMAP4Server, **options: Any
) -> tuple[imap4.IMAP4Server, StringTransport]:
    server = server_class(chal=bearer_challengers("imap", **options))
    server.portal = portal
    server.callLater = Clock().callLater  # the idle timeouts
    transport = StringTransport()
    server.makeConnection(transport)
    transport.clear()
    return server, transport


def exchange(server: Any, transport: StringTransport, line: bytes) -> bytes:
    transport.clear()
    server.dataReceived(line + b"\r\n")
    return transport.value()


def test_imap_success(portal, realm):
    server, transport = imap_connection(portal)
    assert exchange(server, transport, b"a1 AUTHENTICATE OAUTHBEARER") == b"+ \r\n"
    reply = exchange(server, transport, b64(oauthbearer("goodtoken")))
    assert reply == b"a1 OK Authentication successful\r\n"
    assert server.state == "auth"
    assert realm.avatar_ids == [b"alice"]


def test_imap_relays_long_error_challenge_on_one_line(portal):
    # The RFC 7628 §4.3 challenge is longer than encodebytes keeps on one line.
    vector = VECTORS["failed_exchange_imap"]
    checker = BearerChecker(
        lambda bearer, service: defer.succeed(
            Verdict(ok=False, status=vector["status"], scope=vector["scope"])
        )
    )
    portal = Portal(Realm(), [checker])
    server, transport = imap_connection(
        portal, openid_configuration=vector["openid_configuration"]
    )
    exchange(server, transport, b"a1 AUTHENTICATE OAUTHBEARER")
    reply = exchange(server, transport, vector["client_response"].encode())
    assert reply == b"+ " + vector["server_challenge"].encode() + b"\r\n"
    reply = exchange(server, transport, vector["client_ack"].encode())
    assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    assert server.state == "unauth"


def test_imap_waits_for_the_verdict(portal, validator):
    server, transport = imap_connection(portal)
    exchange(server, transport, b"a1 AUTHENTICATE XOAUTH2")
    assert exchange(server, transport, b64(xoauth2("slow"))) == b""
    validator.pending.callback(Verdict(ok=False, reason="expired"))
    line = transport.value()
    assert line.startswith(b"+ ")
    challenge = json.loads(base64.b64decode(line[2:]))
    assert challenge == {"status": "invalid_token", "schemes": "bearer"}
    reply = exchange(server, transport, b"")
    assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n"


def test_imap_temporary_failure_is_unavailable(portal):
    server, transport = imap_connection(portal)
    exchange(server, transport, b"a1 AUTHENTICATE OAUTHBEARER")
    reply = exchange(server, transport, b64(oauthbearer("down")))
    assert reply == b"a1 NO [UNAVAILABLE] Temporary authentication failure\r\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"*", b"a1 BAD AUTHENTICATE cancelled\r\n"),
        (b"not base64!", b"a1 BAD Malformed response: not base64\r\n"),
    ],
)
def test_imap_cancel_and_garbage(portal, line, reply):
    server, transport = imap_connection(portal)
    exchange(server, transport, b"a1 AUTHENTICATE OAUTHBEARER")
    assert exchange(server, transport, line) == reply
    assert exchange(server, transport, b"a2 NOOP") == b"a2 OK NOOP No operation performed\r\n"


def test_imap_other_challengers_take_the_stock_path(portal):
    server, transport = imap_connection(portal)
    server.challengers[b"PLAIN"] = imap4.PLAINCredentials
    assert exchange(server, transport, b"a1 AUTHENTICATE PLAIN") == b"+\r\n"
    reply = exchange(server, transport, b64(b"\x00alice\x00secret"))
    assert reply == b"a1 NO Authentication failed: server misconfigured\r\n"


def test_stock_imap_server_accepts_but_cannot_relay(portal):
    """Without BearerIMAP4Server a refused token gets a bare NO, no error challenge."""
    server, transport = imap_connection(portal, imap4.IMAP4Server)
    exchange(server, transport, b"a1 AUTHENTICATE OAUTHBEARER")
    reply = exchange(server, transport, b64(oauthbearer("badtoken")))
    assert reply == b"a1 NO Authentication failed: unauthorized\r\n"
    exchange(server, transport, b"a2 AUTHENTICATE OAUTHBEARER")
    reply = exchange(server, transport, b64(oauthbearer("goodtoken")))
    assert reply == b"a2 OK Authentication successful\r\n"


# SMTP on a StringTransport


def smtp_connection(
    portal: Portal, server_class: type = BearerESMTP
) -> tuple[Any, StringTransport]:
    server = server_class(chal=bearer_challengers("smtp"))
    server.host = b"mx.example"
    server.portal = portal
    server.callLater = Clock().callLater
    transport = StringTransport()
    server.makeConnection(transport)
    exchange(server, transport, b"EHLO client.example")
    return server, transport


def test_smtp_advertises_and_accepts(portal, realm, validator):
    server, transport = smtp_connection(portal)
    assert b"250 AUTH OAUTHBEARER XOAUTH2\r\n" in exchange(server, transport, b"EHLO again")
    reply = exchange(server, transport, b"AUTH OAUTHBEARER " + b64(oauthbearer("goodtoken")))
    assert reply == b"235 Authentication successful.\r\n"
    assert server.authenticated
    assert realm.avatar_ids == [b"alice"]
    assert validator.calls[0][1] == "smtp"


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_smtp_relays_error_challenge(portal, mechanism):
    server, transport = smtp_connection(portal)
    message = MESSAGES[mechanism]("scopeless")
    reply = exchange(server, transport, b"AUTH " + mechanism.encode() + b" " + b64(message))
    assert reply.startswith(b"334 ")
    assert json.loads(base64.b64decode(reply[4:]))["scope"] == "smtp"
    reply = exchange(server, transport, b64(ACKS[mechanism]))
    assert reply == b"535 5.7.8 Authentication credentials invalid\r\n"
    # Back to commands.
    assert exchange(server, transport, b"RSET") == b"250 I remember nothing.\r\n"


def test_smtp_temporary_failure_is_454(portal):
    server, transport = smtp_connection(portal)
    reply = exchange(server, transport, b"AUTH XOAUTH2 " + b64(xoauth2("down")))
    assert reply == b"454 4.7.0 Temporary authentication failure\r\n"


def test_stock_esmtp_answers_535_without_challenge(portal):
    server, transport = smtp_connection(portal, smtp.ESMTP)
    reply = exchange(server, transport, b"AUTH OAUTHBEARER " + b64(oauthbearer("badtoken")))
    assert reply == b"535 Authentication failed\r\n"


# End to end: Python's imaplib and smtplib over loopback sockets


def listen(portal: Portal, server_class: type, service: str) -> Any:
    def build() -> Any:
        server = server_class(chal=bearer_challengers(service))
        server.portal = portal
        if isinstance(server, smtp.ESMTP):
            server.host = b"mx.example"
        return server

    return reactor.listenTCP(0, protocol.Factory.forProtocol(build), interface="127.0.0.1")


def responder(mechanism: str, message: bytes, seen: list[bytes]) -> Callable:
    """A client callback: the message first, the acknowledgement after an error challenge."""

    def respond(challenge: bytes | None = None) -> bytes:
        if challenge is not None:
            seen.append(challenge)
        return ACKS[mechanism] if challenge else message

    return respond


def imaplib_authenticate(port: int, mechanism: str, message: bytes) -> tuple[str, list[bytes]]:
    """Runs in a thread: returns imaplib's outcome and the challenges it saw."""
    seen: list[bytes] = []
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:
        client.authenticate(mechanism, responder(mechanism, message, seen))
        outcome = client.noop()[0]
    except imaplib.IMAP4.error as error:
        outcome = str(error)
    finally:
        client.logout()
    return outcome, seen


def smtplib_authenticate(
    port: int, mechanism: str, message: bytes, initial_response: bool = True
) -> tuple[Any, list[bytes]]:
    seen: list[bytes] = []
    respond = responder(mechanism, message, seen)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        try:
            outcome = client.auth(
                mechanism, lambda *c: respond(*c).decode(), initial_response_ok=initial_response
            )[0]
        except smtplib.SMTPAuthenticationError as error:
            outcome = error.smtp_code
    return outcome, seen


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
@pytest_twisted.inlineCallbacks
def test_imaplib_success(portal, realm, validator, mechanism):
    port = listen(portal, BearerIMAP4Server, "imap")
    try:
        outcome, seen = yield threads.deferToThread(
            imaplib_authenticate, port.getHost().port, mechanism, MESSAGES[mechanism]("goodtoken")
        )
    finally:
        yield port.stopListening()
    assert outcome == "OK"  # the NOOP after login
    assert seen == [b""]  # imaplib waited for the empty continuation
    assert realm.avatar_ids == [b"alice"]
    assert [(b.identity, service) for b, service in validator.calls] == [("alice", "imap")]


@pytest.mark.parametrize(
    ("mechanism", "token", "challenge"),
    [
        ("OAUTHBEARER", "badtoken", {"status": "invalid_token"}),
        ("XOAUTH2", "badtoken", {"status": "invalid_token", "schemes": "bearer"}),
        ("OAUTHBEARER", "scopeless", {"status": "insufficient_scope", "scope": "imap"}),
    ],
)
@pytest_twisted.inlineCallbacks
def test_imaplib_failure(portal, realm, mechanism, token, challenge):
    port = listen(portal, BearerIMAP4Server, "imap")
    try:
        outcome, seen = yield threads.deferToThread(
            imaplib_authenticate, port.getHost().port, mechanism, MESSAGES[mechanism](token)
        )
    finally:
        yield port.stopListening()
    assert outcome == "[AUTHENTICATIONFAILED] Authentication failed"
    assert seen[0] == b"" and json.loads(seen[1]) == challenge
    assert realm.avatar_ids == []


@pytest.mark.parametrize(
    ("mechanism", "token", "initial_response", "code", "challenges"),
    [
        ("OAUTHBEARER", "goodtoken", True, 235, []),
        ("OAUTHBEARER", "goodtoken", False, 235, [{}]),
        ("XOAUTH2", "goodtoken", True, 235, []),
        ("OAUTHBEARER", "badtoken", True, 535, [{"status": "invalid_token"}]),
        ("XOAUTH2", "badtoken", True, 535, [{"status": "invalid_token", "schemes": "bearer"}]),
        (
            "OAUTHBEARER", "scopeless", False, 535,
            [{}, {"status": "insufficient_scope", "scope": "smtp"}],
        ),
    ],
)
@pytest_twisted.inlineCallbacks
def test_smtplib(portal, mechanism, token, initial_response, code, challenges):
    port = listen(portal, BearerESMTP, "smtp")
    try:
        outcome, seen = yield threads.deferToThread(
            smtplib_authenticate, port.getHost().port, mechanism,
            MESSAGES[mechanism](token), initial_response,
        )
    finally:
        yield port.stopListening()
    assert outcome == code
    assert [json.loads(c) if c else {} for c in seen] == challenges


# The example's introspection validator, against a stubbed RFC 7662 endpoint


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("imap_server_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def introspect_with(code: int, claims: dict, requests: list, identity: str = "alice") -> Verdict | TwistedFailure:
    def answer(method, url, params, headers, data):
        requests.append((method, url, headers, data))
        return code, {b"Content-Type": b"application/json"}, json.dumps(claims).encode()

    http = StubTreq(StringStubbingResource(answer))
    validate = load_example().introspection_validate(
        "https://auth.example/introspect", "imapd", "s3cret", "imap", http=http
    )
    d = validate(Bearer("XOAUTH2", identity, "goodtoken"), "imap")
    http.flush()
    return result_of(d)


ALICE = {"active": True, "username": "alice", "email": "alice@example.org"}


@pytest.mark.parametrize(
    ("code", "claims", "verdict"),
    [
        (200, {**ALICE, "scope": "smtp imap"}, Verdict(ok=True, username="alice")),
        (200, {"active": False}, Verdict(ok=False, reason="inactive")),
        (
            200, {**ALICE, "scope": "smtp"},
            Verdict(ok=False, status="insufficient_scope", scope="imap"),
        ),
        (
            200, {**ALICE},  # no scope at all
            Verdict(ok=False, status="insufficient_scope", scope="imap"),
        ),
        (
            200, {**ALICE, "username": "bob", "email": "bob@x", "scope": "imap"},
            Verdict(ok=False, reason="identity_mismatch"),
        ),
        (200, {"active": True, "scope": "imap"}, Verdict(ok=False, reason="no_user")),  # client credentials
        (503, {}, Verdict(ok=False, temporary=True, reason="introspection said 503")),
    ],
)
def test_example_introspection_mapping(code, claims, verdict):
    requests: list = []
    assert introspect_with(code, claims, requests) == verdict
    [(method, url, headers, data)] = requests
    assert (method, url) == (b"POST", "https://auth.example/introspect")
    assert headers[b"Authorization"] == [b"Basic " + b64(b"imapd:s3cret")]
    assert data == b"token=goodtoken"


def test_example_takes_the_email_in_any_case_like_bearerbridge():
    claims = {**ALICE, "scope": "imap"}
    assert introspect_with(200, claims, [], identity="Alice@Example.ORG") == Verdict(ok=True, username="alice")
    assert introspect_with(200, claims, [], identity="bob@example.org").reason == "identity_mismatch"
