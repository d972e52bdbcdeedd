"""`doveadm kick` over Dovecot's doveadm HTTP API, without I/O: whose sessions to end, the request,
and what the answer means.

Dovecot checks a token or a password only when a client logs in, so revoking a grant or an app
password, or disabling a user, leaves their open IMAP and POP3 connections working. `kick` ends
them: it looks up the user's connections in Dovecot's anvil and sends SIGTERM to the processes
serving them (the client reads `* BYE Server shutting down.`). Its `mask` takes at most one user
mask and at most one IP network (more of either is EX_USAGE, 64): a connection is kicked when
its user matches the mask (case-insensitive, `*` and `?` as wildcards) and, if a network is
given, its client address (Dovecot's `rip`) lies in it (src/doveadm/doveadm-kick.c and
doveadm-who.c, who_parse_args and who_line_filter_match, in 2.3.19.1). Through the API a kick is
always forced: a process also serving other users ends too (a non-default `client_limit` above
1). Several addresses therefore take one kick each, which one request carries: the API answers
every command of a JSON array in order, by tag. Before each kick a `who` with the same mask
counts the connections it ends.

Answers (ran on 2.3.19.1): 200 `[["doveadmResponse", [{"result": USER}], TAG]]` when something
was kicked; 200 `[["error", {"type": "exitCode", "exitCode": 68}, TAG]]` when nothing matched
(EX_NOTFOUND); 401 for a wrong key.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bearerbridge.config import DovecotSettings, SaslSettings
from bearerbridge.storage.account import ConnectedApp, Use
from bearerbridge.storage.apppasswords import AppPassword
from bearerbridge.storage.models import User

NOT_FOUND = 68  # doveadm's exit code when no connection matched the mask (EX_NOTFOUND)
EXIT_CODES = {64: "usage error", 67: "no such user", 68: "no connection matched", 75: "temporary failure",
              77: "permission denied", 1: "failure"}


class Outcome(enum.Enum):
    """What came of asking Dovecot to end a user's sessions."""

    ENDED = "ended"  # Dovecot ended live sessions
    NONE_OPEN = "none_open"  # no live session matched
    REFUSED = "refused"  # 401: Dovecot refused the API key
    UNREACHABLE = "unreachable"  # no connection, or no answer in time
    FAILED = "failed"  # any other answer, or a user name doveadm would read as a pattern

    @property
    def reached(self) -> bool:
        """Whether Dovecot did what was asked (ended the sessions, or there were none)."""
        return self in (Outcome.ENDED, Outcome.NONE_OPEN)


@dataclass(frozen=True)
class Target:
    """Whose sessions to end: a user as Dovecot names them, only those coming from `networks`
    (CIDR strings), or all of them when there are none."""

    user: str
    networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Kicked:
    """The outcome, how many connections ended, and why it failed (for the log and the audit)."""

    outcome: Outcome
    ended: int = 0
    reason: str = ""


def dovecot_name(user: User, form: str, realm: str) -> str:
    """The user's name in `form` (`config.REPORTED_NAMES`), as `sasl.judge.reported_name` gives
    it to a service: the email falls back to the username for a user without one."""
    if form == "email" and user.email:
        return user.email
    if form == "localpart":
        return user.username.split("@", 1)[0]
    if form == "user@realm":
        return f"{user.username}@{realm}"
    return user.username


def networks(addresses: Iterable[str]) -> tuple[str, ...]:
    """The networks to kick from: each address as a /32 or /128 (a stored network as it is),
    overlapping ones merged so that no connection is counted twice; what does not parse is left out."""
    parsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for address in addresses:
        try:
            parsed.append(ipaddress.ip_network(address, strict=False))
        except ValueError:
            continue
    merged = [*ipaddress.collapse_addresses(n for n in parsed if n.version == 4),
              *ipaddress.collapse_addresses(n for n in parsed if n.version == 6)]
    return tuple(str(n) for n in merged)


@dataclass(frozen=True)
class Reach:
    """What a revoked way into mail could have done at Dovecot, as `target_for` weighs it: the
    services it may open by name (an app password's), or the scopes it holds (a grant's; a service
    needs the scope `[sasl.services]` names for it, else its own name), and every (service,
    address) of its last uses (an address None when the use was recorded without one)."""

    seen_from: frozenset[tuple[str, str | None]] = frozenset()
    services: frozenset[str] = frozenset()
    scope: frozenset[str] = frozenset()

    @classmethod
    def of_grant(cls, app: ConnectedApp) -> Reach:
        """A grant: its scopes, and the last uses of every token family of it (each app instance
        signed in has its own)."""
        return cls(frozenset(app.seen_from), scope=frozenset(app.scope))

    @classmethod
    def of_app_password(cls, password: AppPassword, uses: Iterable[Use]) -> Reach:
        """An app password: the services it was made for, and its last use at each (its
        `token_uses` rows, family `app:<id>`)."""
        return cls(frozenset((use.service, use.address) for use in uses), services=password.services)


def target_for(user: User, reach: Reach | None, dovecot: DovecotSettings, sasl: SaslSettings) -> Target | None:
    """Whose Dovecot sessions revoking a way in (`reach`) must end; None when it could have opened
    none: no use at `[dovecot] services` and none of them among its services or scopes. The
    sessions from the addresses of its last uses there when `narrow_by_address` and every such
    use has one; else all of the user's (a way in never seen at Dovecot may still have logged in
    moments ago)."""
    if reach is None:
        return None
    addresses = [address for service, address in reach.seen_from if service in dovecot.services]
    scopes = {sasl.services.get(service, service) for service in dovecot.services}
    if not addresses and not reach.services & set(dovecot.services) and not reach.scope & scopes:
        return None
    everyone = all_sessions(user, dovecot, sasl)
    if dovecot.narrow_by_address and addresses and all(addresses):
        narrowed = networks(address for address in addresses if address)
        if narrowed:
            return Target(everyone.user, narrowed)
    return everyone


def all_sessions(user: User, dovecot: DovecotSettings, sasl: SaslSettings) -> Target:
    """Every Dovecot session of the user (when an admin disables them, say), named as Dovecot
    knows them: `[dovecot] username`, else what `[sasl.usernames]` reports to imap."""
    return Target(dovecot_name(user, dovecot.username or sasl.usernames.get("imap", "username"), sasl.realm))


def unusable(name: str) -> str | None:
    """Why a user name cannot be a kick's user mask, if it cannot: `*` and `?` are wildcards
    there (and cannot be escaped), so `bo*` would end every bob's and bono's sessions."""
    if not name:
        return "the user name is empty"
    if "*" in name or "?" in name:
        return f"the user name {name!r} holds * or ?, which doveadm reads as wildcards"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "the user name holds control characters"
    return None


def request_body(target: Target) -> bytes:
    """The JSON commands: for each network (or once for the whole user) a `who` listing the
    connections the mask matches, one a line, then the `kick`; tagged who0, kick0, who1, ..."""
    commands: list[list[Any]] = []
    for i, network in enumerate(target.networks or (None,)):
        mask = [target.user] if network is None else [target.user, network]
        commands.append(["who", {"mask": mask, "separate-connections": True}, f"who{i}"])
        commands.append(["kick", {"mask": mask}, f"kick{i}"])
    return json.dumps(commands).encode()


def request_headers(key: bytes) -> dict[bytes, list[bytes]]:
    """The API key goes as `Authorization: X-Dovecot-API <base64 key>` (doc.dovecot.org/2.3,
    admin_manual/doveadm_http_api)."""
    return {b"Authorization": [b"X-Dovecot-API " + base64.b64encode(key)],
            b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]}


def read_answer(status: int, body: bytes, target: Target) -> Kicked:
    """What Dovecot's answer to `request_body(target)` means. A kick that matched nothing (68) is
    no failure; one that failed otherwise makes the whole answer FAILED, with the connections the
    others ended still counted."""
    if status == 401:
        return Kicked(Outcome.REFUSED, reason="HTTP 401: Dovecot refused the API key (doveadm_key_file)")
    if status != 200:
        return Kicked(Outcome.FAILED, reason=f"HTTP {status}")
    try:
        answers = json.loads(body)
    except ValueError:
        return Kicked(Outcome.FAILED, reason="the answer is not JSON")
    by_tag = {}
    for answer in answers if isinstance(answers, list) else ():
        if isinstance(answer, list) and len(answer) == 3 and isinstance(answer[2], str):
            by_tag[answer[2]] = (answer[0], answer[1])
    ended, failures = 0, []
    for i in range(len(target.networks) or 1):
        kind, payload = by_tag.get(f"kick{i}", (None, None))
        if kind == "doveadmResponse":
            ended += max(_connections(by_tag.get(f"who{i}")), 1)  # kicked at least the one it names
        elif kind == "error" and isinstance(payload, dict) and payload.get("exitCode") == NOT_FOUND:
            continue
        elif kind == "error" and isinstance(payload, dict):
            code = payload.get("exitCode")
            meaning = EXIT_CODES.get(code, "unknown") if isinstance(code, int) else "unknown"
            failures.append(f"kick: {payload.get('type')}, exit code {code} ({meaning})")
        else:
            failures.append(f"no answer to kick{i}")
    if failures:
        return Kicked(Outcome.FAILED, ended, "; ".join(failures))
    return Kicked(Outcome.ENDED if ended else Outcome.NONE_OPEN, ended)


def _connections(answer: tuple[Any, Any] | None) -> int:
    """How many connections a `who -1` answer lists (one object each)."""
    if answer is None or answer[0] != "doveadmResponse" or not isinstance(answer[1], list):
        return 0
    return len(answer[1])
