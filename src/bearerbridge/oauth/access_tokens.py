"""Access tokens: 256 random bits, or RFC 9068 JWTs signed with the signing keys.

Either kind is stored the same way (its keyed digest), so every surface of ours looks a token up
and honours its revocation whatever its kind. A JWT also lets a resource server check it by
itself (Dovecot's `introspection_mode = local`, with the keys `bearerbridge keys dovecot`
writes); such a server cannot see a revocation before the token expires. Blocking: runs in the
pool, where the grants issue tokens.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from joserfc import jwt

from bearerbridge.crypto import new_secret
from bearerbridge.storage.models import Client, User

if TYPE_CHECKING:  # the server uses this module: no import at run time
    from bearerbridge.oauth.server import BridgeServer


def token_format(server: BridgeServer, client: Client) -> str:
    """"opaque" or "jwt": the client's own choice, else the server's (`[tokens] format`)."""
    return client.access_token_format or server.config.tokens.format


def new_access_token(server: BridgeServer, client: Client, user: User | None, scope: str) -> str:
    """An access token for `client` (and `user`, unless client credentials) with `scope`."""
    if token_format(server, client) != "jwt":
        return new_secret()
    return jwt_access_token(server, client, user, scope, int(time.time()))


def jwt_access_token(server: BridgeServer, client: Client, user: User | None, scope: str, now: int) -> str:
    """An RFC 9068 access token. `sub` is the user's OpenID subject, or the client's id for a token
    of its own (§2.2); `preferred_username` and `email` name the user as introspection does, for
    resource servers that match the login name against a claim (Dovecot's username_attribute).
    There is no `azp`: Dovecot looks its keys up under the azp, and without one under `default`,
    so one set of key files serves every client."""
    tokens = server.config.tokens
    claims: dict[str, Any] = {
        "iss": server.config.server.issuer, "aud": tokens.jwt_audience or server.config.server.issuer,
        "iat": now, "exp": now + tokens.access_ttl, "jti": secrets.token_urlsafe(16),
        "client_id": client.client_id, "scope": scope,
        "sub": server.store.keyring.subject(user.id) if user else client.client_id,
    }
    if user is not None:
        claims["preferred_username"] = user.username
        if user.email:
            claims["email"] = user.email
    header = {**server.signing_keys.header(tokens.jwt_algorithm), "typ": tokens.jwt_type}
    return jwt.encode(header, claims, server.signing_keys.private(), algorithms=[tokens.jwt_algorithm])
