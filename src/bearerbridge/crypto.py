"""Keyed hashing of long random secrets, signed values for cookies and forms, passwords.

Client secrets, tokens and codes carry 256 bits of randomness, so a fast keyed hash
(HMAC-SHA-256) protects them at rest; slow password hashing (argon2id) is for the
low-entropy passwords people choose.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

if TYPE_CHECKING:
    from bearerbridge.config import PasswordSettings
    from bearerbridge.storage.models import User

_passwords = PasswordHasher()  # argon2id; `use_password_parameters` sets [passwords]


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against when the user does not exist, so that the answer takes as long
    as for a real user and does not reveal which names exist. Made on first use, not on import:
    it costs ~100 ms, which every command and test process would pay."""
    return _passwords.hash(secrets.token_urlsafe(16))


def use_password_parameters(settings: PasswordSettings) -> None:
    """Hash new passwords (and the unknown user's stand-in) with argon2id's parameters from
    `[passwords]`; a stored hash is verified with the parameters it holds."""
    global _passwords
    _passwords = PasswordHasher(time_cost=settings.time_cost, memory_cost=settings.memory_cost,
                                parallelism=settings.parallelism)
    _dummy_hash.cache_clear()


def new_secret() -> str:
    """A fresh token, code or client secret: 256 bits, URL-safe, never starting with '-'
    (a command line would take it for an option)."""
    while (secret := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return secret


# An app password is typed by people, into printers and phones: lower-case letters without i, l
# and o (read as 1, 1 and 0), 24 of them in groups of four, about 108 random bits.
APP_PASSWORD_LETTERS = "abcdefghjkmnpqrstuvwxyz"


def new_app_password() -> str:
    """A fresh app password, e.g. "hxvk-rmtd-waqe-pzbn-cfsu-jgye"."""
    letters = "".join(secrets.choice(APP_PASSWORD_LETTERS) for _ in range(24))
    return "-".join(letters[i:i + 4] for i in range(0, 24, 4))


def hash_password(password: str) -> str:
    return _passwords.hash(password)


def check_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches; constant-ish time when there is no hash."""
    try:
        return _passwords.verify(password_hash or _dummy_hash(), password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def verify_login(found: tuple[User | None, str | None], password: str) -> User | None:
    """The user found by name (`SqlStore.password_hash`), if the password is right and the
    account enabled. argon2id is slow on purpose: run this away from the store's threads."""
    user, password_hash = found
    if not check_password(password_hash, password) or user is None or user.disabled:
        return None
    return user


class Keyring:
    """Everything keyed by the server's secret: secret digests and signed values."""

    def __init__(self, key: bytes) -> None:
        # Separate subkeys so a digest can never be replayed as a signature.
        digest_key = hmac.digest(key, b"bearerbridge digest", "sha256")
        self._sign_key = hmac.digest(key, b"bearerbridge sign", "sha256")
        # Seals the private signing keys kept in the database (keys.KeySealer).
        self.sealing_key = hmac.digest(key, b"bearerbridge signing keys", "sha256")
        self._subject_key = hmac.digest(key, b"bearerbridge subject", "sha256")
        # Keyed once and copied for each digest: a third cheaper than keying every time,
        # and the SASL hot path takes one digest per check.
        self._digest_hmac = hmac.new(digest_key, digestmod=hashlib.sha256)

    def subject(self, user_id: int) -> str:
        """A user's OpenID `sub`: the same at every client and instance, never reassigned (ids are
        not reused), and telling nothing of the user (not their name, not their row number)."""
        mac = hmac.digest(self._subject_key, str(user_id).encode(), "sha256")
        return base64.urlsafe_b64encode(mac[:18]).decode()

    def digest(self, secret: str) -> str:
        """The stored form of a token, code or client secret."""
        mac = self._digest_hmac.copy()
        mac.update(secret.encode())
        return mac.hexdigest()

    def _mac(self, purpose: str, payload: str) -> str:
        mac = hmac.digest(self._sign_key, f"{purpose}\0{payload}".encode(), "sha256")
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def sign(self, purpose: str, payload: str, now: float | None = None) -> str:
        """`payload.timestamp.mac`, valid only for `purpose` (payload must not contain '.')."""
        stamped = f"{payload}.{int(now if now is not None else time.time())}"
        return f"{stamped}.{self._mac(purpose, stamped)}"

    def unsign(self, purpose: str, value: str, max_age: int, now: float | None = None) -> str | None:
        """The payload of a value made by `sign`, or None if forged, malformed or too old."""
        stamped, _, mac = value.rpartition(".")
        payload, _, stamp = stamped.rpartition(".")
        if not stamp.isdigit() or not hmac.compare_digest(mac, self._mac(purpose, stamped)):
            return None
        age = (now if now is not None else time.time()) - int(stamp)
        return payload if 0 <= age <= max_age else None
