"""Tests for bearerbridge.sasl.dovecot: the codec, the connection, and the protocol on a socket."""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer

from bearerbridge.sasl.dovecot import (
    HANDSHAKE_TIMEOUT,
    MAX_LINE,
    MAX_PROTOCOL_ERRORS,
    MAX_REQUESTS,
    AuthRequest,
    Cancel,
    Cont,
    Cpid,
    Decision,
    DecisionLog,
    DovecotAuthConnection,
    DovecotAuthFactory,
    DovecotAuthProtocol,
    DovecotProtocolError,
    Output,
    Version,
    format_cont,
    format_fail,
    format_ok,
    handshake,
    parse_line,
    tabescape,
    tabunescape,
)
from bearerbridge.sasl.mechanisms import MECHANISMS, Bearer
from bearerbridge.sasl.verdict import Verdict

TOKEN = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
OAUTHBEARER = f"n,a=alice@example.org,\x01auth=Bearer {TOKEN}\x01\x01".encode()
XOAUTH2 = f"user=alice@example.org\x01auth=Bearer {TOKEN}\x01\x01".encode()
PLAIN = f"\x00alice@example.org\x00{TOKEN}".encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


OK = Verdict(ok=True, username="alice")
EXPIRED = Verdict(ok=False, reason="expired")

# Codec


def test_handshake_bytes():
    assert handshake(MECHANISMS, 4242, 7, "0123456789abcdef0123456789abcdef") == (
        b"VERSION\t1\t2\n"
        b"MECH\tOAUTHBEARER\tplaintext\n"
        b"MECH\tXOAUTH2\tplaintext\n"
        b"MECH\tPLAIN\tplaintext\n"
        b"SPID\t4242\n"
        b"CUID\t7\n"
        b"COOKIE\t0123456789abcdef0123456789abcdef\n"
        b"DONE\n"
    )


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"VERSION\t1\t0", Version(1, 0)),
        (b"VERSION\t1\t1", Version(1, 1)),
        (b"CPID\t31337", Cpid("31337")),
        (b"CONT\t12\tAQ==", Cont("12", b"\x01")),
        (b"CONT\t12\t", Cont("12", b"")),
        (b"CONT\t12\t=", Cont("12", b"")),
        (b"CANCEL\t12", Cancel("12")),
    ],
)
def test_parse_simple_commands(line, command):
    assert parse_line(line) == command


def test_parse_postfix_auth_under_tls():
    line = (
        b"AUTH\t3\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1\tsecured\tresp="
        + b64(PLAIN).encode()
    )
    assert parse_line(line) == AuthRequest(
        id="3",
        mechanism="PLAIN",
        service="smtp",
        params={"service": "smtp", "lip": "127.0.0.1", "rip": "127.0.0.1"},
        flags=frozenset({"nologin", "secured"}),
        initial_response=PLAIN,
    )


def test_parse_postfix_auth_without_initial_response():
    request = parse_line(b"AUTH\t4\tOAUTHBEARER\tservice=smtp\tnologin\tlip=::1\trip=::1")
    assert isinstance(request, AuthRequest)
    assert request.initial_response is None
    assert request.flags == {"nologin"}


def test_parse_exim_auth_with_empty_resp():
    request = parse_line(b"AUTH\t1\tOAUTHBEARER\tservice=smtp\tsecured\trip=\tlip=\tnologin\tresp=")
    assert request == AuthRequest(
        "1", "OAUTHBEARER", "smtp", {"service": "smtp", "rip": "", "lip": ""},
        frozenset({"secured", "nologin"}), b"",
    )


@pytest.mark.parametrize(
    ("resp", "initial"), [(b"resp==", b""), (b"resp=" + b64(XOAUTH2).encode(), XOAUTH2)]
)
def test_parse_prosody_auth(resp, initial):
    request = parse_line(b"AUTH\t1804\tXOAUTH2\tservice=xmpp\t" + resp)
    assert request == AuthRequest(
        "1804", "XOAUTH2", "xmpp", {"service": "xmpp"}, frozenset(), initial
    )


def test_parse_auth_takes_an_escaped_resp_key_as_the_response():
    request = parse_line(b"AUTH\t1\tPLAIN\tservice=imap\tre\x01sp=AQ==\tx=y")
    assert request.initial_response == b"\x01" and request.params == {"service": "imap"}


def test_parse_auth_unescapes_values_and_ignores_fields_after_resp():
    request = parse_line(b"AUTH\t1\toauthbearer\tservice=imap\tsession=a\x01tb\tresp=AQ==\tx=y")
    assert request.mechanism == "OAUTHBEARER"
    assert request.params == {"service": "imap", "session": "a\tb"}


@pytest.mark.parametrize(
    ("line", "request_id"),
    [
        (b"", None),
        (b"HELLO\tworld", None),
        (b"VERSION\t1", None),
        (b"VERSION\tone\ttwo", None),
        (b"VERSION\t" + b"1" * 5000 + b"\t2", None),  # int() refuses past 4,300 digits
        (b"VERSION\t1\t" + b"9" * 10, None),
        (b"VERSION\t\xd9\xa1\t2", None),  # not ASCII digits
        (b"CPID", None),
        (b"AUTH", None),
        (b"AUTH\tx1\tPLAIN\tservice=smtp", None),
        (b"AUTH\t12345678901\tPLAIN\tservice=smtp", None),
        (b"AUTH\t1", "1"),
        (b"AUTH\t1\tPLAIN\tnologin", "1"),
        (b"AUTH\t1\tPLAIN\tservice=", "1"),
        (b"AUTH\t1\tPLAIN\tservice=smtp\tresp=!!!!", "1"),
        (b"AUTH\t1\tPLAIN\tservice=smtp\tresp=AQ=", "1"),
        (b"AUTH\t1\tPLAIN\tservice=\xff", "1"),
        (b"CONT\t2", "2"),
        (b"CONT\t2\tAQ==\textra", "2"),
        (b"CONT\t2\t\xffAQ==", "2"),
        (b"CANCEL", None),
        (b"CANCEL\t-1", None),
        (b"\xff\xfe\x00", None),
    ],
)
def test_parse_garbage(line, request_id):
    with pytest.raises(DovecotProtocolError) as caught:
        parse_line(line)
    assert caught.value.request_id == request_id


def test_parse_error_never_quotes_the_line():
    with pytest.raises(DovecotProtocolError) as caught:
        parse_line(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + TOKEN.encode() + b"!")
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ("a\tb", "a\x01tb"),
        ("a\nb\rc", "a\x01nb\x01rc"),
        ("\x01", "\x011"),
        ("\x00", "\x010"),
        ("\x01t", "\x011t"),
    ],
)
def test_tabescape_round_trip(raw, escaped):
    assert tabescape(raw) == escaped
    assert tabunescape(escaped) == raw


def test_tabunescape_is_lenient_like_dovecot():
    assert tabunescape("a\x01xb\x01") == "axb"


def test_format_replies():
    assert format_ok("5", "bob\tx") == b"OK\t5\tuser=bob\x01tx\n"
    assert format_fail("5", "bad\ntoken") == b"FAIL\t5\treason=bad\x01ntoken\n"
    assert format_fail("5", "db down", temporary=True) == b"FAIL\t5\treason=db down\ttemp\n"
    assert format_cont("5", b"") == b"CONT\t5\t\n"
    assert format_cont("5", b"\x01") == b"CONT\t5\tAQ==\n"


# Sans-IO connection


def test_connection_rejects_unknown_mechanisms_in_its_offer():
    with pytest.raises(ValueError):
        DovecotAuthConnection(("OAUTHBEARER", "GSSAPI"))
    with pytest.raises(ValueError):
        DovecotAuthConnection(())


def test_connection_drops_verdict_for_a_replaced_request():
    connection = DovecotAuthConnection()
    connection.receive(Version(1, 2))
    first = connection.line_received(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + b64(PLAIN).encode())
    connection.receive(Cancel("1"))
    second = connection.line_received(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + b64(PLAIN).encode())
    stale = connection.verdict(first.validations[0], OK)
    assert stale == Output()  # nothing to write, and nothing wrong: a cancelled request is no problem
    assert connection.verdict(second.validations[0], OK).lines == [b"OK\t1\tuser=alice\n"]


# Protocol over StringTransport


class Validator:
    """A fake validate(): records calls and returns Deferreds fired by the test."""

    def __init__(self) -> None:
        self.calls: list[tuple[Bearer, str, defer.Deferred[Verdict]]] = []

    def __call__(self, bearer: Bearer, service: str) -> defer.Deferred[Verdict]:
        d: defer.Deferred[Verdict] = defer.Deferred()
        self.calls.append((bearer, service, d))
        return d

    def fire(self, index: int, verdict: Verdict) -> None:
        self.calls[index][2].callback(verdict)


def always(verdict: Verdict):
    return lambda bearer, service: defer.succeed(verdict)


class Peer:
    """A protocol on a StringTransport, already past the client's handshake."""

    def __init__(self, validate, handshake_done: bool = True, **options) -> None:
        self.decisions: list[tuple[str, str, bool, str]] = []
        self.clock = Clock()
        self.protocol = DovecotAuthProtocol(
            validate,
            clock=self.clock,
            on_decision=lambda *args: self.decisions.append(args),
            **options,
        )
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.handshake = self.transport.value()
        self.transport.clear()
        if handshake_done:
            self.send(b"VERSION\t1\t0", b"CPID\t100")

    def send(self, *lines: bytes) -> bytes:
        """Write lines as the client would and return what the server answered."""
        self.protocol.dataReceived(b"".join(line + b"\n" for line in lines))
        return self.take()

    def take(self) -> bytes:
        written = self.transport.value()
        self.transport.clear()
        return written


def auth(request_id: str, mechanism: str, message: bytes | None, service: str = "smtp") -> bytes:
    resp = b"" if message is None else b"\tresp=" + b64(message).encode()
    return f"AUTH\t{request_id}\t{mechanism}\tservice={service}\tnologin".encode() + resp


def test_handshake_is_sent_on_connect_without_waiting():
    peer = Peer(always(OK), handshake_done=False)
    cookie = re.search(rb"COOKIE\t([0-9a-f]{32})\n", peer.handshake)
    assert cookie is not None
    assert peer.handshake == handshake(MECHANISMS, os.getpid(), 1, cookie.group(1).decode())


def test_offered_mechanisms_are_configurable():
    peer = Peer(always(OK), handshake_done=False, mechanisms=("OAUTHBEARER",))
    assert b"MECH\tOAUTHBEARER\tplaintext\n" in peer.handshake
    assert b"PLAIN" not in peer.handshake
    assert peer.send(b"VERSION\t1\t0", auth("1", "PLAIN", PLAIN)) == (
        b"FAIL\t1\treason=unsupported mechanism\n"
    )


@pytest.mark.parametrize(
    ("mechanism", "message"), [("OAUTHBEARER", OAUTHBEARER), ("XOAUTH2", XOAUTH2), ("PLAIN", PLAIN)]
)
def test_exim_pipelines_handshake_and_auth(mechanism, message):
    validator = Validator()
    peer = Peer(validator, handshake_done=False)
    assert peer.send(b"VERSION\t1\t0", b"CPID\t9", auth("1", mechanism, message)) == b""
    bearer, service, _ = validator.calls[0]
    assert (bearer.mechanism, bearer.identity, bearer.token, service) == (
        mechanism, "alice@example.org", TOKEN, "smtp",
    )
    validator.fire(0, OK)
    assert peer.take() == b"OK\t1\tuser=alice\n"
    assert peer.decisions == [(mechanism, "smtp", True, "ok")]


def test_interleaved_requests_are_answered_out_of_order():
    validator = Validator()
    peer = Peer(validator)
    peer.send(auth("17", "OAUTHBEARER", OAUTHBEARER), auth("23", "PLAIN", PLAIN, "xmpp"))
    validator.fire(1, Verdict(ok=True, username="bob"))
    assert peer.take() == b"OK\t23\tuser=bob\n"
    validator.fire(0, OK)
    assert peer.take() == b"OK\t17\tuser=alice\n"


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "PLAIN"])
def test_ok_without_username_is_a_temporary_failure_not_the_claimed_identity(mechanism):
    peer = Peer(always(Verdict(ok=True)))
    message = OAUTHBEARER if mechanism == "OAUTHBEARER" else PLAIN
    assert peer.send(auth("1", mechanism, message)) == (
        b"FAIL\t1\treason=no user name for token\ttemp\n"
    )


def test_reported_user_is_escaped():
    peer = Peer(always(Verdict(ok=True, username="a\tb")))
    assert peer.send(auth("1", "PLAIN", PLAIN)) == b"OK\t1\tuser=a\x01tb\n"


def test_cancel_drops_the_late_answer():
    validator = Validator()
    peer = Peer(validator)
    assert peer.send(auth("5", "OAUTHBEARER", OAUTHBEARER), b"CANCEL\t5") == b""
    validator.fire(0, OK)
    assert peer.take() == b""


def test_closed_connection_drops_the_late_answer():
    validator = Validator()
    peer = Peer(validator)
    peer.send(auth("5", "OAUTHBEARER", OAUTHBEARER))
    peer.protocol.connectionLost()
    validator.fire(0, OK)
    assert peer.take() == b""


@pytest.mark.parametrize("resp", [b"", b"\tresp="])
def test_empty_initial_response_gets_empty_cont(resp):
    validator = Validator()
    peer = Peer(validator)
    line = b"AUTH\t1\tOAUTHBEARER\tservice=smtp\tsecured\trip=\tlip=\tnologin" + resp
    assert peer.send(line) == b"CONT\t1\t\n"
    assert peer.send(b"CONT\t1\t" + b64(OAUTHBEARER).encode()) == b""
    validator.fire(0, OK)
    assert peer.take() == b"OK\t1\tuser=alice\n"


@pytest.mark.parametrize("resp", [b"", b"\tresp==", b"\tresp="])
def test_xmpp_never_gets_an_empty_cont(resp):
    peer = Peer(always(OK))
    written = peer.send(b"AUTH\t9\tOAUTHBEARER\tservice=xmpp" + resp)
    assert written == b"FAIL\t9\treason=initial response required\n"
    assert peer.decisions == [("OAUTHBEARER", "xmpp", False, "initial response required")]


def test_prosody_is_known_by_its_handshake_whatever_its_service_name():
    peer = Peer(always(OK), handshake_done=False)
    peer.send(b"VERSION\t1\t1", b"CPID\t77")  # Prosody's greeting; Postfix and Exim send 1 0
    written = peer.send(b"AUTH\t4\tOAUTHBEARER\tservice=chat\tresp==")  # service_name = "chat"
    assert written == b"FAIL\t4\treason=initial response required\n"


def test_oauthbearer_failure_is_a_json_challenge_then_fail_after_ack():
    peer = Peer(always(Verdict(ok=False, scope="smtp", reason="expired")),
                openid_configuration="https://as.example/.well-known/openid-configuration")
    written = peer.send(auth("3", "OAUTHBEARER", OAUTHBEARER))
    name, request_id, data = written.rstrip(b"\n").split(b"\t")
    assert (name, request_id) == (b"CONT", b"3")
    assert json.loads(base64.b64decode(data)) == {
        "status": "invalid_token",
        "scope": "smtp",
        "openid-configuration": "https://as.example/.well-known/openid-configuration",
    }
    assert peer.decisions == [("OAUTHBEARER", "smtp", False, "expired")]  # logged in full...
    assert peer.send(b"CONT\t3\tAQ==") == b"FAIL\t3\treason=invalid_token\n"  # ...but not told
    assert len(peer.decisions) == 1


def test_xoauth2_failure_ack_is_empty():
    peer = Peer(always(EXPIRED))
    written = peer.send(auth("3", "XOAUTH2", XOAUTH2))
    assert json.loads(base64.b64decode(written.split(b"\t")[2])) == {
        "status": "invalid_token", "schemes": "bearer",
    }
    assert peer.send(b"CONT\t3\t") == b"FAIL\t3\treason=invalid_token\n"


def test_plain_failure_fails_at_once():
    peer = Peer(always(Verdict(ok=False, status="invalid_token", reason="revoked")))
    assert peer.send(auth("3", "PLAIN", PLAIN)) == b"FAIL\t3\treason=invalid_token\n"


def test_malformed_oauthbearer_message_is_challenged_then_failed():
    validator = Validator()
    peer = Peer(validator)
    written = peer.send(auth("3", "OAUTHBEARER", b"n,,\x01auth=Basic x\x01\x01"))
    assert json.loads(base64.b64decode(written.split(b"\t")[2]))["status"] == "invalid_request"
    assert peer.send(b"CONT\t3\tAQ==") == (
        b"FAIL\t3\treason=malformed: auth scheme is not Bearer\n"
    )
    assert validator.calls == []


def test_temporary_verdict_fails_with_temp():
    peer = Peer(always(Verdict(ok=False, temporary=True, reason="database unavailable")))
    assert peer.send(auth("3", "OAUTHBEARER", OAUTHBEARER)) == (
        b"FAIL\t3\treason=database unavailable\ttemp\n"
    )


def test_validator_error_is_a_temporary_failure():
    peer = Peer(lambda bearer, service: defer.fail(RuntimeError("boom")))
    with capturedLogs():
        written = peer.send(auth("3", "OAUTHBEARER", OAUTHBEARER))
    assert written == b"FAIL\t3\treason=validator error\ttemp\n"


def test_slow_validator_times_out_as_temporary_failure():
    validator = Validator()
    peer = Peer(validator, timeout=5.0)
    peer.send(auth("3", "OAUTHBEARER", OAUTHBEARER))
    peer.clock.advance(4.9)
    assert peer.take() == b""
    peer.clock.advance(0.2)
    assert peer.take() == b"FAIL\t3\treason=validation timed out\ttemp\n"


def test_garbage_lines_do_not_kill_the_connection():
    peer = Peer(always(OK))
    assert peer.send(b"HELLO\tworld", b"\xff\xfe", b"", b"CANCEL\t77") == b""
    assert not peer.transport.disconnecting
    assert peer.send(auth("1", "PLAIN", PLAIN)) == b"OK\t1\tuser=alice\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"AUTH\t4\tPLAIN\tservice=smtp\tresp=%%%", b"FAIL\t4\treason=invalid base64\n"),
        (b"AUTH\t4\tSCRAM-SHA-1\tservice=smtp", b"FAIL\t4\treason=unsupported mechanism\n"),
        (b"AUTH\t4\tPLAIN\tnologin", b"FAIL\t4\treason=AUTH without service\n"),
        (b"CONT\t4\tAQ==", b"FAIL\t4\treason=unknown request id\n"),
    ],
)
def test_bad_requests_fail_their_id(line, reply):
    peer = Peer(always(OK))
    assert peer.send(line) == reply
    assert not peer.transport.disconnecting


def test_duplicate_live_id_fails_and_drops_both():
    validator = Validator()
    peer = Peer(validator)
    peer.send(auth("1", "PLAIN", PLAIN))
    assert peer.send(auth("1", "PLAIN", PLAIN)) == b"FAIL\t1\treason=duplicate request id\n"
    validator.fire(0, OK)
    assert peer.take() == b""


def test_response_while_validating_fails_the_request():
    validator = Validator()
    peer = Peer(validator)
    peer.send(auth("1", "OAUTHBEARER", OAUTHBEARER))
    assert peer.send(b"CONT\t1\tAQ==") == b"FAIL\t1\treason=response out of turn\n"
    validator.fire(0, OK)
    assert peer.take() == b""


def test_broken_cont_for_a_live_request_ends_it():
    validator = Validator()
    peer = Peer(validator)
    peer.send(auth("1", "OAUTHBEARER", None))
    peer.take()
    assert peer.send(b"CONT\t1\t!!") == b"FAIL\t1\treason=invalid base64\n"
    assert peer.send(b"CONT\t1\tAQ==") == b"FAIL\t1\treason=unknown request id\n"


def test_too_many_concurrent_requests():
    validator = Validator()
    peer = Peer(validator)
    peer.send(*(auth(str(n), "PLAIN", PLAIN) for n in range(MAX_REQUESTS)))
    assert peer.send(auth("9999", "PLAIN", PLAIN)) == (
        b"FAIL\t9999\treason=too many concurrent requests\n"
    )
    validator.fire(0, OK)
    assert peer.take() == b"OK\t0\tuser=alice\n"
    peer.send(auth("10000", "PLAIN", PLAIN))
    assert len(validator.calls) == MAX_REQUESTS + 1


def test_oversized_line_drops_the_connection():
    peer = Peer(always(OK))
    with capturedLogs():
        peer.protocol.dataReceived(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + b"A" * MAX_LINE)
    assert peer.transport.disconnecting


class CountingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def test_verdicts_known_at_once_are_answered_in_one_write_per_read():
    # The validator answers remembered tokens with the Verdict itself, not a Deferred.
    peer = Peer(lambda bearer, service: OK)
    peer.transport = CountingTransport()
    peer.protocol.transport = peer.transport
    assert peer.send(*(auth(str(i), "PLAIN", PLAIN) for i in range(1, 4))) == (
        b"OK\t1\tuser=alice\nOK\t2\tuser=alice\nOK\t3\tuser=alice\n")
    assert peer.transport.writes == 1


def test_a_coroutine_validator_is_awaited():
    async def validate(bearer, service):
        return OK

    peer = Peer(validate)
    assert peer.send(auth("1", "PLAIN", PLAIN)) == b"OK\t1\tuser=alice\n"


def test_no_tcp_options_on_a_unix_socket():
    # Twisted's UNIX transports are TCP transports by inheritance, but TCP_NODELAY fails on them.
    @implementer(ITCPTransport)
    class UNIXTransport(StringTransport):
        def setTcpNoDelay(self, enabled: bool) -> None:
            raise OSError(errno.EOPNOTSUPP, "not a TCP socket")

    protocol = DovecotAuthProtocol(always(OK), clock=Clock())
    transport = UNIXTransport(hostAddress=UNIXAddress("/run/bearerbridge/auth"))
    protocol.makeConnection(transport)
    assert transport.value().endswith(b"DONE\n")


def test_answers_before_a_dropping_line_are_still_written():
    peer = Peer(lambda bearer, service: OK)
    with capturedLogs():
        peer.protocol.dataReceived(auth("1", "PLAIN", PLAIN) + b"\n" + b"A" * (MAX_LINE + 1))
    assert peer.take() == b"OK\t1\tuser=alice\n"
    assert peer.transport.disconnecting


@pytest.mark.parametrize(
    "lines", [[b"VERSION\t2\t0"], [b"CPID\t1"], [auth("1", "PLAIN", PLAIN)], [b"HELLO"]]
)
def test_bad_handshake_drops_the_connection(lines):
    peer = Peer(always(OK), handshake_done=False)
    with capturedLogs():
        assert peer.send(*lines, auth("2", "PLAIN", PLAIN)) == b""
    assert peer.transport.disconnecting


def test_a_client_that_never_greets_is_dropped_after_the_handshake_timeout():
    peer = Peer(always(OK), handshake_done=False)
    peer.clock.advance(HANDSHAKE_TIMEOUT / 2)
    peer.protocol.dataReceived(b"VERS")  # bytes, but no VERSION: the deadline is not idle time
    peer.clock.advance(HANDSHAKE_TIMEOUT / 2 - 0.01)
    assert not peer.transport.disconnecting
    peer.clock.advance(0.02)
    assert peer.transport.disconnecting


@pytest.mark.parametrize("greeting", [
    b"VERSION\t1\t0\nCPID\t1\n",  # Postfix
    b"VERSION\t1\t1\nCPID\t1\n",  # Prosody
    b"VERSION\t1\t0\nCPID\t1\n" + auth("1", "PLAIN", PLAIN) + b"\n",  # Exim, all in one write
])
def test_a_client_that_greeted_is_never_dropped_for_being_idle(greeting):
    """Postfix keeps a connection per smtpd process and Prosody one for its whole life."""
    peer = Peer(always(OK), handshake_done=False)
    peer.clock.advance(HANDSHAKE_TIMEOUT - 1)
    peer.protocol.dataReceived(greeting)
    peer.take()
    peer.clock.advance(7 * 24 * 3600)
    assert not peer.transport.disconnecting
    assert peer.send(auth("2", "PLAIN", PLAIN)) == b"OK\t2\tuser=alice\n"


def test_a_closed_connection_leaves_no_deadline_behind():
    peer = Peer(always(OK), handshake_done=False)
    peer.protocol.connectionLost()
    assert peer.clock.getDelayedCalls() == []


def test_protocol_errors_are_logged_once_counted_and_close_the_connection_at_the_bound():
    peer = Peer(always(OK))
    with capturedLogs() as events:
        assert peer.send(*[b""] * (MAX_PROTOCOL_ERRORS - 1)) == b""
        assert not peer.transport.disconnecting
        assert len(events) == 1  # the first, with its reason
        assert "ignored line: unknown or malformed command" in formatEvent(events[0])
        peer.send(b"HELLO")
        assert peer.transport.disconnecting
        peer.protocol.connectionLost()
    assert len(events) == 2  # and one summary
    assert f"{MAX_PROTOCOL_ERRORS} protocol errors" in formatEvent(events[1])


def test_a_flood_of_empty_lines_writes_two_log_lines_and_is_read_no_further():
    """200 KB of empty lines once wrote 23 MB of warnings and stalled other clients for seconds."""
    peer = Peer(always(OK))
    with capturedLogs() as events:
        peer.protocol.dataReceived(b"\n" * 200_000)
        peer.protocol.connectionLost()
    assert peer.transport.disconnecting and len(events) == 2
    assert peer.protocol._connection.protocol_errors == MAX_PROTOCOL_ERRORS


def test_requests_no_peer_would_make_are_failed_and_count_as_protocol_errors():
    peer = Peer(always(OK))
    with capturedLogs() as events:
        written = peer.send(*[f"CONT\t{n}\tAQ==".encode() for n in range(MAX_PROTOCOL_ERRORS + 5)])
    # each one answered (a decision, logged and counted), and none after the bound
    assert written == b"".join(b"FAIL\t%d\treason=unknown request id\n" % n for n in range(MAX_PROTOCOL_ERRORS))
    assert len(peer.decisions) == MAX_PROTOCOL_ERRORS and peer.transport.disconnecting
    assert len(events) == 1


def test_a_few_protocol_errors_leave_the_connection_open_and_log_no_summary():
    peer = Peer(always(OK))
    with capturedLogs() as events:
        peer.send(b"", auth("1", "SCRAM-SHA-1", None))
        assert peer.send(auth("2", "PLAIN", PLAIN)) == b"OK\t2\tuser=alice\n"
        peer.protocol.connectionLost()
    assert len(events) == 2 and "2 protocol errors" in formatEvent(events[1])
    peer = Peer(always(OK))
    with capturedLogs() as events:
        peer.send(b"")
        peer.protocol.connectionLost()
    assert len(events) == 1


def test_decisions_are_logged_without_the_token():
    peer = Peer(always(EXPIRED))
    with capturedLogs() as events:
        peer.send(auth("1", "PLAIN", PLAIN), auth("2", "OAUTHBEARER", OAUTHBEARER, "imap"))
        peer.send(b"CONT\t2\tAQ==")
        assert events == []  # written in a batch...
        peer.clock.advance(0.25)  # ...a quarter of a second later
    text = "\n".join(formatEvent(event) for event in events)
    assert TOKEN not in text
    assert "auth failed: user='alice@example.org' service='smtp' mechanism=PLAIN" in text
    assert "service='imap' mechanism=OAUTHBEARER id=2 reason='expired'" in text


def test_decision_batches_are_bounded_in_size():
    clock = Clock()
    decisions = DecisionLog(clock, interval=0.25, max_lines=3)
    decision = Decision("1", "PLAIN", "smtp", "alice", True, "ok")
    with capturedLogs() as events:
        for _ in range(7):
            decisions.add(decision)
        assert [formatEvent(e).count("auth ok") for e in events] == [3, 3]  # full batches at once
        clock.advance(0.25)  # and the rest on time
        assert [formatEvent(e).count("auth ok") for e in events] == [3, 3, 1]
        assert clock.getDelayedCalls() == []


# Over a real loopback socket


class Client(protocol.Protocol):
    """Collects the server's bytes and fires `answered` once it sees `until`."""

    def __init__(self, until: bytes) -> None:
        self.received = b""
        self.until = until
        self.answered: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.until in self.received and not self.answered.called:
            self.answered.callback(self.received)


@pytest_twisted.inlineCallbacks
def test_oauthbearer_success_over_tcp():
    seen = []

    def validate(bearer, service):
        seen.append((bearer.identity, service))
        return defer.succeed(Verdict(ok=True, username="alice"))

    port = reactor.listenTCP(0, DovecotAuthFactory(validate), interface="127.0.0.1")
    creator = protocol.ClientCreator(reactor, Client, b"OK\t")
    client = yield creator.connectTCP("127.0.0.1", port.getHost().port)
    try:
        client.transport.write(
            b"VERSION\t1\t0\nCPID\t4711\n"
            + auth("1", "OAUTHBEARER", OAUTHBEARER, "imap")
            + b"\n"
        )
        received = yield client.answered
    finally:
        client.transport.loseConnection()
        yield port.stopListening()
    assert received.startswith(b"VERSION\t1\t2\nMECH\tOAUTHBEARER\tplaintext\n")
    assert b"\nDONE\n" in received
    assert received.endswith(b"DONE\nOK\t1\tuser=alice\n")
    assert seen == [("alice@example.org", "imap")]


@pytest_twisted.inlineCallbacks
def test_tcp_replies_are_not_held_back_by_nagle():
    factory = DovecotAuthFactory(always(OK))
    served = []
    build = factory.buildProtocol
    factory.buildProtocol = lambda addr: served.append(build(addr)) or served[-1]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = yield protocol.ClientCreator(reactor, Client, b"DONE\n").connectTCP("127.0.0.1", port.getHost().port)
    try:
        yield client.answered
        handle = served[0].transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.transport.loseConnection()
        yield port.stopListening()
