"""The second step of a sign-in, for a user who turned two-factor sign-in on (web/twofactor.py):
after the right password, a form asking for the code their authenticator app shows, or one of
their recovery codes, before any session starts. /authorize, /device and /account all ask it,
through `PasswordLogin` (web/sessions.py); each shows `second_factor_page` and posts it back
with `step=second_factor`, under the same CSRF token as its password form.

What the first step proved travels in the form as `pending`: the user's id, signed
(`Keyring.sign`), bound to this browser (its CSRF cookie) and to the page that asked (the
request's URI), for PENDING_TTL seconds. It cannot be forged (a MAC), taken to another browser
or page (the binding), or outlive its minutes; posted again, it buys only another guess at the
code, and guesses are counted: a wrong code is a failure at the sign-in door (`DatabaseDoor`),
per user (a count of its own, "second factor of NAME", which a right password does not clear)
and per address, as wrong passwords are. A code is accepted once (storage/twofactor.py).

Both a TOTP code and a recovery code sign in with `amr` ["pwd", "otp", "mfa"] (RFC 8176 §2): a
recovery code is a one-time password too (each works once; NIST SP 800-63B calls such codes
look-up secrets, "something you have", like the phone), and RFC 8176 registers no closer
value; the audit log tells the two apart (`recovery_code_used`).

A user with passkeys is offered one here too (web/passkeys.py: the form's `credential` field, a
challenge signed for this page), in place of a code or, without TOTP, alone; it signs in with
the amr `Assertion.amr` gives (passkeys.py), "pwd" first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge.guard import Blocked, DatabaseDoor, Recorder
from bearerbridge.passkeys import PasskeyRefused, StoredPasskey
from bearerbridge.storage.models import User
from bearerbridge.storage.pool import StorePool
from bearerbridge.storage.twofactor import CodeCheck
from bearerbridge.web.passkeys import PasskeyForm, Passkeys
from bearerbridge.web.site import Pages, Reply, client_address, retry_after

if TYPE_CHECKING:  # sessions.py makes the one SecondFactor of its PasswordLogin
    from bearerbridge.web.sessions import Sessions

PENDING_TTL = 600  # seconds from the right password to the code
AMR = ("pwd", "otp", "mfa")  # RFC 8176: a password, then a one-time password: two factors


@dataclass(frozen=True)
class SecondFactorAsked:
    """The password was right and the user has two-factor sign-in on: ask for a code (again,
    when the last one was `wrong` or the door is `blocked`). An empty `pending`: what the first
    step proved is no longer valid (too old, another browser): sign in again."""

    username: str
    pending: str
    wrong: bool = False
    blocked: Blocked | None = None
    totp: bool = True  # whether a code from an app (or a recovery code) is asked
    passkey: PasskeyForm | None = None  # the user's passkeys, asked of the browser

    @property
    def status(self) -> int:
        return 429 if self.blocked else 400 if not self.pending else 401 if self.wrong else 200


def second_factor_page(pages: Pages, asked: SecondFactorAsked, action: str, csrf: str,
                       client_name: str | None) -> Reply:
    """The code form, posting to `action` (the page that asked) with `csrf` (its login token)."""
    blocked = asked.blocked
    return pages.render(asked.status, "second_factor.html", asked=asked, action=action, csrf=csrf,
                        client_name=client_name, blocked_wait=blocked.in_words if blocked else None,
                        headers=retry_after(blocked.retry_after if blocked else None))


class SecondFactor:
    """Asks for the second factor and checks it, throttled at the sign-in door."""

    def __init__(self, pool: StorePool, sessions: Sessions, door: DatabaseDoor, audit: Recorder,
                 passkeys: Passkeys | None = None) -> None:
        self._pool = pool
        self._sessions = sessions
        self._door = door
        self._audit = audit
        self.passkeys = passkeys

    @staticmethod
    def _binding(request: Request) -> str:
        return f"second factor|{request.uri.decode('latin-1')}"

    def ask(self, request: Request, user: User, totp: bool = True, keys: Sequence[StoredPasskey] = (),
            pending: str = "", wrong: bool = False, blocked: Blocked | None = None) -> SecondFactorAsked:
        """The second step's form (first showing: carrying what the password proved), with a
        passkey form when the user has passkeys and the site can ask for them."""
        pending = pending or self._sessions.bind_to_browser(request, self._binding(request), str(user.id))
        passkey = self.passkeys.sign_in_form(request, keys) if self.passkeys and keys else None
        return SecondFactorAsked(user.username, pending, wrong, blocked, totp or passkey is None, passkey)

    async def _again(self, request: Request, user: User, pending: str, wrong: bool = False,
                     blocked: Blocked | None = None) -> SecondFactorAsked:
        totp, keys = await self._pool.run(self._pool.store.second_factors, user.id)
        return self.ask(request, user, totp, keys, pending, wrong, blocked)

    async def check(self, request: Request, fields: Mapping[str, str]
                    ) -> tuple[User, tuple[str, ...]] | SecondFactorAsked:
        """The code form's answer: the user and how they signed in, or the form to show again."""
        pending = fields.get("pending", "")
        user_id = self._sessions.bound_to_browser(request, self._binding(request), pending, PENDING_TTL)
        user = await self._pool.run(self._pool.store.get_user, int(user_id)) if user_id and user_id.isdigit() \
            else None
        if user is None or user.disabled:
            return SecondFactorAsked("", "")
        if fields.get("credential"):
            return await self._passkey(request, user, pending, fields)
        recovery = fields.get("recovery_code", "").strip()
        proven = await self.attempt(request, user, recovery or fields.get("code", ""), recovery=bool(recovery))
        if isinstance(proven, Blocked):
            return await self._again(request, user, pending, blocked=proven)
        if proven is None:
            return await self._again(request, user, pending, wrong=True)
        return user, proven

    async def _passkey(self, request: Request, user: User, pending: str, fields: Mapping[str, str]
                       ) -> tuple[User, tuple[str, ...]] | SecondFactorAsked:
        """A passkey's answer in place of a code, counted at the door as a code is."""
        address = client_address(request)
        known = self._sessions.known_browser(request, user.username)
        keys = self._door.keys(None if known else f"second factor of {user.username}", address)

        async def check() -> tuple[str, ...] | None:
            if self.passkeys is None:
                return None
            try:
                _, proven = await self.passkeys.assertion(request, fields, user.id)
            except PasskeyRefused as e:
                self._audit.record("sign_in_failed", user=user.username, address=address, reason="passkey",
                                   detail=str(e)[:200])
                return None
            return proven.amr(after_password=True)
        amr = await self._door.attempt(keys, check)
        if isinstance(amr, Blocked) or amr is None:
            return await self._again(request, user, pending, wrong=amr is None,
                                     blocked=amr if isinstance(amr, Blocked) else None)
        return user, amr

    def attempt(self, request: Request, user: User, typed: str, recovery: bool = False,
                failure: str = "sign_in_failed") -> defer.Deferred[tuple[str, ...] | Blocked | None]:
        """Check a code of `user` at the door: counted per user (unless this browser has signed in
        as them before: then whoever knows the password cannot lock them out) and per address.
        The `amr` it proves, or None (audited as `failure`, with the reason), or Blocked."""
        address = client_address(request)
        known = self._sessions.known_browser(request, user.username)
        keys = self._door.keys(None if known else f"second factor of {user.username}", address)
        return defer.Deferred.fromCoroutine(self._door.attempt(
            keys, lambda: self._check(user, typed, recovery, address, failure)))

    async def _check(self, user: User, typed: str, recovery: bool, address: str | None,
                     failure: str) -> tuple[str, ...] | None:
        store = self._pool.store
        outcome = await self._pool.run(store.use_recovery_code if recovery else store.use_totp_code, user.id, typed)
        if outcome is CodeCheck.RECOVERY:
            left = (await self._pool.run(store.two_factor, user.id)).recovery_left
            self._audit.record("recovery_code_used", user=user.username, left=left, address=address)
        elif outcome is not CodeCheck.TOTP:
            self._audit.record(failure, user=user.username, address=address, reason=outcome.value)
            return None
        return AMR
