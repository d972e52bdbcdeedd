"""`BridgeServer`: authlib's authorization server bound to our store and settings, the
authorization step (`authorize`: what a browser doing the code grant is shown next), and the
RFC 8414 metadata.

Blocking: everything here runs in a pool thread inside one store transaction. The web
layer snapshots a twisted.web request into `HttpRequest` on the reactor thread and writes
back whatever these functions return.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit
from uuid import uuid4

from authlib.common.urls import add_params_to_uri
from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (
    InvalidClientError,
    InvalidRequestError,
    OAuth2Error,
    OAuth2Request,
    UnsupportedGrantTypeError,
    UnsupportedResponseTypeError,
)
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from authlib.oidc.core.errors import ConsentRequiredError, InteractionRequiredError, LoginRequiredError

from bearerbridge.audit import AuditLog
from bearerbridge.config import Config
from bearerbridge.crypto import new_secret
from bearerbridge.metrics import Metrics
from bearerbridge.oauth import device, oidc
from bearerbridge.oauth.access_tokens import new_access_token
from bearerbridge.oauth.endpoints import Introspection, Revocation
from bearerbridge.oauth.grants import (
    ANY_AUTH,
    GRANT_TYPES,
    SECRET_AUTH,
    ClientCredentialsGrant,
    CodeGrant,
    RefreshGrant,
    S256Challenge,
)
from bearerbridge.oauth.requests import HttpRequest, MalformedRequest
from bearerbridge.storage.models import AuthCode, Client, SignIn, Token, User
from bearerbridge.storage.store import SqlStore
from bearerbridge.uris import OUT_OF_BAND

T = TypeVar("T")

# How authlib begins its description of a failed client authentication, followed by a list's repr.
_AUTHLIB_NO_METHOD = "The client cannot authenticate with methods:"

# -- the authorization step ---------------------------------------------------------------

@dataclass(frozen=True)
class Redirect:
    location: str


@dataclass(frozen=True)
class ErrorPage:
    """An error that must not redirect: unknown client or unverified redirect URI. The
    description is for the person who followed the app's link (see `error_page`)."""
    error: str
    description: str


@dataclass(frozen=True)
class AskLogin:
    client_name: str
    failed: bool = False
    login_hint: str = ""  # the user name to offer (OpenID's login_hint, ownCloud's user)


@dataclass(frozen=True)
class AskConsent:
    client_name: str
    user: User
    scopes: tuple[tuple[str, str], ...]  # (name, description)
    website: str | None = None
    logo_uri: str | None = None


@dataclass(frozen=True)
class ShowCode:
    """A code for an app registered with the out-of-band redirect (`uris.OUT_OF_BAND`), shown for
    the user to copy into it."""
    client_name: str
    code: str


@dataclass(frozen=True)
class NeedSecondFactor:
    """A user `[server] require_second_factor` asks a second factor of, signed in without one."""
    client_name: str


AuthorizeOutcome = Redirect | ErrorPage | AskLogin | AskConsent | ShowCode | NeedSecondFactor


class BridgeServer(AuthorizationServer):
    """authlib's AuthorizationServer bound to our store and settings; the security events of
    the grants and endpoints go to `audit`."""

    def __init__(self, store: SqlStore, config: Config, audit: AuditLog, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(scopes_supported=list(config.scopes))
        self.store = store
        self.config = config
        self.audit = audit
        self.metrics = metrics
        self.signing_keys = oidc.SigningKeys(store, clock)  # re-read on `clock`
        self.register_token_generator("default", BearerTokenGenerator(
            access_token_generator=lambda client, grant_type, user, scope: new_access_token(
                config, store.keyring, self.signing_keys, client, user, scope, config.tokens.access_ttl),
            refresh_token_generator=lambda **_: new_secret(),
            expires_generator=lambda client, grant_type: config.tokens.access_ttl))
        id_tokens = oidc.IdTokens(self)
        self.register_grant(CodeGrant, [S256Challenge(required=True), id_tokens])
        self.register_grant(RefreshGrant)
        self.register_grant(ClientCredentialsGrant)
        self.register_grant(device.DeviceGrant, [id_tokens])
        self.register_endpoint(Introspection)
        self.register_endpoint(Revocation)
        self.register_endpoint(oidc.EndSession(self))
        device_endpoint = device.DeviceEndpoint(self)
        device_endpoint.EXPIRES_IN = config.tokens.device_ttl
        self.register_endpoint(device_endpoint)

    # authlib's framework hooks

    def query_client(self, client_id: str) -> Client | None:
        return self.store.find_client(client_id)

    def get_token_grant(self, request: OAuth2Request) -> Any:
        """authlib's grant for the request, if this server gives it at all (`[server] grant_types`)."""
        grant = super().get_token_grant(request)
        if grant.GRANT_TYPE not in self.config.server.grant_types:
            raise UnsupportedGrantTypeError(grant.GRANT_TYPE)
        return grant

    def get_authorization_grant(self, request: OAuth2Request) -> Any:
        if "authorization_code" not in self.config.server.grant_types:
            raise UnsupportedResponseTypeError(request.payload.response_type)
        return super().get_authorization_grant(request)

    def default_scope(self, client: Client) -> str:
        """What a request naming no scope gets (`[tokens] default_scopes`): the defaults this
        client may have, else every scope it may have; empty when it may have no default."""
        defaults = self.config.tokens.default_scopes
        if not defaults:
            return client.scope
        return " ".join(s for s in defaults if s in client.scope.split())

    def save_token(self, token: dict[str, Any], request: HttpRequest) -> None:
        """Store a token pair issued by any grant, and record it: `token_issued`, or
        `token_refreshed` for a rotation (which keeps the family of the token it replaces)."""
        previous: Token | None = request.refresh_token
        code: AuthCode | None = request.authorization_code
        family = previous.family if previous else uuid4().hex
        if "refresh_token" not in self.config.server.grant_types:  # authlib asks only the client
            token.pop("refresh_token", None)
        if "created_at" in self.config.tokens.response_fields:  # Doorkeeper's
            token["created_at"] = int(time.time())
        if "user_id" in self.config.tokens.response_fields and request.user:  # ownCloud's
            token["user_id"] = request.user.username
        token_id = self.store.save_token(
            token["access_token"], token.get("refresh_token"), request.client.client_id,
            request.user.id if request.user else None, token.get("scope", ""), token["expires_in"],
            self.config.tokens.refresh_ttl, family=family, code_digest=code.code_digest if code else None,
            # A refresh keeps the scope of the refresh token presented, whatever it asked for (RFC 6749 §6).
            refresh_scope=previous.scope if previous else None)
        self.audit.record(
            "token_refreshed" if previous else "token_issued", grant_type=request.payload.grant_type,
            client_id=request.client.client_id, user=request.user.username if request.user else None,
            scope=token.get("scope", ""), token_id=token_id, family=family,
            previous_token_id=previous.id if previous else None, address=request.address)

    def create_oauth2_request(self, request: OAuth2Request) -> OAuth2Request:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, Any]:
        return status, body, headers

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """authlib's signals; we count outcomes in the web layer instead."""

    # authlib's entry points, refusing a parameter given twice, and answering input authlib
    # cannot describe (see MalformedRequest)

    def create_token_response(self, request: HttpRequest) -> tuple[int, Any, Any]:
        return self._once_each(request) or self._describable(request, super().create_token_response, request)

    def create_endpoint_response(self, name: str, request: HttpRequest) -> tuple[int, Any, Any]:
        return self._once_each(request) or self._describable(
            request, super().create_endpoint_response, name, request)

    def _once_each(self, request: HttpRequest) -> tuple[int, Any, Any] | None:
        """invalid_request for a parameter given more than once (`HttpRequest.repeated`)."""
        repeated = request.repeated()
        if repeated is None:
            return None
        return self.handle_error_response(request, InvalidRequestError(f"{repeated} is given more than once"))

    def authenticate_client(self, request: HttpRequest, methods: list[str], endpoint: str = "token") -> Client:
        """authlib's client authentication, with its description of a failed one (a wrong
        secret, say) in words rather than the repr of a Python list."""
        try:
            return self._describable(request, super().authenticate_client, request, methods, endpoint)
        except InvalidClientError as error:
            if (error.description or "").startswith(_AUTHLIB_NO_METHOD):
                error.description = ("Client authentication failed: the client secret is wrong or missing, or the "
                                     "client used a method this endpoint does not take "
                                     f"(it takes {', '.join(methods)})")
            raise

    @staticmethod
    def _describable(request: HttpRequest, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)`, with authlib's ValueError for characters it will not quote in an
        error turned into the MalformedRequest it means; any other ValueError is a bug."""
        try:
            return call(*args)
        except ValueError:
            malformed = request.malformed()
            if malformed is None:
                raise
            raise malformed from None

    # helpers for the grants

    def note_failure(self, grant_type: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.token_failures.labels(grant_type, reason).inc()

    def active_user(self, user_id: int | None) -> User | None:
        user = self.store.get_user(user_id) if user_id is not None else None
        return user if user is not None and not user.disabled else None

    # the authorization endpoint

    def _with_issuer(self, response: tuple[int, Any, Any], client_name: str) -> Redirect | ShowCode | ErrorPage:
        """The authorization response: to the client's redirect URI with its issuer (RFC 9207), or
        for the out-of-band one, on a page."""
        location = dict(response[2])["Location"]
        if location.startswith(OUT_OF_BAND + "?"):
            answer = dict(parse_qsl(urlsplit(location).query))
            if "code" in answer:
                return ShowCode(client_name, answer["code"])
            if answer.get("error") == "access_denied":
                return ErrorPage("access_denied", "You did not give the app access: nothing was shared with it. "
                                                  "You can close this page.")
            return ErrorPage(answer.get("error", "invalid_request"), _for_a_person(
                f"its request was refused ({answer.get('error_description') or answer.get('error')})"))
        return Redirect(add_params_to_uri(location, [("iss", self.config.server.issuer)]))

    def authorize(self, request: HttpRequest, sign_in: SignIn | None, decision: str | None,
                  just_signed_in: bool = False) -> AuthorizeOutcome:
        """Decide what one request to /authorize gets, for the browser's `sign_in`.

        `decision` is None when the user has not answered the consent form yet, else "approve" or
        "deny". Consent is remembered per user and client; a later request for the same or fewer
        scopes skips the page, unless it says `prompt=consent`. A sign-in made by this very
        request (`just_signed_in`), or one the consent form was shown to, satisfies `prompt=login`,
        `max_age` and `id_token_hint` (OpenID Connect Core §3.1.2.1).
        """
        try:
            return self._describable(request, self._authorize, request, sign_in, decision,
                                     just_signed_in or decision is not None)
        except MalformedRequest:
            return ErrorPage("invalid_request", _for_a_person(
                "its request holds characters that are not allowed in its parameters"))

    def _authorize(self, request: HttpRequest, sign_in: SignIn | None, decision: str | None,
                   fresh: bool) -> AuthorizeOutcome:
        user = self.active_user(sign_in.user.id) if sign_in else None
        prompts = set((request.payload.data.get("prompt") or "").split())
        try:
            grant = self.get_consent_grant(request, end_user=user)
            if sign_in and user and not fresh and self._must_sign_in_again(request, sign_in, prompts, grant):
                user = None
            if user is None and "none" in prompts:
                raise LoginRequiredError(redirect_uri=grant.redirect_uri, state=request.payload.state)
        except OAuth2Error as error:
            if error.redirect_uri:
                known = self.query_client(request.payload.client_id)
                return self._with_issuer(self.handle_error_response(request, error), known.name if known else "")
            return error_page(error, request)
        client: Client = grant.client
        if user is None or sign_in is None:
            data = request.payload.data
            return AskLogin(client.name, login_hint=data.get("login_hint") or data.get("user") or "")
        if sign_in.lacks_second_factor(self.config.server.require_second_factor):
            if "none" in prompts:
                return self._with_issuer(self.handle_error_response(request, InteractionRequiredError(
                    redirect_uri=grant.redirect_uri, state=request.payload.state)), client.name)
            return NeedSecondFactor(client.name)
        scope = set(request.scope.split())
        if decision in ("approve", "deny"):
            self.audit.record("consent", user=user.username, client_id=client.client_id, scope=request.scope,
                              approved=decision == "approve", address=request.address)
        if decision == "approve":
            self.store.save_consent(user.id, client.client_id, scope)
        elif decision != "deny" and ("consent" in prompts
                                     or not scope <= self.store.consented_scope(user.id, client.client_id)):
            if "none" in prompts:
                return self._with_issuer(self.handle_error_response(request, ConsentRequiredError(
                    redirect_uri=grant.redirect_uri, state=request.payload.state)), client.name)
            return AskConsent(client.name, user,
                              tuple((s, self.config.scopes.get(s, s)) for s in request.scope.split()),
                              client.website, client.logo_uri)
        request.sign_in = sign_in
        granted = user if decision != "deny" else None
        return self._with_issuer(self.create_authorization_response(request, grant_user=granted, grant=grant),
                                 client.name)

    def _must_sign_in_again(self, request: HttpRequest, sign_in: SignIn, prompts: set[str], grant: Any) -> bool:
        """Whether the browser's sign-in will not do: `prompt=login`, a sign-in older than
        `max_age` seconds, or an `id_token_hint` naming another user. invalid_request for a
        `max_age` that is no number of seconds or a hint that is not our ID token."""
        data = request.payload.data
        max_age = data.get("max_age")
        if max_age is not None and not (max_age.isascii() and max_age.isdigit()):
            raise InvalidRequestError("max_age must be a number of seconds", redirect_uri=grant.redirect_uri,
                                      state=request.payload.state)
        hint = data.get("id_token_hint")
        if hint:
            try:
                hinted = oidc.hinted_subject(hint, self.signing_keys.public(), self.config.server.issuer)
            except InvalidRequestError as error:
                error.redirect_uri, error.state = grant.redirect_uri, request.payload.state
                raise
            if hinted != self.store.keyring.subject(sign_in.user.id):
                return True
        return "login" in prompts or (max_age is not None and time.time() - sign_in.auth_time > int(max_age))


# The parameters authlib refuses to see twice at /authorize (RFC 6749 §3.1), in its order.
_ONCE = ("response_type", "client_id", "redirect_uri", "scope", "state")
_GO_BACK = "Nothing was shared with the app. Go back to it and try again; if this page comes back, tell its developers."


def _for_a_person(what: str) -> str:
    return f"The app that sent you here made a mistake: {what}. {_GO_BACK}"


def error_page(error: OAuth2Error, request: HttpRequest) -> ErrorPage:
    """The page for an error that may not go back to the app (RFC 6749 §4.1.2.1), in words for
    the person who followed the app's link: what is wrong and what to do. The error code stays
    authlib's; the case is read from the request, as authlib's own descriptions are for the app's
    developers (and one, for a missing response_type, is garbled)."""
    payload = request.payload
    if isinstance(error, UnsupportedResponseTypeError) and not (payload.response_type or payload.client_id):
        return ErrorPage(error.error, "This address is where an app sends you to ask for access to your account, "
                                      "and this visit did not come with an app's request. To give an app access, "
                                      "start from the app.")
    repeated = next((name for name in _ONCE if len(payload.datalist.get(name, [])) > 1), None)
    if isinstance(error, UnsupportedResponseTypeError):
        what = ("it did not say what it asks for (response_type is missing)" if not payload.response_type
                else "it asked for a kind of access this server does not give (response_type must be code)")
    elif isinstance(error, InvalidClientError):
        what = ("it did not say which app is asking (client_id is missing)" if not payload.client_id
                else "it is not registered with this server (its client_id is unknown)")
    elif isinstance(error, InvalidRequestError) and repeated:
        what = f"it gave {repeated} more than once, so it is not clear what it asks for"
    elif isinstance(error, InvalidRequestError) and payload.redirect_uri:
        what = (f"it asked to send you back to an address it has not registered with this server "
                f"({payload.redirect_uri}), so you are not sent there")
    elif isinstance(error, InvalidRequestError):
        what = ("it did not say where to send you back to (redirect_uri is missing, and the app has registered "
                "more than one address)")
    else:
        what = f"its request was refused ({error.get_error_description() or error.error})"
    return ErrorPage(error.error, _for_a_person(what))


def discovery_url(issuer: str) -> str:
    """Where the OpenID Provider Configuration is served; SASL error challenges point clients at it
    (RFC 7628 §3.2.2 names this very document)."""
    return f"{issuer.rstrip('/')}/.well-known/openid-configuration"


def metadata(config: Config) -> dict[str, Any]:
    """The server's metadata: RFC 8414's, with what OpenID Connect Discovery 1.0 adds. One
    document, served at both well-known addresses, so the two always agree."""
    issuer = config.server.issuer.rstrip("/")
    data = AuthorizationServerMetadata({
        "issuer": config.server.issuer,
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "introspection_endpoint": f"{issuer}/introspect",
        "revocation_endpoint": f"{issuer}/revoke",
        "device_authorization_endpoint": f"{issuer}/device_authorization",
        "jwks_uri": f"{issuer}/jwks",
        "scopes_supported": list(config.scopes),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": [g for g in GRANT_TYPES if g in config.server.grant_types],
        "token_endpoint_auth_methods_supported": ANY_AUTH,
        "introspection_endpoint_auth_methods_supported": SECRET_AUTH,
        "revocation_endpoint_auth_methods_supported": ANY_AUTH,
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
    })
    if config.https:  # authlib's validator insists on an https issuer
        data.validate()
    return oidc.provider_metadata(config, dict(data))
