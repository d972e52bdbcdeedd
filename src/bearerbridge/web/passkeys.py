"""Passkey ceremonies in the browser's pages (passkeys.py decides, storage/passkeys.py keeps).

A page that asks for a passkey carries a form with the options for navigator.credentials
(`PasskeyForm.options`, JSON in a data attribute) and the challenge, signed for this browser and
what the form is for (`binding`: the page's URI at a sign-in, the session at a registration) for
CHALLENGE_TTL seconds. /static/passkeys.js (no inline script: the CSP is default-src 'self')
calls the browser and posts its answer in the form's `credential` field. An answer is accepted
once: its challenge is spent when the answer verifies, for the user it proves (`SpentChallenges`;
passkeys.py's docstring says why after, and why per user). Without JavaScript, or on an issuer
with an IP address (no RP ID), the passkey forms stay hidden and everything else works.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.web.server import Request

from bearerbridge import passkeys
from bearerbridge.passkeys import Assertion, PasskeyRefused, RelyingParty, SpentChallenges, StoredPasskey
from bearerbridge.storage.models import User
from bearerbridge.storage.pool import StorePool

if TYPE_CHECKING:  # sessions.py makes the Passkeys of its PasswordLogin
    from bearerbridge.web.sessions import Sessions


@dataclass(frozen=True)
class PasskeyForm:
    """What a page needs to ask the browser for a passkey: the options (JSON), the signed challenge."""

    options: str
    challenge: str


class Passkeys:
    """Makes the passkey forms of the sign-in pages and checks their answers."""

    def __init__(self, rp: RelyingParty | None, sessions: Sessions, pool: StorePool,
                 clock: Callable[[], float] = time.time) -> None:
        self.rp = rp
        self._sessions = sessions
        self._pool = pool
        self._spent = SpentChallenges()
        self._clock = clock

    def _form(self, request: Request, binding: str, options: Callable[[RelyingParty, str], str],
              extra: str = "") -> PasskeyForm | None:
        if self.rp is None:
            return None
        challenge = passkeys.new_challenge()
        return PasskeyForm(options(self.rp, challenge),
                           self._sessions.bind_to_browser(request, "passkey " + binding, f"{challenge} {extra}"))

    def challenge(self, request: Request, binding: str, fields: Mapping[str, str]) -> tuple[str, str]:
        """The challenge of the form posted (and what was signed with it), if it was made for this
        browser and `binding` in the last CHALLENGE_TTL seconds; not spent yet (`_spend`)."""
        signed = self._sessions.bound_to_browser(request, "passkey " + binding, fields.get("challenge", ""),
                                                 passkeys.CHALLENGE_TTL)
        if signed is None:
            raise PasskeyRefused("challenge expired or not for this browser")
        challenge, _, extra = signed.partition(" ")
        return challenge, extra

    def _spend(self, user_id: int, challenge: str) -> None:
        """Spend the challenge of an answer that verified, for the user it proved; PasskeyRefused if
        it was spent before, or if this user has SPENT_PER_USER live ones. Before anything is
        written or a session started: of two copies posted at once, only one gets that far."""
        if not self._spent.spend(user_id, challenge, self._clock()):
            raise PasskeyRefused("challenge used already, or too many at once")

    # -- registration (/account/passkeys) ---------------------------------------------------------

    def registration_form(self, request: Request, binding: str, user: User, handle: str,
                          existing: Sequence[StoredPasskey]) -> PasskeyForm | None:
        return self._form(request, binding, lambda rp, challenge: passkeys.registration_options(
            rp, challenge, user.username, handle, existing), extra=f"{handle} {user.id}")

    def registered(self, request: Request, binding: str, fields: Mapping[str, str]
                   ) -> tuple[passkeys.NewPasskey, str]:
        """The passkey the browser made, checked (PasskeyRefused if not), and the user handle the
        options gave it (signed with the challenge and the user's id: the authenticator does not
        send it back)."""
        if self.rp is None:
            raise PasskeyRefused("no relying party")
        challenge, extra = self.challenge(request, binding, fields)
        handle, _, user_id = extra.partition(" ")
        if not user_id.isdigit():
            raise PasskeyRefused("challenge without its user")
        new = passkeys.verify_registration(self.rp, challenge, fields.get("credential", ""))
        self._spend(int(user_id), challenge)
        return new, handle

    # -- sign-in ----------------------------------------------------------------------------------

    @staticmethod
    def sign_in_binding(request: Request, second_factor: bool) -> str:
        """What a sign-in challenge is for: this page (its URI), as the only factor or the second."""
        return f"{'second factor' if second_factor else 'sign in'}|{request.uri.decode('latin-1')}"

    def sign_in_form(self, request: Request, allowed: Sequence[StoredPasskey] = ()) -> PasskeyForm | None:
        """The form of a sign-in with a passkey: without a password (`allowed` empty: any of the
        authenticator's passkeys for this site), or after it (the user's passkeys)."""
        binding = self.sign_in_binding(request, second_factor=bool(allowed))
        return self._form(request, binding, lambda rp, challenge: passkeys.authentication_options(
            rp, challenge, allowed))

    async def assertion(self, request: Request, fields: Mapping[str, str], user_id: int | None
                        ) -> tuple[StoredPasskey, Assertion]:
        """Check a sign-in form's answer: of `user_id`'s passkeys (after the password), or of
        anyone's (without one: the passkey names the user). Its challenge is spent for the
        passkey's user once the signature verified, and the passkey's counter and last use are
        written. PasskeyRefused with the reason, if not."""
        if self.rp is None:
            raise PasskeyRefused("no relying party")
        challenge, _ = self.challenge(request, self.sign_in_binding(request, user_id is not None), fields)
        credential = fields.get("credential", "")
        credential_id, _ = passkeys.parse(credential)
        stored = await self._pool.run(self._pool.store.passkey, credential_id)
        if stored is None or (user_id is not None and stored.user_id != user_id):
            raise PasskeyRefused("unknown passkey")
        proven = passkeys.verify_assertion(self.rp, challenge, credential, stored, passwordless=user_id is None)
        self._spend(stored.user_id, challenge)
        if not await self._pool.run(self._pool.store.passkey_used, stored.credential_id, proven.sign_count):
            raise PasskeyRefused("signature counter went backwards")
        return stored, proven
