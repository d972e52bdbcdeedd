"""Sans-IO server side of the bearer-token SASL mechanisms.

Three mechanisms carry an OAuth 2.0 access token:

- ``OAUTHBEARER`` (RFC 7628), the standard one;
- ``XOAUTH2``, Google's precursor, still the only one some clients offer;
- ``PLAIN`` (RFC 4616), where the password *is* the access token, for
  clients that know nothing of OAuth.

The parsers turn a decoded client message into a :class:`Bearer`, and
:class:`ServerExchange` drives one authentication from the first client
message to success or failure. Neither does I/O nor validates the token:
the caller does that between a :class:`Check` step and ``accept()`` or
``reject()``, which lets the Dovecot socket, the HTTP endpoint and the
``twisted.cred`` challengers share one state machine.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

MECHANISMS = ("OAUTHBEARER", "XOAUTH2", "PLAIN")

# RFC 7628 sets no limit, but a bearer token plus a few key/value pairs is a
# few KiB at most; a bound keeps a hostile client from making us parse more.
MAX_MESSAGE = 16384

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6750 §2.1 credentials = "Bearer" 1*SP b64token, the scheme case-insensitive
# (RFC 7235 §2.1): checked in _bearer_token.
# RFC 7628 §3.1: key = 1*(ALPHA) (checked without a regex in _pairs);
# value = *(VCHAR / SP / HTAB / CR / LF)
_VALUE = re.compile(r"[\x21-\x7e \t\r\n]*")
# RFC 5801 §4: saslname = 1*(UTF8-char-safe / "=2C" / "=3D")
_SASLNAME = re.compile(r"(?:[^,=\x00]|=2C|=3D)+")

_KVSEP = "\x01"


# Not frozen, like Check: built for every login, and a frozen dataclass's __init__ costs
# four times as much (bench/README.md). Treat them as immutable all the same.
@dataclass(slots=True)
class Bearer:
    """A bearer token presented by a client, with what it says about itself.

    ``identity`` is the OAUTHBEARER authzid (RFC 7628 §3.1), the XOAUTH2
    ``user``, or the PLAIN authcid (RFC 4616 §2); ``None`` when the client
    gave none. ``host`` and ``port`` are the optional RFC 7628 §3.1 keys.
    """

    mechanism: str
    identity: str | None
    token: str
    host: str | None = None
    port: int | None = None


class MalformedMessage(ValueError):
    """A client message that does not follow its mechanism's syntax.

    ``str()`` is a short reason fit for logs; it never contains the token.
    """


class ProtocolStateError(RuntimeError):
    """A :class:`ServerExchange` method called in the wrong state.

    This is a bug in the caller, never the result of client input.
    """


def _decode(message: bytes) -> str:
    """Check the size and encoding every mechanism shares, and decode."""
    if len(message) > MAX_MESSAGE:
        raise MalformedMessage("message too long")
    if b"\x00" in message:
        raise MalformedMessage("NUL byte in message")
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("message is not UTF-8") from None


def _pairs(body: str, known: tuple[str, ...]) -> dict[str, str]:
    """Parse ``*kvpair`` (RFC 7628 §3.1), each ending in 0x01.

    Keys outside ``known`` are ignored, as RFC 7628 §3.1 lets new keys be
    added; a known key given twice is refused, so no value can shadow another.
    """
    if body and not body.endswith(_KVSEP):
        raise MalformedMessage("missing terminator")
    found: dict[str, str] = {}
    for pair in body.split(_KVSEP)[:-1]:
        key, equals, value = pair.partition("=")
        # These run for every pair of every login. isascii() + isalpha() is exactly the key's
        # 1*ALPHA and cheaper than a regex; printable ASCII is the common case of _VALUE,
        # which still decides whatever else (TAB, CR, LF, or bad characters).
        if not equals or not (key.isascii() and key.isalpha()):
            raise MalformedMessage("bad key/value pair")
        if not (value.isascii() and value.isprintable()) and not _VALUE.fullmatch(value):
            raise MalformedMessage("bad character in value")
        if key in known:
            if key in found:
                raise MalformedMessage(f"duplicate {key}")
            found[key] = value
    return found


def _bearer_token(pairs: dict[str, str]) -> str:
    """Extract the token from ``auth=Bearer <b64token>`` (RFC 6750 §2.1)."""
    if "auth" not in pairs:
        raise MalformedMessage("missing auth")
    # The same as fullmatch("bearer +(.*)", IGNORECASE | DOTALL), without a case-insensitive
    # regex on every login: _pairs let only ASCII through, so lower() is the whole case folding.
    auth = pairs["auth"]
    if auth[:6].lower() != "bearer" or auth[6:7] != " ":
        raise MalformedMessage("auth scheme is not Bearer")
    token = auth[6:].lstrip(" ")
    if not _B64TOKEN.fullmatch(token):
        raise MalformedMessage("token is not a b64token")
    return token


def _gs2_header(text: str) -> tuple[str | None, str]:
    """Split off the GS2 header (RFC 5801 §4), returning (authzid, rest).

    RFC 7628 §3.1 has no channel binding, so only the ``n`` flag is taken.
    """
    flag, comma, rest = text.partition(",")
    if not comma:
        raise MalformedMessage("missing GS2 header")
    if flag == "y" or flag.startswith("p="):
        raise MalformedMessage("channel binding is not supported")
    if flag != "n":
        raise MalformedMessage("bad GS2 channel-binding flag")
    authzid, comma, rest = rest.partition(",")
    if not comma:
        raise MalformedMessage("unterminated GS2 header")
    if not authzid:
        return None, rest
    name = authzid[2:]
    # _SASLNAME tries its alternation at every character; a name without "=" (nothing
    # escaped, the usual case) matches it exactly when it is non-empty and free of "," and NUL.
    unescaped = name != "" and "=" not in name and "," not in name and "\x00" not in name
    if not authzid.startswith("a=") or not (unescaped or _SASLNAME.fullmatch(name)):
        raise MalformedMessage("bad authzid")
    # Most names have nothing escaped: skip the two replace() copies then.
    return (name.replace("=2C", ",").replace("=3D", "=") if "=" in name else name), rest


# The shape nearly every client sends (RFC 7628 §3.1, Postfix, Thunderbird, msmtp...): an
# unescaped authzid or none, then host, port and auth, each optional but auth, in that order.
# It is matched in one pass: at tens of thousands of logins a second the general parser's
# per-pair loop was the largest cost of a check. Whatever else is valid (escapes in the
# name, other keys or orders) and every error go to `_parse_oauthbearer`, which decides and
# says why; tests/sasl/test_mechanisms.py checks that both agree. ASCII, so that no other script's
# letter passes for one of "bearer" when the case is ignored.
_COMMON_OAUTHBEARER = re.compile(
    r"n,(?:a=(?P<identity>[^,=\x00]+))?,\x01"
    r"(?:host=(?P<host>[\x21-\x7e \t\r\n]*)\x01)?"
    r"(?:port=(?P<port>[0-9]{1,5})\x01)?"
    r"auth=(?i:bearer) +(?P<token>[A-Za-z0-9\-._~+/]+=*)\x01\x01", re.ASCII)


def parse_oauthbearer(message: bytes) -> Bearer:
    """Parse an OAUTHBEARER client response (RFC 7628 §3.1).

    ``gs2-header kvsep *kvpair kvsep``, e.g.
    ``n,a=user@example.com,^Ahost=h^Aport=143^Aauth=Bearer T^A^A``.
    """
    text = _decode(message)
    common = _COMMON_OAUTHBEARER.fullmatch(text)
    if common is None:
        return _parse_oauthbearer(text)
    port = common["port"]
    if port is not None and int(port) > 65535:
        raise MalformedMessage("port is not a number")
    return Bearer("OAUTHBEARER", common["identity"], common["token"], common["host"],
                  None if port is None else int(port))


def _parse_oauthbearer(text: str) -> Bearer:
    """Parse any decoded OAUTHBEARER client response, or say what is wrong with it."""
    identity, rest = _gs2_header(text)
    # After the header come kvsep, the pairs, and a final kvsep.
    if not rest.startswith(_KVSEP):
        raise MalformedMessage("missing separator after GS2 header")
    if not rest.endswith(_KVSEP * 2):
        raise MalformedMessage("missing terminator")
    pairs = _pairs(rest[1:-1], ("auth", "host", "port"))
    port = pairs.get("port")
    # isascii() + isdigit() is [0-9]+ (isdigit() alone takes other scripts' digits too).
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise MalformedMessage("port is not a number")
    return Bearer(
        mechanism="OAUTHBEARER",
        identity=identity,
        token=_bearer_token(pairs),
        host=pairs.get("host"),
        port=None if port is None else int(port),
    )


def parse_xoauth2(message: bytes) -> Bearer:
    """Parse an XOAUTH2 client response: ``user=U^Aauth=Bearer T^A^A``.

    The format is Google's (developers.google.com/gmail/imap/xoauth2-protocol);
    its pairs follow the RFC 7628 §3.1 grammar, so they are parsed the same way.
    """
    text = _decode(message)
    if not text.endswith(_KVSEP * 2):
        raise MalformedMessage("missing terminator")
    pairs = _pairs(text[:-1], ("auth", "user"))
    if not pairs.get("user"):
        raise MalformedMessage("missing user")
    return Bearer(mechanism="XOAUTH2", identity=pairs["user"], token=_bearer_token(pairs))


def parse_plain(message: bytes) -> Bearer:
    """Parse a PLAIN message (RFC 4616 §2): ``[authzid] NUL authcid NUL passwd``.

    The password is taken as the access token. Proxy authentication (an
    authzid other than the authcid) is refused: a token speaks for one user.
    """
    if len(message) > MAX_MESSAGE:
        raise MalformedMessage("message too long")
    fields = message.split(b"\x00")
    if len(fields) != 3:
        raise MalformedMessage("PLAIN needs exactly two NUL separators")
    try:
        authzid, authcid, passwd = (field.decode("utf-8") for field in fields)
    except UnicodeDecodeError:
        raise MalformedMessage("message is not UTF-8") from None
    if not authcid:
        raise MalformedMessage("empty authcid")
    if authzid and authzid != authcid:
        raise MalformedMessage("proxy authorization is not supported")
    if not _B64TOKEN.fullmatch(passwd):
        raise MalformedMessage("password is not a b64token")
    return Bearer(mechanism="PLAIN", identity=authcid, token=passwd)


_PARSERS = {"OAUTHBEARER": parse_oauthbearer, "XOAUTH2": parse_xoauth2, "PLAIN": parse_plain}


def checked_mechanisms(names: Iterable[str]) -> tuple[str, ...]:
    """`names` as a tuple, if it is a non-empty selection of MECHANISMS (else ValueError)."""
    mechanisms = tuple(names)
    if not mechanisms or not set(mechanisms) <= set(MECHANISMS):
        raise ValueError(f"mechanisms must be a non-empty subset of {MECHANISMS}")
    return mechanisms


def _json(fields: dict[str, str | None]) -> bytes:
    present = {key: value for key, value in fields.items() if value is not None}
    return json.dumps(present, separators=(",", ":")).encode("utf-8")


def error_challenge(status: str, scope: str | None, openid_configuration: str | None) -> bytes:
    """Build the OAUTHBEARER error challenge (RFC 7628 §3.2.2).

    Compact JSON with ``status`` and, when given, ``scope`` and
    ``openid-configuration``, in that order, as in RFC 7628 §4.3.
    """
    return _json(
        {"status": status, "scope": scope, "openid-configuration": openid_configuration}
    )


def _xoauth2_challenge(status: str, scope: str | None) -> bytes:
    """Build the XOAUTH2 error challenge, which names the scheme like Google's."""
    return _json({"status": status, "schemes": "bearer", "scope": scope})


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client and feed its response to ``receive``."""

    data: bytes


@dataclass(slots=True)
class Check:
    """Validate ``bearer``, then call ``accept()`` or ``reject()``."""

    bearer: Bearer


@dataclass(frozen=True, slots=True)
class Success:
    """The client is authenticated."""


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange failed; ``reason`` is for logs and never holds the token."""

    reason: str


Step = Challenge | Check | Success | Failure


class _State(enum.Enum):
    START = enum.auto()
    AWAIT_MESSAGE = enum.auto()
    CHECK = enum.auto()
    AWAIT_ACK = enum.auto()
    DONE = enum.auto()


class ServerExchange:
    """One server-side authentication, driven by the caller.

    ``receive`` takes each client response (``None`` for "no initial
    response") and returns the next :data:`Step`. OAUTHBEARER and XOAUTH2
    report errors in a challenge that the client must acknowledge before
    the exchange fails (RFC 7628 §3.2.3); PLAIN simply fails.
    """

    def __init__(self, mechanism: str, openid_configuration: str | None = None) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown SASL mechanism {mechanism!r}")
        self.mechanism = mechanism
        self._openid_configuration = openid_configuration
        self._state = _State.START
        self._reason = ""

    @property
    def expects_response(self) -> bool:
        """Whether the next call must be ``receive`` (the client's turn)."""
        return self._state in (_State.START, _State.AWAIT_MESSAGE, _State.AWAIT_ACK)

    def _require(self, *states: _State) -> None:
        if self._state not in states:
            raise ProtocolStateError(f"not allowed in state {self._state.name}")

    def receive(self, data: bytes | None) -> Step:
        """Take the client's next response and say what to do next."""
        self._require(_State.START, _State.AWAIT_MESSAGE, _State.AWAIT_ACK)
        if self._state is _State.AWAIT_ACK:
            return self._acknowledged(data)
        if not data:
            if self._state is _State.START:
                # RFC 4422 §5: without an initial response the server sends
                # an empty challenge and the client answers with its message.
                self._state = _State.AWAIT_MESSAGE
                return Challenge(b"")
            return self._error("invalid_request", None, "malformed: empty message")
        try:
            bearer = _PARSERS[self.mechanism](data)
        except MalformedMessage as error:
            return self._error("invalid_request", None, f"malformed: {error}")
        self._state = _State.CHECK
        return Check(bearer)

    def accept(self) -> Success:
        """The caller found the token valid (RFC 7628 §3.2.1)."""
        self._require(_State.CHECK)
        self._state = _State.DONE
        return Success()

    def reject(
        self, status: str, scope: str | None = None, reason: str = ""
    ) -> Challenge | Failure:
        """The caller refused the token; ``status`` is an RFC 7628 §3.2.2 code."""
        self._require(_State.CHECK)
        return self._error(status, scope, reason or status)

    def _error(self, status: str, scope: str | None, reason: str) -> Challenge | Failure:
        if self.mechanism == "PLAIN":
            self._state = _State.DONE
            return Failure(reason)
        self._state = _State.AWAIT_ACK
        self._reason = reason
        if self.mechanism == "XOAUTH2":
            return Challenge(_xoauth2_challenge(status, scope))
        return Challenge(error_challenge(status, scope, self._openid_configuration))

    def _acknowledged(self, data: bytes | None) -> Failure:
        """RFC 7628 §3.2.3: the client answers an error with a lone 0x01;
        XOAUTH2 clients answer with an empty response instead."""
        self._state = _State.DONE
        expected = b"\x01" if self.mechanism == "OAUTHBEARER" else b""
        if (data or b"") == expected:
            return Failure(self._reason)
        return Failure(f"{self._reason}; unexpected response after error")
