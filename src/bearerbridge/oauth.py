"""The authlib wiring: grants, endpoints, metadata, and the authorization step.

Blocking: everything here runs in a pool thread inside one store transaction. The
web layer snapshots a twisted.web request into `HttpRequest` on the reactor thread
and writes back whatever (status, body, headers) these functions return.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from authlib.common.urls import add_params_to_uri
from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (InvalidRequestError, OAuth2Error, OAuth2Payload, OAuth2Request,
                                    grants)
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata

from . import device
from .config import Config
from .crypto import check_password, new_secret
from .models import AuthCode, Client, Token, User
from .store import SqlStore

SECRET_AUTH = ["client_secret_basic", "client_secret_post"]
ANY_AUTH = SECRET_AUTH + ["none"]


class _Headers(dict):
    """Request headers keyed by lower-case name, as authlib looks them up by any case."""

    def get(self, key, default=None):
        return super().get(key.lower(), default)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return super().__contains__(key.lower())


class _Payload(OAuth2Payload):
    def __init__(self, datalist: Mapping[str, list[str]]) -> None:
        self._datalist = dict(datalist)
        self._data = {key: values[0] for key, values in self._datalist.items() if values}

    @property
    def data(self):
        return self._data

    @property
    def datalist(self):
        return self._datalist


class HttpRequest(OAuth2Request):
    """A snapshot of an HTTP request, safe to hand to a pool thread.

    twisted.web merges the query and the form in `request.args`; we keep them apart
    (`args` and `form`, as RFC 6749 says where each parameter belongs) and give
    authlib their union as the payload.
    """

    def __init__(self, method: str, uri: str, headers: Mapping[str, str],
                 query: Mapping[str, list[str]], form: Mapping[str, list[str]]) -> None:
        super().__init__(method, uri, headers=_Headers({k.lower(): v for k, v in headers.items()}))
        self._args = {k: v[0] for k, v in query.items() if v}
        self._form = {k: v[0] for k, v in form.items() if v}
        merged: dict[str, list[str]] = {k: list(v) for k, v in query.items()}
        for key, values in form.items():
            merged.setdefault(key, []).extend(values)
        self.payload = _Payload(merged)

    @property
    def args(self):
        return self._args

    @property
    def form(self):
        return self._form


# -- grants -------------------------------------------------------------------------------

class S256Challenge(CodeChallenge):
    """PKCE (RFC 7636) with S256 only: required for public clients, honoured for all.

    authlib accepts `plain` and a missing challenge; RFC 9700 §2.1.1 wants neither.
    """

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant, redirect_uri):
        data = grant.request.payload.data
        if data.get("code_challenge") and data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256")
        if grant.request.client.public and not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        super().validate_code_challenge(grant, redirect_uri)


class CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ANY_AUTH  # "none" is for public clients, which must use PKCE

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        self.server.store.save_code(
            code, request.client.client_id, request.user.id, request.payload.redirect_uri or "",
            request.scope, data.get("code_challenge"), data.get("code_challenge_method"),
            int(time.time()) + self.server.config.tokens.code_ttl)

    def query_authorization_code(self, code: str, client: Client) -> AuthCode | None:
        """A code is good once: the first exchange marks it used, and presenting a used
        code again revokes every token issued from it (RFC 6749 §4.1.2)."""
        store = self.server.store
        found = store.find_code(code)
        if found is None or found.client_id != client.client_id:
            return None
        if found.used or not store.use_code(found.code_digest):
            store.revoke_from_code(found.code_digest)
            self.server.note_failure("authorization_code", "code_reused")
            return None
        return None if found.is_expired() else found

    def delete_authorization_code(self, authorization_code: AuthCode) -> None:
        """Nothing to do: the code was marked used when it was queried, and stays
        until it expires so that a replay can be detected."""

    def authenticate_user(self, authorization_code: AuthCode) -> User | None:
        return self.server.active_user(authorization_code.user_id)


class RefreshGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ANY_AUTH
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation: RFC 9700 §4.14.2

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        """The token if it may be used now; a rotated token presented again is a replay,
        so its whole family is revoked."""
        store = self.server.store
        token = store.find_refresh_token(refresh_token)
        if token is None or token.client_id != self.request.client.client_id:
            return None
        if not token.rotated and not token.refresh_usable():
            return None  # expired, revoked, or its user disabled
        if token.rotated or not store.mark_rotated(token.id):
            store.revoke_family(token.family)
            self.server.note_failure("refresh_token", "refresh_reused")
            return None
        return token

    def authenticate_user(self, refresh_token: Token) -> User | None:
        return self.server.active_user(refresh_token.user_id)

    def revoke_old_credential(self, refresh_token: Token) -> None:
        """Nothing to do: the old refresh token was retired when it was accepted."""


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = SECRET_AUTH  # confidential clients only


# -- introspection and revocation -----------------------------------------------------------

def _query_token(store: SqlStore, token_string: str, hint: str | None) -> Token | None:
    """Look a token up as an access token or a refresh token, the hinted kind first.

    A refresh token is returned as a Token whose lifetime is the refresh token's,
    so that `is_expired`/`is_revoked` answer for it."""
    def as_refresh() -> Token | None:
        found = store.find_refresh_token(token_string)
        if found is None:
            return None
        return dataclasses.replace(found, expires_at=found.refresh_expires_at or 0,
                                   revoked=found.revoked or found.rotated, refresh=True)
    lookups = [as_refresh, lambda: store.find_access_token(token_string)]
    if hint != "refresh_token":
        lookups.reverse()
    for lookup in lookups:
        if (found := lookup()) is not None:
            return found
    return None


def introspection_claims(token: Token) -> dict:
    """The RFC 7662 §2.2 members for an active token."""
    claims = {"active": True, "scope": token.scope, "client_id": token.client_id,
              "token_type": "refresh_token" if token.refresh else "Bearer", "exp": token.expires_at, "iat": token.issued_at,
              "sub": token.username or token.client_id}
    if token.username:
        claims["username"] = token.username
    if token.email:
        claims["email"] = token.email
    return claims


class Introspection(IntrospectionEndpoint):
    """RFC 7662. Any registered confidential client (a resource server) may ask."""

    CLIENT_AUTH_METHODS = SECRET_AUTH

    def query_token(self, token_string, token_type_hint):
        return _query_token(self.server.store, token_string, token_type_hint)

    def check_permission(self, token, client, request):
        """Which tokens a caller may see active.

        A refresh token only by the client it was issued to: a resource server must never
        take one for an access token. And when Dovecot (`send_auth_headers = yes`) names
        the service being logged into, a token lacking that service's scope
        (`[sasl.services]`) is reported inactive."""
        if token.refresh:
            return token.client_id == client.client_id
        service = request.headers.get("X-Dovecot-Auth-Service")
        if service is None:
            return True
        required = self.server.config.sasl.services.get(service)
        return required is not None and required in token.scope.split()

    def introspect_token(self, token):
        return introspection_claims(token)


class Revocation(RevocationEndpoint):
    """RFC 7009. Revoking either token of a grant revokes the grant's whole family."""

    CLIENT_AUTH_METHODS = ANY_AUTH

    def query_token(self, token_string, token_type_hint):
        return _query_token(self.server.store, token_string, token_type_hint)

    def revoke_token(self, token, request):
        self.server.store.revoke_family(token.family)


# -- the authorization step ---------------------------------------------------------------

@dataclass(frozen=True)
class Redirect:
    location: str


@dataclass(frozen=True)
class ErrorPage:
    """An error that must not redirect: unknown client or unverified redirect URI."""
    error: str
    description: str


@dataclass(frozen=True)
class AskLogin:
    client_name: str
    failed: bool = False


@dataclass(frozen=True)
class AskConsent:
    client_name: str
    user: User
    scopes: tuple[tuple[str, str], ...]  # (name, description)


AuthorizeOutcome = Redirect | ErrorPage | AskLogin | AskConsent


# Every grant the token endpoint serves: in the metadata, and as the label of token metrics.
GRANT_TYPES = tuple(grant.GRANT_TYPE
                    for grant in (CodeGrant, RefreshGrant, ClientCredentialsGrant, device.DeviceGrant))


class BridgeServer(AuthorizationServer):
    """authlib's AuthorizationServer bound to our store and settings."""

    def __init__(self, store: SqlStore, config: Config, metrics=None) -> None:
        super().__init__(scopes_supported=list(config.scopes))
        self.store = store
        self.config = config
        self.metrics = metrics
        self.register_token_generator("default", BearerTokenGenerator(
            access_token_generator=lambda **_: new_secret(),
            refresh_token_generator=lambda **_: new_secret(),
            expires_generator=lambda client, grant_type: config.tokens.access_ttl))
        self.register_grant(CodeGrant, [S256Challenge(required=True)])
        self.register_grant(RefreshGrant)
        self.register_grant(ClientCredentialsGrant)
        self.register_grant(device.DeviceGrant)
        self.register_endpoint(Introspection)
        self.register_endpoint(Revocation)
        device_endpoint = device.DeviceEndpoint(self)
        device_endpoint.EXPIRES_IN = config.tokens.device_ttl
        self.register_endpoint(device_endpoint)

    # authlib's framework hooks

    def query_client(self, client_id: str) -> Client | None:
        return self.store.find_client(client_id)

    def save_token(self, token: dict, request: OAuth2Request) -> None:
        previous: Token | None = request.refresh_token
        code: AuthCode | None = request.authorization_code
        self.store.save_token(
            token["access_token"], token.get("refresh_token"), request.client.client_id,
            request.user.id if request.user else None, token.get("scope", ""), token["expires_in"],
            self.config.tokens.refresh_ttl, family=previous.family if previous else None,
            code_digest=code.code_digest if code else None)

    def create_oauth2_request(self, request: OAuth2Request) -> OAuth2Request:
        return request

    def handle_response(self, status, body, headers):
        return status, body, headers

    def send_signal(self, name, *args, **kwargs):
        """authlib's signals; we count outcomes in the web layer instead."""

    # helpers for the grants

    def note_failure(self, grant_type: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.token_failures.labels(grant_type, reason).inc()

    def active_user(self, user_id: int | None) -> User | None:
        user = self.store.get_user(user_id) if user_id is not None else None
        return user if user is not None and not user.disabled else None

    # the authorization endpoint

    def _with_issuer(self, response: tuple) -> Redirect:
        """RFC 9207: every authorization response names its issuer."""
        location = dict(response[2])["Location"]
        return Redirect(add_params_to_uri(location, [("iss", self.config.server.issuer)]))

    def authorize(self, request: HttpRequest, user_id: int | None, decision: str | None) -> AuthorizeOutcome:
        """Decide what one request to /authorize gets.

        `decision` is None when the user has not answered the consent form yet,
        else "approve" or "deny". Consent is remembered per user and client; a later
        request for the same or fewer scopes skips the page.
        """
        user = self.active_user(user_id)
        try:
            grant = self.get_consent_grant(request, end_user=user)
        except OAuth2Error as error:
            if error.redirect_uri:
                return self._with_issuer(self.handle_error_response(request, error))
            return ErrorPage(error.error, error.get_error_description() or error.error)
        client: Client = grant.client
        if user is None:
            return AskLogin(client.name)
        scope = set(request.scope.split())
        if decision == "approve":
            self.store.save_consent(user.id, client.client_id, scope)
        elif decision != "deny" and not scope <= self.store.consented_scope(user.id, client.client_id):
            return AskConsent(client.name, user,
                              tuple((s, self.config.scopes.get(s, s)) for s in request.scope.split()))
        granted = user if decision != "deny" else None
        return self._with_issuer(self.create_authorization_response(request, grant_user=granted, grant=grant))


def verify_login(found: tuple[User | None, str | None], password: str) -> User | None:
    """The user found by name, if the password is right and the account enabled.

    argon2id is slow on purpose, so this runs away from the store's threads."""
    user, password_hash = found
    if not check_password(password_hash, password) or user is None or user.disabled:
        return None
    return user


def discovery_url(config: Config) -> str:
    """Where the metadata is served; SASL error challenges point clients at it (RFC 7628 §3.2.2)."""
    return f"{config.server.issuer.rstrip('/')}/.well-known/oauth-authorization-server"


def metadata(config: Config) -> dict:
    """RFC 8414 authorization server metadata."""
    issuer = config.server.issuer.rstrip("/")
    data = AuthorizationServerMetadata({
        "issuer": config.server.issuer,
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "introspection_endpoint": f"{issuer}/introspect",
        "revocation_endpoint": f"{issuer}/revoke",
        "device_authorization_endpoint": f"{issuer}/device_authorization",
        "scopes_supported": list(config.scopes),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": list(GRANT_TYPES),
        "token_endpoint_auth_methods_supported": ANY_AUTH,
        "introspection_endpoint_auth_methods_supported": SECRET_AUTH,
        "revocation_endpoint_auth_methods_supported": ANY_AUTH,
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
    })
    if config.https:  # authlib's validator insists on an https issuer
        data.validate()
    return dict(data)


def issue_token(store: SqlStore, config: Config, username: str, client_id: str, scope: Iterable[str],
                ttl: int | None = None) -> dict:
    """An operator-issued access token (for testing a service), as a token response."""
    user = store.get_user_by_name(username)
    if user is None or user.disabled:
        raise ValueError(f"no enabled user {username!r}")
    if store.get_client(client_id) is None:
        raise ValueError(f"no client {client_id!r}")
    scopes = list(dict.fromkeys(scope))
    unknown = [s for s in scopes if s not in config.scopes]
    if unknown:
        raise ValueError(f"unknown scope(s): {' '.join(unknown)}")
    access_token, expires_in = new_secret(), ttl or config.tokens.access_ttl
    store.save_token(access_token, None, client_id, user.id, " ".join(scopes), expires_in, None)
    return {"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in,
            "scope": " ".join(scopes)}
