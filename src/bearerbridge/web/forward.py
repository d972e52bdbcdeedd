"""GET /forward-auth: decides each request a reverse proxy forwards (nginx `auth_request`,
Traefik ForwardAuth, Caddy `forward_auth`) by the bearer token it carries.

The proxy sends the client's headers and names the original request: nginx (by its config) in
`X-Original-Method` and `X-Original-URI`, the host then being `Host`; Traefik and Caddy in
`X-Forwarded-Method`/`X-Forwarded-Uri`/`X-Forwarded-Host`. Traefik and Caddy also pass the
client's own headers on, so a request naming its URI or method both ways, or any of these
headers twice, is refused rather than believed either way.

Rules match the percent-decoded path, never the query; a URI that servers could read two ways
is refused (`canonical_path`). Path prefixes compare case-sensitively, as URL paths do (RFC 3986
§6.2.2.1); hosts case-insensitively, without the port and one trailing dot (`canonical_host`).
The first `[[forward_auth.rules]]` rule matching the host and path says which scope the
method needs: reading methods the rule's `read_scope`, all others its `write_scope`. Answers
(RFC 6750 §3): 200 with the user in `[forward_auth] user_header`; 401 `invalid_token` (or no
token); 403 `insufficient_scope`, also for a request no rule matches or that is refused.
nginx turns any other status into a 500, so nothing else is sent but 503 for an outage.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

from bearerbridge.config import ForwardAuthRule, ForwardAuthSettings
from bearerbridge.metrics import Metrics
from bearerbridge.sasl.verdict import Reason, Verdict
from bearerbridge.uses import LastUses
from bearerbridge.web.site import AsyncResource, Reply, bearer_token, client_address, when_ready

log = Logger()

# WebDAV (RFC 4918) and HTTP methods that only read; every other method writes.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"})


# The request target (RFC 9112 §3.2): origin-form `/path?query`, or absolute-form
# `http://host/path?query`, which Caddy passes on as the client sent it.
_ABSOLUTE = re.compile(r"https?://([^/?]*)", re.IGNORECASE | re.ASCII)
# Never in a URI (RFC 3986 §2): controls, space, anything beyond ASCII (servers read raw bytes as
# UTF-8 or as Latin-1); nor "#", a fragment no request carries: nginx cuts the path at it, Go's
# servers keep it in the path, and `/public#/../private/x` would be /public to one and
# /private/x to the other.
_NOT_IN_A_REQUEST = re.compile(r"[^\x21-\x7e]|#")
# Raw paths that servers resolve differently (RFC 3986 §6.2.2): empty and dot segments; "\",
# which some read as "/"; ";", with which Java servers (Tomcat, Jetty) start a path parameter
# and drop it (`/public/..;/private/x` is /private/x to them); "/", "\", ".", "#", "?" or ";"
# percent-encoded, which a server that decodes before it parses reads as the character itself;
# and a "%" that starts no escape, which some servers refuse and others keep.
_AMBIGUOUS = re.compile(r"//|/\.\.?(/|$)|[\\;]|%(2f|5c|2e|23|3f|3b)|%(?![0-9a-f]{2})", re.IGNORECASE | re.ASCII)
# An escape left after decoding once ("%252e" is "%2e"): a server decoding twice reads another path.
_ESCAPE = re.compile(r"%[0-9a-f]{2}", re.IGNORECASE | re.ASCII)
# Control characters, C0 and C1, in the decoded path (`%00`, `%0a`, `%c2%85`).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A Host (RFC 9110 §7.2): a DNS name or IPv4 address, or an IPv6 literal in brackets, and a port.
_HOST = re.compile(r"(?P<name>[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\])(?::[0-9]*)?",
                   re.IGNORECASE | re.ASCII)


def split_target(uri: str) -> tuple[str | None, str]:
    """(authority, path) of a request target; the authority None in origin-form, the query dropped."""
    absolute = _ABSOLUTE.match(uri)
    authority, rest = (absolute[1], uri[absolute.end():]) if absolute else (None, uri)
    return authority, rest.split("?", 1)[0]


def canonical_path(uri: str) -> str | None:
    """The percent-decoded path of an original request URI (the query takes no part), or None
    if servers could read it two ways: see `_NOT_IN_A_REQUEST`, `_AMBIGUOUS`, `_ESCAPE` and
    `_CONTROL`; also a path that is not UTF-8, overlong forms (`%c0%ae` for ".") included."""
    if _NOT_IN_A_REQUEST.search(uri):
        return None
    _, path = split_target(uri)
    if not path.startswith("/") or _AMBIGUOUS.search(path):
        return None
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if _ESCAPE.search(decoded) or _CONTROL.search(decoded):
        return None
    return decoded


def canonical_host(value: str) -> str | None:
    """The host a Host (or X-Forwarded-Host) header names: lowercase, without the port and one
    trailing dot (`Files.Example.:443` is files.example, the same DNS name); "" for none; None
    for anything else (`a..b`, userinfo, a list of hosts, non-ASCII)."""
    if not value:
        return ""
    found = _HOST.fullmatch(value)
    return found["name"].lower().removesuffix(".") if found else None


@dataclass(frozen=True, slots=True)
class Original:
    """The request a proxy asks about: its method, canonical host and canonical path. When it
    cannot be read one way only, `refused` says why, and host and path are as sent (for the log)."""
    method: str
    host: str
    path: str
    refused: Reason | None = None


# The headers naming the original request; each may come once at most.
_NAMES = (b"X-Original-Method", b"X-Original-URI", b"X-Forwarded-Method", b"X-Forwarded-Uri",
          b"X-Forwarded-Host", b"Host")


def original_request(request: Request) -> Original:
    """The request the proxy is asking about, or why it is refused.

    nginx names it in X-Original-Method/-URI (set by its config) and passes the client's own
    headers through: any X-Forwarded-Host then came from the client, so only Host counts.
    Traefik and Caddy set X-Forwarded-Method/-Uri/-Host themselves but pass a client's
    X-Original-URI on: with both URIs (or X-Original-URI and X-Forwarded-Method) one came
    from the client, and which is unknown. The method is case-sensitive (RFC 9110 §9.1):
    `get` is not a reading method."""
    sent: dict[bytes, str] = {}
    for name in _NAMES:
        values = request.requestHeaders.getRawHeaders(name) or []
        if len(values) > 1:
            return Original("", "", f"{name.decode()} twice", Reason.AMBIGUOUS_PATH)
        sent[name] = values[0].decode("latin-1") if values else ""
    if sent[b"X-Original-URI"]:
        method, uri, host = sent[b"X-Original-Method"], sent[b"X-Original-URI"], sent[b"Host"]
        if sent[b"X-Forwarded-Uri"] or sent[b"X-Forwarded-Method"]:
            return Original(method, host, uri, Reason.AMBIGUOUS_PATH)
    else:
        method, uri = sent[b"X-Forwarded-Method"], sent[b"X-Forwarded-Uri"] or "/"
        host = sent[b"X-Forwarded-Host"] or sent[b"Host"]
    method = method or "GET"
    canonical = canonical_host(host)
    if canonical is None:
        return Original(method, host, uri, Reason.MALFORMED)
    path = canonical_path(uri)
    authority, _ = split_target(uri)
    if path is None or (authority is not None and (not authority or canonical_host(authority) != canonical)):
        return Original(method, canonical, uri, Reason.AMBIGUOUS_PATH)
    return Original(method, canonical, path)


def matching_rule(rules: tuple[ForwardAuthRule, ...], host: str, path: str) -> ForwardAuthRule | None:
    """The first rule for `host` (a canonical host) whose prefix is `path` or one of its parents;
    the prefix compares case-sensitively, the rule's host as `canonical_host` reads a header."""
    for rule in rules:
        if rule.host and rule.host.lower().removesuffix(".") != host:
            continue
        prefix = rule.path_prefix.rstrip("/")
        if path == prefix or path.startswith(prefix + "/") or not prefix:
            return rule
    return None


def credentials(request: Request, rule: ForwardAuthRule) -> tuple[str | None, str | None]:
    """(identity, token): a bearer token, or with `basic` the password of HTTP Basic."""
    token = bearer_token(request)
    if token is not None or not rule.basic:
        return None, token
    scheme, _, encoded = (request.getHeader(b"authorization") or b"").decode("latin-1").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return (user or None), (password or None)


def forwarded_address(request: Request) -> str | None:
    """The address of the client the proxy asks about: X-Forwarded-For as `client_address` trusts
    it; None when the proxy sends none (its own address says nothing of the client)."""
    return client_address(request) if request.getHeader(b"x-forwarded-for") else None


class CheckScope(Protocol):
    """(token, identity named or None, scope[, service of a Basic password]) -> the Verdict, now or
    later: `Validator.check_scope`."""

    def __call__(self, token: str, identity: str | None, scope: str, service: str | None = ..., /
                 ) -> Verdict | defer.Deferred[Verdict]: ...


class ForwardAuth(AsyncResource):
    """/forward-auth: 200 with the user, 401 or 403 with an RFC 6750 challenge, or 503."""

    def __init__(self, check_scope: CheckScope, settings: ForwardAuthSettings, metrics: Metrics,
                 uses: LastUses | None = None) -> None:
        super().__init__()
        self._check_scope = check_scope
        self._settings = settings
        self._metrics = metrics
        self._uses = uses  # an accepted token's grant noted as used at the rule's service

    def render_GET(self, request: Request) -> int:
        return self._answer(request, self._get)

    def _challenge(self, rule: ForwardAuthRule | None, error: str = "", scope: str = "") -> dict[bytes, bytes]:
        bearer = f'Bearer realm="{self._settings.realm}"'
        if error:
            bearer += f', error="{error}"'
        if scope:
            bearer += f', scope="{scope}"'
        headers = {b"WWW-Authenticate": bearer.encode()}
        if rule is not None and rule.basic and not error:
            # Password-only clients need a Basic challenge to know what to send.
            headers[b"WWW-Authenticate"] = f'Basic realm="{self._settings.realm}", {bearer}'.encode()
        return headers

    def _get(self, request: Request) -> Reply | defer.Deferred[Reply]:
        asked = original_request(request)
        rule = None if asked.refused else matching_rule(self._settings.rules, asked.host, asked.path)
        if rule is None:
            self._record(asked.method, asked.host, asked.path, None, "-", False, asked.refused or Reason.NO_RULE)
            return Reply(403, b"", self._challenge(None, "insufficient_scope"))
        scope = rule.read_scope if asked.method in READ_METHODS else rule.write_scope
        identity, token = credentials(request, rule)
        if token is None:
            return Reply(401, b"", self._challenge(rule))
        if rule.basic and bearer_token(request) is None:  # a password: an app password for the rule's service too
            verdict = when_ready(self._check_scope(token, identity, scope, rule.service))
        else:
            verdict = when_ready(self._check_scope(token, identity, scope))
        return verdict.addCallback(self._decided, rule, scope, asked, request)

    def _decided(self, verdict: Verdict, rule: ForwardAuthRule, scope: str, asked: Original, request: Request
                 ) -> Reply:
        self._record(asked.method, asked.host, asked.path, verdict.username, scope, verdict.accepted, verdict.reason)
        if verdict.accepted and verdict.username:
            if verdict.family is not None and self._uses is not None:
                self._uses.note(verdict.family, rule.service, forwarded_address(request))
            return Reply(200, b"", {self._settings.user_header.encode(): verdict.username.encode()})
        if verdict.unavailable is not None:
            return Reply(503, b"", {})
        if verdict.status == "insufficient_scope":
            return Reply(403, b"", self._challenge(rule, "insufficient_scope", scope))
        return Reply(401, b"", self._challenge(rule, "invalid_token"))

    def _record(self, method: str, host: str, path: str, user: str | None, scope: str, ok: bool,
                reason: Reason | str) -> None:
        # repr(): method, host and path come from the client and must not forge log lines.
        log.info("forward-auth {result}: user={user!r} {method!r} {host!r}{path!r} scope={scope} reason={reason}",
                 result="ok" if ok else "failed", user=user, method=method, host=host, path=path, scope=scope,
                 reason=reason)
        self._metrics.sasl_decision("forward_auth", {scope}, "bearer", scope, ok, reason)
