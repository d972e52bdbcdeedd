"""The device authorization grant (RFC 8628): authlib's endpoint and grant, made strict.

authlib checks neither the client's registered scopes nor its grant types at the device
endpoint, and never consumes a device code; these subclasses do. The user's side (the
verification page) calls `find_by_user_code` and `decide`. Blocking: runs in the pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authlib.oauth2.rfc6749 import InvalidGrantError, InvalidScopeError, OAuth2Error, UnauthorizedClientError
from authlib.oauth2.rfc8628 import DeviceAuthorizationEndpoint, DeviceCodeGrant

from bearerbridge.oauth.scopes import refuse_operator_scopes
from bearerbridge.storage.models import Client, DeviceCode, SignIn, User

if TYPE_CHECKING:  # the server registers this module's grant: no import at run time
    from bearerbridge.oauth.server import BridgeServer

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
# authlib's user codes: two groups of four consonants, with no vowels (no words) and nothing
# that looks like a digit (RFC 8628 §6.1). 20**8 codes; wrong guesses are rate-limited.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
INTERVAL = 5


def normalize_user_code(typed: str) -> str | None:
    """`bcdf ghjk`, `BCDF-GHJK` → `BCDF-GHJK`; None if it cannot be a user code (§6.1)."""
    letters = [c for c in typed.upper() if not c.isspace() and c != "-"]
    if len(letters) != 8 or any(c not in USER_CODE_ALPHABET for c in letters):
        return None
    return "".join(letters[:4]) + "-" + "".join(letters[4:])


class TooManyDeviceCodes(OAuth2Error):
    """A client with `[tokens] device_codes_per_client` codes waiting already: a public client
    could otherwise fill the table as fast as it can post."""

    error = "slow_down"
    status_code = 429
    description = "Too many device codes are waiting for their users; try again later"


class DeviceEndpoint(DeviceAuthorizationEndpoint):
    """POST /device_authorization (RFC 8628 §3.1)."""

    INTERVAL = INTERVAL  # EXPIRES_IN is set from [tokens] device_ttl

    def get_verification_uri(self) -> str:
        return f"{self.server.config.server.issuer.rstrip('/')}/device"

    def save_device_credential(self, client_id: str, scope: str | None, data: dict[str, Any]) -> None:
        client: Client = self.server.query_client(client_id)  # authlib has just read it: memory answers
        if not client.check_grant_type(GRANT_TYPE) or GRANT_TYPE not in self.server.config.server.grant_types:
            raise UnauthorizedClientError(f"The client may not use {GRANT_TYPE}")
        allowed = client.get_allowed_scope(scope or self.server.default_scope(client))
        if not allowed:
            raise InvalidScopeError()
        refuse_operator_scopes(allowed, self.server.config.server.operator_scopes)
        if self.server.store.waiting_device_codes(client_id) >= self.server.config.tokens.device_codes_per_client:
            raise TooManyDeviceCodes()
        self.server.store.save_device_code(data["device_code"], data["user_code"], client_id, allowed,
                                           int(time.time()) + self.EXPIRES_IN, self.INTERVAL)


class DeviceGrant(DeviceCodeGrant):
    """Polling the token endpoint with a device code (RFC 8628 §3.4, §3.5)."""

    def query_device_credential(self, device_code: str) -> DeviceCode | None:
        found = self.server.store.find_device_code(device_code)
        if found is None:  # authlib would say invalid_request; the grant is what is invalid
            raise InvalidGrantError("Unknown device code")
        if found.used:
            raise InvalidGrantError("This device code has been used already")
        return found

    def query_user_grant(self, user_code: str) -> tuple[User | None, bool] | None:
        found = self.server.store.find_user_code(user_code)
        if found is None or found.approved is None:
            return None
        user = self.server.active_user(found.user_id)
        return user, bool(found.approved and user is not None)

    def should_slow_down(self, credential: DeviceCode) -> bool:
        now = time.time()
        previous = self.server.store.note_device_poll(credential.device_digest, now)
        return previous is not None and now - previous < credential.interval

    def validate_device_credential(self, credential: DeviceCode) -> User:
        user = super().validate_device_credential(credential)
        if not self.server.store.use_device_code(credential.device_digest):
            raise InvalidGrantError("This device code has been used already")
        return user


@dataclass(frozen=True)
class DeviceRequest:
    """What the verification page shows the user about a device awaiting approval."""
    user_code: str
    client_name: str
    scopes: tuple[tuple[str, str], ...]


def find_by_user_code(server: BridgeServer, user_code: str) -> DeviceRequest | None:
    """The pending device request behind a (normalized) user code, if any."""
    found = server.store.find_user_code(user_code)
    if found is None or found.is_expired() or found.approved is not None:
        return None
    client = server.store.get_client(found.client_id)
    if client is None:  # deleted by a transaction that ended while this one read the code
        return None
    scopes = tuple((s, server.config.scopes.get(s, s)) for s in found.scope.split())
    return DeviceRequest(user_code, client.name, scopes)


def decide(server: BridgeServer, user_code: str, sign_in: SignIn, approved: bool, address: str | None = None) -> bool:
    """Record the answer of the user signed in (and audit it as `consent`, from the user's
    `address`); remember the consent when they approve."""
    found = server.store.find_user_code(user_code)
    if found is None or found.is_expired() or not server.store.decide_device_code(user_code, sign_in, approved):
        return False
    server.audit.record("consent", user=sign_in.user.username, client_id=found.client_id,
                        scope=found.scope, approved=approved, grant_type=GRANT_TYPE, address=address)
    if approved:
        server.store.save_consent(sign_in.user.id, found.client_id, set(found.scope.split()))
    return True
