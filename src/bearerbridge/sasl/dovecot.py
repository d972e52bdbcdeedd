"""The server side of Dovecot's authentication protocol, for Postfix, Exim and Prosody.

Three layers, each testable alone:

- pure codec functions (:func:`handshake`, :func:`parse_line`, ``format_*``);
- :class:`DovecotAuthConnection`, a sans-IO state machine that turns lines
  and verdicts into lines to write and tokens to validate;
- :class:`DovecotAuthProtocol`, a thin ``LineOnlyReceiver`` that runs the
  validations and writes the replies.

The wire format is that of Dovecot 2.3's auth-client protocol version 1.2, as
Postfix, Exim and Prosody speak it: the server greets first (VERSION, MECH lines,
SPID, CUID, COOKIE, DONE) without waiting; request ids are matched, never counted
(Postfix's grow and skip, Exim's are always 1, Prosody's are not consecutive); an
OK names the user (Postfix and Prosody fail without it) and never echoes the
token; Postfix and Exim get an empty CONT when they sent no initial response,
while Prosody, whose session an empty CONT would crash, sends `resp==` instead.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport, ITransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure as TwistedFailure

from bearerbridge.connections import counted_address
from bearerbridge.guard import MemoryDoor
from bearerbridge.sasl.mechanisms import (
    MECHANISMS,
    Bearer,
    Challenge,
    Check,
    Failure,
    ServerExchange,
    Step,
    checked_mechanisms,
)
from bearerbridge.sasl.verdict import Reason, Validate, Verdict
from bearerbridge.throttle import Key
from bearerbridge.uses import LastUses

MAX_LINE = 16384
MAX_REQUESTS = 256
# A real peer never breaks the protocol: the errors it could make (a line we cannot parse, an
# unknown or repeated id, a mechanism we did not offer) are bugs. The first is logged, the rest
# only counted (each once cost a log line: 200 KB of empty lines wrote 23 MB), and this many
# close the connection. Not 1, so that one odd line does not cut Prosody's lifelong connection.
MAX_PROTOCOL_ERRORS = 10
# Postfix, Exim and Prosody send VERSION at once on connecting (Exim before it even reads ours),
# so a connection silent this long is no peer, only a descriptor held. Seconds rather than
# milliseconds, so that a reactor busy for a moment does not drop real peers. Nothing closes a
# connection once it has greeted: Postfix keeps one per smtpd process and Prosody one for its
# whole life, idle for as long as nobody logs in, and closing theirs would at best fail their
# next login; the cap per peer address (tap.py) bounds those instead.
HANDSHAKE_TIMEOUT = 10
# Dovecot marks its OAUTHBEARER and XOAUTH2 "plaintext" too, since the token is
# as good as a password. Keep them off unencrypted sessions with Postfix's
# `smtpd_tls_auth_only = yes`: its `noplaintext` makes smtpd exit when no
# mechanism is left (conf/postfix/main.cf.snippet).
MECH_FLAGS = {"OAUTHBEARER": "plaintext", "XOAUTH2": "plaintext", "PLAIN": "plaintext"}

_ESCAPES = {"\x00": "\x010", "\x01": "\x011", "\t": "\x01t", "\n": "\x01n", "\r": "\x01r"}
_UNESCAPES = {code[1]: char for char, code in _ESCAPES.items()}


class DovecotProtocolError(ValueError):
    """A line that breaks the protocol; ``request_id`` is set when it names one."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Version:
    major: int
    minor: int


@dataclass(frozen=True, slots=True)
class Cpid:
    pid: str


# Not frozen, like the other records built for every check: a frozen dataclass's __init__
# costs four times as much (bench/README.md). Treat them as immutable all the same.
@dataclass(slots=True)
class AuthRequest:
    """An ``AUTH`` line; ``params`` holds every ``key=value`` but ``resp``."""

    id: str
    mechanism: str
    service: str
    params: dict[str, str]
    flags: frozenset[str]
    initial_response: bytes | None


@dataclass(frozen=True, slots=True)
class Cont:
    id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str


Command = Version | Cpid | AuthRequest | Cont | Cancel


def tabescape(value: str) -> str:
    """Escape a value as Dovecot's ``str_tabescape`` does (NUL, ^A, TAB, LF, CR)."""
    if value.isprintable():  # none of the five is printable: the usual case, nothing to escape
        return value
    return "".join(_ESCAPES.get(char, char) for char in value)


def tabunescape(value: str) -> str:
    """Undo :func:`tabescape`; like Dovecot, ^A before any other char yields that char."""
    if "\x01" not in value:  # nearly every field of every line: skip the split and join
        return value
    head, *rest = value.split("\x01")
    out = [head]
    for chunk in rest:
        out.append(_UNESCAPES.get(chunk[:1], chunk[:1]) + chunk[1:])
    return "".join(out)


def handshake(mechanisms: Iterable[str], spid: int, cuid: int, cookie: str) -> bytes:
    """The lines the server sends first, unasked, on every connection."""
    lines = ["VERSION\t1\t2"]
    lines += [f"MECH\t{name}\t{MECH_FLAGS[name]}" for name in mechanisms]
    lines += [f"SPID\t{spid}", f"CUID\t{cuid}", f"COOKIE\t{cookie}", "DONE", ""]
    return "\n".join(lines).encode("ascii")


def format_ok(request_id: str, user: str) -> bytes:
    # `user=` is mandatory: Postfix and Prosody both fail without it.
    return f"OK\t{request_id}\tuser={tabescape(user)}\n".encode()


def format_fail(request_id: str, reason: str, temporary: bool = False) -> bytes:
    temp = "\ttemp" if temporary else ""
    return f"FAIL\t{request_id}\treason={tabescape(reason)}{temp}\n".encode()


def format_cont(request_id: str, data: bytes) -> bytes:
    # The third field is required even when empty, so the tab stays.
    return f"CONT\t{request_id}\t{base64.b64encode(data).decode('ascii')}\n".encode("ascii")


def _request_id(raw: bytes) -> str:
    # Dovecot's ids are unsigned 32-bit integers; anything else cannot be
    # echoed back safely, so such a line gets no reply.
    if not raw.isdigit() or len(raw) > 10:
        raise DovecotProtocolError("bad request id")
    return raw.decode("ascii")


def _base64(value: bytes, request_id: str) -> bytes:
    # Prosody sends `=` for an empty response, as XMPP does (RFC 6120 §6.4.2).
    if value == b"=":
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DovecotProtocolError("invalid base64", request_id) from None


def _parse_auth(line: bytes) -> AuthRequest:
    """``ID TAB MECHANISM *(TAB key[=value])``: an AUTH line without its command name."""
    # Dovecot ignores whatever follows `resp`, which must come last. It is base64, with
    # nothing to unescape, so the longest field of the line is never made text.
    head, has_response, after = line.partition(b"\tresp=")
    response = after.partition(b"\t")[0] if has_response else None
    raw_id, _, rest = head.partition(b"\t")
    request_id = _request_id(raw_id)
    try:
        text = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise DovecotProtocolError("line is not UTF-8", request_id) from None
    mechanism, *fields = text.split("\t")
    if "\x01" in text:  # only escaped lines pay for unescaping
        mechanism, fields = tabunescape(mechanism), [tabunescape(f) for f in fields]
    if not mechanism:
        raise DovecotProtocolError("AUTH without mechanism", request_id)
    params: dict[str, str] = {}
    flags: set[str] = set()
    for entry in fields:
        key, equals, value = entry.partition("=")
        if key == "resp" and equals:  # one whose key was escaped: unescaped, it is the response all the same
            response = value.encode()
            break
        if equals:
            params[key] = value
        else:
            flags.add(key)
    service = params.get("service")
    if not service:
        raise DovecotProtocolError("AUTH without service", request_id)
    initial_response = None if response is None else _base64(response, request_id)
    return AuthRequest(request_id, mechanism.upper(), service, params, frozenset(flags), initial_response)


def _small_number(field: bytes) -> bool:
    """Digits, few enough for `int()`: past 4,300 it raises ValueError, and no version needs ten."""
    return 0 < len(field) <= 9 and field.isdigit()


def parse_line(line: bytes) -> Command:
    """Parse one client line (without its LF) into a command.

    Raises :class:`DovecotProtocolError`; its message never quotes the line,
    which may carry a token.
    """
    if line.startswith(b"AUTH\t"):  # nearly every line: the others are split into fields
        return _parse_auth(line[5:])
    name, *args = line.split(b"\t")
    if name == b"VERSION" and len(args) >= 2 and _small_number(args[0]) and _small_number(args[1]):
        return Version(int(args[0]), int(args[1]))
    if name == b"CPID" and len(args) == 1:
        return Cpid(args[0].decode("ascii", "replace"))
    if name == b"CONT" and args:
        request_id = _request_id(args[0])
        if len(args) != 2:
            raise DovecotProtocolError("CONT needs exactly one response", request_id)
        return Cont(request_id, _base64(args[1], request_id))
    if name == b"CANCEL" and len(args) == 1:
        return Cancel(_request_id(args[0]))
    raise DovecotProtocolError("unknown or malformed command")


@dataclass(slots=True)
class Validation:
    """A token to validate for a live request; hand it back with the verdict."""

    request: AuthRequest
    bearer: Bearer


@dataclass(slots=True)
class Decision:
    """The outcome of one request, for logs and metrics; never holds the token."""

    request_id: str
    mechanism: str
    service: str
    user: str | None
    ok: bool
    reason: Reason | str


@dataclass(slots=True)
class Output:
    """What the connection wants done, in order: write, validate, maybe close."""

    lines: list[bytes] = field(default_factory=list)
    validations: list[Validation] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    close: bool = False


@dataclass(slots=True)
class _Live:
    request: AuthRequest
    exchange: ServerExchange
    pending: Validation | None = None
    decided: bool = False


class DovecotAuthConnection:
    """Sans-IO state of one client connection: its handshake and live requests.

    Requests are keyed by the client's id and answered in any order. A
    verdict whose request was cancelled, replaced or lost is dropped.
    """

    def __init__(
        self,
        mechanisms: Iterable[str] = MECHANISMS,
        openid_configuration: str | None = None,
    ) -> None:
        self.mechanisms = checked_mechanisms(mechanisms)
        self._openid_configuration = openid_configuration
        self._version_seen = False
        # Prosody greets with VERSION 1 1 (Postfix and Exim with 1 0), and an empty
        # challenge crashes its session whatever service name it was configured with.
        self._prosody = False
        self._live: dict[str, _Live] = {}
        self.protocol_errors = 0

    @property
    def greeted(self) -> bool:
        """Whether the client has sent a VERSION we speak."""
        return self._version_seen

    def line_received(self, line: bytes) -> Output:
        """Parse one line and act on it; protocol errors become replies here."""
        try:
            command = parse_line(line)
        except DovecotProtocolError as error:
            out = Output()
            if error.request_id is None or not self._version_seen:
                self._protocol_error(out, f"ignored line: {error}")
                return self._handshake_check(out)
            # A broken line for a live request ends it: one reply per id.
            live = self._live.pop(error.request_id, None)
            self._fail_unstarted(out, error.request_id, str(error), live.request if live else None)
            return out
        return self.receive(command)

    def _handshake_check(self, out: Output) -> Output:
        # Before VERSION nothing can be trusted to be this protocol at all.
        if not self._version_seen:
            out.problems.append("client skipped the VERSION handshake")
            out.close = True
        return out

    def receive(self, command: Command) -> Output:
        """Act on one parsed command."""
        out = Output()
        if isinstance(command, Version):
            if command.major != 1:
                out.problems.append(f"incompatible protocol version {command.major}")
                out.close = True
            else:
                self._version_seen = True
                self._prosody = command.minor == 1
            return out
        if not self._version_seen:
            return self._handshake_check(out)
        if isinstance(command, AuthRequest):
            self._auth(out, command)
        elif isinstance(command, Cont):
            self._cont(out, command)
        elif isinstance(command, Cancel):
            self._live.pop(command.id, None)
        return out

    def verdict(self, validation: Validation, verdict: Verdict) -> Output:
        """Apply the validator's verdict on ``validation``'s token."""
        out = Output()
        live = self._live.get(validation.request.id)
        if live is None or live.pending is not validation:
            return out  # cancelled, replaced or its connection gone: nothing wrong, nobody to tell
        live.pending = None
        bearer = validation.bearer
        if verdict.accepted:
            live.exchange.accept()
            self._decide(out, live, verdict.username, True, verdict.reason or Reason.OK)
            # `accepted` means there is a name, which the type checker cannot see through the property.
            self._finish(out, live, format_ok(live.request.id, verdict.username))  # type: ignore[arg-type]
        elif (reason := verdict.unavailable) is not None:
            self._decide(out, live, bearer.identity, False, reason)
            self._finish(out, live, format_fail(live.request.id, reason, temporary=True))
        else:
            self._decide(out, live, bearer.identity, False, verdict.reason or verdict.status)
            # The client sees only the RFC 7628 status (Postfix shows FAIL's reason to it):
            # telling "revoked" from "unknown" would help whoever holds a stolen token.
            self._step(out, live, live.exchange.reject(verdict.status, verdict.scope, verdict.status))
        return out

    def lost(self) -> None:
        """The connection is gone: every answer still to come will be dropped."""
        self._live.clear()

    def _auth(self, out: Output, request: AuthRequest) -> None:
        if self._live.pop(request.id, None) is not None:
            self._fail_unstarted(out, request.id, "duplicate request id", request)
        elif len(self._live) >= MAX_REQUESTS:
            self._fail_unstarted(out, request.id, "too many concurrent requests", request)
        elif request.mechanism not in self.mechanisms:
            self._fail_unstarted(out, request.id, "unsupported mechanism", request)
        else:
            live = _Live(request, ServerExchange(request.mechanism, self._openid_configuration))
            self._live[request.id] = live
            self._step(out, live, live.exchange.receive(request.initial_response))

    def _cont(self, out: Output, cont: Cont) -> None:
        live = self._live.get(cont.id)
        if live is None:
            self._fail_unstarted(out, cont.id, "unknown request id")
        elif not live.exchange.expects_response:
            # The client spoke while its token was being checked.
            self._live.pop(cont.id)
            self._fail_unstarted(out, cont.id, "response out of turn", live.request)
        else:
            self._step(out, live, live.exchange.receive(cont.data))

    def _step(self, out: Output, live: _Live, step: Step) -> None:
        """Carry out what the exchange asks; ``receive`` never yields Success."""
        request = live.request
        if isinstance(step, Check):
            live.pending = Validation(request, step.bearer)
            out.validations.append(live.pending)
        elif isinstance(step, Challenge) and not step.data and (self._prosody or request.service.lower() == "xmpp"):
            # An empty CONT crashes Prosody's session, so refuse instead.
            self._decide(out, live, None, False, "initial response required")
            self._finish(out, live, format_fail(request.id, "initial response required"))
        elif isinstance(step, Challenge):
            out.lines.append(format_cont(request.id, step.data))
        elif isinstance(step, Failure):
            if not live.decided:
                self._decide(out, live, None, False, step.reason)
            self._finish(out, live, format_fail(request.id, step.reason))

    def _finish(self, out: Output, live: _Live, line: bytes) -> None:
        self._live.pop(live.request.id, None)
        out.lines.append(line)

    def _decide(self, out: Output, live: _Live, user: str | None, ok: bool, reason: str) -> None:
        live.decided = True
        request = live.request
        out.decisions.append(
            Decision(request.id, request.mechanism, request.service, user, ok, reason)
        )

    def _fail_unstarted(
        self, out: Output, request_id: str, reason: str, request: AuthRequest | None = None
    ) -> None:
        """FAIL a request that has no exchange (any more)."""
        # Only offered names reach logs and metrics, so a client cannot mint labels.
        mechanism = request.mechanism if request and request.mechanism in self.mechanisms else "-"
        service = request.service if request else "-"
        out.decisions.append(Decision(request_id, mechanism, service, None, False, reason))
        out.lines.append(format_fail(request_id, reason))
        self._protocol_error(out, reason)

    def _protocol_error(self, out: Output, reason: str) -> None:
        """Count an error no real peer makes: report the first, close at MAX_PROTOCOL_ERRORS."""
        self.protocol_errors += 1
        if self.protocol_errors == 1:
            out.problems.append(f"{reason} (further protocol errors are only counted; "
                                f"{MAX_PROTOCOL_ERRORS} close the connection)")
        if self.protocol_errors >= MAX_PROTOCOL_ERRORS:
            out.close = True


log = Logger()


class DecisionLog:
    """Every decision, logged in batches: at tens of thousands of checks a second, a log
    event each costs more than the check itself (bench/README.md). Lines are formatted at
    once and written as one event every `interval` seconds, or as soon as `max_lines`
    have gathered: writing costs about a microsecond a line, and the server answers no one
    while it writes, so a batch must stay small. The price: a crash (kill -9) loses the batch
    being gathered, at most `max_lines` - 1 decisions of the last `interval` seconds (README);
    a normal stop writes it (DovecotAuthFactory.stopFactory)."""

    def __init__(self, clock: IReactorTime, interval: float = 0.25, max_lines: int = 200) -> None:
        self._clock = clock
        self._interval = interval
        self._max_lines = max_lines
        self._lines: list[str] = []
        self._flush_call: IDelayedCall | None = None

    def add(self, decision: Decision) -> None:
        # repr() because user and service come from the client and could otherwise forge lines.
        self._lines.append(
            f"auth {'ok' if decision.ok else 'failed'}: user={decision.user!r} service={decision.service!r} "
            f"mechanism={decision.mechanism} id={decision.request_id} reason={str(decision.reason)!r}")
        if len(self._lines) >= self._max_lines:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(self._interval, self.flush)

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        lines, self._lines = self._lines, []
        if lines:
            log.info("{decisions}", decisions="\n".join(lines))


def _ignore_decision(mechanism: str, service: str, ok: bool, reason: str) -> None:
    """The default ``on_decision``: no metrics."""


def _peer_name(address: IAddress) -> str:
    return address.host if isinstance(address, (IPv4Address, IPv6Address)) else "(UNIX socket)"


class DovecotAuthProtocol(LineOnlyReceiver, TimeoutMixin):
    """One auth-client connection: writes the handshake, runs validations.

    A validation that takes longer than ``timeout`` seconds is answered as a
    temporary failure, because Postfix gives up after 10 s and Prosody blocks
    while it waits. A client that has not sent VERSION within HANDSHAKE_TIMEOUT
    seconds is disconnected; one that has, never for being idle.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    # Not None here: makeConnection sets it before connectionMade, and nothing unsets it.
    transport: ITransport

    def __init__(
        self,
        validate: Validate,
        openid_configuration: str | None = None,
        mechanisms: Iterable[str] = MECHANISMS,
        on_decision: Callable[[str, str, bool, str], None] = _ignore_decision,
        cuid: int = 1,
        clock: IReactorTime | None = None,
        timeout: float = 5.0,
        decision_log: DecisionLog | None = None,
        door: MemoryDoor | None = None,
        uses: LastUses | None = None,
    ) -> None:
        if clock is None:
            # Imported late so that importing this module installs no reactor.
            from twisted.internet import reactor

            clock = reactor
        self._connection = DovecotAuthConnection(mechanisms, openid_configuration)
        self._validate = validate
        self._on_decision = on_decision
        self._cuid = cuid
        self._clock: IReactorTime = clock
        self._timeout = timeout
        self._decision_log = decision_log or DecisionLog(clock)
        # Failed logins, per user named and per remote address (`rip`): answered late, and an
        # address that keeps failing refused unchecked for a while; None: no throttle.
        self._door = door
        # Where an accepted login's grant is noted as used at this service from `rip` (None: nowhere).
        self._uses = uses
        self._replies: list[bytes] | None = None  # collected while dataReceived runs
        self._peer = "?"

    def callLater(self, period: float, func: Callable[[], None]) -> IDelayedCall:
        """TimeoutMixin's clock: ours, not the global reactor."""
        return self._clock.callLater(period, func)

    def connectionMade(self) -> None:
        transport = self.transport
        self._peer = _peer_name(transport.getPeer())
        self.setTimeout(HANDSHAKE_TIMEOUT)
        if ITCPTransport.providedBy(transport) and isinstance(transport.getHost(), (IPv4Address, IPv6Address)):
            # Without it, a reply written while the last one is still unacknowledged waits for
            # the peer's delayed ACK: 40 ms stalls whenever a client has two requests in flight.
            transport.setTcpNoDelay(True)
        cookie = secrets.token_hex(16)
        self.transport.write(
            handshake(self._connection.mechanisms, os.getpid(), self._cuid, cookie)
        )

    def dataReceived(self, data: bytes) -> None:
        # The replies to all the lines of one read go out in one write: most are answered
        # from the validator's memory while the lines are read (bench/README.md).
        self._replies = []
        try:
            LineOnlyReceiver.dataReceived(self, data)
        finally:
            self._flush()
        if self.timeOut is not None and self._connection.greeted:  # once per read, not per line
            self.setTimeout(None)  # the handshake deadline is met; no other applies

    def lineReceived(self, line: bytes) -> None:
        self._apply(self._connection.line_received(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("Dovecot auth client {peer}: line longer than {max} bytes, closing", peer=self._peer, max=MAX_LINE)
        self._close()

    def connectionLost(self, reason: TwistedFailure = connectionDone) -> None:
        self.setTimeout(None)
        self._connection.lost()
        if (errors := self._connection.protocol_errors) > 1:  # the first was logged when it came
            log.warn("Dovecot auth client {peer}: {errors} protocol errors in all on a connection now closed",
                     peer=self._peer, errors=errors)

    def _apply(self, out: Output) -> None:
        for problem in out.problems:
            log.warn("Dovecot auth client {peer}: {problem}", peer=self._peer, problem=problem)
        for d in out.decisions:
            self._decision_log.add(d)
            self._on_decision(d.mechanism, d.service, d.ok, d.reason)
        if self._replies is not None:
            self._replies += out.lines
        elif out.lines:  # an answer from the database, outside dataReceived
            self.transport.write(b"".join(out.lines))
        for validation in out.validations:
            self._start(validation)
        if out.close:
            self._close()

    def _flush(self) -> None:
        replies, self._replies = self._replies, None
        if replies:
            self.transport.write(b"".join(replies))

    def _close(self) -> None:
        self._flush()  # what was answered before the close still goes out
        self.transport.loseConnection()

    def _start(self, validation: Validation) -> None:
        door = self._door
        if door is not None and door.counts and door.blocked_for(self._throttle_keys(door, validation)):
            # Held like a failure, so that a blocked client sending thousands a second gets as
            # few answers as a failing one, not a fast loop of refusals.
            self._clock.callLater(door.rules.max_delay, self._apply_verdict,
                                  Verdict(False, temporary=True, reason=Reason.THROTTLED), validation)
            return
        try:
            result = self._validate(validation.bearer, validation.request.service)
        except Exception:
            result = defer.fail()
        if isinstance(result, Verdict):  # the validator's memory answered
            self._answer(result, validation)
            return
        d = defer.maybeDeferred(lambda: result)  # a Deferred, a coroutine or a Failure
        if not d.called:
            d.addTimeout(self._timeout, self._clock)
        # One callback for both outcomes (it logs its own errors): every add* runs the chain.
        d.addBoth(self._answer, validation)

    def _answer(self, result: Verdict | TwistedFailure, validation: Validation) -> None:
        try:
            if isinstance(result, TwistedFailure):
                result = self._validator_failed(result)
            if result.family is not None and self._uses is not None:  # accepted (Verdict.family)
                request = validation.request
                self._uses.note(result.family, request.service, request.params.get("rip"))
            delay = self._settle(result, validation)
            if delay:  # a failure, answered late as Dovecot's auth_failure_delay does: on a timer
                self._clock.callLater(delay, self._apply_verdict, result, validation)
                return
            self._apply(self._connection.verdict(validation, result))
        except Exception:
            log.failure("answering a Dovecot auth request")

    def _apply_verdict(self, verdict: Verdict, validation: Validation) -> None:
        try:
            self._apply(self._connection.verdict(validation, verdict))
        except Exception:
            log.failure("answering a Dovecot auth request")

    def _settle(self, verdict: Verdict, validation: Validation) -> float:
        """Count a checked login on the throttle; the seconds to hold a failure's answer."""
        door = self._door
        if door is None or verdict.unavailable is not None or (verdict.accepted and not door.counts):
            return 0.0  # no throttle; no check made; or no failures anywhere to forgive (the usual case)
        return door.outcome(self._throttle_keys(door, validation), ok=verdict.accepted)

    @staticmethod
    def _throttle_keys(door: MemoryDoor, validation: Validation) -> list[Key]:
        """The user the client named and the remote address its server passed (`rip`), if an address."""
        rip = validation.request.params.get("rip")
        try:
            address = counted_address(rip) if rip else None
        except ValueError:
            address = None
        return door.keys(validation.bearer.identity, address)

    def _validator_failed(self, failure: TwistedFailure) -> Verdict:
        if failure.check(defer.TimeoutError):
            return Verdict(ok=False, temporary=True, reason=Reason.VALIDATION_TIMED_OUT)
        log.failure("token validation failed", failure)
        return Verdict(ok=False, temporary=True, reason=Reason.VALIDATOR_ERROR)


class DovecotAuthFactory(Factory):
    """Builds a :class:`DovecotAuthProtocol` per connection, each with its own CUID.

    ``options`` are the protocol's keyword arguments other than ``cuid``.
    """

    def __init__(self, validate: Validate, **options: Any) -> None:
        if "decision_log" not in options:  # one for all connections, so batches fill up
            from twisted.internet import reactor

            options["decision_log"] = DecisionLog(options.get("clock") or reactor)
        self._validate = validate
        self._options = options
        self._cuids = itertools.count(1)

    def stopFactory(self) -> None:
        self._options["decision_log"].flush()  # leave no decision unwritten at shutdown

    def buildProtocol(self, addr: IAddress | None) -> DovecotAuthProtocol:
        protocol = DovecotAuthProtocol(self._validate, cuid=next(self._cuids), **self._options)
        protocol.factory = self
        return protocol
