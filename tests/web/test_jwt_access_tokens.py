"""RFC 9068 JWT access tokens in process: their header and claims, checked against /jwks as a
resource server checks them, and that every surface of ours still looks them up, so a revoked
JWT is refused here although its signature stays good."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from bearerbridge import keys
from bearerbridge.config import Config
from bearerbridge.storage.models import Client

from ..fakes import CODE_GRANTS, Bridge, NewUser, code_grant, sqlite_bridge, tokens_of

ISSUER = "http://127.0.0.1:8080"
CB = "https://app.example/cb"
CLIENTS = (
    Client("jwt", "JWT App", (CB,), "openid email imap", CODE_GRANTS, public=False, access_token_format="jwt"),
    Client("plain", "Plain App", (CB,), "imap", CODE_GRANTS, public=False),
    Client("cron", "Cron", (), "imap", ("client_credentials",), public=False, access_token_format="jwt"),
    Client("imapd", "IMAP server", (), "imap", ("client_credentials",), public=False, resource_server=True),
)


def bridge_with(tmp_path, **tokens: str) -> Bridge:
    """CLIENTS and alice, with `tokens` as settings of [tokens]."""
    config = Config()
    config = dataclasses.replace(config, tokens=dataclasses.replace(config.tokens, **tokens))
    return sqlite_bridge(tmp_path / "x.db", CLIENTS, [NewUser("alice", "alice@example.org")], config)


@pytest.fixture
def bridge(tmp_path) -> Iterator[Bridge]:
    with bridge_with(tmp_path) as bridge:
        yield bridge


def granted(bridge: Bridge, client_id: str = "jwt", scope: str = "openid email imap") -> dict:
    return code_grant(bridge, bridge.browser(), client_id, CB, scope)


def checked(bridge: Bridge, token: str) -> tuple[dict, dict]:
    published = KeySet.import_key_set(json.loads(bridge.browser().get("/jwks").body))
    decoded = jwt.decode(token, published, algorithms=list(keys.ALGORITHMS))
    jwt.JWTClaimsRegistry(iss={"essential": True, "value": ISSUER}, exp={"essential": True},
                          jti={"essential": True}).validate(decoded.claims)
    return dict(decoded.header), dict(decoded.claims)


def introspected(bridge: Bridge, token: str) -> dict:
    return json.loads(bridge.browser().post("/introspect", data={
        "token": token, "client_id": "imapd", "client_secret": "imapd-secret"}).body)


def test_a_client_registered_for_jwt_gets_rfc9068_access_tokens(bridge):
    tokens = granted(bridge)
    header, claims = checked(bridge, tokens["access_token"])
    assert (header["typ"], header["alg"]) == ("at+jwt", "ES256") and header["kid"]
    with bridge.store.transaction():
        sub = bridge.store.keyring.subject(bridge.store.get_user_by_name("alice").id)
    assert (claims["sub"], claims["aud"], claims["client_id"], claims["scope"]) == (sub, ISSUER, "jwt",
                                                                                      "openid email imap")
    assert (claims["preferred_username"], claims["email"]) == ("alice", "alice@example.org")
    assert claims["exp"] - claims["iat"] == Config().tokens.access_ttl and "azp" not in claims
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == Config().tokens.access_ttl
    refreshed = tokens_of(bridge.browser().post("/token", data={
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": "jwt",
        "client_secret": "jwt-secret"}))
    assert checked(bridge, refreshed["access_token"])[1]["jti"] != claims["jti"]
    assert "." not in granted(bridge, "plain", "imap")["access_token"]  # the server's default: opaque


def test_a_jwt_is_looked_up_everywhere_so_its_revocation_counts_here(bridge):
    tokens = granted(bridge)
    access = tokens["access_token"]
    assert introspected(bridge, access)["active"] is True
    assert bridge.browser().get("/userinfo", headers={"Authorization": f"Bearer {access}"}).code == 200
    bridge.browser().post("/revoke", data={"token": access, "client_id": "jwt", "client_secret": "jwt-secret"})
    checked(bridge, access)  # the signature is still good: only bearerbridge knows it was revoked
    assert introspected(bridge, access) == {"active": False}
    assert bridge.browser().get("/userinfo", headers={"Authorization": f"Bearer {access}"}).code == 401


def test_a_client_credentials_jwt_names_the_client_as_its_subject(bridge):
    tokens = tokens_of(bridge.browser().post("/token", data={
        "grant_type": "client_credentials", "client_id": "cron", "client_secret": "cron-secret"}))
    _, claims = checked(bridge, tokens["access_token"])
    assert claims["sub"] == "cron" and "email" not in claims and "preferred_username" not in claims


def test_the_header_type_algorithm_and_audience_follow_the_config(tmp_path):
    bridge = bridge_with(tmp_path, format="jwt", jwt_type="JWT", jwt_algorithm="RS256", jwt_audience="imap.example")
    header, claims = checked(bridge, granted(bridge, "plain", "imap")["access_token"])
    assert (header["typ"], header["alg"], claims["aud"]) == ("JWT", "RS256", "imap.example")
    bridge.store.engine.dispose()
