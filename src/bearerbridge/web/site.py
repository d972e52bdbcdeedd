"""The plumbing every HTTP face shares: reading a request, writing a reply, error pages, the Site.

Each handler snapshots the request on the reactor thread (`snapshot`), makes at most one
hop to the store pool, and returns a `Reply` (or a Deferred of one) that `AsyncResource`
writes. Pages are Jinja2 templates; every response refuses framing. A failure becomes our
own answer, a page for a person or JSON for a program, never Twisted's traceback page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, TemplateError, TemplateSyntaxError, select_autoescape
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File

from bearerbridge.config import ConfigError, PagesSettings, logo_origin
from bearerbridge.connections import counted_address, peer_address
from bearerbridge.oauth.requests import HttpRequest, MalformedRequest
from bearerbridge.storage.pool import DatabaseUnavailable
from bearerbridge.web.theme import Theme, allow, builtin_loader
from bearerbridge.web.theme import loader as theme_loader

log = Logger()
T = TypeVar("T")

MAX_BODY = 64 * 1024
MAX_FIELDS = 64
# Seconds from a request's first byte to the end of its head (request line and headers, at most
# Twisted's 16 KiB), and from there to the end of its body (at most MAX_BODY). Twisted's own idle
# timeout (60 s) restarts with every byte, so a client sending one byte a minute held a
# connection for ever; these do not restart. They leave room for a slow link: 64 KiB in 20 s
# needs 26 kbit/s.
HEAD_DEADLINE = 10.0
BODY_DEADLINE = 20.0
SECURITY_HEADERS = {
    b"X-Frame-Options": b"DENY",
    b"Content-Security-Policy": b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
}
JSON_HEADERS = {b"Content-Type": b"application/json", b"Cache-Control": b"no-store", b"Pragma": b"no-cache"}


def row_id(text: str) -> int | None:
    """The id of a database row as an address or a form names it; None if it names none. Only
    a few ASCII digits: str.isdigit() also takes "²", which int() refuses, and numbers no
    integer column holds."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else None


class BadRequest(Exception):
    """Hostile or malformed HTTP input, answered with invalid_request."""


def parse_query(raw: bytes | str) -> dict[str, list[str]]:
    """A query string or form body: strict UTF-8, at most MAX_FIELDS fields (else BadRequest).

    Strict after percent-decoding too: parse_qs's default would read `%FF` as U+FFFD, so that
    different values (two `state`s, say) came out the same (found by tests/web/test_fuzz.py)."""
    try:
        return parse_qs(raw if isinstance(raw, str) else raw.decode("utf-8", "strict"),
                        keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The parameters are malformed or too many") from None


def posted_form(request: Request) -> dict[str, list[str]]:
    """The fields of a form posted (application/x-www-form-urlencoded); none for anything else."""
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if request.method != b"POST" or content_type != b"application/x-www-form-urlencoded":
        return {}
    assert request.content is not None  # twisted.web has read the body before rendering
    request.content.seek(0)
    body = request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise BadRequest("The request body is too large")
    return parse_query(body)


def snapshot(request: Request, issuer: str) -> HttpRequest:
    """Copy what authlib needs out of a twisted.web request (query and form kept apart)."""
    raw_query = urlsplit(request.uri).query
    form = posted_form(request)
    headers = {name.decode("latin-1"): b", ".join(values).decode("latin-1")
               for name, values in request.requestHeaders.getAllRawHeaders()}
    uri = issuer.rstrip("/") + request.uri.decode("latin-1")
    return HttpRequest(request.method.decode("ascii"), uri, headers, parse_query(raw_query), form,
                       client_address(request))


def client_address(request: Request) -> str | None:
    """The address a request came from, as throttling and the audit log count it: an IPv4
    address or an IPv6 /64 (`connections.peer_address`); None on a UNIX socket. From a proxy
    the site trusts (`[http] trusted_proxies`), the last address of X-Forwarded-For: the one
    that proxy saw; a header from anyone else is ignored, as anyone can write one."""
    peer = request.getClientAddress()
    forwarded = request.getHeader(b"x-forwarded-for")
    trusted: frozenset[str] = getattr(getattr(request, "site", None), "trusted_proxies", frozenset())
    if forwarded and isinstance(peer, (IPv4Address, IPv6Address)) and peer.host in trusted:
        try:
            return counted_address(forwarded.decode("latin-1").rpartition(",")[2].strip())
        except ValueError:
            pass  # not an address: count the proxy's
    return peer_address(peer)


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header (RFC 6750 §2.1), if any."""
    scheme, _, token = (request.getHeader(b"authorization") or b"").decode("latin-1").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[bytes, bytes]


def json_reply(status: int, body: Any, headers: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> Reply:
    """A JSON answer that no cache keeps (RFC 6749 §5.1), with any headers authlib added."""
    merged = dict(JSON_HEADERS)
    merged.update({k.encode(): v.encode() for k, v in dict(headers).items()})
    return Reply(status, json.dumps(body).encode(), merged)


def json_error(status: int, error: str, description: str) -> Reply:
    """An OAuth-style error for a program (RFC 6749 §5.2)."""
    return json_reply(status, {"error": error, "error_description": description})


def retry_after(seconds: float | None) -> dict[bytes, bytes]:
    """The Retry-After header of a 429 (RFC 6585 §4), in whole seconds; none without a wait."""
    return {} if seconds is None else {b"Retry-After": str(max(1, math.ceil(seconds))).encode()}


UNAVAILABLE = "The service is temporarily unavailable; try again shortly"


class Pages:
    """The Jinja2 templates, the operator's (`[pages] templates`) before the built-in ones, with the
    site name and the theme (web/theme.py) filled in. With an operator's directory, every template
    is compiled at start, so that a mistake in one stops it (ConfigError, naming the file and line);
    one that fails while rendering is logged and the built-in template answers instead."""

    def __init__(self, site_name: str, settings: PagesSettings | None = None) -> None:
        settings = settings or PagesSettings()
        theme = Theme.of(settings, SECURITY_HEADERS[b"Content-Security-Policy"])
        # auto_reload off: otherwise every page stats its template files, on the reactor thread.
        self._env = self._builtin = Environment(loader=builtin_loader(), auto_reload=False,
                                                autoescape=select_autoescape(default=True))
        if settings.templates:
            self._env = self._builtin.overlay(loader=theme_loader(settings))
            self._compile_all()
        self._values = {"site_name": site_name, "theme": theme}
        self._headers = {b"Content-Type": b"text/html; charset=utf-8", b"Cache-Control": b"no-store"}
        if theme.policy != SECURITY_HEADERS[b"Content-Security-Policy"]:
            self._headers[b"Content-Security-Policy"] = theme.policy

    def _compile_all(self) -> None:
        for name in self._env.list_templates(extensions=["html"]):
            try:
                self._env.get_template(name)
            except TemplateSyntaxError as e:
                raise ConfigError(f"[pages] templates: {e.filename or name}, line {e.lineno}: {e.message}") from None
            except (TemplateError, UnicodeDecodeError, OSError) as e:
                raise ConfigError(f"[pages] templates: {name}: {e}") from None

    def render(self, status: int, name: str, headers: Mapping[bytes, bytes] | None = None, **values: Any) -> Reply:
        try:
            html = self._env.get_template(name).render(self._values, **values)
        except Exception:
            if self._env is self._builtin:
                raise
            log.failure("The page {name} of [pages] templates failed; the built-in one answered", name=name)
            html = self._builtin.get_template(name).render(self._values, **values)
        return Reply(status, html.encode(), {**self._headers, **(headers or {})})

    def allowing_image(self, url: str | None) -> dict[bytes, bytes]:
        """The headers of a page that shows an image from `url` (a client's logo on the consent page):
        its Content-Security-Policy lets in that image's origin, and no other."""
        origin = logo_origin(url or "")
        if origin is None:
            return {}
        policy = self._headers.get(b"Content-Security-Policy", SECURITY_HEADERS[b"Content-Security-Policy"])
        return {b"Content-Security-Policy": allow(policy.decode(), "img-src", origin).encode()}

    def error(self, status: int, error: str, description: str) -> Reply:
        """An OAuth-style error, as a page for a person."""
        return self.render(status, "error.html", error=error, description=description)

    def form_expired(self) -> Reply:
        """A form whose CSRF token is missing, forged, too old, or bound to another request."""
        return self.error(400, "invalid_request", "The form has expired or did not come from this site. "
                                                  "Go back and try again.")


def when_ready(outcome: T | defer.Deferred[T]) -> defer.Deferred[T]:
    """A result known now, or a Deferred of one, as a Deferred: `maybeDeferred` for a value
    already in hand (and typed, which maybeDeferred's overloads are not for such a union)."""
    return outcome if isinstance(outcome, defer.Deferred) else defer.succeed(outcome)


class AsyncResource(Resource):
    """A leaf whose handlers return a Reply, or a Deferred of one, written when ready. Its
    errors are JSON, for a program; a `PageResource`'s are pages, for a person."""

    isLeaf = True

    def _error(self, status: int, error: str, description: str, headers: Mapping[bytes, bytes] | None = None) -> Reply:
        reply = json_error(status, error, description)
        reply.headers.update(headers or {})
        return reply

    def _answer(self, request: Request, handler: Callable[[Request], Reply | defer.Deferred[Reply]]) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def write(reply: Reply) -> None:
            if gone:
                return
            request.setResponseCode(reply.status)
            for name, value in reply.headers.items():
                request.setHeader(name, value)
            request.write(reply.body)
            request.finish()

        def fail(failure: Failure) -> None:
            if failure.check(BadRequest):
                write(self._error(400, "invalid_request", str(failure.value)))
                return
            if isinstance(malformed := failure.value, MalformedRequest):
                log.info("Refused a request to {path}: {reason}", path=request.path.decode("latin-1"),
                         reason=str(malformed))
                if malformed.in_credentials:  # RFC 6749 §5.2: invalid_client, with the scheme to use
                    write(self._error(401, "invalid_client", str(malformed), {b"WWW-Authenticate": b"Basic"}))
                else:
                    write(self._error(400, "invalid_request", str(malformed)))
                return
            if failure.check(DatabaseUnavailable):
                log.warn("Request to {path} answered 503: {reason}", path=request.path.decode("latin-1"),
                         reason=str(failure.value))
            else:
                log.failure("Request to {path} failed", failure, path=request.path.decode("latin-1"))
            write(self._error(503, "temporarily_unavailable", UNAVAILABLE))

        # Whether the handler raises at once or its Deferred fails later, the answer is ours
        # (with our headers), never Twisted's bare "Processing Failed" page.
        try:
            answer = when_ready(handler(request))
        except Exception:
            answer = defer.fail()
        answer.addCallback(write).addErrback(fail)
        return NOT_DONE_YET


class PageResource(AsyncResource):
    """An AsyncResource that people visit: it renders `pages`, errors included."""

    def __init__(self, pages: Pages) -> None:
        super().__init__()
        self.pages = pages

    def _error(self, status: int, error: str, description: str, headers: Mapping[bytes, bytes] | None = None) -> Reply:
        reply = self.pages.error(status, error, description)
        reply.headers.update(headers or {})
        return reply


class JsonDocument(Resource):
    """A fixed JSON document anyone may read, from any origin (discovery metadata)."""

    isLeaf = True

    def __init__(self, document: Mapping[str, Any]) -> None:
        super().__init__()
        self._body = json.dumps(document, indent=2).encode()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return self._body


class StaticFiles(File):
    """The stylesheet: files, and no listing of the directories that hold them."""

    def directoryListing(self) -> IResource:
        return notFound()


class NotFound(PageResource):
    """Any address under the root that names no page: the site's own error page, 404."""

    def render(self, request: Request) -> int:
        return self._answer(request, lambda r: self.pages.error(404, "not_found",
                                                                "There is no page at this address."))


class Landing(PageResource):
    """/: what this site is, for a person who comes by without an app sending them."""

    isLeaf = True

    def render_GET(self, request: Request) -> int:
        return self._answer(request, lambda r: self.pages.render(200, "landing.html"))


class SecuredRoot(Resource):
    """The root of the tree. Every request passes it first, so it gives every response the
    security headers (pages refuse framing, no sniffing, no referrer; HSTS under an https
    issuer), Twisted's own 405 pages included; an address that names nothing gets `NotFound`."""

    def __init__(self, https: bool, pages: Pages) -> None:
        super().__init__()
        self._headers = dict(SECURITY_HEADERS)
        if https:  # RFC 6797: browsers then refuse plain http to this host for a year
            self._headers[b"Strict-Transport-Security"] = b"max-age=31536000"
        self._not_found = NotFound(pages)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._not_found

    def _secure(self, request: Request) -> None:
        for name, value in self._headers.items():
            request.setHeader(name, value)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        self._secure(request)
        return super().getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes:
        self._secure(request)
        return super().render(request)


class BridgeChannel(http.HTTPChannel):
    """Twisted's HTTP/1.1 channel, with bounds on reading a request: its head must arrive within
    HEAD_DEADLINE seconds of its first byte and its body within BODY_DEADLINE of its head (else
    408), and a body longer than MAX_BODY is refused with 413 as soon as the Content-Length says
    so or the chunks add up to it, without reading the rest. Either way the connection closes."""

    refused = False
    _deadline: IDelayedCall | None = None
    _busy = False  # a request read in full and not answered yet: what follows is only buffered

    def dataReceived(self, data: bytes) -> None:
        if self.refused:  # bytes already on their way (decrypted by TLS, say) when we closed
            return
        if self._deadline is None and not self._busy:
            self._deadline = self.callLater(HEAD_DEADLINE, self._late)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        if self.length is not None and self.length > MAX_BODY:  # None: chunked, counted as it comes
            self.refuse(413, f"The request body is larger than {MAX_BODY} bytes")
            return  # before Twisted would answer `Expect: 100-continue`
        if self.length != 0:
            self._deadline = self.callLater(BODY_DEADLINE, self._late)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.refused:  # the chunked decoder may still reach the end of what it was handed
            return
        self._cancel_deadline()
        self._busy = True
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        self._busy = False  # before Twisted replays what was buffered meanwhile
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def refuse(self, status: int, description: str) -> None:
        """Answer `status` with a JSON error at once, read nothing more, and close."""
        if self.refused:
            return
        self.refused = True
        self._cancel_deadline()
        body = json.dumps({"error": "invalid_request", "error_description": description}).encode()
        headers = {**SECURITY_HEADERS, **JSON_HEADERS, b"Content-Length": b"%d" % len(body), b"Connection": b"close"}
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 %d %s\r\n" % (status, http.RESPONSES[status])
                             + b"".join(b"%s: %s\r\n" % header for header in headers.items()) + b"\r\n" + body)
        # Twisted's idle timeout still runs (nothing resets it now) and then aborts a peer that
        # does not even read the answer.
        self.loseConnection()

    def _late(self) -> None:
        self._deadline = None
        self.refuse(408, "The request was not received in time")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class BridgeRequest(Request):
    """A Request whose body is kept in memory: its channel never lets one past MAX_BODY."""

    def gotLength(self, length: int | None) -> None:
        # Twisted's own would spool a chunked body, or one over 100 kB, to a file in /tmp.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        assert self.content is not None
        if self.content.tell() + len(data) <= MAX_BODY:
            self.content.write(data)
        elif isinstance(self.channel, BridgeChannel):
            self.channel.refuse(413, f"The request body is larger than {MAX_BODY} bytes")
        else:  # not a channel of ours (HTTP/2 is not offered): close without an answer
            self.loseConnection()


def _bridge_channel(site: http.HTTPFactory) -> http._GenericHTTPChannelProtocol:
    """`BridgeSite.protocol`: what `HTTPFactory.protocol` builds, around a BridgeChannel."""
    return http._GenericHTTPChannelProtocol(BridgeChannel())


class BridgeSite(Site):
    """The Site for every [http] listener. Twisted's own form parsing is off (`snapshot` parses
    what it needs, and Twisted's Content-Type parsing costs more than a database lookup), the
    access log is written only to the file `[http] access_log` names, and requests are read by a
    BridgeChannel into a BridgeRequest, whose bounds keep one client from holding the server."""

    displayTracebacks = False
    protocol = _bridge_channel

    def __init__(self, resource: Resource, access_log: str = "", reactor: IReactorTime | None = None,
                 trusted_proxies: tuple[str, ...] = ()) -> None:
        super().__init__(resource, BridgeRequest, logPath=access_log or None, parsePOSTFormSubmission=False,
                         reactor=reactor)
        self._access_log = bool(access_log)
        self.trusted_proxies = frozenset(trusted_proxies)  # whose X-Forwarded-For names the client

    def log(self, request: http.Request) -> None:
        if self._access_log:
            super().log(request)
