"""Property tests (hypothesis) of the SASL parsers, the exchange and the Dovecot codec and connection.

Client bytes are hostile: whatever arrives, a parser answers with a value or its documented error
(MalformedMessage, DovecotProtocolError), never another exception and never the token in a message;
what a client formats correctly comes back as it was; and a Dovecot connection answers every request
it accepted exactly once. A few hundred examples a property, seconds in all, derandomized when
CI=true so that CI never fails by luck. bench/fuzz.py runs these same tests with a million inputs.
"""

from __future__ import annotations

import base64
import os
import re

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bearerbridge.sasl import mechanisms as sasl
from bearerbridge.sasl.dovecot import (
    AuthRequest,
    Cancel,
    Cont,
    Cpid,
    DovecotAuthConnection,
    DovecotProtocolError,
    Version,
    format_cont,
    parse_line,
    tabescape,
    tabunescape,
)
from bearerbridge.sasl.mechanisms import (
    MECHANISMS,
    Bearer,
    Challenge,
    Check,
    Failure,
    MalformedMessage,
    ProtocolStateError,
    ServerExchange,
    parse_oauthbearer,
    parse_plain,
    parse_xoauth2,
)
from bearerbridge.sasl.verdict import Verdict

# bench/fuzz.py sets this before importing the module, for its long run.
_LONG_RUN = int(os.environ.get("BEARERBRIDGE_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    """`examples` a property in the suite; no deadline (a loaded CI machine is slow, not wrong);
    the same examples on every CI run; no example database left in the working tree."""
    return settings(max_examples=_LONG_RUN or examples, deadline=None, database=None,
                    derandomize=os.environ.get("CI") == "true",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


PARSERS = {"OAUTHBEARER": parse_oauthbearer, "XOAUTH2": parse_xoauth2, "PLAIN": parse_plain}

# Every token starts with this, and no generated name contains an S: so a reply or an error
# that contains a token's text can only have copied the token.
MARK = "SECRET"
B64CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
tokens = st.builds(lambda body, pad: MARK + body + "=" * pad,
                   st.text(B64CHARS, min_size=1, max_size=40), st.integers(0, 2))
# Names as clients send them, and as hostile ones might: any text but NUL (and no S, see MARK).
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00S"), min_size=1, max_size=20)
# RFC 7628 §3.1 value = *(VCHAR / SP / HTAB / CR / LF); no S, as above.
values = st.text(st.sampled_from([chr(c) for c in range(0x21, 0x7F) if chr(c) != "S"] + [" ", "\t", "\r", "\n"]),
                 max_size=20)
# Characters that matter to the grammars, to mix into otherwise valid messages.
NASTY = [",", "=", "\x01", "\x00", " ", "\t", "\r", "\n", "=2C", "=3D", "a=", "auth=", "Bearer ", "\xe9", "\u212a",
         "\x7f", "\udcff"]


def _escape_saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")  # RFC 5801 §4, "=" first


def _outcome(parse, message):
    try:
        return parse(message)
    except MalformedMessage as error:
        return f"malformed: {error}"


# ---- the three parsers on any bytes


@fuzz(400)
@given(mechanism=st.sampled_from(MECHANISMS), message=st.binary(max_size=200))
def test_the_parsers_raise_only_malformed_message_whatever_the_bytes(mechanism, message):
    try:
        bearer = PARSERS[mechanism](message)
    except MalformedMessage:
        return
    assert isinstance(bearer, Bearer) and bearer.mechanism == mechanism and bearer.token


@st.composite
def oauthbearer_texts(draw):
    """OAUTHBEARER messages: half in the common shape (the one-pass route), half just off it."""
    common = draw(st.booleans())
    pick = (lambda usual, other: draw(st.sampled_from(usual))) if common else (
        lambda usual, other: draw(st.sampled_from(usual + other)))
    header = pick(["n,,", "n,a={},"], ["y,,", "p=x,,", "n,a=,", "n,a={}", "n,b={},"])
    header = header.format(draw(names) if common else draw(st.one_of(names, st.sampled_from(["al=2Cice", "a=3Db"]))))
    pairs = []
    if draw(st.booleans()):
        pairs.append("host=" + draw(values))
    if draw(st.booleans()):
        pairs.append("port=" + pick(["143", "0", "00993", "65535", "65536", "99999"], ["099999", "1x", "", "-1"]))
    if not common and draw(st.booleans()):
        pairs.insert(draw(st.integers(0, len(pairs))),
                     draw(st.sampled_from(["mystery=1", "x=", "Host=h", "auth=Bearer x", "=v", "nokey", "port=1"])))
    scheme = pick(["Bearer", "bearer", "BEARER", "bEaReR"], ["Basic", "\u212aearer", "Bearer\t", "Bearer\xa0"])
    spaces = draw(st.integers(1, 3)) if common else draw(st.integers(0, 3))
    auth = "auth=" + scheme + " " * spaces + draw(tokens)
    pairs.insert(len(pairs) if common else draw(st.integers(0, len(pairs))), auth)
    text = header + "\x01" + "".join(pair + "\x01" for pair in pairs) + "\x01"
    if not common and draw(st.booleans()):  # one change anywhere: a character that matters, added or instead
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(NASTY)) + text[at + draw(st.integers(0, 1)):]
    return text


@fuzz(600)
@given(text=oauthbearer_texts())
def test_the_one_pass_oauthbearer_route_agrees_with_the_general_parser(text):
    try:
        message = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not UTF-8, refused by both
        message = text.encode("utf-8", "surrogatepass")
        assert _outcome(parse_oauthbearer, message) == "malformed: message is not UTF-8"
        return
    fast = sasl._COMMON_OAUTHBEARER.fullmatch(text) is not None
    event("one-pass route" if fast else "general parser")
    general = "malformed: NUL byte in message" if "\x00" in text else _outcome(sasl._parse_oauthbearer, text)
    assert _outcome(parse_oauthbearer, message) == general


@fuzz(300)
@given(identity=st.one_of(st.none(), names), host=st.one_of(st.none(), values),
       port=st.one_of(st.none(), st.integers(0, 65535)), token=tokens, scheme=st.sampled_from(["Bearer", "bearer"]),
       spaces=st.integers(1, 3), extra=st.lists(st.sampled_from(["x=1", "future=a b"]), max_size=2))
def test_an_oauthbearer_message_gives_back_what_it_was_built_from(identity, host, port, token, scheme, spaces, extra):
    pairs = [f"host={host}"] * (host is not None) + [f"port={port}"] * (port is not None) + extra
    pairs.append(f"auth={scheme}{' ' * spaces}{token}")
    header = "n,," if identity is None else f"n,a={_escape_saslname(identity)},"
    message = (header + "\x01" + "".join(pair + "\x01" for pair in pairs) + "\x01").encode()
    assert parse_oauthbearer(message) == Bearer("OAUTHBEARER", identity, token, host, port)


@fuzz(200)
@given(user=values.filter(bool), token=tokens, extra=st.lists(st.sampled_from(["x=1", "future=a b"]), max_size=2))
def test_an_xoauth2_message_gives_back_what_it_was_built_from(user, token, extra):
    message = "\x01".join([f"user={user}", *extra, f"auth=Bearer {token}", "", ""]).encode()
    assert parse_xoauth2(message) == Bearer("XOAUTH2", user, token)


@fuzz(200)
@given(user=names, token=tokens, proxy=st.booleans())
def test_a_plain_message_gives_back_what_it_was_built_from(user, token, proxy):
    message = f"{user if proxy else ''}\x00{user}\x00{token}".encode()
    assert parse_plain(message) == Bearer("PLAIN", user, token)


@st.composite
def broken_messages(draw):
    """A valid message of a mechanism, its token somewhere, with a few bytes changed."""
    mechanism = draw(st.sampled_from(MECHANISMS))
    token = draw(tokens)
    message = {"OAUTHBEARER": f"n,a=me,\x01host=h\x01auth=Bearer {token}\x01\x01",
               "XOAUTH2": f"user=me\x01auth=Bearer {token}\x01\x01",
               "PLAIN": f"\x00me\x00{token}"}[mechanism].encode()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(message)))
        message = message[:at] + draw(st.binary(max_size=3)) + message[at + draw(st.integers(0, 3)):]
    return mechanism, token, message


@fuzz(300)
@given(case=broken_messages())
def test_an_error_never_quotes_the_token(case):
    mechanism, token, message = case
    try:
        PARSERS[mechanism](message)
    except MalformedMessage as error:
        assert MARK not in str(error)  # a prefix of the token is as bad as all of it


# ---- the exchange


@fuzz(300)
@given(mechanism=st.sampled_from(MECHANISMS), responses=st.lists(st.one_of(st.none(), st.binary(max_size=60),
                                                                          broken_messages().map(lambda c: c[2])),
                                                                min_size=1, max_size=4),
       verdicts=st.lists(st.sampled_from(["accept", "reject", "reject_scope"]), min_size=4, max_size=4))
def test_an_exchange_fed_any_responses_ends_in_at_most_three_turns_and_raises_only_on_misuse(mechanism, responses,
                                                                                             verdicts):
    exchange = ServerExchange(mechanism, "https://issuer.example/.well-known/openid-configuration")
    turns = 0
    for data in responses:
        if not exchange.expects_response:
            try:
                exchange.receive(data)
            except ProtocolStateError:
                continue  # the caller's bug, reported as such
            raise AssertionError("receive() outside the client's turn")
        step = exchange.receive(data)
        turns += 1
        if isinstance(step, Check):
            verdict = verdicts[turns]
            step = (exchange.accept() if verdict == "accept"
                    else exchange.reject("invalid_token", "mail" if verdict == "reject_scope" else None))
        assert isinstance(step, (Challenge, Check, Failure, sasl.Success))
        if isinstance(step, Failure):
            assert MARK not in step.reason
        if isinstance(step, Challenge):
            assert MARK.encode() not in step.data
        assert turns <= 3  # message (after an empty challenge at most), then the error's acknowledgement


# ---- the Dovecot codec


@fuzz(200)
@given(value=st.text())
def test_tabescape_leaves_no_separator_and_tabunescape_undoes_it(value):
    escaped = tabescape(value)
    assert not set(escaped) & {"\x00", "\t", "\n", "\r"}
    assert tabunescape(escaped) == value


dovecot_ids = st.integers(0, 2**32 - 1).map(str)


@fuzz(200)
@given(request_id=dovecot_ids, data=st.binary(max_size=100))
def test_a_cont_line_gives_back_its_id_and_data(request_id, data):
    assert parse_line(format_cont(request_id, data).rstrip(b"\n")) == Cont(request_id, data)


_param_keys = st.text(min_size=1, max_size=8).filter(lambda k: "=" not in k and k != "resp")


@fuzz(300)
@given(request_id=dovecot_ids, mechanism=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                                                   min_size=1, max_size=12),
       service=st.text(min_size=1, max_size=10), params=st.dictionaries(_param_keys, st.text(max_size=10), max_size=4),
       flags=st.frozensets(_param_keys, max_size=3), response=st.one_of(st.none(), st.binary(max_size=60)))
def test_an_auth_line_gives_back_its_fields_escaped_or_not(request_id, mechanism, service, params, flags, response):
    params = {**params, "service": service}
    fields = [f"{tabescape(key)}={tabescape(value)}" for key, value in params.items()]
    fields += [tabescape(flag) for flag in flags]
    if response is not None:
        fields.append("resp=" + base64.b64encode(response).decode())
    line = "\t".join(["AUTH", request_id, mechanism, *fields]).encode()
    assert parse_line(line) == AuthRequest(request_id, mechanism.upper(), service, params, flags, response)


@st.composite
def client_lines(draw, token_pool):
    """A Dovecot client line: mostly well-formed commands with good or broken fields, some plain junk."""
    kind = draw(st.sampled_from(["AUTH"] * 5 + ["CONT"] * 2 + ["CANCEL", "VERSION", "CPID", "junk"]))
    request_id = draw(st.sampled_from(["1", "2", "3", "17", "4294967295"] * 3 + ["01", "", "x", "99999999999", "1 "]))
    if kind == "junk":
        return draw(st.binary(max_size=40))
    if kind == "VERSION":
        return draw(st.sampled_from([b"VERSION\t1\t0", b"VERSION\t1\t1", b"VERSION\t2\t0", b"VERSION\t1", b"VERSION"]))
    if kind == "CPID":
        return b"CPID\t" + draw(st.binary(max_size=8))
    if kind == "CANCEL":
        return b"CANCEL\t" + request_id.encode()
    token = draw(st.sampled_from(token_pool))
    mechanism = draw(st.sampled_from(MECHANISMS)) if draw(st.integers(0, 4)) else draw(
        st.sampled_from(["oauthbearer", "CRAM-MD5", "", "\x01t"]))
    good = {"OAUTHBEARER": [f"n,,\x01auth=Bearer {token}\x01\x01",
                            f"n,a=me,\x01port=25\x01auth=bearer {token}\x01\x01"],
            "XOAUTH2": [f"user=me\x01auth=Bearer {token}\x01\x01"],
            "PLAIN": [f"\x00me\x00{token}", f"me\x00me\x00{token}"]}.get(mechanism.upper(), [])
    odd = [f"n,,\x01auth=Bearer {token}", f"\x00me\x00{token}", "\x01", "", "junk"]
    message = draw(st.sampled_from(good if good and draw(st.integers(0, 3)) else odd)).encode()
    response = draw(st.sampled_from([base64.b64encode(message)] * 12 + [b"=", b"", b"%%%", b"AQ=="]))
    if kind == "CONT":
        return b"\t".join([b"CONT", request_id.encode(), response][:draw(st.integers(2, 3))])
    fields = [b"AUTH", request_id.encode(), mechanism.encode()]
    if draw(st.integers(0, 5)):
        fields.append(draw(st.sampled_from([b"service=smtp", b"service=xmpp", b"service=imap"])))
    fields += draw(st.lists(st.sampled_from([b"service=", b"nologin", b"secured", b"lip=127.0.0.1", b"rip=",
                                             b"x=\x01t\x01n", b"\xff", b""]), max_size=3))
    if draw(st.integers(0, 3)):
        fields.append(b"resp=" + response)
    return b"\t".join(fields)


@fuzz(400)
@given(line=st.one_of(st.binary(max_size=100), client_lines(["SECRETgood"]),
                      st.builds(bytes.__add__, st.sampled_from([b"AUTH\t1\t", b"CONT\t1\t", b"VERSION\t", b"CANCEL\t"]),
                                st.binary(max_size=60))))
def test_parse_line_gives_a_command_or_a_protocol_error_whatever_the_bytes(line):
    try:
        command = parse_line(line)
    except DovecotProtocolError as error:
        assert MARK not in str(error) and error.request_id in (None, *re.findall(r"[0-9]+", line.decode("latin-1")))
    else:
        assert isinstance(command, (Version, Cpid, AuthRequest, Cont, Cancel))


# The validator's answer, chosen by the token: accepted (with a user name that needs escaping),
# refused, a backend outage, and "ok" without a user name (which must not become an OK).
ALICE = "alice\twith a tab\nand a newline"
STUB_VERDICTS = {
    "SECRETgood": Verdict(ok=True, username=ALICE, reason="ok"),
    "SECRETbad": Verdict(ok=False, status="invalid_token", reason="unknown"),
    "SECRETscope": Verdict(ok=False, status="insufficient_scope", scope="mail", reason="insufficient_scope"),
    "SECRETdown": Verdict(ok=False, temporary=True, reason="database_unavailable"),
    "SECRETnoname": Verdict(ok=True, username=None),
}
_REPLY = re.compile(rb"(OK|FAIL|CONT)\t([0-9]+)(\t[^\t\n]*)*\n")


@fuzz(300)
@given(data=st.data(), greet=st.integers(0, 9), prosody=st.booleans(), at_once=st.booleans())
def test_a_connection_fed_any_lines_answers_each_request_it_took_exactly_once(data, greet, prosody, at_once):
    """Every line naming a request id, after VERSION, is owed one reply, which a CANCEL waives;
    no reply is sent that is not owed, none names the token, and in the end none is still owed.
    With `at_once` the validator answers from its memory (in the same call), else the verdicts
    come later, in any order, interleaved with more lines."""
    connection = DovecotAuthConnection(openid_configuration="https://issuer.example/x")
    lines = data.draw(st.lists(client_lines(["SECRETgood"] * 4 + list(STUB_VERDICTS)), max_size=12))
    if greet:  # nearly every client greets first; the others are closed at their first line
        lines.insert(0, b"VERSION\t1\t1" if prosody else b"VERSION\t1\t0")
    owed: dict[bytes, bool] = {}
    pending = []
    greeted = closed = False

    def apply(out, line=None):
        nonlocal closed
        for reply in out.lines:
            match = _REPLY.fullmatch(reply)
            assert match, reply
            assert MARK.encode() not in reply
            assert owed.get(match[2]), f"{reply!r} answers nothing owed"
            owed[match[2]] = False
            event(match[1].decode())
            if match[1] == b"OK":
                assert reply.rstrip(b"\n").split(b"\t")[2] == b"user=" + tabescape(ALICE).encode()
        for decision in out.decisions:
            assert MARK not in f"{decision.reason}"
        assert not any(MARK in problem for problem in out.problems)
        pending.extend(out.validations)
        if at_once:
            while pending:
                validation = pending.pop(0)
                apply(connection.verdict(validation, STUB_VERDICTS[validation.bearer.token]))
        closed = closed or out.close

    for line in lines:
        while pending and data.draw(st.booleans()):  # some verdicts arrive before the next line
            validation = pending.pop(data.draw(st.integers(0, len(pending) - 1)))
            apply(connection.verdict(validation, STUB_VERDICTS[validation.bearer.token]))
        if closed:
            break
        try:
            command = parse_line(line)
            request_id = None if isinstance(command, (Version, Cpid)) else command.id.encode()
        except DovecotProtocolError as error:
            command, request_id = None, error.request_id and error.request_id.encode()
        if isinstance(command, Version) and command.major == 1:
            greeted = True
        if request_id is not None and greeted:
            owed[request_id] = not isinstance(command, Cancel)
        apply(connection.line_received(line))
        if at_once and request_id is not None and greeted and not closed:
            assert not owed[request_id], f"{line!r} got no reply at once"
    while pending and not closed:
        validation = pending.pop(0)
        apply(connection.verdict(validation, STUB_VERDICTS[validation.bearer.token]))
    if not closed:
        assert not any(owed.values()), owed
