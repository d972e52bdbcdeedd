"""OpenID Connect Core 1.0 on top of the OAuth grants: ID tokens for the code and device grants,
the claims each scope gives, the UserInfo endpoint, `id_token_hint`, RP-initiated logout and the
provider configuration (Discovery 1.0).

authlib's OpenID extension (`OpenIDCode`) and RP-initiated logout endpoint do the protocol and
joserfc the JOSE; this module says what they ask of us: which key signs, what a user's claims
are, and how a bearer token is looked up. Blocking: everything here runs in a pool thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authlib.oauth2.rfc6749 import InvalidRequestError, OAuth2Error
from authlib.oauth2.rfc6750 import InsufficientScopeError, InvalidTokenError
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from authlib.oidc.discovery import OpenIDProviderMetadata
from authlib.oidc.rpinitiated import EndSessionEndpoint, EndSessionRequest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from bearerbridge import keys
from bearerbridge.config import Config
from bearerbridge.crypto import Keyring
from bearerbridge.keys import SigningKey
from bearerbridge.oauth.requests import HttpRequest
from bearerbridge.storage.models import Client, DeviceCode, SignIn, User
from bearerbridge.storage.store import SqlStore

if TYPE_CHECKING:  # the server registers this module's parts: no import at run time
    from bearerbridge.oauth.server import BridgeServer

# The claims each scope gives (Core §5.4), of those we know about a user.
PROFILE_CLAIMS = ("preferred_username", "name")
EMAIL_CLAIMS = ("email", "email_verified")
PROMPTS = ("none", "login", "consent")
NONCE_LENGTH = 255  # as stored with the code


def user_claims(user: User, scope: str, keyring: Keyring) -> UserInfo:
    """What `scope` lets a client know of `user`: always `sub` (opaque, `Keyring.subject`); with
    `profile` the user name and display name; with `email` the address, verified because only the
    operator sets it."""
    scopes = set(scope.split())
    claims = UserInfo(sub=keyring.subject(user.id))
    if "profile" in scopes:
        claims["preferred_username"] = user.username
        if user.display_name:
            claims["name"] = user.display_name
    if "email" in scopes and user.email:
        claims["email"] = user.email
        claims["email_verified"] = True
    return claims


@dataclass(frozen=True)
class _KeysRead:
    keys: list[SigningKey]
    private: KeySet  # every published key, opened
    public: KeySet
    read_at: float


class SigningKeys:
    """The signing keys as the store holds them, opened once and read again every `keys.REREAD`
    seconds: a rotation made elsewhere (the CLI, another instance) is signed with within that,
    and since every next key is published a rotation before it signs, no relying party meets a
    kid it has not seen."""

    def __init__(self, store: SqlStore, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._read: _KeysRead | None = None
        self._lock = threading.Lock()

    def _current(self) -> _KeysRead:
        read = self._read
        if read is not None and self._clock() - read.read_at < keys.REREAD:
            return read
        with self._lock:  # one pool thread reads and opens them; the others wait for its result
            if self._read is read:
                found = keys.published(self._store.ensure_signing_keys(), int(time.time()))
                private = KeySet([self._store.sealer.open(k) for k in found])
                public = KeySet.import_key_set({"keys": [k.as_dict(private=False) for k in private.keys]})
                self._read = _KeysRead(found, private, public, self._clock())
            assert self._read is not None
            return self._read

    def header(self, alg: str) -> dict[str, str]:
        """The JWS header of a token signed now with `alg`'s current key."""
        current = keys.current(self._current().keys, alg)
        if current is None:  # ensure_signing_keys makes one for every algorithm
            raise RuntimeError(f"no current {alg} signing key")
        return {"alg": alg, "kid": current.kid, "typ": "JWT"}

    def private(self) -> KeySet:
        """Every published key, private halves: joserfc picks the one the header's kid names, so
        a header made just before a re-read still finds its key."""
        return self._current().private

    def public(self) -> KeySet:
        """Every published key's public half: what verifies an ID token of ours."""
        return self._current().public


class IdTokens(OpenIDCode):
    """authlib's OpenID extension of the code grant (and, for its token response alone, the device
    grant): an `id_token` beside the access token when the scope has `openid`, signed with the
    client's algorithm (ES256 unless registered otherwise) by the current key of that algorithm."""

    def __init__(self, server: BridgeServer) -> None:
        super().__init__(require_nonce=False)
        self._server = server

    def validate_openid_authorization_request(self, grant: Any, redirect_uri: str) -> None:
        nonce = grant.request.payload.data.get("nonce") or ""
        if len(nonce) > NONCE_LENGTH:
            raise InvalidRequestError(f"nonce is longer than {NONCE_LENGTH} characters", redirect_uri=redirect_uri,
                                      state=grant.request.payload.state)
        super().validate_openid_authorization_request(grant, redirect_uri)

    def exists_nonce(self, nonce: str, request: HttpRequest) -> bool:
        """A nonce this client sent with a code still kept is a replay (Core §15.5.2)."""
        return self._server.store.nonce_in_use(request.payload.client_id, nonce)

    def get_client_algorithm(self, client: Client) -> str:
        return client.id_token_alg

    def get_encode_header(self, client: Client) -> dict[str, str]:
        return self._server.signing_keys.header(client.id_token_alg)

    def resolve_client_private_key(self, client: Client) -> KeySet:
        return self._server.signing_keys.private()

    def get_client_claims(self, client: Client) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self._server.config.server.issuer, "aud": client.client_id,
                                  "iat": now, "exp": now + self._server.config.tokens.access_ttl}
        if self._server.config.openid.acr:
            claims["acr"] = self._server.config.openid.acr
        return claims

    def get_compatible_claims(self, request: HttpRequest) -> dict[str, Any]:
        """The code grant's sign-in comes from its code (`get_authorization_code_claims`); the
        device grant's from the device code the user approved."""
        claims: dict[str, Any] = super().get_compatible_claims(request)
        credential = getattr(request, "credential", None)
        if isinstance(credential, DeviceCode) and credential.auth_time is not None:
            claims["auth_time"] = credential.auth_time
            if credential.amr:
                claims["amr"] = credential.amr.split()
        return claims

    def generate_user_info(self, user: User, scope: str) -> UserInfo:
        return user_claims(user, scope, self._server.store.keyring)


_NOT_OURS = "the sign-in it sent along (id_token_hint) was not issued by this server, or was changed on the way"


def hinted_subject(hint: str, public: KeySet, issuer: str) -> str:
    """The `sub` of an ID token we issued (`id_token_hint`, Core §3.1.2.1): signed by one of our
    published keys and naming us as issuer; it may have expired. InvalidRequestError otherwise."""
    try:
        token = jwt.decode(hint, public, algorithms=list(keys.ALGORITHMS))
    except (JoseError, ValueError) as error:
        raise InvalidRequestError(_NOT_OURS) from error
    if token.claims.get("iss") != issuer or not isinstance(token.claims.get("sub"), str):
        raise InvalidRequestError(_NOT_OURS)
    return str(token.claims["sub"])


# -- UserInfo (Core §5.3) ------------------------------------------------------------------------

def _bearer_error(error: OAuth2Error, realm: str, scope: str | None = None) -> tuple[int, Any, list[tuple[str, str]]]:
    """An RFC 6750 §3 error: its status, body and WWW-Authenticate challenge."""
    challenge = [f'realm="{realm}"', f'error="{error.error}"']
    if error.description:
        challenge.append(f'error_description="{error.description}"')
    if scope:
        challenge.append(f'scope="{scope}"')
    body = {"error": error.error, "error_description": error.description}
    return error.status_code, body, [("WWW-Authenticate", "Bearer " + ", ".join(challenge))]


def bearer_token(request: HttpRequest) -> str | None:
    """The access token of a request to a protected resource (RFC 6750 §2.1, §2.2): in the
    Authorization header, or in a form body; never in the query string (RFC 9700 §2.3)."""
    scheme, _, credentials = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.form.get("access_token") or None


def userinfo(server: BridgeServer, request: HttpRequest) -> tuple[int, Any, list[tuple[str, str]]]:
    """The UserInfo endpoint: the claims the token's scope gives of its user, for a live token
    granted with `openid`; RFC 6750 errors otherwise."""
    realm = server.config.server.issuer
    token_string = bearer_token(request)
    if token_string is None:  # §3.1: no error code when no token was sent
        return 401, {"error": "invalid_request", "error_description": "No bearer token"}, [
            ("WWW-Authenticate", f'Bearer realm="{realm}"')]
    token = server.store.find_access_token(token_string)
    if token is None or not token.is_active():
        return _bearer_error(InvalidTokenError("The access token is unknown, expired or revoked"), realm)
    if "openid" not in token.scope.split():
        return _bearer_error(InsufficientScopeError("The access token was not granted the openid scope"), realm,
                             "openid")
    user = server.active_user(token.user_id)
    if user is None:  # client credentials: no user to describe
        return _bearer_error(InvalidTokenError("The access token was not granted by a user"), realm)
    request.token_use = (token.family, "userinfo")  # noted as a use of the grant by the web layer (uses.py)
    return 200, dict(user_claims(user, token.scope, server.store.keyring)), [("Cache-Control", "no-store")]


# -- RP-initiated logout ---------------------------------------------------------------------------

class EndSession(EndSessionEndpoint):
    """authlib's RP-initiated logout (OpenID Connect RP-Initiated Logout 1.0): the request is
    checked here, the browser's session is ended by the web layer, which holds its cookie."""

    def __init__(self, server: BridgeServer) -> None:
        super().__init__(server)
        self._server = server

    def get_server_jwks(self) -> KeySet:
        return self._server.signing_keys.public()

    def get_algorithms(self) -> list[str]:
        return list(keys.ALGORITHMS)

    def end_session(self, end_session_request: EndSessionRequest) -> None:
        """Nothing here: the web layer ends the session whose cookie the browser sent."""


@dataclass(frozen=True)
class LogoutRequest:
    """What a visit to the end-session endpoint gets."""

    confirm: bool  # ask the user before signing them out
    redirect_uri: str | None = None  # where to send the browser afterwards (registered; with the state)
    client_name: str | None = None
    error: str | None = None  # why the request cannot be followed: nothing is done, no redirect


def logout_request(server: BridgeServer, request: HttpRequest, sign_in: SignIn | None) -> LogoutRequest:
    """Check an RP-initiated logout (authlib's `EndSession`). The user is asked first unless the
    request carries an ID token of ours for the very user signed in (§2: without one, a logout
    link is a way to sign anyone out); post-logout redirection needs that ID token too."""
    hint = request.payload.data.get("id_token_hint")
    try:
        if hint:  # checked here first, to say in words what authlib would say in joserfc's
            hinted_subject(hint, server.signing_keys.public(), server.config.server.issuer)
        checked: EndSessionRequest = server.validate_endpoint_request("end_session", request)
    except OAuth2Error as error:
        return LogoutRequest(confirm=False, error=error.description or error.error)
    hinted = checked.id_token_claims
    same_user = sign_in is None or (hinted is not None
                                    and hinted.get("sub") == server.store.keyring.subject(sign_in.user.id))
    return LogoutRequest(not same_user, checked.redirect_uri, checked.client.name if checked.client else None)


# -- Discovery 1.0 ---------------------------------------------------------------------------------

def provider_metadata(config: Config, oauth_metadata: dict[str, Any]) -> dict[str, Any]:
    """The OpenID Provider Configuration: the RFC 8414 metadata and what OpenID Connect adds."""
    issuer = config.server.issuer.rstrip("/")
    data = OpenIDProviderMetadata({
        **oauth_metadata,
        "userinfo_endpoint": f"{issuer}/userinfo",
        "end_session_endpoint": f"{issuer}/logout",
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": list(keys.ALGORITHMS),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "at_hash", "amr",
                             *(["acr"] if config.openid.acr else []), *PROFILE_CLAIMS, *EMAIL_CLAIMS],
        "prompt_values_supported": list(PROMPTS),
        "claims_parameter_supported": False,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
    })
    if config.https:  # authlib's validator insists on an https issuer
        data.validate()
    return dict(data)
