"""Passkeys (WebAuthn Level 3), the decisions around the `webauthn` library: the options a page
hands to navigator.credentials.create/get, checking what the browser sends back, which challenges
were spent, and the `amr` a passkey proves. No I/O; the store keeps the credentials
(storage/passkeys.py), web/passkeys.py and web/second_factor.py ask for them.

The relying party is the issuer's host name (WebAuthn §5.1.3: an RP ID is a registrable domain,
never an IP address; browsers refuse `127.0.0.1`), so an issuer on an IP address has no passkeys.

A challenge travels to the browser and back in a form, signed for that browser and page
(`Sessions.bind_to_browser`) for CHALLENGE_TTL seconds, and an answer to it is accepted once:
`SpentChallenges` remembers the challenges of accepted answers until they would have expired
anyway. That memory must stay bounded, and full it must refuse rather than forget (a forgotten
challenge lets its answer be replayed); so it is bounded per user, SPENT_PER_USER each, and a
full one refuses only the user who filled it. One memory of 100k for everyone, spent before the
answer was checked, let one signed-in user post 100k made-up answers to /account/passkeys within
CHALLENGE_TTL and shut every passkey sign-in on the instance out. Checking before spending is
not what stops a flood (a "none" attestation carries no signature: a script makes registrations
that verify, then assertions with its own key, as fast); it is what names the user at a sign-in,
where only a signature that verified says whose passkey answered (a registration's user is
signed into its form with the challenge). Spending after the check still keeps a replay out: the
library compares the challenge in clientDataJSON with the one signed in the form (an assertion's
signature covers clientDataJSON), `spend` checks and remembers in one step on the reactor's
thread, and web/passkeys.py spends before anything is written or a session started, so of one
answer posted twice at once one is accepted. The memory holds at most
SPENT_PER_USER for each user who answered in the last 2 * CHALLENGE_TTL: users an administrator
made, not anything a stranger can mint.

A credential id is kept as the passkeys table's String(1024) holds it: at most 1024 base64url
characters, 768 bytes. WebAuthn §5.8.3 allows 1023 bytes (1364 characters), but authenticators'
ids are far shorter (tens of bytes for the discoverable credentials asked for here), so a longer
one is refused (PasskeyRefused: the registration is not added, the assertion is malformed) rather
than the column widened and migrated; before, it passed the check and failed the insert on
PostgreSQL, an error page instead of a reason.

`amr` (RFC 8176 §2): a passkey is a proof of possession of a key, "hwk" when the authenticator
says the key cannot leave it (its backup-eligible flag clear, WebAuthn §6.1: a security key, a
TPM, a phone's secure element), "swk" when it may be copied to other devices (a synced passkey in
a password manager or a platform's keychain). "user" always: every assertion accepted has the
user-present flag (RFC 8176 cites WebAuthn for "user"). The user-verified flag says a PIN or a
biometric unlocked the key but not which, so "pin", "fpt" or "face" would be a guess; instead
"mfa": a key with user verification is two factors by itself (NIST SP 800-63B §5.1.8, a
multi-factor cryptographic authenticator), and so is a password with any passkey after it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from webauthn import (
    base64url_to_bytes,
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import bytes_to_base64url
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

CHALLENGE_TTL = 300  # seconds from the page to the browser's answer
TIMEOUT_MS = 120_000  # how long the browser's own prompt waits
MAX_PASSKEYS = 20  # per user
MAX_NAME = 60
SPENT_PER_USER = 32  # answers of one user in CHALLENGE_TTL: a person signs in or adds a passkey a few times
CREDENTIAL_ID_CHARS = 1024  # base64url, 768 bytes: the passkeys table's column (the docstring says why)
_CREDENTIAL_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{CREDENTIAL_ID_CHARS}}}")
_USER_HANDLE = re.compile(r"[A-Za-z0-9_-]{1,86}")  # a user handle is at most 64 bytes (WebAuthn §5.4.3)


class PasskeyRefused(Exception):
    """What the browser sent does not prove what it should (the reason, for the audit log)."""


@dataclass(frozen=True)
class RelyingParty:
    """Who the passkeys are for: the RP ID (a host name) and the origin pages are served from."""

    id: str
    origin: str
    name: str

    @classmethod
    def of(cls, issuer: str, site_name: str) -> RelyingParty | None:
        """The issuer's host as the RP ID; None when it is an IP address (WebAuthn refuses those)."""
        parts = urlsplit(issuer)
        host = parts.hostname or ""
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
        return cls(host, f"{parts.scheme}://{parts.netloc}", site_name) if host else None


@dataclass(frozen=True)
class StoredPasskey:
    """A credential as the store keeps it."""

    credential_id: str  # base64url
    user_id: int
    user_handle: str  # base64url
    public_key: str  # base64url COSE
    sign_count: int
    transports: str
    name: str
    created_at: int
    last_used_at: int | None


@dataclass(frozen=True)
class NewPasskey:
    """A credential a registration proved, to keep."""

    credential_id: str
    public_key: str
    sign_count: int
    transports: str


@dataclass(frozen=True)
class Assertion:
    """What an accepted assertion proved: the counter to keep and how the user was checked."""

    sign_count: int
    user_verified: bool
    hardware: bool  # not backup-eligible: the key cannot leave the authenticator

    def amr(self, after_password: bool) -> tuple[str, ...]:
        """RFC 8176 values (the module's docstring says why)."""
        key = ("hwk" if self.hardware else "swk", "user")
        mfa = ("mfa",) if after_password or self.user_verified else ()
        return (("pwd",) if after_password else ()) + key + mfa


def new_user_handle() -> str:
    """A user handle (WebAuthn §14.6.1: random, no name in it), 32 bytes, base64url."""
    return bytes_to_base64url(secrets.token_bytes(32))


def new_challenge() -> str:
    return bytes_to_base64url(secrets.token_bytes(32))


def _descriptors(keys: Sequence[StoredPasskey]) -> list[PublicKeyCredentialDescriptor]:
    known = {t.value for t in AuthenticatorTransport}
    return [PublicKeyCredentialDescriptor(
        id=base64url_to_bytes(k.credential_id),
        transports=[AuthenticatorTransport(t) for t in k.transports.split() if t in known] or None) for k in keys]


def registration_options(rp: RelyingParty, challenge: str, username: str, user_handle: str,
                         existing: Sequence[StoredPasskey]) -> str:
    """navigator.credentials.create's options as JSON: a discoverable credential (so that it can
    sign in without a name), user verification preferred, the user's passkeys excluded."""
    options = generate_registration_options(
        rp_id=rp.id, rp_name=rp.name, user_name=username, user_display_name=username,
        user_id=base64url_to_bytes(user_handle), challenge=base64url_to_bytes(challenge), timeout=TIMEOUT_MS,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED, user_verification=UserVerificationRequirement.PREFERRED),
        exclude_credentials=_descriptors(existing))
    return options_to_json(options)


def authentication_options(rp: RelyingParty, challenge: str, allowed: Sequence[StoredPasskey] = ()) -> str:
    """navigator.credentials.get's options as JSON: the user's passkeys for a second factor
    (user verification preferred); none listed for a sign-in without a password, where the
    authenticator offers its discoverable ones and must verify the user."""
    options = generate_authentication_options(
        rp_id=rp.id, challenge=base64url_to_bytes(challenge), timeout=TIMEOUT_MS,
        allow_credentials=_descriptors(allowed),
        user_verification=UserVerificationRequirement.PREFERRED if allowed else UserVerificationRequirement.REQUIRED)
    return options_to_json(options)


def parse(credential: str) -> tuple[str, str | None]:
    """The credential id and (for an assertion) the user handle the browser sent, both base64url,
    at most CREDENTIAL_ID_CHARS and 64 bytes; the rest is left to the library."""
    try:
        data = json.loads(credential)
        credential_id = data["id"]
        handle = data.get("response", {}).get("userHandle") or None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise PasskeyRefused("malformed") from None
    if not isinstance(credential_id, str) or not _CREDENTIAL_ID.fullmatch(credential_id) or not (
            handle is None or isinstance(handle, str) and _USER_HANDLE.fullmatch(handle)):
        raise PasskeyRefused("malformed")
    return credential_id, handle


def verify_registration(rp: RelyingParty, challenge: str, credential: str) -> NewPasskey:
    """The new credential, if the browser's answer to create() is for this challenge, RP and origin,
    and its id fits the passkeys table (at most CREDENTIAL_ID_CHARS in base64url)."""
    try:
        verified = verify_registration_response(
            credential=credential, expected_challenge=base64url_to_bytes(challenge),
            expected_rp_id=rp.id, expected_origin=rp.origin)
        transports = json.loads(credential).get("response", {}).get("transports") or []
    except (WebAuthnException, ValueError, TypeError, KeyError, AttributeError) as e:
        raise PasskeyRefused(f"registration: {e}") from None
    credential_id = bytes_to_base64url(verified.credential_id)
    if len(credential_id) > CREDENTIAL_ID_CHARS:
        raise PasskeyRefused(f"registration: a credential id of {len(verified.credential_id)} bytes, "
                             f"more than {CREDENTIAL_ID_CHARS * 3 // 4}")
    words = " ".join(t for t in transports if isinstance(t, str) and t.isalnum())[:255]
    return NewPasskey(credential_id, bytes_to_base64url(verified.credential_public_key), verified.sign_count, words)


def verify_assertion(rp: RelyingParty, challenge: str, credential: str, stored: StoredPasskey,
                     passwordless: bool) -> Assertion:
    """Check an answer to get() against the stored key: this challenge, RP and origin, the
    signature, the counter moving forward (a cloned authenticator falls behind), the user
    present, and verified when there is no password. Without a password the authenticator must
    name the user, as the one the key was made for."""
    credential_id, handle = parse(credential)
    if credential_id != stored.credential_id:
        raise PasskeyRefused("another credential")
    if passwordless and handle != stored.user_handle:
        raise PasskeyRefused("user handle")
    try:
        verified = verify_authentication_response(
            credential=credential, expected_challenge=base64url_to_bytes(challenge), expected_rp_id=rp.id,
            expected_origin=rp.origin, credential_public_key=base64url_to_bytes(stored.public_key),
            credential_current_sign_count=stored.sign_count, require_user_verification=passwordless)
    except (WebAuthnException, ValueError, TypeError, KeyError) as e:
        raise PasskeyRefused(f"assertion: {e}") from None
    return Assertion(verified.new_sign_count, verified.user_verified,
                     verified.credential_device_type == CredentialDeviceType.SINGLE_DEVICE)


def display_name(typed: str, transports: str) -> str:
    """The name a user gave a passkey, or one made from how it talks to the browser."""
    name = " ".join(typed.split())[:MAX_NAME]
    if name:
        return name
    return "Security key" if set(transports.split()) & {"usb", "nfc", "ble"} else "Passkey"


class SpentChallenges:
    """Challenges whose answers were accepted, each kept until it would have expired anyway, so
    that an answer replayed (the same form posted twice) is refused. Counted per user, at most
    `per_user` at once: a full user is refused, not forgotten, and refuses nobody else (the
    module's docstring says why). In memory: one instance's (behind several instances, the
    counter check is what is left against a replay, for authenticators that count)."""

    def __init__(self, per_user: int = SPENT_PER_USER) -> None:
        self._spent: dict[int, dict[bytes, float]] = {}
        self._per_user = per_user
        self._swept = 0.0

    def spend(self, user_id: int, challenge: str, now: float) -> bool:
        """True the first time `challenge` is spent for `user_id` within its lifetime, False after
        or when the user has `per_user` live ones."""
        if not self._swept <= now < self._swept + CHALLENGE_TTL:  # users gone quiet, every TTL
            self._spent = {u: live for u, spent in self._spent.items()
                           if (live := {k: t for k, t in spent.items() if t > now})}
            self._swept = now
        spent = self._spent.setdefault(user_id, {})
        key = hashlib.sha256(challenge.encode()).digest()
        if spent.get(key, 0) > now:
            return False
        if len(spent) >= self._per_user:
            spent = self._spent[user_id] = {k: t for k, t in spent.items() if t > now}
            if len(spent) >= self._per_user:
                return False  # full of live challenges: refuse rather than forget one
        spent[key] = now + CHALLENGE_TTL
        return True
