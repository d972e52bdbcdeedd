"""/authorize, the code grant's front door with its login and consent pages, and /logout.

Path 1 of the architecture, steps 1 to 3: a GET is snapshot and handed to
`BridgeServer.authorize` in the pool, which says what to show (`AskLogin`, `AskConsent`,
`ErrorPage`) or where to send the browser (`Redirect`, with `iss`, RFC 9207). The login form
posts back here (`PasswordLogin`), and so does the consent form; each form's CSRF token is
bound to the request it was shown for.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

from bearerbridge.guard import Blocked
from bearerbridge.metrics import Metrics
from bearerbridge.oauth import oidc
from bearerbridge.oauth.oidc import LogoutRequest
from bearerbridge.oauth.requests import HttpRequest
from bearerbridge.oauth.server import (
    AskConsent,
    AskLogin,
    AuthorizeOutcome,
    BridgeServer,
    ErrorPage,
    NeedSecondFactor,
    Redirect,
    ShowCode,
)
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.second_factor import SecondFactorAsked, second_factor_page
from bearerbridge.web.sessions import PasswordLogin, Sessions, SignedIn, refused_sign_in
from bearerbridge.web.site import BadRequest, PageResource, Pages, Reply, retry_after, snapshot

log = Logger()


class SignInAndConsent(PageResource):
    """A page where a person signs in and answers an app's request: /authorize, /device."""

    def __init__(self, pages: Pages, issuer: str, sessions: Sessions, login: PasswordLogin, pool: StorePool,
                 server: BridgeServer, metrics: Metrics) -> None:
        super().__init__(pages)
        self._issuer = issuer
        self._sessions = sessions
        self._login = login
        self._pool = pool
        self._server = server
        self._metrics = metrics


class Authorize(SignInAndConsent):
    """/authorize (RFC 6749 §3.1, §4.1.1)."""

    def render_GET(self, request: Request) -> int:
        return self._answer(request, self._get)

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._post)

    def _binding(self, request: Request, session_id: str | None) -> str:
        """What a form of this page is for: this very request, by this session (none to sign in)."""
        return f"{session_id or ''}|{urlsplit(request.uri).query.decode('latin-1')}"

    def _get(self, request: Request) -> defer.Deferred[Reply]:
        req = snapshot(request, self._issuer)
        session_id = self._sessions.session_id(request)
        d = self._pool.run(self._decide, req, session_id, None)
        return d.addCallback(self._get_outcome, request, session_id)

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        req = snapshot(request, self._issuer)
        form = req.form
        session_id = self._sessions.session_id(request) if form.get("step") == "consent" else None
        if not self._sessions.csrf_ok(request, form, self._binding(request, session_id)):
            return self.pages.form_expired()
        if form.get("step") == "consent":
            decision = form.get("decision")
            if decision not in ("approve", "deny"):
                raise BadRequest("decision must be approve or deny")
            d = self._pool.run(self._decide, req, session_id, decision)
            return d.addCallback(self._get_outcome, request, session_id)
        signed_in = self._login(request, form)
        after = signed_in.addCallback(lambda new: self._pool.run(self._after_login, req, new))
        return after.addCallback(lambda outcome: self._render(outcome[0], outcome[1], outcome[2], request))

    def _decide(self, req: HttpRequest, session_id: str | None, decision: str | None) -> AuthorizeOutcome:
        """In the pool: the session's sign-in, if it is live, and what the request gets."""
        sign_in = self._pool.store.session(session_id) if session_id else None
        return self._server.authorize(req, sign_in, decision)

    def _after_login(self, req: HttpRequest, signed_in: SignedIn | SecondFactorAsked | Blocked | None
                     ) -> tuple[AuthorizeOutcome, str | None, Blocked | SecondFactorAsked | None]:
        """In the pool: go on as a fresh request from the user who signed in, if one did (the
        login page again, or the second factor's, for one who has not yet)."""
        user = signed_in if isinstance(signed_in, SignedIn) else None
        outcome = self._server.authorize(req, user.sign_in if user else None, None, just_signed_in=True)
        if signed_in is None and isinstance(outcome, AskLogin):
            outcome = dataclasses.replace(outcome, failed=True)
        held = None if isinstance(signed_in, SignedIn) else signed_in
        return outcome, user.session_id if user else None, held

    def _get_outcome(self, outcome: AuthorizeOutcome, request: Request, session_id: str | None) -> Reply:
        return self._render(outcome, session_id, None, request)

    def _render(self, outcome: AuthorizeOutcome, session_id: str | None,
                held: Blocked | SecondFactorAsked | None, request: Request) -> Reply:
        self._metrics.authorizations.labels(type(outcome).__name__.lower()).inc()
        action = request.uri.decode("latin-1")
        match outcome:
            case Redirect(location):
                # After the login or consent POST, 303: a 302 lets a browser repeat the POST, with
                # the user's password, to the client (RFC 9700 §4.12).
                return Reply(303 if request.method == b"POST" else 302, b"", {b"Location": location.encode()})
            case ErrorPage(error, description):
                log.info("Authorization refused with a page: {error}: {description}", error=error,
                         description=description)
                return self.pages.error(400, error, description)
            case AskLogin(client_name, failed, login_hint):
                csrf = self._sessions.csrf_token(request, self._binding(request, None))
                if isinstance(held, SecondFactorAsked):
                    return second_factor_page(self.pages, held, action, csrf, client_name)
                blocked = held
                return self.pages.render(429 if blocked else 401 if failed else 200, "login.html",
                                          client_name=client_name, failed=refused_sign_in(request) if failed else None,
                                          action=action, csrf=csrf,
                                          login_hint=login_hint, passkey=self._login.passkey_form(request),
                                          blocked_wait=blocked.in_words if blocked else None,
                                          headers=retry_after(blocked.retry_after if blocked else None))
            case NeedSecondFactor(client_name):
                return self.pages.render(403, "second_factor_required.html", client_name=client_name)
            case ShowCode(client_name, code):
                return self.pages.render(200, "oob.html", client_name=client_name, code=code)
            case AskConsent(client_name, user, scopes, website, logo_uri):
                csrf = self._sessions.csrf_token(request, self._binding(request, session_id))
                return self.pages.render(200, "consent.html", client_name=client_name, username=user.username,
                                          scopes=scopes, action=action, csrf=csrf, website=website,
                                          logo_uri=logo_uri, remembered=True,
                                          headers=self.pages.allowing_image(logo_uri))
        raise TypeError(outcome)


class Logout(PageResource):
    """/logout, also OpenID's end-session endpoint (RP-Initiated Logout 1.0): ends the browser's
    session, after asking the user (a form with its CSRF token) unless an app sent an ID token of
    the user signed in; then back to the app's registered post-logout address, if it gave one."""

    def __init__(self, pages: Pages, issuer: str, sessions: Sessions, pool: StorePool, server: BridgeServer) -> None:
        super().__init__(pages)
        self._issuer = issuer
        self._sessions = sessions
        self._pool = pool
        self._server = server

    def render_GET(self, request: Request) -> int:
        return self._answer(request, lambda r: self._check(r).addCallback(self._get, r))

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._post)

    def _binding(self, request: Request) -> str:
        return f"logout|{urlsplit(request.uri).query.decode('latin-1')}"

    def _check(self, request: Request) -> defer.Deferred[LogoutRequest]:
        req = snapshot(request, self._issuer)
        return self._sessions.sign_in(request).addCallback(
            lambda sign_in: self._pool.run(oidc.logout_request, self._server, req, sign_in))

    def _get(self, logout: LogoutRequest, request: Request) -> Reply | defer.Deferred[Reply]:
        if logout.error is not None:
            return self.pages.error(400, "invalid_request", f"The app that sent you here made a mistake: "
                                    f"{logout.error}. You have not been signed out.")
        if logout.confirm:
            return self.pages.render(200, "logout.html", done=False, client_name=logout.client_name,
                                     action=request.uri.decode("latin-1"),
                                     csrf=self._sessions.csrf_token(request, self._binding(request)))
        return self._end(logout, request)

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        form = snapshot(request, self._issuer).form
        if not self._sessions.csrf_ok(request, form, self._binding(request)):
            return self.pages.form_expired()
        return self._check(request).addCallback(self._end, request)

    def _end(self, logout: LogoutRequest, request: Request) -> defer.Deferred[Reply]:
        def ended(_: None) -> Reply:
            if logout.redirect_uri:
                return Reply(303 if request.method == b"POST" else 302, b"",
                             {b"Location": logout.redirect_uri.encode()})
            return self.pages.render(200, "logout.html", done=True)
        return self._sessions.end(request).addCallback(ended)
