"""Introspection (RFC 7662) and revocation (RFC 7009) on authlib's endpoints.

Introspection has two ways in. `Introspection` is authlib's endpoint, run in the pool
against the store. `introspect_remembered` answers without the pool when the calling client
and the token were read lately (`storage.recent`), and says it cannot (None) otherwise.
Both decide with the same `answer`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Callable
from typing import Any

from authlib.oauth2.rfc6749.util import extract_basic_authorization
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

from bearerbridge.config import SaslSettings
from bearerbridge.oauth.grants import ANY_AUTH, SECRET_AUTH
from bearerbridge.oauth.requests import HttpRequest
from bearerbridge.sasl.judge import judge_token
from bearerbridge.storage.models import Client, Token
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.store import SqlStore


def query_token(store: SqlStore, token_string: str, hint: str | None) -> Token | None:
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


def introspection_claims(token: Token) -> dict[str, Any]:
    """The RFC 7662 §2.2 members for an active token."""
    claims: dict[str, Any] = {
        "active": True, "scope": token.scope, "client_id": token.client_id,
        "token_type": "refresh_token" if token.refresh else "Bearer", "exp": token.expires_at,
        "iat": token.issued_at, "sub": token.username or token.client_id}
    if token.username:
        claims["username"] = token.username
    if token.email:
        claims["email"] = token.email
    return claims


# Dovecot (`send_auth_headers = yes`) names the service being logged into, and the mail client's
# address and port as `ip:port`, an IPv6 address in brackets (`[::1]:143`; lib-oauth2's
# oauth2_request_set_headers with net_ipport2str, seen on the wire from Dovecot 2.3.19.1 as
# `X-Dovecot-Auth-Remote: 127.0.0.5:55519`).
SERVICE_HEADER = "X-Dovecot-Auth-Service"
REMOTE_HEADER = "X-Dovecot-Auth-Remote"
# The service a resource server's introspection is noted as a use at when it names none.
INTROSPECTION = "introspection"


def answer(token: Token | None, client: Client, service: str | None, settings: SaslSettings,
           now: float | None = None) -> dict[str, Any]:
    """The RFC 7662 §2.2 answer: the claims of an active token `client` may see, else
    `{"active": false}` alone (an unknown, expired, revoked or hidden token, §2.2 and §4).

    A client sees its own tokens; only a resource server (`client create --resource-server`)
    sees others'. A refresh token only its own client sees: a resource server must never take one
    for an access token. When the caller names the service being logged into (Dovecot's
    `X-Dovecot-Auth-Service`), the token must pass the same `judge_token` as a SASL login to
    that service: its scope (`[sasl.services]`), and a user to log in as."""
    if token is None or token.is_expired(now) or token.is_revoked():
        return {"active": False}
    if token.client_id != client.client_id and (token.refresh or not client.resource_server):
        return {"active": False}
    if service is not None and not token.refresh:
        required = settings.services.get(service)
        at = now if now is not None else time.time()
        if required is None or not judge_token(token, at, None, required, settings).ok:
            return {"active": False}
    return introspection_claims(token)


class Introspection(IntrospectionEndpoint):
    """RFC 7662 in the pool, for any confidential client; what it sees, `answer` decides."""

    CLIENT_AUTH_METHODS = SECRET_AUTH

    def create_endpoint_response(self, request: HttpRequest) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        """authlib's steps (client authentication, parameter checks, lookup), then `answer`."""
        client = self.authenticate_endpoint_client(request)
        self.check_params(request, client)
        token = self.query_token(request.form["token"], request.form.get("token_type_hint"))
        return 200, answered(request, token, client, self.server.config.sasl), []

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return query_token(self.server.store, token_string, token_type_hint)


def introspect_remembered(request: HttpRequest, recent: RecentReads, digest: Callable[[str], str],
                          settings: SaslSettings) -> dict[str, Any] | None:
    """The introspection answer from memory alone, or None when the pool must be asked: the
    client or the access token was not read lately, the client did not authenticate, or the
    request is anything but a plain one (which authlib then answers, errors included)."""
    client = _remembered_client(request, recent)
    token_string = request.form.get("token")
    if client is None or not token_string or request.form.get("token_type_hint") not in (None, "", "access_token"):
        return None
    if request.repeated() is not None:
        return None  # refused in the pool (BridgeServer._once_each)
    remembered = recent.token(digest(token_string))
    if remembered is None:
        return None
    return answered(request, remembered[0], client, settings)


def answered(request: HttpRequest, token: Token | None, client: Client, settings: SaslSettings) -> dict[str, Any]:
    """`answer` for this request; an active access token shown to a resource server is a use of
    its grant at the service named (else "introspection"), noted on the request (`token_use`)."""
    service = request.headers.get(SERVICE_HEADER)
    claims = answer(token, client, service, settings)
    if token is not None and claims["active"] and client.resource_server and not token.refresh:
        request.token_use = (token.family, service or INTROSPECTION)
        # The address the use came from is the mail client's, as the resource server says it saw it
        # (the HTTP peer is the resource server itself). Believed only here, from a resource server:
        # a client the operator registered as one (`--resource-server`) and that proved its secret
        # in this request, and that already decides who logs in to its service. From anyone else
        # the header is ignored, and no use is noted at all: a client sees only its own tokens.
        request.use_address = remote_address(request.headers.get(REMOTE_HEADER))
    return claims


def remote_address(header: str | None) -> str | None:
    """The IP address of Dovecot's `X-Dovecot-Auth-Remote` (`1.2.3.4:993`, `[2001:db8::1]:993`,
    or a bare address), without its port; None when absent or not an address."""
    if not header:
        return None
    value = header.strip()
    if value.startswith("["):
        value, closed, _ = value[1:].partition("]")
        if not closed:
            return None
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _remembered_client(request: HttpRequest, recent: RecentReads) -> Client | None:
    """The calling client if it was read lately and its secret is right (client_secret_basic,
    else client_secret_post, as authlib tries them)."""
    try:
        client_id, secret = extract_basic_authorization(request.headers)
    except ValueError:  # not even ASCII: the pool's way answers it, with invalid_client
        return None
    if not (client_id and secret):
        client_id, secret = request.form.get("client_id"), request.form.get("client_secret")
    if not (client_id and secret):
        return None
    client = recent.client(client_id)
    return client if client is not None and client.check_client_secret(secret) else None


class Revocation(RevocationEndpoint):
    """RFC 7009. Revoking either token of a grant revokes the grant's whole family."""

    CLIENT_AUTH_METHODS = ANY_AUTH

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return query_token(self.server.store, token_string, token_type_hint)

    def revoke_token(self, token: Token, request: HttpRequest) -> None:
        revoked = self.server.store.revoke_family(token.family)
        self.server.audit.record("token_revoked", client_id=token.client_id, user=token.username,
                                 token_type="refresh_token" if token.refresh else "access_token",
                                 token_id=token.id, family=token.family, revoked=revoked, address=request.address)
