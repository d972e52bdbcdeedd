"""Access tokens: 256 random bits, or RFC 9068 JWTs signed with the signing keys.

Either kind is stored the same way (its keyed digest), so every surface of ours looks a token up
and honours its revocation whatever its kind. A JWT also lets a resource server check it by
itself (Dovecot's `introspection_mode = local`, with the keys `bearerbridge keys dovecot`
writes); such a server cannot see a revocation before the token expires. Blocking: runs in the
pool, where the grants issue tokens, or in the CLI.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from joserfc import jwt

from bearerbridge.config import Config
from bearerbridge.crypto import Keyring, new_secret
from bearerbridge.oauth.oidc import SigningKeys
from bearerbridge.storage.models import Client, User


def token_format(config: Config, client: Client) -> str:
    """"opaque" or "jwt": the client's own choice, else the server's (`[tokens] format`)."""
    return client.access_token_format or config.tokens.format


def new_access_token(config: Config, keyring: Keyring, signing_keys: SigningKeys, client: Client,
                     user: User | None, scope: str, ttl: int) -> str:
    """An access token for `client` (and `user`, unless client credentials) with `scope`, good
    for `ttl` seconds, in the client's format."""
    if token_format(config, client) != "jwt":
        return new_secret()
    return jwt_access_token(config, keyring, signing_keys, client, user, scope, int(time.time()), ttl)


def jwt_access_token(config: Config, keyring: Keyring, signing_keys: SigningKeys, client: Client,
                     user: User | None, scope: str, now: int, ttl: int) -> str:
    """An RFC 9068 access token. `sub` is the user's OpenID subject, or the client's id for a token
    of its own (§2.2); `preferred_username` and `email` name the user as introspection does, for
    resource servers that match the login name against a claim (Dovecot's username_attribute).
    There is no `azp`: Dovecot looks its keys up under the azp, and without one under `default`,
    so one set of key files serves every client."""
    tokens = config.tokens
    claims: dict[str, Any] = {
        "iss": config.server.issuer, "aud": tokens.jwt_audience or config.server.issuer,
        "iat": now, "exp": now + ttl, "jti": secrets.token_urlsafe(16),
        "client_id": client.client_id, "scope": scope,
        "sub": keyring.subject(user.id) if user else client.client_id,
    }
    if user is not None:
        claims["preferred_username"] = user.username
        if user.email:
            claims["email"] = user.email
    header = {**signing_keys.header(tokens.jwt_algorithm), "typ": tokens.jwt_type}
    return jwt.encode(header, claims, signing_keys.private(), algorithms=[tokens.jwt_algorithm])
