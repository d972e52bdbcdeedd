"""Records read from the store, with the methods authlib's grants call on them."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin
from authlib.oauth2.rfc6749.util import scope_to_list
from authlib.oauth2.rfc8628 import DeviceCredentialMixin
from authlib.oidc.core import AuthorizationCodeMixin as OpenIDCodeMixin

from bearerbridge.uris import loopback_redirect_without_port, redirect_uri_problem


@dataclass(frozen=True)
class User:
    id: int
    username: str
    email: str | None
    disabled: bool = False
    display_name: str | None = None  # the OpenID `name` claim, when the operator gave one
    is_admin: bool = False  # may use /admin

    def get_user_id(self) -> int:
        return self.id


# The RFC 8176 methods that are a second factor here: a TOTP code, a passkey (bound or synced).
SECOND_FACTORS = frozenset({"otp", "hwk", "swk"})


@dataclass(frozen=True)
class SignIn:
    """A live browser session: who signed in, when (OpenID's `auth_time`) and how (`amr`,
    RFC 8176: `pwd` for a password)."""

    user: User
    auth_time: int
    amr: tuple[str, ...]

    def lacks_second_factor(self, rule: str) -> bool:
        """Whether `[server] require_second_factor` (`rule`: none, admins, everyone) wants of this
        user a second factor this sign-in did not use (a TOTP code, a passkey)."""
        applies = rule == "everyone" or (rule == "admins" and self.user.is_admin)
        return applies and not SECOND_FACTORS & set(self.amr)


@dataclass(frozen=True)
class Client(ClientMixin):
    client_id: str
    name: str
    redirect_uris: tuple[str, ...]
    scope: str
    grant_types: tuple[str, ...]
    public: bool
    secret_digest: str | None = None
    created_at: int = 0
    # May introspect other clients' tokens (an IMAP, WebDAV or mail server); any client its own.
    resource_server: bool = False
    # Must send a PKCE S256 challenge; False only for a legacy confidential client (`--no-pkce`).
    pkce_required: bool = True
    # Signs its ID tokens with (OpenID Connect Registration's id_token_signed_response_alg).
    id_token_alg: str = "ES256"
    # Where RP-initiated logout may send the browser afterwards (exact match).
    post_logout_redirect_uris: tuple[str, ...] = ()
    # Shown on the consent page beside the name (https URLs).
    website: str | None = None
    logo_uri: str | None = None
    # "opaque" or "jwt" (RFC 9068); None: the server's [tokens] format.
    access_token_format: str | None = None
    # Turns a presented secret into its stored digest; set by the store (it holds the key).
    digest: Callable[[str], str] | None = field(default=None, compare=False, repr=False)

    def get_client_id(self) -> str:
        return self.client_id

    @property
    def id_token_signed_response_alg(self) -> str:
        """The name authlib's OpenID grants look for."""
        return self.id_token_alg

    @property
    def client_metadata(self) -> dict[str, object]:
        """What authlib's RP-initiated logout reads of a client."""
        return {"post_logout_redirect_uris": list(self.post_logout_redirect_uris)}

    def get_default_redirect_uri(self) -> str | None:
        # Only an unambiguous default: with several URIs the request must name one.
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """The registered scopes when none are asked for; None (invalid_scope) when
        the request asks for any scope the client was not registered with."""
        if not scope:
            return self.scope
        requested = scope_to_list(scope)
        if not set(requested) <= set(scope_to_list(self.scope)):
            return None
        return " ".join(dict.fromkeys(requested))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """Exact match, character for character (RFC 9700 §4.1.3), of a URI nothing could read
        two ways (`uris.redirect_uri_problem`); only a public native client's loopback
        redirect may use another port (RFC 8252 §7.3)."""
        if redirect_uri_problem(redirect_uri) is not None:
            return False
        if redirect_uri in self.redirect_uris:
            return True
        wanted = loopback_redirect_without_port(redirect_uri) if self.public else None
        return wanted is not None and any(loopback_redirect_without_port(r) == wanted for r in self.redirect_uris)

    def check_client_secret(self, client_secret: str) -> bool:
        if self.public or not self.secret_digest or self.digest is None:
            return False
        return hmac.compare_digest(self.digest(client_secret), self.secret_digest)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.public:
            return method == "none"
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        if grant_type == "client_credentials" and self.public:
            return False
        return grant_type in self.grant_types


@dataclass(frozen=True)
class AuthCode(OpenIDCodeMixin):
    code_digest: str
    client_id: str
    user_id: int
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    expires_at: int
    used: bool = False
    # OpenID Connect: the request's nonce, and when and how the user signed in (`SignIn`).
    nonce: str | None = None
    auth_time: int | None = None
    amr: str | None = None  # space-separated

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int | None:
        return self.auth_time

    def get_amr(self) -> list[str] | None:
        return self.amr.split() if self.amr else None

    def is_expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.expires_at


@dataclass(frozen=True)
class DeviceCode(DeviceCredentialMixin):
    """A device authorization (RFC 8628 §3.2) and, once given, the user's answer."""

    device_digest: str
    user_code: str
    client_id: str
    scope: str
    expires_at: int
    interval: int
    last_poll_at: float | None
    user_id: int | None
    approved: bool | None
    used: bool
    # When and how the user who answered had signed in (`SignIn`), for an ID token.
    auth_time: int | None = None
    amr: str | None = None

    def get_client_id(self) -> str:
        return self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_user_code(self) -> str:
        return self.user_code

    def is_expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.expires_at


@dataclass(frozen=True)
class Token(TokenMixin):
    """An issued token pair, joined with the state of its user and client."""

    id: int
    client_id: str
    user_id: int | None
    username: str | None
    email: str | None
    scope: str
    issued_at: int
    expires_at: int
    refresh_expires_at: int | None
    revoked: bool
    rotated: bool          # its refresh token has been used once already
    family: str            # every token rotated from one grant shares this
    user_disabled: bool = False
    # This record answers for its refresh token (in introspection and revocation).
    refresh: bool = False

    def check_client(self, client: ClientMixin) -> bool:
        return self.client_id == client.get_client_id()

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_at - self.issued_at

    def is_expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked or self.user_disabled

    def is_active(self, now: float | None = None) -> bool:
        return not self.is_revoked() and not self.is_expired(now)

    def refresh_usable(self, now: float | None = None) -> bool:
        now = now if now is not None else time.time()
        return (not self.is_revoked() and not self.rotated
                and self.refresh_expires_at is not None and now < self.refresh_expires_at)
