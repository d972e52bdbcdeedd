"""GET /forward-auth: decides each request a reverse proxy forwards (nginx `auth_request`,
Traefik ForwardAuth, Caddy `forward_auth`) by the bearer token it carries.

The proxy sends the client's headers and names the original request in `X-Original-Method`
and `X-Original-URI` (nginx, by config; the host is then `Host`) or `X-Forwarded-Method`/
`X-Forwarded-Uri`/`X-Forwarded-Host` (Traefik, Caddy). Rules match the percent-decoded path;
a path that servers could read differently (`//`, dot segments, encoded `/` or `.`) is refused.
The first `[[forward_auth.rules]]` rule matching the host and path says which scope the
method needs: reading methods the rule's `read_scope`, all others its `write_scope`. Answers
(RFC 6750 §3): 200 with the user in `[forward_auth] user_header`; 401 `invalid_token` (or no
token); 403 `insufficient_scope`.
nginx turns any other status into a 500, so nothing else is sent but 503 for an outage.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

from bearerbridge.config import ForwardAuthRule, ForwardAuthSettings
from bearerbridge.metrics import Metrics
from bearerbridge.sasl.verdict import Reason, Verdict
from bearerbridge.web.site import AsyncResource, Reply, bearer_token, when_ready

log = Logger()

# WebDAV (RFC 4918) and HTTP methods that only read; every other method writes.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"})


# Raw paths that different servers resolve differently: empty or dot segments, and encoded
# "/" or "." (RFC 3986 §6.2.2). A rule decided on one reading while the backend serves another
# would be an authorization bypass, so these are refused rather than guessed at.
_AMBIGUOUS = re.compile(r"//|/\.\.?(/|$)|%2f|%2e|%5c|\\", re.IGNORECASE)


def canonical_path(uri: str) -> str | None:
    """The percent-decoded path of an original request URI, or None if it is ambiguous."""
    path = urlsplit(uri).path if "://" in uri else uri.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/") or _AMBIGUOUS.search(path):
        return None
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 0x20 or c == "\x7f" for c in decoded):
        return None
    return decoded


def original_request(request: Request) -> tuple[str, str, str | None]:
    """(method, host, canonical path or None) of the request the proxy is asking about.

    nginx names it in X-Original-Method/-URI (set by its config) and passes the client's
    own headers through: any X-Forwarded-* then came from the client, so only Host counts.
    Traefik and Caddy set X-Forwarded-Method/-Uri/-Host themselves."""
    def header(name: str) -> str:
        return (request.getHeader(name.encode()) or b"").decode("latin-1")
    if header("X-Original-URI"):
        method, uri, host = header("X-Original-Method"), header("X-Original-URI"), header("Host")
    else:
        method, uri = header("X-Forwarded-Method"), header("X-Forwarded-Uri")
        host = header("X-Forwarded-Host") or header("Host")
    return (method or "GET").upper(), host.split(":")[0].lower(), canonical_path(uri or "/")


def matching_rule(rules: tuple[ForwardAuthRule, ...], host: str, path: str) -> ForwardAuthRule | None:
    for rule in rules:
        if rule.host and rule.host.lower() != host:
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


# (token, identity named or None, scope) -> the Verdict, now or later: `Validator.check_scope`.
CheckScope = Callable[[str, "str | None", str], "Verdict | defer.Deferred[Verdict]"]


class ForwardAuth(AsyncResource):
    """/forward-auth: 200 with the user, 401 or 403 with an RFC 6750 challenge, or 503."""

    def __init__(self, check_scope: CheckScope, settings: ForwardAuthSettings, metrics: Metrics) -> None:
        super().__init__()
        self._check_scope = check_scope
        self._settings = settings
        self._metrics = metrics

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
        method, host, path = original_request(request)
        rule = matching_rule(self._settings.rules, host, path) if path is not None else None
        if rule is None:
            reason = Reason.NO_RULE if path is not None else Reason.AMBIGUOUS_PATH
            self._record(method, host, path, None, "-", False, reason)
            return Reply(403, b"", self._challenge(None, "insufficient_scope"))
        scope = rule.read_scope if method in READ_METHODS else rule.write_scope
        identity, token = credentials(request, rule)
        if token is None:
            return Reply(401, b"", self._challenge(rule))
        verdict = when_ready(self._check_scope(token, identity, scope))
        return verdict.addCallback(self._decided, rule, scope, method, host, path)

    def _decided(self, verdict: Verdict, rule: ForwardAuthRule, scope: str, method: str, host: str,
                 path: str | None) -> Reply:
        self._record(method, host, path, verdict.username, scope, verdict.accepted, verdict.reason)
        if verdict.accepted and verdict.username:
            return Reply(200, b"", {self._settings.user_header.encode(): verdict.username.encode()})
        if verdict.unavailable is not None:
            return Reply(503, b"", {})
        if verdict.status == "insufficient_scope":
            return Reply(403, b"", self._challenge(rule, "insufficient_scope", scope))
        return Reply(401, b"", self._challenge(rule, "invalid_token"))

    def _record(self, method: str, host: str, path: str | None, user: str | None, scope: str, ok: bool,
                reason: Reason | str) -> None:
        # repr(): method, host and path come from the client and must not forge log lines.
        log.info("forward-auth {result}: user={user!r} {method!r} {host!r}{path!r} scope={scope} reason={reason}",
                 result="ok" if ok else "failed", user=user, method=method, host=host, path=path, scope=scope,
                 reason=reason)
        self._metrics.sasl_decision("forward_auth", {scope}, "bearer", scope, ok, reason)
