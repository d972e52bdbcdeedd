"""OpenID Connect in process, over the whole HTTP tree and a real SQLite store: the provider
configuration, ID tokens (checked with joserfc against /jwks, as a relying party checks them),
the claims of each scope, nonce replay, /userinfo and its RFC 6750 errors, prompt, max_age,
login_hint, id_token_hint, key rotation, RP-initiated logout, and the device grant's ID token.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from bearerbridge import keys
from bearerbridge.config import Config, OpenIdSettings
from bearerbridge.oauth import device
from bearerbridge.storage.models import Client, SignIn

from ..fakes import (
    CODE_GRANTS,
    PASSWORD,
    Bridge,
    Http,
    NewUser,
    code_grant,
    form_of,
    redirect_params,
    sqlite_bridge,
    tokens_of,
)
from ..support import authorize_url, pkce_pair

ISSUER = "http://127.0.0.1:8080"
CB = "https://rp.example/cb"
AFTER_LOGOUT = "https://rp.example/bye"
OPENID = "openid profile email"


@pytest.fixture
def bridge(tmp_path) -> Iterator[Bridge]:
    with sqlite_bridge(tmp_path / "x.db", [
        Client("rp", "Relying Party", (CB,), f"{OPENID} imap", CODE_GRANTS, public=False,
               post_logout_redirect_uris=(AFTER_LOGOUT,)),
        Client("rsa", "RSA Party", (CB,), OPENID, CODE_GRANTS, public=False, id_token_alg="RS256"),
        Client("tv", "TV", (), f"{OPENID} imap", (device.GRANT_TYPE,), public=True),
    ], [NewUser("alice", "alice@example.org", display_name="Alice Liddell"), NewUser("bob")]) as bridge:
        yield bridge


def grant(bridge: Bridge, browser: Http | None = None, client_id: str = "rp", scope: str = OPENID,
          username: str = "alice", **extra: str) -> tuple[Http, dict]:
    """A browser that signed in (unless already) and approved a code grant; the token response."""
    browser = browser or bridge.browser()
    return browser, code_grant(bridge, browser, client_id, CB, scope, username, **extra)


def verified(bridge: Bridge, id_token: str, audience: str = "rp") -> tuple[dict, dict]:
    """The header and claims of an ID token, its signature checked with the published JWKS and
    its issuer, audience and times checked as a relying party does."""
    published = KeySet.import_key_set(json.loads(bridge.browser().get("/jwks").body))
    token = jwt.decode(id_token, published, algorithms=list(keys.ALGORITHMS))
    jwt.JWTClaimsRegistry(iss={"essential": True, "value": ISSUER}, aud={"essential": True, "value": audience},
                          sub={"essential": True}, exp={"essential": True}).validate(token.claims)
    return dict(token.header), dict(token.claims)


def at_hash(access_token: str) -> str:
    digest = hashlib.sha256(access_token.encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def subject(bridge: Bridge, username: str) -> str:
    with bridge.store.transaction():
        return bridge.store.keyring.subject(bridge.store.get_user_by_name(username).id)


def authorize_again(browser: Http, client_id: str = "rp", scope: str = OPENID, **extra: str):
    _, challenge = pkce_pair()
    return browser.get(authorize_url("", client_id, CB, challenge, scope, **extra))


# -- discovery ---------------------------------------------------------------------------------

def test_the_provider_configuration_has_what_discovery_requires_and_is_the_rfc8414_document(bridge):
    openid = bridge.browser().get("/.well-known/openid-configuration")
    assert openid.code == 200 and openid.header("Content-Type") == "application/json"
    document = json.loads(openid.body)
    assert document == json.loads(bridge.browser().get("/.well-known/oauth-authorization-server").body)
    assert document["issuer"] == ISSUER
    for name, path in (("authorization_endpoint", "/authorize"), ("token_endpoint", "/token"),
                       ("userinfo_endpoint", "/userinfo"), ("jwks_uri", "/jwks"), ("end_session_endpoint", "/logout")):
        assert document[name] == ISSUER + path
    assert document["response_types_supported"] == ["code"] and document["subject_types_supported"] == ["public"]
    assert document["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    assert {"openid", "profile", "email"} <= set(document["scopes_supported"])
    claims = set(document["claims_supported"])
    assert {"sub", "preferred_username", "email", "email_verified", "name", "nonce"} <= claims
    assert document["prompt_values_supported"] == ["none", "login", "consent"]


# -- ID tokens ---------------------------------------------------------------------------------

def test_the_code_grant_with_openid_returns_an_es256_id_token_with_the_claims_of_its_scope(bridge):
    before = int(time.time())
    _, tokens = grant(bridge, nonce="n-0S6_WzA2Mj")
    header, claims = verified(bridge, tokens["id_token"])
    assert header["alg"] == "ES256" and header["typ"] == "JWT"
    assert header["kid"] in {k["kid"] for k in json.loads(bridge.browser().get("/jwks").body)["keys"]}
    assert claims["sub"] == subject(bridge, "alice") and "alice" not in claims["sub"]
    assert claims["nonce"] == "n-0S6_WzA2Mj" and claims["at_hash"] == at_hash(tokens["access_token"])
    assert claims["amr"] == ["pwd"] and before <= claims["auth_time"] <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == Config().tokens.access_ttl
    assert (claims["preferred_username"], claims["name"]) == ("alice", "Alice Liddell")
    assert (claims["email"], claims["email_verified"]) == ("alice@example.org", True)
    assert "acr" not in claims


def test_openid_alone_gives_only_the_subject_and_no_openid_gives_no_id_token(bridge):
    browser, tokens = grant(bridge, scope="openid")
    _, claims = verified(bridge, tokens["id_token"])
    assert not {"preferred_username", "name", "email", "email_verified", "nonce"} & set(claims)
    _, tokens = grant(bridge, browser, scope="imap")
    assert "id_token" not in tokens


def test_a_client_registered_for_rs256_gets_rs256_and_each_user_their_own_stable_subject(bridge):
    _, first = grant(bridge, client_id="rsa")
    header, claims = verified(bridge, first["id_token"], audience="rsa")
    assert header["alg"] == "RS256"
    _, again = grant(bridge, client_id="rsa")
    assert verified(bridge, again["id_token"], audience="rsa")[1]["sub"] == claims["sub"]
    _, bobs = grant(bridge, client_id="rsa", username="bob")
    bob = verified(bridge, bobs["id_token"], audience="rsa")[1]
    assert bob["sub"] != claims["sub"] and "email" not in bob and "name" not in bob  # bob has neither


def test_the_acr_configured_is_in_every_id_token(tmp_path):
    config = dataclasses.replace(Config(), openid=OpenIdSettings(acr="urn:mace:incommon:iap:silver"))
    rp = Client("rp", "RP", (CB,), OPENID, ("authorization_code",), public=False)
    with sqlite_bridge(tmp_path / "x.db", [rp], [NewUser("alice")], config) as bridge:
        _, tokens = grant(bridge)
        assert verified(bridge, tokens["id_token"])[1]["acr"] == "urn:mace:incommon:iap:silver"


def test_a_nonce_a_client_used_with_a_live_code_is_refused_as_a_replay(bridge):
    browser, _ = grant(bridge, nonce="once")
    answer = authorize_again(browser, nonce="once")
    params = redirect_params(answer)
    assert params["error"] == "invalid_request" and params["state"] == "st-123" and params["iss"] == ISSUER
    assert "code" not in params
    assert redirect_params(authorize_again(browser, nonce="x" * 256))["error"] == "invalid_request"


def test_an_id_token_signed_before_a_rotation_verifies_after_it_and_new_ones_use_the_next_key(bridge):
    _, before = grant(bridge)
    old_kid = verified(bridge, before["id_token"])[0]["kid"]
    with bridge.store.transaction():
        upcoming = next(k.kid for k in bridge.store.ensure_signing_keys()
                        if k.alg == "ES256" and k.stage is keys.Stage.NEXT)
        bridge.store.rotate_signing_keys(3600)
    bridge.clock.advance(keys.REREAD)  # how long a running server may sign with what it read
    _, after = grant(bridge)
    assert verified(bridge, after["id_token"])[0]["kid"] == upcoming != old_kid
    verified(bridge, before["id_token"])  # the retired key is still published


# -- userinfo ----------------------------------------------------------------------------------

def test_userinfo_answers_the_claims_of_the_tokens_scope_by_header_or_form(bridge):
    _, tokens = grant(bridge)
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    answer = bridge.browser().get("/userinfo", headers=bearer)
    assert answer.code == 200 and answer.header("Cache-Control") == "no-store"
    claims = json.loads(answer.body)
    assert claims == {"sub": subject(bridge, "alice"), "preferred_username": "alice", "name": "Alice Liddell",
                      "email": "alice@example.org", "email_verified": True}
    assert json.loads(bridge.browser().post("/userinfo", headers=bearer).body) == claims
    assert json.loads(bridge.browser().post("/userinfo", data={"access_token": tokens["access_token"]}).body) == claims
    _, openid_only = grant(bridge, scope="openid")
    assert json.loads(bridge.browser().get("/userinfo", headers={
        "Authorization": f"bearer {openid_only['access_token']}"}).body) == {"sub": claims["sub"]}


def challenge(answer) -> str:
    return answer.header("WWW-Authenticate") or ""


def test_userinfo_refuses_as_rfc6750_says(bridge):
    _, tokens = grant(bridge, scope="openid imap")
    _, no_openid = grant(bridge, scope="imap")
    http = bridge.browser()
    nothing = http.get("/userinfo")
    assert nothing.code == 401 and challenge(nothing) == f'Bearer realm="{ISSUER}"'
    in_query = http.get("/userinfo?" + urlencode({"access_token": tokens["access_token"]}))
    assert in_query.code == 401 and "error=" not in challenge(in_query)  # RFC 9700 §2.3: never from the query
    unknown = http.get("/userinfo", headers={"Authorization": "Bearer not-a-token"})
    assert unknown.code == 401 and 'error="invalid_token"' in challenge(unknown)
    narrow = http.get("/userinfo", headers={"Authorization": f"Bearer {no_openid['access_token']}"})
    assert narrow.code == 403 and 'error="insufficient_scope"' in challenge(narrow)
    assert 'scope="openid"' in challenge(narrow) and json.loads(narrow.body)["error"] == "insufficient_scope"
    http.post("/revoke", data={"token": tokens["access_token"], "client_id": "rp", "client_secret": "rp-secret"})
    revoked = http.get("/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert revoked.code == 401 and 'error="invalid_token"' in challenge(revoked)


# -- prompt, max_age, login_hint, id_token_hint ----------------------------------------------------

def test_prompt_none_answers_at_once_login_required_consent_required_or_a_code(bridge):
    no_session = redirect_params(authorize_again(bridge.browser(), prompt="none"))
    assert (no_session["error"], no_session["state"], no_session["iss"]) == ("login_required", "st-123", ISSUER)
    browser, _ = grant(bridge, scope="openid")
    wider = redirect_params(authorize_again(browser, prompt="none", scope=OPENID))
    assert wider["error"] == "consent_required"
    assert "code" in redirect_params(authorize_again(browser, prompt="none", scope="openid"))
    assert redirect_params(authorize_again(browser, prompt="none login"))["error"] == "invalid_request"


def test_prompt_login_and_consent_ask_again_and_are_satisfied_by_answering(bridge):
    browser, _ = grant(bridge)
    page = authorize_again(browser, prompt="login")
    assert page.code == 200 and form_of(page)[1]["step"] == "login"
    action, fields = form_of(page)
    after = browser.post(action, data={**fields, "username": "alice", "password": PASSWORD})
    assert "code" in redirect_params(after)  # consent was remembered; the new sign-in is enough
    page = authorize_again(browser, prompt="consent")
    action, fields = form_of(page)
    assert fields["step"] == "consent"
    assert "code" in redirect_params(browser.post(action, data={**fields, "decision": "approve"}))


def test_max_age_asks_for_a_sign_in_older_than_it_and_must_be_a_number(bridge):
    browser, _ = grant(bridge)
    assert "code" in redirect_params(authorize_again(browser, max_age="3600"))
    with bridge.store.transaction():  # the session began a minute ago
        bridge.store._db.exec_driver_sql("UPDATE sessions SET created_at = created_at - 60")
    page = authorize_again(browser, max_age="30")
    assert page.code == 200 and form_of(page)[1]["step"] == "login"
    assert redirect_params(authorize_again(browser, max_age="soon"))["error"] == "invalid_request"


def test_a_session_older_than_max_age_gives_an_id_token_with_the_new_auth_time(bridge):
    browser, first = grant(bridge)
    with bridge.store.transaction():
        bridge.store._db.exec_driver_sql("UPDATE sessions SET created_at = created_at - 600")
    _, tokens = grant(bridge, browser, max_age="60")  # the session is older: signing in again
    assert verified(bridge, tokens["id_token"])[1]["auth_time"] >= verified(bridge, first["id_token"])[1]["auth_time"]
    assert time.time() - verified(bridge, tokens["id_token"])[1]["auth_time"] < 60


@pytest.mark.parametrize("parameter", ["login_hint", "user"])  # `user`: ownCloud's clients
def test_a_login_hint_fills_in_the_user_name(bridge, parameter):
    page = authorize_again(bridge.browser(), **{parameter: "alice@example.org"})
    assert 'id="username" autocomplete="username" required value="alice@example.org"' in page.body.decode()


def test_an_id_token_hint_of_another_user_asks_for_a_sign_in_and_a_forged_one_is_refused(bridge):
    _, bobs = grant(bridge, username="bob")
    browser, alices = grant(bridge)
    page = authorize_again(browser, id_token_hint=bobs["id_token"])
    assert page.code == 200 and form_of(page)[1]["step"] == "login"
    assert "code" in redirect_params(authorize_again(browser, id_token_hint=alices["id_token"]))
    assert redirect_params(authorize_again(browser, id_token_hint=bobs["id_token"], prompt="none"))["error"] == \
        "login_required"
    forged = alices["id_token"][:-4] + ("AAAA" if not alices["id_token"].endswith("AAAA") else "BBBB")
    assert redirect_params(authorize_again(browser, id_token_hint=forged))["error"] == "invalid_request"


# -- RP-initiated logout ---------------------------------------------------------------------------

def signed_in(bridge: Bridge, browser: Http) -> bool:
    page = authorize_again(browser, prompt="none")
    return "code" in redirect_params(page)


def test_logout_with_the_users_id_token_ends_the_session_and_returns_to_the_registered_uri(bridge):
    browser, tokens = grant(bridge)
    answer = browser.get("/logout?" + urlencode({"id_token_hint": tokens["id_token"], "state": "bye-1",
                                                 "post_logout_redirect_uri": AFTER_LOGOUT}))
    assert answer.code == 302
    location = urlsplit(answer.header("Location"))
    assert f"{location.scheme}://{location.netloc}{location.path}" == AFTER_LOGOUT
    assert parse_qs(location.query) == {"state": ["bye-1"]}
    assert not signed_in(bridge, browser)


def test_logout_without_an_id_token_asks_first_and_never_redirects(bridge):
    browser, _ = grant(bridge)
    page = browser.get("/logout?" + urlencode({"client_id": "rp", "post_logout_redirect_uri": AFTER_LOGOUT}))
    assert page.code == 200 and "Relying Party" in page.body.decode() and signed_in(bridge, browser)
    action, fields = form_of(page)
    done = browser.post(action, data=fields)
    assert done.code == 200 and 'id="signed-out"' in done.body.decode()
    assert not signed_in(bridge, browser)


def test_logout_to_an_unregistered_uri_or_with_a_forged_hint_does_nothing_but_say_so(bridge):
    browser, tokens = grant(bridge)
    elsewhere = browser.get("/logout?" + urlencode({"id_token_hint": tokens["id_token"],
                                                    "post_logout_redirect_uri": "https://evil.example/"}))
    assert elsewhere.code == 200 and elsewhere.header("Location") is None  # signed out, but not sent there
    browser, tokens = grant(bridge)
    forged = browser.get("/logout?" + urlencode({"id_token_hint": tokens["id_token"][:-2] + "xx",
                                                 "post_logout_redirect_uri": AFTER_LOGOUT}))
    assert forged.code == 400 and forged.header("Location") is None and signed_in(bridge, browser)


# -- the device grant --------------------------------------------------------------------------

def test_the_device_grant_with_openid_returns_an_id_token_with_the_approving_sign_in(bridge):
    started = json.loads(bridge.browser().post("/device_authorization", data={
        "client_id": "tv", "scope": "openid profile"}).body)
    with bridge.store.transaction():
        alice = bridge.store.get_user_by_name("alice")
        server = bridge.root.children[b"token"]._server
        assert device.decide(server, started["user_code"], SignIn(alice, 1_700_000_000, ("pwd",)), True)
    tokens = tokens_of(bridge.browser().post("/token", data={
        "grant_type": device.GRANT_TYPE, "device_code": started["device_code"], "client_id": "tv"}))
    header, claims = verified(bridge, tokens["id_token"], audience="tv")
    assert claims["auth_time"] == 1_700_000_000 and claims["amr"] == ["pwd"]
    assert claims["preferred_username"] == "alice" and claims["at_hash"] == at_hash(tokens["access_token"])
