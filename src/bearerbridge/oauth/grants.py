"""The token grants: the code grant with PKCE S256, refresh with rotation, client credentials.

authlib's grants, bound to the store through `server` (a `BridgeServer`) and made strict where
authlib's defaults are permissive (RFC 9700). Blocking: they run in a pool thread.
"""

from __future__ import annotations

import time

from authlib.oauth2.rfc6749 import InvalidGrantError, InvalidRequestError, InvalidScopeError, OAuth2Request, grants
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core.grants.util import is_openid_scope

from bearerbridge.oauth import device
from bearerbridge.oauth.scopes import refuse_operator_scopes
from bearerbridge.storage.models import AuthCode, Client, Token, User

SECRET_AUTH = ["client_secret_basic", "client_secret_post"]
ANY_AUTH = SECRET_AUTH + ["none"]


class S256Challenge(CodeChallenge):
    """PKCE (RFC 7636) with S256 only, required of every client (OAuth 2.1, RFC 9700 §2.1.1) but
    a confidential one registered with `--no-pkce`; a challenge sent is honoured from any client.

    authlib accepts `plain`, and a missing challenge from a confidential client.
    """

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: grants.AuthorizationCodeGrant, redirect_uri: str | None) -> None:
        data = grant.request.payload.data
        if data.get("code_challenge") and data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256")
        client = grant.request.client
        if (client.public or client.pkce_required) and not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        super().validate_code_challenge(grant, redirect_uri)


class CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ANY_AUTH  # "none" is for public clients, which must use PKCE

    def validate_requested_scope(self) -> None:
        if not self.request.payload.scope:  # the server's default scopes, of the client's
            default = self.server.default_scope(self.request.client)
            if not default:
                raise InvalidScopeError("The request names no scope, and the client may have none of the default "
                                        "scopes")
            self.request.payload.data["scope"] = default
        super().validate_requested_scope()
        scope = self.request.client.get_allowed_scope(self.request.payload.scope)
        refuse_operator_scopes(scope, self.server.config.server.operator_scopes)

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        self.server.store.save_code(
            code, request.client.client_id, request.user.id, request.payload.redirect_uri or "",
            request.scope, data.get("code_challenge"), data.get("code_challenge_method"),
            int(time.time()) + self.server.config.tokens.code_ttl,
            data.get("nonce") if is_openid_scope(request.scope) else None, request.sign_in)

    def query_authorization_code(self, code: str, client: Client) -> AuthCode:
        """A code is good once: the first exchange marks it used, and presenting a used
        code again revokes every token issued from it (RFC 6749 §4.1.2). An unknown, an
        expired and a replayed code are each invalid_grant, with a description of their own."""
        store = self.server.store
        found = store.find_code(code)
        if found is None or found.client_id != client.client_id:
            raise InvalidGrantError("The code is unknown: this server did not issue it to this client "
                                    "(check that it was copied whole)")
        if not found.used and found.is_expired():  # left unused: presenting it again is no replay
            raise InvalidGrantError(f"The code has expired: a code must be exchanged within "
                                    f"{self.server.config.tokens.code_ttl} seconds; ask for a new one")
        if found.used or not store.use_code(found.code_digest):
            revoked = store.revoke_from_code(found.code_digest)
            self.server.note_failure("authorization_code", "code_reused")
            user = store.get_user(found.user_id)
            self.server.audit.record("code_replayed", client_id=client.client_id, user=user.username if user else None,
                                     scope=found.scope, revoked=revoked, address=self.request.address)
            raise InvalidGrantError("The code was presented before: a code is good for one exchange only, "
                                    "and any tokens issued from it are now revoked")
        return found

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
        token = self.server.store.find_refresh_token(refresh_token)
        if token is None or token.client_id != self.request.client.client_id:
            return None
        if token.rotated:
            self._replayed(token)
            return None
        return token if token.refresh_usable() else None  # else expired, revoked, or its user disabled

    def validate_token_request(self) -> None:
        """authlib's checks (the client, the token, the scope asked for), and only then the
        token retired: a refresh refused for its scope must leave the token good."""
        super().validate_token_request()
        token: Token = self.request.refresh_token
        if not self.server.store.mark_rotated(token.id):  # a concurrent request rotated it first
            self._replayed(token)
            raise InvalidGrantError()

    def _replayed(self, token: Token) -> None:
        """A rotated refresh token came back: whoever holds the family now may be a thief, so all
        of it is revoked (RFC 9700 §4.14.2)."""
        revoked = self.server.store.revoke_family(token.family)
        self.server.note_failure("refresh_token", "refresh_reused")
        self.server.audit.record("refresh_replayed", client_id=token.client_id, user=token.username,
                                 token_id=token.id, family=token.family, revoked=revoked,
                                 address=self.request.address)

    def authenticate_user(self, refresh_token: Token) -> User | None:
        return self.server.active_user(refresh_token.user_id)

    def revoke_old_credential(self, refresh_token: Token) -> None:
        """Nothing to do: the old refresh token was retired when it was accepted."""


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = SECRET_AUTH  # confidential clients only


# Every grant the token endpoint serves: in the metadata, in the admin CLI's choices, and as
# the label of token metrics.
GRANT_TYPES = tuple(grant.GRANT_TYPE for grant in (CodeGrant, RefreshGrant, ClientCredentialsGrant, device.DeviceGrant))
