"""Tests for bearerbridge.sasl.mechanisms: the three parsers and the exchange state machine."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from bearerbridge.sasl.mechanisms import (
    MAX_MESSAGE,
    MECHANISMS,
    Bearer,
    Challenge,
    Check,
    Failure,
    MalformedMessage,
    ProtocolStateError,
    ServerExchange,
    Success,
    error_challenge,
    parse_oauthbearer,
    parse_plain,
    parse_xoauth2,
)

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "rfc7628.json").read_text())
TOKEN = VECTORS["token"]
A = b"\x01"


def oauthbearer(header: bytes = b"n,,", *pairs: bytes) -> bytes:
    """An OAUTHBEARER message: header, kvsep, each pair with its kvsep, kvsep."""
    return header + A + b"".join(pair + A for pair in pairs) + A


AUTH = b"auth=Bearer " + TOKEN.encode()


# RFC 7628 §4 vectors


def test_rfc7628_successful_exchange_parses():
    vector = VECTORS["successful_exchange_imap"]
    bearer = parse_oauthbearer(base64.b64decode(vector["client_response"]))
    assert bearer == Bearer(
        mechanism="OAUTHBEARER",
        identity=vector["authzid"],
        token=TOKEN,
        host=vector["host"],
        port=vector["port"],
    )


def test_rfc7628_failed_exchange_challenge_is_reproduced_byte_for_byte():
    vector = VECTORS["failed_exchange_imap"]
    challenge = error_challenge(
        vector["status"], vector["scope"], vector["openid_configuration"]
    )
    assert base64.b64encode(challenge).decode() == vector["server_challenge"]


def test_rfc7628_smtp_failed_negotiation_runs_through_the_exchange():
    vector = VECTORS["failed_negotiation_smtp"]
    exchange = ServerExchange("OAUTHBEARER")
    step = exchange.receive(base64.b64decode(vector["client_response"]))
    assert isinstance(step, Check)
    assert step.bearer.port == vector["port"]
    challenge = exchange.reject(vector["status"], vector["scope"], reason="expired")
    expected = json.loads(base64.b64decode(vector["server_challenge"]))
    assert isinstance(challenge, Challenge)
    got = json.loads(challenge.data)
    # The RFC's server also lists its schemes; the RFC 7628 §3.2.2 fields agree.
    assert got == {"status": expected["status"], "scope": expected["scope"]}
    assert exchange.receive(base64.b64decode(vector["client_ack"])) == Failure("expired")


# error_challenge


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("invalid_token", None, None), b'{"status":"invalid_token"}'),
        (("insufficient_scope", "mail", None), b'{"status":"insufficient_scope","scope":"mail"}'),
        (
            ("invalid_token", None, "https://x/.well-known/openid-configuration"),
            b'{"status":"invalid_token","openid-configuration":'
            b'"https://x/.well-known/openid-configuration"}',
        ),
    ],
)
def test_error_challenge_omits_absent_fields(args, expected):
    assert error_challenge(*args) == expected


# OAUTHBEARER parsing


@pytest.mark.parametrize(
    ("header", "identity"),
    [
        (b"n,,", None),
        (b"n,a=user@example.com,", "user@example.com"),
        (b"n,a=a=2Cb,", "a,b"),
        (b"n,a=x=3Dy,", "x=y"),
        (b"n,a==3D=2C=3D,", "=,="),
        ("n,a=jörg,".encode(), "jörg"),
    ],
)
def test_oauthbearer_authzid_is_unescaped(header, identity):
    assert parse_oauthbearer(oauthbearer(header, AUTH)).identity == identity


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER", b"bEaReR"])
def test_oauthbearer_scheme_is_case_insensitive(scheme):
    message = oauthbearer(b"n,,", b"auth=" + scheme + b" " + TOKEN.encode())
    assert parse_oauthbearer(message).token == TOKEN


def test_oauthbearer_pairs_in_any_order_and_unknown_keys_ignored():
    message = oauthbearer(b"n,,", AUTH, b"mystery=42", b"port=993", b"host=imap.example")
    assert parse_oauthbearer(message) == Bearer("OAUTHBEARER", None, TOKEN, "imap.example", 993)


def test_oauthbearer_without_host_and_port():
    assert parse_oauthbearer(oauthbearer(b"n,,", AUTH)) == Bearer("OAUTHBEARER", None, TOKEN)


def test_oauthbearer_token_may_end_in_padding_and_use_every_b64token_char():
    token = "AZaz09-._~+/=="
    assert parse_oauthbearer(oauthbearer(b"n,,", b"auth=Bearer " + token.encode())).token == token


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (oauthbearer(b"y,,", AUTH), "channel binding"),
        (oauthbearer(b"p=tls-unique,,", AUTH), "channel binding"),
        (oauthbearer(b"F,n,,", AUTH), "flag"),
        (oauthbearer(b"n,", AUTH), "GS2"),
        (b"auth=Bearer x\x01\x01", "GS2"),
        (oauthbearer(b"n,,"), "missing auth"),
        (oauthbearer(b"n,,", b"host=h"), "missing auth"),
        (oauthbearer(b"n,,", AUTH, AUTH), "duplicate auth"),
        (oauthbearer(b"n,,", b"port=1", b"port=2", AUTH), "duplicate port"),
        (oauthbearer(b"n,,", b"auth=Basic dXNlcjpwYXNz"), "not Bearer"),
        (oauthbearer(b"n,,", b"auth=Bearer"), "not Bearer"),
        (oauthbearer(b"n,,", b"auth=Bearer a b"), "b64token"),
        (oauthbearer(b"n,,", b"auth=Bearer a=b"), "b64token"),
        (oauthbearer(b"n,,", b"auth=Bearer to,ken"), "b64token"),
        (oauthbearer(b"n,,", b"auth=Bearer tok\nen"), "b64token"),
        (oauthbearer(b"n,,", b"auth=Bearer "), "b64token"),
        (oauthbearer(b"n,,", AUTH + b"\x00"), "NUL"),
        (oauthbearer(b"n,a=us\x00er,", AUTH), "NUL"),
        (oauthbearer(b"n,a=\xff,", AUTH), "UTF-8"),
        (oauthbearer(b"n,a=x=2Dy,", AUTH), "authzid"),
        (oauthbearer(b"n,a=x=2c,", AUTH), "authzid"),
        (oauthbearer(b"n,a=x=,", AUTH), "authzid"),
        (oauthbearer(b"n,a=,", AUTH), "authzid"),
        (oauthbearer(b"n,u=x,", AUTH), "authzid"),
        (oauthbearer(b"n,,", b"=v", AUTH), "pair"),
        (oauthbearer(b"n,,", b"novalue", AUTH), "pair"),
        (oauthbearer(b"n,,", b"k2=v", AUTH), "pair"),
        (oauthbearer(b"n,,", b"host=a\x02b", AUTH), "value"),
        (oauthbearer(b"n,,", b"port=imap", AUTH), "port"),
        (oauthbearer(b"n,,", b"port=-1", AUTH), "port"),
        (oauthbearer(b"n,,", b"port=65536", AUTH), "port"),
        (b"n,,\x01" + AUTH + b"\x01", "terminator"),
        (b"n,,\x01" + AUTH, "terminator"),
        (b"n,," + AUTH + b"\x01\x01", "separator"),
        (b"n,a=x,y\x01" + AUTH + b"\x01\x01", "separator"),
        (b"n,,\x01" + AUTH + b"\x01\x01\x01", "pair"),
        (b"n,,\x01\x01" + AUTH + b"\x01\x01", "pair"),
        (b"\x01", "GS2"),
        (oauthbearer(b"n,,", AUTH, b"pad=" + b"x" * MAX_MESSAGE), "too long"),
    ],
)
def test_oauthbearer_malformed(message, reason):
    with pytest.raises(MalformedMessage, match=reason) as caught:
        parse_oauthbearer(message)
    assert TOKEN not in str(caught.value)


def test_oauthbearer_accepts_exactly_max_message():
    base = oauthbearer(b"n,,", AUTH, b"pad=")
    message = oauthbearer(b"n,,", AUTH, b"pad=" + b"x" * (MAX_MESSAGE - len(base)))
    assert len(message) == MAX_MESSAGE
    assert parse_oauthbearer(message).token == TOKEN


# XOAUTH2 parsing


def test_xoauth2_good():
    message = b"user=someuser@example.com\x01" + AUTH + b"\x01\x01"
    assert parse_xoauth2(message) == Bearer("XOAUTH2", "someuser@example.com", TOKEN)


def test_xoauth2_scheme_case_and_unknown_keys():
    message = b"user=u\x01extra=1\x01auth=bearer " + TOKEN.encode() + b"\x01\x01"
    assert parse_xoauth2(message) == Bearer("XOAUTH2", "u", TOKEN)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (AUTH + b"\x01\x01", "missing user"),
        (b"user=\x01" + AUTH + b"\x01\x01", "missing user"),
        (b"user=u\x01\x01", "missing auth"),
        (b"user=u\x01" + AUTH + b"\x01", "terminator"),
        (b"user=u\x01" + AUTH, "terminator"),
        (b"user=u\x01user=v\x01" + AUTH + b"\x01\x01", "duplicate user"),
        (b"user=u\x01auth=Bearer t!\x01\x01", "b64token"),
        (b"user=u\x01auth=Basic dTpw\x01\x01", "not Bearer"),
        (b"user=\xff\x01" + AUTH + b"\x01\x01", "UTF-8"),
        (b"user=u\x00\x01" + AUTH + b"\x01\x01", "NUL"),
        (b"n,,\x01" + AUTH + b"\x01\x01", "pair"),
        (b"user=" + b"u" * MAX_MESSAGE + b"\x01" + AUTH + b"\x01\x01", "too long"),
    ],
)
def test_xoauth2_malformed(message, reason):
    with pytest.raises(MalformedMessage, match=reason):
        parse_xoauth2(message)


# PLAIN parsing


@pytest.mark.parametrize(
    ("message", "identity"),
    [
        (b"\x00alice\x00" + TOKEN.encode(), "alice"),
        (b"alice\x00alice\x00" + TOKEN.encode(), "alice"),
        ("\x00jörg@example.org\x00".encode() + TOKEN.encode(), "jörg@example.org"),
    ],
)
def test_plain_good(message, identity):
    assert parse_plain(message) == Bearer("PLAIN", identity, TOKEN)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"bob\x00alice\x00" + TOKEN.encode(), "proxy"),
        (b"\x00\x00" + TOKEN.encode(), "authcid"),
        (b"\x00alice\x00", "b64token"),
        (b"\x00alice\x00pass word", "b64token"),
        (b"alice\x00" + TOKEN.encode(), "two NUL"),
        (b"\x00alice\x00tok\x00en", "two NUL"),
        (b"\x00\xffalice\x00" + TOKEN.encode(), "UTF-8"),
        (b"\x00alice\x00" + b"t" * MAX_MESSAGE, "too long"),
    ],
)
def test_plain_malformed(message, reason):
    with pytest.raises(MalformedMessage, match=reason):
        parse_plain(message)


# ServerExchange

GOOD = {
    "OAUTHBEARER": oauthbearer(b"n,a=alice,", AUTH),
    "XOAUTH2": b"user=alice\x01" + AUTH + b"\x01\x01",
    "PLAIN": b"\x00alice\x00" + TOKEN.encode(),
}
ACK = {"OAUTHBEARER": b"\x01", "XOAUTH2": b""}


def test_unknown_mechanism_is_refused():
    with pytest.raises(ValueError):
        ServerExchange("SCRAM-SHA-256")


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("initial", [True, False])
def test_exchange_success(mechanism, initial):
    exchange = ServerExchange(mechanism)
    if not initial:
        assert exchange.receive(None) == Challenge(b"")
    step = exchange.receive(GOOD[mechanism])
    assert step == Check(Bearer(mechanism, "alice", TOKEN))
    assert not exchange.expects_response
    assert exchange.accept() == Success()


@pytest.mark.parametrize("empty", [None, b""])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_exchange_no_initial_response_asks_for_the_message(mechanism, empty):
    exchange = ServerExchange(mechanism)
    assert exchange.receive(empty) == Challenge(b"")
    assert exchange.expects_response
    assert isinstance(exchange.receive(GOOD[mechanism]), Check)


def test_oauthbearer_rejection_then_ack_fails_with_the_reason():
    exchange = ServerExchange("OAUTHBEARER", openid_configuration="https://as/.well-known/x")
    exchange.receive(GOOD["OAUTHBEARER"])
    step = exchange.reject("insufficient_scope", "smtp", reason="insufficient_scope")
    assert step == Challenge(
        b'{"status":"insufficient_scope","scope":"smtp",'
        b'"openid-configuration":"https://as/.well-known/x"}'
    )
    assert exchange.expects_response
    assert exchange.receive(b"\x01") == Failure("insufficient_scope")


def test_xoauth2_rejection_uses_google_shape_and_empty_ack():
    exchange = ServerExchange("XOAUTH2", openid_configuration="https://as/x")
    exchange.receive(GOOD["XOAUTH2"])
    step = exchange.reject("invalid_token", "mail", reason="expired")
    assert step == Challenge(b'{"status":"invalid_token","schemes":"bearer","scope":"mail"}')
    assert exchange.receive(b"") == Failure("expired")


def test_xoauth2_ack_may_be_none():
    exchange = ServerExchange("XOAUTH2")
    exchange.receive(GOOD["XOAUTH2"])
    exchange.reject("invalid_token")
    assert exchange.receive(None) == Failure("invalid_token")


def test_plain_rejection_fails_at_once():
    exchange = ServerExchange("PLAIN")
    exchange.receive(GOOD["PLAIN"])
    assert exchange.reject("invalid_token", reason="revoked") == Failure("revoked")
    assert not exchange.expects_response


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_malformed_message_gets_invalid_request_challenge_then_fails(mechanism):
    exchange = ServerExchange(mechanism, openid_configuration="https://as/c")
    step = exchange.receive(b"garbage")
    assert isinstance(step, Challenge)
    assert json.loads(step.data)["status"] == "invalid_request"
    failure = exchange.receive(ACK[mechanism])
    assert isinstance(failure, Failure)
    assert failure.reason.startswith("malformed")


def test_oauthbearer_malformed_challenge_carries_openid_configuration():
    exchange = ServerExchange("OAUTHBEARER", openid_configuration="https://as/c")
    step = exchange.receive(oauthbearer(b"n,,"))
    assert step == Challenge(b'{"status":"invalid_request","openid-configuration":"https://as/c"}')


def test_plain_malformed_message_fails_at_once():
    step = ServerExchange("PLAIN").receive(b"no separators")
    assert isinstance(step, Failure)
    assert "NUL" in step.reason


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_second_empty_message_is_malformed(mechanism):
    exchange = ServerExchange(mechanism)
    exchange.receive(None)
    step = exchange.receive(b"")
    if mechanism == "PLAIN":
        assert step == Failure("malformed: empty message")
    else:
        assert json.loads(step.data)["status"] == "invalid_request"
        assert exchange.receive(ACK[mechanism]) == Failure("malformed: empty message")


@pytest.mark.parametrize(
    ("mechanism", "ack"),
    [("OAUTHBEARER", b""), ("OAUTHBEARER", GOOD["OAUTHBEARER"]), ("XOAUTH2", b"\x01")],
)
def test_unexpected_ack_still_fails(mechanism, ack):
    exchange = ServerExchange(mechanism)
    exchange.receive(GOOD[mechanism])
    exchange.reject("invalid_token", reason="unknown")
    step = exchange.receive(ack)
    assert step == Failure("unknown; unexpected response after error")


def test_rejection_reason_defaults_to_status():
    exchange = ServerExchange("OAUTHBEARER")
    exchange.receive(GOOD["OAUTHBEARER"])
    exchange.reject("invalid_token")
    assert exchange.receive(b"\x01") == Failure("invalid_token")


def test_failure_reason_never_contains_the_token():
    exchange = ServerExchange("PLAIN")
    step = exchange.receive(b"bob\x00alice\x00" + TOKEN.encode())
    assert isinstance(step, Failure)
    assert TOKEN not in step.reason


@pytest.mark.parametrize(
    ("setup", "call"),
    [
        ([], "accept"),
        ([], "reject"),
        ([None], "accept"),
        ([GOOD["OAUTHBEARER"]], "receive"),
        ([GOOD["OAUTHBEARER"], "accept"], "receive"),
        ([GOOD["OAUTHBEARER"], "accept"], "accept"),
        ([GOOD["OAUTHBEARER"], "reject"], "accept"),
        ([GOOD["OAUTHBEARER"], "reject", b"\x01"], "receive"),
    ],
)
def test_calls_in_the_wrong_state_are_programming_errors(setup, call):
    exchange = ServerExchange("OAUTHBEARER")
    for action in setup:
        if action == "accept":
            exchange.accept()
        elif action == "reject":
            exchange.reject("invalid_token")
        else:
            exchange.receive(action)
    with pytest.raises(ProtocolStateError):
        if call == "accept":
            exchange.accept()
        elif call == "reject":
            exchange.reject("invalid_token")
        else:
            exchange.receive(b"\x01")


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize(
    "junk",
    [b"\x00", b"\xff\xfe", b"\x01\x01", b"=" * 100, bytes(range(256)), b"x" * (MAX_MESSAGE + 1)],
)
def test_client_input_never_raises(mechanism, junk):
    step = ServerExchange(mechanism).receive(junk)
    assert isinstance(step, (Challenge, Failure))


def _oauthbearer_variants():
    """Common and uncommon OAUTHBEARER messages, valid and not, for the two parsers to agree on."""
    headers = [b"n,,", b"n,a=alice,", b"n,a=al=2Cice,", b"n,a=,", b"y,,", b"n,a=\xc3\xa9l\xc3\xa8ve,"]
    hosts = [None, b"host=imap.example", b"host=", b"host=a b\tc"]
    ports = [None, b"port=993", b"port=65535", b"port=65536", b"port=099999", b"port=1x"]
    auths = [AUTH, b"auth=bearer  " + TOKEN.encode(), b"auth=BEARER x=", b"auth=Basic x", b"auth=Bearer",
             b"auth=Bearer \xc3\xa9", b"auth=Bearer\tx", b"auth=bearer \x7fx"]
    for header in headers:
        for host in hosts:
            for port in ports:
                for auth in auths:
                    pairs = [pair for pair in (host, port, auth) if pair is not None]
                    yield oauthbearer(header, *pairs)
                    yield oauthbearer(header, *reversed(pairs))
    yield oauthbearer(b"n,a=alice,", b"host=h", b"auth=Bearer x", b"auth=Bearer y")
    yield oauthbearer(b"n,a=alice,", b"mystery=1", AUTH)
    yield oauthbearer(b"n,,", AUTH) + A
    yield oauthbearer(b"n,,", AUTH)[:-1]
    yield b"n,," + AUTH + A + A
    yield "n,,\x01auth=\u212aearer x\x01\x01".encode()  # KELVIN SIGN folds to k, not b: still refused


def _outcome(parse, message):
    try:
        return parse(message)
    except MalformedMessage:
        return "malformed"


def test_the_common_shape_is_parsed_as_the_general_parser_does():
    from bearerbridge.sasl import mechanisms as sasl

    messages = list(_oauthbearer_variants())
    disagreements = [m for m in messages
                     if _outcome(parse_oauthbearer, m) != _outcome(lambda m: sasl._parse_oauthbearer(m.decode()), m)]
    assert len(messages) > 2000 and disagreements == []


def test_what_clients_send_takes_the_one_pass_route():
    from bearerbridge.sasl import mechanisms as sasl

    postfix_like = oauthbearer(b"n,a=alice,", b"host=mail.example", b"port=587", AUTH).decode()
    assert sasl._COMMON_OAUTHBEARER.fullmatch(postfix_like)
    assert sasl._COMMON_OAUTHBEARER.fullmatch(oauthbearer(b"n,,", AUTH).decode())
