"""/device: where a user signs in, types the code a device shows, and approves it (RFC 8628 §3.3)."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge.guard import Blocked, DatabaseDoor
from bearerbridge.metrics import Metrics
from bearerbridge.oauth import device
from bearerbridge.oauth.server import BridgeServer
from bearerbridge.storage.models import SignIn
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.authorize import SignInAndConsent
from bearerbridge.web.second_factor import SecondFactorAsked, second_factor_page
from bearerbridge.web.sessions import SIGN_IN_STEPS, PasswordLogin, Sessions, SignedIn, refused_sign_in
from bearerbridge.web.site import Pages, Reply, client_address, parse_query, retry_after, snapshot


class DevicePage(SignInAndConsent):
    """The verification page: login, the code, then the same consent page as the code grant."""

    def __init__(self, pages: Pages, issuer: str, sessions: Sessions, login: PasswordLogin, pool: StorePool,
                 server: BridgeServer, metrics: Metrics, door: DatabaseDoor) -> None:
        super().__init__(pages, issuer, sessions, login, pool, server, metrics)
        # Wrong user codes count as failed sign-ins, per user and per address: 20**8 codes would
        # take a guesser far longer than a code lives (RFC 8628 §5.1).
        self._door = door

    def render_GET(self, request: Request) -> int:
        return self._answer(request, self._get)

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._post)

    def _typed_code(self, request: Request) -> str:
        return parse_query(urlsplit(request.uri).query).get("user_code", [""])[0]

    def _get(self, request: Request) -> defer.Deferred[Reply]:
        return self._sessions.sign_in(request).addCallback(
            lambda sign_in: (self._second_factor_needed(sign_in)
                             or self._code_page(request, sign_in.user.id, self._typed_code(request))) if sign_in
            else self._login_page(request, failed=False))

    def _second_factor_needed(self, sign_in: SignIn) -> Reply | None:
        """The page sending the user to set up a second factor, if `[server] require_second_factor`
        asks one of them and this sign-in had none."""
        if sign_in.lacks_second_factor(self._server.config.server.require_second_factor):
            return self.pages.render(403, "second_factor_required.html", client_name="A device")
        return None

    def _login_page(self, request: Request, failed: bool, blocked: Blocked | None = None) -> Reply:
        csrf = self._sessions.csrf_token(request, f"device-login|{request.uri.decode('latin-1')}")
        return self.pages.render(429 if blocked else 401 if failed else 200, "login.html", client_name="A device",
                                 failed=refused_sign_in(request) if failed else None,
                                 action=request.uri.decode("latin-1"), csrf=csrf,
                                 passkey=self._login.passkey_form(request),
                                 blocked_wait=blocked.in_words if blocked else None,
                                 headers=retry_after(blocked.retry_after if blocked else None))

    def _code_page(self, request: Request, user_id: int, user_code: str, error: str = "", status: int = 200) -> Reply:
        csrf = self._sessions.csrf_token(request, f"device|{user_id}")
        return self.pages.render(status, "device.html", action="/device", csrf=csrf, user_code=user_code,
                                     error=error)

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        form = snapshot(request, self._issuer).form
        if form.get("step") in SIGN_IN_STEPS:
            if not self._sessions.csrf_ok(request, form, f"device-login|{request.uri.decode('latin-1')}"):
                return self.pages.form_expired()
            return self._login(request, form).addCallback(self._signed_in, request)
        return self._sessions.sign_in(request).addCallback(self._post_signed_in, request, form)

    def _signed_in(self, signed_in: SignedIn | SecondFactorAsked | Blocked | None, request: Request) -> Reply:
        if isinstance(signed_in, SignedIn):
            return (self._second_factor_needed(signed_in.sign_in)
                    or self._code_page(request, signed_in.user.id, self._typed_code(request)))
        if isinstance(signed_in, SecondFactorAsked):
            action = request.uri.decode("latin-1")
            csrf = self._sessions.csrf_token(request, f"device-login|{action}")
            return second_factor_page(self.pages, signed_in, action, csrf, "A device")
        return self._login_page(request, failed=True, blocked=signed_in)

    def _post_signed_in(self, sign_in: SignIn | None, request: Request, form: dict[str, str]
                        ) -> Reply | defer.Deferred[Reply]:
        """The code form and the consent form, for the user whose session is live."""
        if sign_in is None:
            return self._login_page(request, failed=False)
        needed = self._second_factor_needed(sign_in)
        if needed is not None:
            return needed
        step, user_id = form.get("step"), sign_in.user.id
        if step == "code" and self._sessions.csrf_ok(request, form, f"device|{user_id}"):
            return self._check_code(request, user_id, form.get("user_code", ""))
        user_code = device.normalize_user_code(self._typed_code(request))
        consent_binding = f"device-consent|{user_id}|{user_code}"
        if step == "consent" and user_code and self._sessions.csrf_ok(request, form, consent_binding):
            approved = form.get("decision") == "approve"
            d = self._pool.run(device.decide, self._server, user_code, sign_in, approved, client_address(request))
            return d.addCallback(self._decided, request, user_id, approved)
        return self.pages.form_expired()

    def _check_code(self, request: Request, user_id: int, typed: str) -> defer.Deferred[Reply]:
        user_code = device.normalize_user_code(typed)

        async def find() -> device.DeviceRequest | None:
            return await self._pool.run(device.find_by_user_code, self._server, user_code) if user_code else None

        keys = self._door.keys(f"device code of user {user_id}", client_address(request))
        found = defer.Deferred.fromCoroutine(self._door.attempt(keys, find))
        return found.addCallback(self._found, request, user_id, typed)

    def _found(self, found: device.DeviceRequest | Blocked | None, request: Request, user_id: int, typed: str
               ) -> Reply:
        if isinstance(found, Blocked):
            return self._code_page(request, user_id, "", f"Too many wrong codes. Try again in {found.in_words}.",
                                   status=429)
        if found is None:
            return self._code_page(request, user_id, typed, "That code is not valid, or it has expired.", status=400)
        csrf = self._sessions.csrf_token(request, f"device-consent|{user_id}|{found.user_code}")
        return self.pages.render(200, "consent.html", client_name=found.client_name, username=None,
                                 scopes=found.scopes, csrf=csrf,
                                 action="/device?" + urlencode({"user_code": found.user_code}))

    def _decided(self, recorded: bool, request: Request, user_id: int, approved: bool) -> Reply:
        self._metrics.authorizations.labels("device_" + ("approved" if approved else "denied")).inc()
        if not recorded:
            return self._code_page(request, user_id, "", "That code is not valid, or it has expired.", status=400)
        return self.pages.render(200, "device_done.html", approved=approved, client_name="The device")
