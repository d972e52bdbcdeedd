"""/admin: where an admin registers clients and manages users without the command line (issue 12).

Every address under /admin answers a signed-in admin (`User.is_admin`) alone, and checks that
before anything else: without a session it shows the sign-in form (as /account does), and to a
user who is not an admin it answers 403, GET and POST alike, whatever the address. The pages are
server-rendered and work without JavaScript; every form is a POST carrying a CSRF token bound to
this browser and session. Every change is an `admin` event in the audit log as the command line
records its own (`action` such as `client create` or `user disable`, `actor`, `outcome`), with
the admin's name as the actor, where they were (`address`) and `via` web; never a secret.

    /admin                         the clients and the users
    /admin/clients/new             register a client (its secret shown once)
    /admin/clients/ID              a client; POST .../secret rotates its secret (shown once)
    /admin/clients/ID/delete       asks, then deletes it
    /admin/users/new               add a user
    /admin/users/ID                a user and their grants; disable, enable, reset the second
                                   factor, sign out everywhere

The clients' pages are web/admin_clients.py, the users' web/admin_users.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge.guard import Blocked, Recorder
from bearerbridge.oauth.registration import ClientRules
from bearerbridge.storage.models import SignIn
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.admin_base import Act
from bearerbridge.web.admin_clients import ClientPages
from bearerbridge.web.admin_users import UserPages
from bearerbridge.web.mail_kick import MailKick
from bearerbridge.web.second_factor import SecondFactorAsked, second_factor_page
from bearerbridge.web.sessions import SIGN_IN_STEPS, PasswordLogin, Sessions, SignedIn, refused_sign_in
from bearerbridge.web.site import BadRequest, PageResource, Pages, Reply, client_address, retry_after, snapshot

ID = "{id}"  # in a route: any one segment, handed to the page as `Act.args`


@dataclass(frozen=True)
class Route:
    method: bytes
    path: tuple[str, ...]
    page: Callable[[Act], Awaitable[Reply]]
    action: str | None = None  # what a POST changes, as the audit log names it

    def match(self, segments: tuple[str, ...]) -> tuple[str, ...] | None:
        """The segments standing for ID when `segments` is this route's path, else None."""
        if len(segments) != len(self.path) or any(p not in (ID, s) for p, s in zip(self.path, segments, strict=True)):
            return None
        return tuple(s for p, s in zip(self.path, segments, strict=True) if p == ID)


class Admin(PageResource):
    """/admin and every address under it."""

    def __init__(self, pages: Pages, issuer: str, sessions: Sessions, login: PasswordLogin, pool: StorePool,
                 audit: Recorder, rules: ClientRules, require_second_factor: str = "none",
                 mail: MailKick | None = None) -> None:
        super().__init__(pages)
        self._issuer = issuer
        self._require_second_factor = require_second_factor
        self._sessions = sessions
        self._login = login
        self._audit = audit
        clients = ClientPages(pages, pool, audit, rules)
        users = UserPages(pages, pool, audit, login, rules.scopes, mail)
        # The first route matching wins: `new` before ID.
        self.routes = (
            Route(b"GET", (), clients.overview),
            Route(b"GET", ("clients", "new"), clients.new),
            Route(b"POST", ("clients", "new"), clients.create, "client create"),
            Route(b"GET", ("clients", ID), clients.show),
            Route(b"POST", ("clients", ID, "secret"), clients.rotate, "client rotate"),
            Route(b"GET", ("clients", ID, "delete"), clients.confirm_delete),
            Route(b"POST", ("clients", ID, "delete"), clients.delete, "client delete"),
            Route(b"GET", ("users", "new"), users.new),
            Route(b"POST", ("users", "new"), users.add, "user add"),
            Route(b"GET", ("users", ID), users.show),
            Route(b"POST", ("users", ID), users.change, "user change"),
        )

    def render_GET(self, request: Request) -> int:
        return self._answer(request, self._gate)

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._gate)

    def _gate(self, request: Request) -> defer.Deferred[Reply]:
        form = snapshot(request, self._issuer).form if request.method == b"POST" else {}
        return self._sessions.sign_in(request).addCallback(
            lambda sign_in: defer.Deferred.fromCoroutine(self._through(sign_in, request, form)))

    async def _through(self, sign_in: SignIn | None, request: Request, form: Mapping[str, str]) -> Reply:
        """Who may pass: no one signed in gets the sign-in form; anyone but an admin 403."""
        if sign_in is None:
            if request.method == b"POST" and form.get("step") in SIGN_IN_STEPS:
                return await self._signing_in(request, form)
            return self._login_page(request)
        admin, address = sign_in.user, client_address(request)
        route, args, known = self._route(request)
        if not admin.is_admin:
            if request.method == b"POST":  # an attempt to change something: worth a line
                self._audit.record("admin", action=route.action if route else None, actor=admin.username,
                                   address=address, via="web", outcome="refused", reason="not an admin",
                                   path=request.path.decode("latin-1"))
            return self.pages.render(403, "admin_forbidden.html", user=admin)
        if sign_in.lacks_second_factor(self._require_second_factor):
            return self.pages.render(403, "second_factor_required.html", client_name=None)
        binding = f"admin|{self._sessions.session_id(request)}"
        if request.method == b"POST" and not self._sessions.csrf_ok(request, form, binding):
            return self.pages.form_expired()
        if route is None:
            return (self.pages.error(405, "invalid_request", "This page takes no form.") if known
                    else self.pages.error(404, "not_found", "There is no page at this address."))
        return await route.page(Act(request, admin, address, form, self._sessions.csrf_token(request, binding), args))

    def _route(self, request: Request) -> tuple[Route | None, tuple[str, ...], bool]:
        """The route serving the request with its ID segments, and whether any route (of another
        method, maybe) serves its address."""
        try:
            segments = tuple(unquote(s.decode("ascii"), errors="strict") for s in request.postpath or ())
        except UnicodeError:
            raise BadRequest("The address is malformed") from None
        segments = segments[:-1] if segments[-1:] == ("",) else segments  # /admin/ is /admin
        known, method = False, b"GET" if request.method == b"HEAD" else request.method
        for route in self.routes:
            args = route.match(segments)
            if args is not None and route.method == method:
                return route, args, True
            known = known or args is not None
        return None, (), known

    def _login_page(self, request: Request, failed: bool = False, blocked: Blocked | None = None) -> Reply:
        return self.pages.render(429 if blocked else 401 if failed else 200, "admin_login.html", client_name=None,
                                 failed=refused_sign_in(request) if failed else None,
                                 action=request.path.decode("latin-1"),
                                 csrf=self._sessions.csrf_token(request, "admin-login"),
                                 passkey=self._login.passkey_form(request),
                                 blocked_wait=blocked.in_words if blocked else None,
                                 headers=retry_after(blocked.retry_after if blocked else None))

    async def _signing_in(self, request: Request, form: Mapping[str, str]) -> Reply:
        if not self._sessions.csrf_ok(request, form, "admin-login"):
            return self.pages.form_expired()
        outcome = await self._login(request, form)
        if isinstance(outcome, SignedIn):  # back to the page asked for, now as GET
            return Reply(303, b"", {b"Location": request.path})
        if isinstance(outcome, SecondFactorAsked):
            return second_factor_page(self.pages, outcome, request.path.decode("latin-1"),
                                      self._sessions.csrf_token(request, "admin-login"), None)
        return self._login_page(request, failed=True, blocked=outcome)
