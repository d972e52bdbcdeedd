"""SMTP AUTH through a real Postfix and IMAP AUTHENTICATE through a real Dovecot, both backed by one
running bearerbridge: Postfix asks over the Dovecot authentication protocol (`[sasl] listen`),
Dovecot's oauth2 passdb asks RFC 7662 introspection. Each test asserts the exact replies that a mail
client sees.

Needs Debian's postfix and dovecot-imapd (scripts/install-peers) and root; skips without them
locally and fails under CI=true.
"""

from __future__ import annotations

import imaplib
import json
import smtplib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import requests

from .peer_setup import (
    MailPeers,
    StartedPeers,
    logs_printed,
    peer_directories,
    require_peers_as_root,
    start_dovecot_asking,
)
from .peers import Dovecot, start_postfix, wait_for_sasl
from .support import Service, exchange_code, free_port, get_code

pytestmark = pytest.mark.peer

WAIT = 10  # seconds: the bound on every SMTP and IMAP exchange
REVOCATION_BOUND = 1.2  # seconds: [sasl] cache_ttl = 1, plus slack
REDIRECT_URI = "https://app.example/cb"
# RFC 7628 error challenges point clients at the RFC 8414 metadata (same schema as OpenID
# Connect discovery; bearerbridge is no OpenID provider).
OPENID_CONFIGURATION = "/.well-known/openid-configuration"

SMTP_OK = (235, b"2.7.0 Authentication successful")
IMAP_OK = ("OK", [b"Logged in"])
IMAP_REFUSED = "[AUTHENTICATIONFAILED] Authentication failed."


@dataclass
class Mail(MailPeers):
    app: dict  # a confidential client asking for imap and smtp
    user: str
    password: str
    email: str

    def issue(self, scope: str, *extra: str) -> str:
        return self.service.issue(self.user, self.app["client_id"], scope, *extra)


@pytest.fixture(scope="module")
def mail(tmp_path_factory) -> Mail:
    require_peers_as_root("/usr/sbin/postfix", "/usr/sbin/dovecot")
    directories = peer_directories(tmp_path_factory.mktemp("mail"), "bearerbridge", "postfix", "dovecot")
    sasl_port = free_port()
    socket_path = directories["bearerbridge"] / "auth"
    with StartedPeers() as started:
        service = started(Service.start(directories["bearerbridge"], extra=f"""
[sasl]
listen = ["unix:{socket_path}:mode=666", "tcp:{sasl_port}:interface=127.0.0.1"]
identity = ["username", "email"]
cache_ttl = 1
[sasl.services]
smtp = "smtp"
imap = "imap"
xmpp = "xmpp"
"""))
        wait_for_sasl(service, sasl_port)  # /healthz answering says only that the reactor runs
        # The UNIX socket listener speaks the same protocol (Postfix here uses the TCP one).
        with socket.socket(socket.AF_UNIX) as unix:
            unix.settimeout(WAIT)
            unix.connect(str(socket_path))
            assert unix.recv(4096).startswith(b"VERSION\t1\t2\nMECH\tOAUTHBEARER\tplaintext\n")
        postfix = started(start_postfix(directories["postfix"], f"inet:127.0.0.1:{sasl_port}"))
        dovecot = started(start_dovecot_asking(service, directories["dovecot"]))
        email = f"{service.unique('mailer')}@example.org"
        user, password = service.user(email=email)
        app = service.client("--redirect-uri", REDIRECT_URI, "--scope", "imap smtp")
        yield Mail(service, postfix, dovecot, app, user, password, email)


@pytest.fixture(autouse=True)
def peer_logs(mail):
    """Print what each program logged during the test; pytest shows it only when the test fails."""
    with logs_printed(mail.logs()):
        yield


# -- the clients' side ------------------------------------------------------------------------

def oauthbearer(user: str | None, token: str) -> bytes:
    authzid = f"a={user}" if user else ""
    return f"n,{authzid},\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


@dataclass
class Attempt:
    code: int | str
    text: bytes | str
    challenges: list[dict]  # the server's RFC 7628 error challenges, decoded


def smtp_auth(port: int, mechanism: str, message: bytes) -> Attempt:
    """One AUTH on a fresh SMTP connection, the client answering any challenge as RFC 7628 says."""
    challenges: list[dict] = []

    def answer(challenge: bytes | None = None) -> str:
        if challenge is None:  # smtplib asks first for the initial response
            return message.decode("latin-1")
        challenges.append(json.loads(challenge))
        return "\x01" if mechanism == "OAUTHBEARER" else ""  # acknowledge the error

    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=WAIT) as smtp:
        smtp.ehlo()
        try:
            code, text = smtp.auth(mechanism, answer)
        except smtplib.SMTPAuthenticationError as error:
            code, text = error.smtp_code, error.smtp_error
        return Attempt(code, text, challenges)


def imap_auth(port: int, mechanism: str, message: bytes) -> Attempt:
    """One AUTHENTICATE on a fresh IMAP connection (imaplib waits for an empty `+` first)."""
    challenges: list[dict] = []

    def answer(challenge: bytes) -> bytes:
        if not challenge:
            return message
        challenges.append(json.loads(challenge))
        return b"\x01" if mechanism == "OAUTHBEARER" else b""

    imap = imaplib.IMAP4("127.0.0.1", port, timeout=WAIT)
    try:
        try:
            status, data = imap.authenticate(mechanism, answer)
        except imaplib.IMAP4.error as error:
            return Attempt("NO", str(error), challenges)
        return Attempt(status, data, challenges)
    finally:
        try:
            imap.logout()
        except (imaplib.IMAP4.error, OSError):
            imap.shutdown()


def until_refused(attempt: Callable[[], Attempt]) -> Attempt:
    """Repeat a login with a token just revoked until it is refused, within REVOCATION_BOUND.

    The CLI is another process: bearerbridge may answer from what it read up to [sasl] cache_ttl
    (1 s) ago, so a login that starts later than the bound must be refused.
    """
    revoked_at = time.monotonic()
    while True:
        started = time.monotonic() - revoked_at
        result = attempt()
        if result.code not in (235, "OK"):
            return result
        assert started < REVOCATION_BOUND, f"revoked token still accepted {started:.2f}s after revocation"
        time.sleep(0.1)


def expect_smtp_refusal(attempt: Attempt, reason: str, challenge: dict) -> None:
    assert (attempt.code, attempt.text) == (535, f"5.7.8 Error: authentication failed: {reason}".encode()), attempt
    assert attempt.challenges == [challenge], attempt


def expect_imap_refusals(mail: Mail, token: str, dovecot: Dovecot | None = None) -> None:
    port = (dovecot or mail.dovecot).port
    attempt = imap_auth(port, "OAUTHBEARER", oauthbearer(mail.user, token))
    assert (attempt.code, attempt.text, attempt.challenges) == ("NO", IMAP_REFUSED, [invalid_token(mail)]), attempt
    attempt = imap_auth(port, "XOAUTH2", xoauth2(mail.user, token))
    expected = ("NO", IMAP_REFUSED, [dovecot_xoauth2_error(mail)])
    assert (attempt.code, attempt.text, attempt.challenges) == expected, attempt


def dovecot_xoauth2_error(mail: Mail) -> dict:
    """Dovecot 2.3's XOAUTH2 error challenge: its fixed fields, and openid_configuration_url.

    (Its OAUTHBEARER one equals bearerbridge's own invalid_token challenge.)"""
    return {"status": "401", "schemes": "bearer", "scope": "mail",
            "openid-configuration": mail.service.url + OPENID_CONFIGURATION}


def invalid_token(mail: Mail) -> dict:
    return {"status": "invalid_token", "openid-configuration": mail.service.url + OPENID_CONFIGURATION}


# -- Postfix --------------------------------------------------------------------------------

def test_postfix_offers_the_bearer_mechanisms(mail):
    with smtplib.SMTP("127.0.0.1", mail.postfix.port, local_hostname="client.example", timeout=WAIT) as smtp:
        # The MECH lines of bearerbridge's handshake, as Postfix relays them, and the old `AUTH=`
        # form that broken_sasl_auth_clients adds; no STARTTLS in this loopback-only setup.
        assert smtp.ehlo() == (250, b"\n".join([
            b"mail.bearerbridge.test", b"PIPELINING", b"SIZE 10240000", b"VRFY", b"ETRN",
            b"AUTH OAUTHBEARER XOAUTH2", b"AUTH=OAUTHBEARER XOAUTH2",
            b"ENHANCEDSTATUSCODES", b"8BITMIME", b"DSN", b"SMTPUTF8", b"CHUNKING"]))


def test_the_error_challenges_point_at_the_metadata(mail):
    url = invalid_token(mail)["openid-configuration"]
    response = requests.get(url, timeout=WAIT)
    assert response.status_code == 200, response.text
    assert response.json()["issuer"] == mail.service.url
    assert response.json()["introspection_endpoint"] == f"{mail.service.url}/introspect"


def test_postfix_oauthbearer_and_xoauth2(mail):
    token = mail.issue("smtp")
    attempt = smtp_auth(mail.postfix.port, "OAUTHBEARER", oauthbearer(mail.user, token))
    assert (attempt.code, attempt.text, attempt.challenges) == (*SMTP_OK, []), attempt
    # No authzid at all is fine too: the token names its user.
    attempt = smtp_auth(mail.postfix.port, "OAUTHBEARER", oauthbearer(None, token))
    assert (attempt.code, attempt.text) == SMTP_OK, attempt
    # XOAUTH2, naming the user by email ([sasl] identity allows username and email).
    attempt = smtp_auth(mail.postfix.port, "XOAUTH2", xoauth2(mail.email, token))
    assert (attempt.code, attempt.text, attempt.challenges) == (*SMTP_OK, []), attempt


def test_postfix_refuses_a_token_without_the_smtp_scope(mail):
    token = mail.issue("imap")
    attempt = smtp_auth(mail.postfix.port, "OAUTHBEARER", oauthbearer(mail.user, token))
    expect_smtp_refusal(attempt, "insufficient_scope",
                        {"status": "insufficient_scope", "scope": "smtp",
                         "openid-configuration": mail.service.url + OPENID_CONFIGURATION})
    attempt = smtp_auth(mail.postfix.port, "XOAUTH2", xoauth2(mail.user, token))
    expect_smtp_refusal(attempt, "insufficient_scope",
                        {"status": "insufficient_scope", "schemes": "bearer", "scope": "smtp"})


def test_postfix_refuses_an_expired_token(mail):
    token = mail.issue("smtp", "--ttl", "1")
    time.sleep(2.2)  # `exp` has whole seconds
    attempt = smtp_auth(mail.postfix.port, "OAUTHBEARER", oauthbearer(mail.user, token))
    expect_smtp_refusal(attempt, "invalid_token", invalid_token(mail))


def test_postfix_refuses_a_revoked_token_within_a_second(mail):
    token = mail.issue("smtp")
    attempt = smtp_auth(mail.postfix.port, "OAUTHBEARER", oauthbearer(mail.user, token))
    assert (attempt.code, attempt.text) == SMTP_OK, attempt
    mail.service.cli("token", "revoke", token)
    attempt = until_refused(lambda: smtp_auth(mail.postfix.port, "OAUTHBEARER", oauthbearer(mail.user, token)))
    expect_smtp_refusal(attempt, "invalid_token", invalid_token(mail))
    # and it stays refused
    attempt = smtp_auth(mail.postfix.port, "XOAUTH2", xoauth2(mail.user, token))
    expect_smtp_refusal(attempt, "invalid_token", {"status": "invalid_token", "schemes": "bearer"})


def test_postfix_refuses_garbage_and_recovers(mail):
    attempt = smtp_auth(mail.postfix.port, "OAUTHBEARER", b"this is not an OAUTHBEARER message")
    expect_smtp_refusal(attempt, "malformed: missing GS2 header",
                        {"status": "invalid_request", "openid-configuration": mail.service.url + OPENID_CONFIGURATION})
    attempt = smtp_auth(mail.postfix.port, "XOAUTH2", b"user=\x01\x01")
    expect_smtp_refusal(attempt, "malformed: missing user", {"status": "invalid_request", "schemes": "bearer"})
    attempt = smtp_auth(mail.postfix.port, "OAUTHBEARER", oauthbearer(mail.user, "not-a-token-we-issued"))
    expect_smtp_refusal(attempt, "invalid_token", invalid_token(mail))
    # The auth connection Postfix holds to bearerbridge is still good.
    attempt = smtp_auth(mail.postfix.port, "OAUTHBEARER", oauthbearer(mail.user, mail.issue("smtp")))
    assert (attempt.code, attempt.text) == SMTP_OK, attempt


# -- Dovecot --------------------------------------------------------------------------------

def test_dovecot_oauthbearer_and_xoauth2(mail):
    token = mail.issue("imap")
    attempt = imap_auth(mail.dovecot.port, "OAUTHBEARER", oauthbearer(mail.user, token))
    assert (attempt.code, attempt.text, attempt.challenges) == (*IMAP_OK, []), attempt
    attempt = imap_auth(mail.dovecot.port, "XOAUTH2", xoauth2(mail.user, token))
    assert (attempt.code, attempt.text, attempt.challenges) == (*IMAP_OK, []), attempt


def test_dovecot_refuses_a_token_without_the_imap_scope(mail):
    token = mail.issue("smtp")
    expect_imap_refusals(mail, token)


def test_dovecot_service_header_alone_keeps_an_smtp_token_out(mail, tmp_path):
    """With Dovecot's own `scope` check off, bearerbridge still refuses: send_auth_headers tells
    it the service (X-Dovecot-Auth-Service: imap), and [sasl.services] imap needs `imap`."""
    dovecot = start_dovecot_asking(mail.service, tmp_path, overrides={"scope": ""})
    try:
        expect_imap_refusals(mail, mail.issue("smtp"), dovecot)
        attempt = imap_auth(dovecot.port, "OAUTHBEARER", oauthbearer(mail.user, mail.issue("imap")))
        assert (attempt.code, attempt.text) == IMAP_OK, attempt
    finally:
        dovecot.stop()
        print(f"----- the scope-less Dovecot's log -----\n{dovecot.log()}")


def test_dovecot_refuses_a_revoked_token(mail):
    token = mail.issue("imap")
    attempt = imap_auth(mail.dovecot.port, "OAUTHBEARER", oauthbearer(mail.user, token))
    assert (attempt.code, attempt.text) == IMAP_OK, attempt
    mail.service.cli("token", "revoke", token)
    until_refused(lambda: imap_auth(mail.dovecot.port, "OAUTHBEARER", oauthbearer(mail.user, token)))
    expect_imap_refusals(mail, token)


# -- the whole chain --------------------------------------------------------------------------

def test_a_code_grant_token_for_smtp_sends_mail_but_reads_none(mail):
    code, verifier = get_code(mail.service, mail.app, mail.user, mail.password, scope="smtp")
    response = exchange_code(mail.service, mail.app, code, verifier, REDIRECT_URI)
    assert response.status_code == 200, response.text
    grant = response.json()
    assert grant["scope"] == "smtp", grant
    token = grant["access_token"]

    with smtplib.SMTP("127.0.0.1", mail.postfix.port, local_hostname="client.example", timeout=WAIT) as smtp:
        smtp.ehlo()
        # Before AUTH, Postfix relays for no one (defer_unauth_destination in the snippet).
        assert smtp.mail(f"<{mail.email}>") == (250, b"2.1.0 Ok")
        assert smtp.rcpt("<someone@example.net>") == (454, b"4.7.1 <someone@example.net>: Relay access denied")
        assert smtp.rset()[0] == 250
        assert smtp.auth("OAUTHBEARER", lambda challenge=None: oauthbearer(mail.user, token).decode()) == SMTP_OK
        # After it, the user may relay: permit_sasl_authenticated.
        assert smtp.mail(f"<{mail.email}>") == (250, b"2.1.0 Ok")
        assert smtp.rcpt("<someone@example.net>") == (250, b"2.1.5 Ok")
        assert smtp.rset()[0] == 250
    # Postfix records the name bearerbridge reported in its OK line.
    deadline = time.monotonic() + WAIT
    while f"sasl_method=OAUTHBEARER, sasl_username={mail.user}" not in mail.postfix.log():
        assert time.monotonic() < deadline, mail.postfix.log()
        time.sleep(0.1)

    expect_imap_refusals(mail, token)
