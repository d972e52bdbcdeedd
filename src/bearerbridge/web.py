"""twisted.web resources: the authorization server's HTTP face.

Each handler snapshots the request on the reactor thread, makes one hop to the
store pool (`StorePool.run`), and writes the result back. Pages are Jinja2
templates; every response refuses framing.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File

from . import oauth
from .config import Config
from .crypto import Keyring
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .pool import StorePool
from .recent import NeedsDatabase

log = Logger()

SESSION_COOKIE = b"bb_session"
CSRF_COOKIE = b"bb_csrf"
CSRF_TTL = 900
MAX_BODY = 64 * 1024
MAX_FIELDS = 64
SECURITY_HEADERS = {
    b"X-Frame-Options": b"DENY",
    b"Content-Security-Policy": b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
}
JSON_HEADERS = {b"Content-Type": b"application/json", b"Cache-Control": b"no-store", b"Pragma": b"no-cache"}


class BadRequest(Exception):
    """Hostile or malformed HTTP input, answered with invalid_request."""


def parse_query(raw: bytes | str) -> dict[str, list[str]]:
    """A query string or form body: strict UTF-8, at most MAX_FIELDS fields (else BadRequest)."""
    try:
        return parse_qs(raw if isinstance(raw, str) else raw.decode("utf-8", "strict"),
                        keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The parameters are malformed or too many") from None


def snapshot(request: Request, issuer: str) -> oauth.HttpRequest:
    """Copy what authlib needs out of a twisted.web request (query and form kept apart)."""
    raw_query = urlsplit(request.uri).query
    form: dict[str, list[str]] = {}
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if request.method == b"POST" and content_type == b"application/x-www-form-urlencoded":
        request.content.seek(0)  # a request may be snapshot twice (see EndpointResource)
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise BadRequest("The request body is too large")
        form = parse_query(body)
    headers = {name.decode("latin-1"): b", ".join(values).decode("latin-1")
               for name, values in request.requestHeaders.getAllRawHeaders()}
    uri = issuer.rstrip("/") + request.uri.decode("latin-1")
    return oauth.HttpRequest(request.method.decode("ascii"), uri, headers, parse_query(raw_query), form)


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header (RFC 6750 §2.1), if any."""
    scheme, _, token = (request.getHeader(b"authorization") or b"").decode("latin-1").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[bytes, bytes]


def json_reply(status: int, body: Any, headers: Any = ()) -> Reply:
    merged = dict(JSON_HEADERS)
    merged.update({k.encode(): v.encode() for k, v in dict(headers).items()})
    return Reply(status, json.dumps(body).encode(), merged)


class Pages:
    """The Jinja2 templates, with the site name filled in."""

    def __init__(self, site_name: str) -> None:
        # auto_reload off: otherwise every page stats its template files, on the reactor thread.
        self._env = Environment(loader=PackageLoader("bearerbridge", "templates"), auto_reload=False,
                                autoescape=select_autoescape(default=True))
        self._site_name = site_name

    def render(self, status: int, name: str, **values: Any) -> Reply:
        html = self._env.get_template(name).render(site_name=self._site_name, **values)
        return Reply(status, html.encode(), {b"Content-Type": b"text/html; charset=utf-8",
                                             b"Cache-Control": b"no-store"})


class AsyncResource(Resource):
    """A leaf whose handlers return a Reply, or a Deferred of one, written when ready."""

    isLeaf = True
    # Pages answer errors with an HTML page for a person; the others with JSON for a program.
    serves_pages = False

    def __init__(self, app: "App") -> None:
        super().__init__()
        self.app = app

    def _answer(self, request: Request, handler: Callable[[Request], Reply | defer.Deferred]) -> Any:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def write(reply: Reply) -> None:
            if gone:
                return
            request.setResponseCode(reply.status)
            for name, value in {**SECURITY_HEADERS, **reply.headers}.items():
                request.setHeader(name, value)
            request.write(reply.body)
            request.finish()

        def fail(failure: Failure) -> None:
            if failure.check(BadRequest):
                write(self.app.bad_request(self.serves_pages, str(failure.value)))
                return
            log.failure("Request to {path} failed", failure, path=request.path.decode("latin-1"))
            write(self.app.unavailable(self.serves_pages))

        # Whether the handler raises at once or its Deferred fails later, the answer is ours
        # (with our headers), never Twisted's bare "Processing Failed" page.
        defer.maybeDeferred(handler, request).addCallback(write).addErrback(fail)
        return NOT_DONE_YET


class App:
    """Everything the resources share: settings, keyring, pool, OAuth server, pages."""

    def __init__(self, config: Config, keyring: Keyring, pool: StorePool, server: oauth.BridgeServer,
                 metrics: Metrics, remembered: oauth.BridgeServer | None = None) -> None:
        self.config = config
        # The same OAuth server over the store's memory of recent reads (recent.RememberedStore):
        # introspection of a token seen lately is answered without a trip to the pool.
        self.remembered = remembered
        self.keyring = keyring
        self.pool = pool
        self.server = server
        self.metrics = metrics
        self.pages = Pages(config.server.site_name)

    def error(self, as_page: bool, status: int, error: str, description: str) -> Reply:
        """An OAuth-style error, as a page for a person or as JSON for a program."""
        if as_page:
            return self.pages.render(status, "error.html", error=error, description=description)
        return json_reply(status, {"error": error, "error_description": description})

    def bad_request(self, as_page: bool, description: str) -> Reply:
        return self.error(as_page, 400, "invalid_request", description)

    def form_expired(self) -> Reply:
        """A form whose CSRF token is missing, forged, too old, or bound to another request."""
        return self.bad_request(True, "The form has expired or did not come from this site. Go back and try again.")

    def unavailable(self, as_page: bool) -> Reply:
        return self.error(as_page, 503, "temporarily_unavailable",
                          "The service is temporarily unavailable; try again shortly")

    def login(self, request: Request, form: dict[str, str]) -> defer.Deferred:
        """Check a login form's username and password; on success start a session.

        Three steps: read the password hash (pool), verify it (argon2id, slow on purpose:
        away from the store's threads), and fire with the User or None."""
        d = self.pool.run(self.server.store.password_hash, form.get("username", ""))
        d.addCallback(lambda found: self.pool.run_apart(oauth.verify_login, found, form.get("password", "")))

        def started(user):
            self.metrics.logins.labels("ok" if user else "failed").inc()
            if user is not None:
                self.start_session(request, user.id)
            return user
        return d.addCallback(started)

    # cookies

    def set_cookie(self, request: Request, name: bytes, value: str, max_age: int | None) -> None:
        request.addCookie(name, value.encode(), path=b"/", httpOnly=True, sameSite=b"lax",
                          secure=self.config.https, max_age=None if max_age is None else str(max_age).encode())

    def session_user(self, request: Request) -> int | None:
        value = request.getCookie(SESSION_COOKIE)
        payload = value and self.keyring.unsign("session", value.decode("latin-1"), self.config.server.session_ttl)
        return int(payload) if payload and payload.isdigit() else None

    def start_session(self, request: Request, user_id: int) -> None:
        self.set_cookie(request, SESSION_COOKIE, self.keyring.sign("session", str(user_id)),
                        self.config.server.session_ttl)

    def csrf_token(self, request: Request, binding: str) -> str:
        """A form token bound to this browser (a cookie) and to `binding`."""
        browser = (request.getCookie(CSRF_COOKIE) or b"").decode("latin-1")
        if not browser:
            browser = secrets.token_urlsafe(16)
            self.set_cookie(request, CSRF_COOKIE, browser, None)
            request.received_cookies[CSRF_COOKIE] = browser.encode()
        return self.keyring.sign(f"csrf|{browser}|{binding}", "form")

    def csrf_ok(self, request: Request, form: dict[str, str], binding: str) -> bool:
        browser = (request.getCookie(CSRF_COOKIE) or b"").decode("latin-1")
        token = form.get("csrf", "")
        return bool(browser and token) and self.keyring.unsign(
            f"csrf|{browser}|{binding}", token, CSRF_TTL) == "form"


class Authorize(AsyncResource):
    """/authorize: the code grant's front door, with the login and consent pages."""

    serves_pages = True

    def render_GET(self, request: Request) -> Any:
        return self._answer(request, self._get)

    def render_POST(self, request: Request) -> Any:
        return self._answer(request, self._post)

    def _binding(self, request: Request, user_id: int | None) -> str:
        return f"{user_id or ''}|{urlsplit(request.uri).query.decode('latin-1')}"

    def _get(self, request: Request) -> defer.Deferred:
        req = snapshot(request, self.app.config.server.issuer)
        user_id = self.app.session_user(request)
        d = self.app.pool.run(self.app.server.authorize, req, user_id, None)
        return d.addCallback(self._render, request, user_id)

    def _post(self, request: Request) -> Reply | defer.Deferred:
        req = snapshot(request, self.app.config.server.issuer)
        form = req.form
        user_id = self.app.session_user(request) if form.get("step") == "consent" else None
        if not self.app.csrf_ok(request, form, self._binding(request, user_id)):
            return self.app.form_expired()
        if form.get("step") == "consent":
            decision = form.get("decision")
            if decision not in ("approve", "deny"):
                raise BadRequest("decision must be approve or deny")
            d = self.app.pool.run(self.app.server.authorize, req, user_id, decision)
            return d.addCallback(self._render, request, user_id)
        d = self.app.login(request, form)
        d.addCallback(lambda user: self.app.pool.run(self._after_login, req, user))
        return d.addCallback(self._logged_in, request)

    def _after_login(self, req: oauth.HttpRequest, user):
        """In the pool: go on as a fresh request from the user who logged in, if one did."""
        outcome = self.app.server.authorize(req, user.id if user else None, None)
        if user is None and isinstance(outcome, oauth.AskLogin):
            outcome = oauth.AskLogin(outcome.client_name, failed=True)
        return user, outcome

    def _logged_in(self, result, request: Request) -> Reply:
        user, outcome = result
        return self._render(outcome, request, user.id if user else None)

    def _render(self, outcome: oauth.AuthorizeOutcome, request: Request, user_id: int | None) -> Reply:
        self.app.metrics.authorizations.labels(type(outcome).__name__.lower()).inc()
        action = request.uri.decode("latin-1")
        match outcome:
            case oauth.Redirect(location):
                return Reply(302, b"", {b"Location": location.encode()})
            case oauth.ErrorPage(error, description):
                return self.app.pages.render(400, "error.html", error=error, description=description)
            case oauth.AskLogin(client_name, failed):
                csrf = self.app.csrf_token(request, self._binding(request, None))
                return self.app.pages.render(401 if failed else 200, "login.html", client_name=client_name,
                                             failed=failed, action=action, csrf=csrf)
            case oauth.AskConsent(client_name, user, scopes):
                csrf = self.app.csrf_token(request, self._binding(request, user.id))
                return self.app.pages.render(200, "consent.html", client_name=client_name, username=user.username,
                                             scopes=scopes, action=action, csrf=csrf)
        raise TypeError(outcome)


class Logout(AsyncResource):
    """/logout: a form (with its CSRF token) that ends the login session."""

    serves_pages = True

    def render_GET(self, request: Request) -> Any:
        return self._answer(request, lambda r: self.app.pages.render(
            200, "logout.html", done=False, csrf=self.app.csrf_token(r, "logout")))

    def render_POST(self, request: Request) -> Any:
        return self._answer(request, self._post)

    def _post(self, request: Request) -> Reply:
        form = snapshot(request, self.app.config.server.issuer).form
        if not self.app.csrf_ok(request, form, "logout"):
            return self.app.form_expired()
        self.app.set_cookie(request, SESSION_COOKIE, "", 0)
        return self.app.pages.render(200, "logout.html", done=True)


class TokenEndpoint(AsyncResource):
    """/token (RFC 6749 §3.2)."""

    def render_POST(self, request: Request) -> Any:
        return self._answer(request, self._post)

    def _post(self, request: Request) -> defer.Deferred:
        req = snapshot(request, self.app.config.server.issuer)
        grant_type = req.form.get("grant_type", "")
        label = grant_type if grant_type in oauth.GRANT_TYPES else "other"
        self.app.metrics.token_requests.labels(label).inc()
        d = self.app.pool.run(self.app.server.create_token_response, req)
        return d.addCallback(self._count, label)

    def _count(self, response: tuple, grant_type: str) -> Reply:
        status, body, headers = response
        if status == 200:
            self.app.metrics.tokens_issued.labels(grant_type).inc()
        else:
            self.app.metrics.token_failures.labels(grant_type, body.get("error", "unknown")).inc()
        return json_reply(status, body, headers)


class EndpointResource(AsyncResource):
    """An authlib endpoint (introspection, revocation) reached by POST."""

    def __init__(self, app: App, endpoint_name: str) -> None:
        super().__init__(app)
        self.endpoint_name = endpoint_name

    def render_POST(self, request: Request) -> Any:
        return self._answer(request, self._post)

    def _post(self, request: Request) -> Reply | defer.Deferred:
        req = snapshot(request, self.app.config.server.issuer)
        d = self.app.pool.run(self.app.server.create_endpoint_response, self.endpoint_name, req)
        return d.addCallback(self._reply)

    def _reply(self, response: tuple) -> Reply:
        status, body, headers = response
        return json_reply(status, body, headers)


class IntrospectionResource(EndpointResource):
    """/introspect (RFC 7662): a token seen lately is answered from memory, with no pool trip."""

    def __init__(self, app: App) -> None:
        super().__init__(app, "introspection")

    def _post(self, request: Request) -> Reply | defer.Deferred:
        if self.app.remembered is not None:
            req = snapshot(request, self.app.config.server.issuer)
            try:
                return self._reply(self.app.remembered.create_endpoint_response(self.endpoint_name, req))
            except NeedsDatabase:
                pass  # the pool runs it again on a fresh snapshot: authlib annotated this one
        return super()._post(request)

    def _reply(self, response: tuple) -> Reply:
        status, body, _ = response
        result = "error" if status != 200 else ("active" if body.get("active") else "inactive")
        self.app.metrics.introspections.labels(result).inc()
        return super()._reply(response)


class MetricsResource(AsyncResource):
    """/metrics for Prometheus, readable with a bearer token holding the `metrics` scope."""

    def render_GET(self, request: Request) -> Any:
        return self._answer(request, self._get)

    def _get(self, request: Request) -> Reply | defer.Deferred:
        token = bearer_token(request)
        if token is None:
            return Reply(401, b"", {b"WWW-Authenticate": b'Bearer realm="metrics"'})
        return self.app.pool.run(self.app.server.store.find_access_token, token).addCallback(self._decide)

    def _decide(self, token) -> Reply:
        if token is None or not token.is_active():
            return Reply(401, b"", {b"WWW-Authenticate": b'Bearer realm="metrics", error="invalid_token"'})
        if "metrics" not in token.scope.split():
            return Reply(403, b"", {b"WWW-Authenticate":
                                    b'Bearer realm="metrics", error="insufficient_scope", scope="metrics"'})
        return Reply(200, self.app.metrics.render(), {b"Content-Type": METRICS_CONTENT_TYPE.encode()})


class Health(AsyncResource):
    """/healthz: 200 while the database answers, else 503."""

    def render_GET(self, request: Request) -> Any:
        return self._answer(request, lambda r: self.app.pool.run(self.app.server.store.ping).addCallback(
            lambda _: Reply(200, b"ok\n", {b"Content-Type": b"text/plain"})))


class JsonDocument(Resource):
    isLeaf = True

    def __init__(self, document: dict) -> None:
        super().__init__()
        self._body = json.dumps(document, indent=2).encode()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return self._body


class BridgeSite(Site):
    """The Site for every [http] listener. Twisted's own form parsing is off (`snapshot` parses
    what it needs, and Twisted's Content-Type parsing costs more than a database lookup), and
    the access log is written only to the file `[http] access_log` names."""

    displayTracebacks = False

    def __init__(self, resource: Resource, access_log: str = "") -> None:
        super().__init__(resource, logPath=access_log or None, parsePOSTFormSubmission=False)
        self._access_log = bool(access_log)

    def log(self, request: Request) -> None:
        if self._access_log:
            super().log(request)


def root(app: App) -> Resource:
    """The resource tree served on every [http] listener."""
    top = Resource()
    top.putChild(b"authorize", Authorize(app))
    top.putChild(b"token", TokenEndpoint(app))
    top.putChild(b"introspect", IntrospectionResource(app))
    top.putChild(b"revoke", EndpointResource(app, "revocation"))
    top.putChild(b"device_authorization", EndpointResource(app, "device_authorization"))
    top.putChild(b"logout", Logout(app))
    top.putChild(b"metrics", MetricsResource(app))
    top.putChild(b"healthz", Health(app))
    well_known = Resource()
    well_known.putChild(b"oauth-authorization-server", JsonDocument(oauth.metadata(app.config)))
    top.putChild(b".well-known", well_known)
    top.putChild(b"static", File(str(resources.files("bearerbridge") / "static")))
    return top
