"""The smaller features of the systems bearerbridge is measured against, in process over the
whole HTTP tree: the out-of-band page (Prosody, Doorkeeper), default scopes (Doorkeeper), extra
token-response fields (Doorkeeper's created_at, ownCloud's user_id), server-wide grant types
(Prosody's allowed_oauth2_grant_types), and the consent page's client name, website and logo.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from bearerbridge.config import Config, ServerSettings, TokenSettings
from bearerbridge.oauth import device
from bearerbridge.storage.models import Client
from bearerbridge.uris import OUT_OF_BAND

from ..fakes import (
    Bridge,
    Http,
    cheap_password_hash,
    error_of,
    form_of,
    login_and_consent,
    redirect_params,
    sqlite_store,
    tokens_of,
)
from ..support import authorize_url, pkce_pair

CB = "https://app.example/cb"
PASSWORD = "correct horse battery"
CODE = ("authorization_code", "refresh_token")


def bridge_with(tmp_path, server: dict | None = None, tokens: dict | None = None) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_client(Client("app", "Mail App", (CB, OUT_OF_BAND), "openid email imap smtp", CODE, public=False,
                                website="https://app.example/", logo_uri="https://app.example/logo.png"),
                         "app-secret")
        store.add_client(Client("tv", "TV", (), "imap smtp", (device.GRANT_TYPE,), public=True), None)
        store.add_client(Client("cron", "Cron", (), "imap", ("client_credentials",), public=False), "cron-secret")
        store.add_user("alice", "alice@example.org", cheap_password_hash(PASSWORD))
    config = Config()
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, **(server or {})),
                                 tokens=dataclasses.replace(config.tokens, **(tokens or {})))
    return Bridge.over(store, config)


@pytest.fixture
def bridge(tmp_path):
    bridge = bridge_with(tmp_path)
    yield bridge
    bridge.store.engine.dispose()


def exchange(bridge: Bridge, code: str, verifier: str, redirect_uri: str = CB) -> dict:
    return tokens_of(bridge.browser().post("/token", data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier,
        "client_id": "app", "client_secret": "app-secret"}))


def code_grant(bridge: Bridge, scope: str | None, browser: Http | None = None) -> dict:
    verifier, challenge = pkce_pair()
    answer = login_and_consent(browser or bridge.browser(), authorize_url("", "app", CB, challenge, scope), "alice",
                               PASSWORD)
    return exchange(bridge, redirect_params(answer)["code"], verifier)


# -- out of band ----------------------------------------------------------------------------------

def test_the_out_of_band_redirect_shows_the_code_on_a_page_and_the_code_exchanges(bridge):
    verifier, challenge = pkce_pair()
    page = login_and_consent(bridge.browser(), authorize_url("", "app", OUT_OF_BAND, challenge, "imap"), "alice",
                             PASSWORD)
    assert page.code == 200 and page.header("Location") is None
    body = page.body.decode()
    assert "Mail App" in body and "copy this code" in body and page.header("Cache-Control") == "no-store"
    code = body.split('id="code" value="')[1].split('"')[0]
    assert exchange(bridge, code, verifier, OUT_OF_BAND)["scope"] == "imap"


def test_denying_an_out_of_band_request_says_so_on_a_page(bridge):
    _, challenge = pkce_pair()
    page = login_and_consent(bridge.browser(), authorize_url("", "app", OUT_OF_BAND, challenge, "imap"), "alice",
                             PASSWORD, decision="deny")
    assert page.code == 400 and "nothing was shared" in page.body.decode() and page.header("Location") is None


# -- default scopes -----------------------------------------------------------------------------

def test_without_default_scopes_a_request_naming_none_gets_every_scope_of_its_client(bridge):
    assert code_grant(bridge, None)["scope"] == "openid email imap smtp"


def test_a_request_naming_no_scope_gets_the_defaults_its_client_may_have(tmp_path):
    bridge = bridge_with(tmp_path, tokens={"default_scopes": ("imap", "xmpp", "openid")})
    assert code_grant(bridge, None)["scope"] == "imap openid"  # not xmpp: the client may not have it
    assert code_grant(bridge, "smtp")["scope"] == "smtp"  # a scope asked for is what counts
    started = json.loads(bridge.browser().post("/device_authorization", data={"client_id": "tv"}).body)
    with bridge.store.transaction():
        assert bridge.store.find_device_code(started["device_code"]).scope == "imap"


def test_a_client_that_may_have_no_default_scope_is_told_so(tmp_path):
    bridge = bridge_with(tmp_path, tokens={"default_scopes": ("xmpp",)})
    _, challenge = pkce_pair()
    params = redirect_params(bridge.browser().get(authorize_url("", "app", CB, challenge, None)))
    assert params["error"] == "invalid_scope" and "default" in params["error_description"]


# -- extra token-response fields ----------------------------------------------------------------

def test_token_responses_carry_created_at_and_user_id_only_when_configured(tmp_path, bridge):
    plain = code_grant(bridge, "imap")
    assert "created_at" not in plain and "user_id" not in plain
    extra = bridge_with(tmp_path / "extra", tokens={"response_fields": ("created_at", "user_id")})
    tokens = code_grant(extra, "imap")
    assert abs(tokens["created_at"] - time.time()) < 5 and tokens["user_id"] == "alice"
    refreshed = tokens_of(extra.browser().post("/token", data={
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": "app",
        "client_secret": "app-secret"}))
    assert refreshed["user_id"] == "alice" and "created_at" in refreshed
    machine = tokens_of(extra.browser().post("/token", data={
        "grant_type": "client_credentials", "client_id": "cron", "client_secret": "cron-secret"}))
    assert "created_at" in machine and "user_id" not in machine  # no user


# -- server-wide grant types ---------------------------------------------------------------------

def test_a_grant_left_out_of_the_servers_list_is_refused_to_every_client(tmp_path):
    bridge = bridge_with(tmp_path, server={"grant_types": ("authorization_code",)})
    answer = bridge.browser().post("/token", data={"grant_type": "client_credentials", "client_id": "cron",
                                                   "client_secret": "cron-secret"})
    assert error_of(answer) == "unsupported_grant_type"
    assert error_of(bridge.browser().post("/device_authorization", data={"client_id": "tv"})) == \
        "unauthorized_client"
    assert "refresh_token" not in code_grant(bridge, "imap")  # it could never be used
    refused = bridge.browser().post("/token", data={"grant_type": "refresh_token", "refresh_token": "any",
                                                    "client_id": "app", "client_secret": "app-secret"})
    assert error_of(refused) == "unsupported_grant_type"
    document = json.loads(bridge.browser().get("/.well-known/openid-configuration").body)
    assert document["grant_types_supported"] == ["authorization_code"]


def test_without_the_code_grant_authorize_refuses_with_a_page(tmp_path):
    bridge = bridge_with(tmp_path, server={"grant_types": ("client_credentials",)})
    _, challenge = pkce_pair()
    page = bridge.browser().get(authorize_url("", "app", CB, challenge, "imap"))
    assert page.code == 400 and "unsupported_response_type" in page.body.decode()


def test_the_config_refuses_an_unknown_grant_field_or_default_scope():
    from bearerbridge.config import ConfigError, parse
    for section, key, value in (("server", "grant_types", ["implicit"]), ("tokens", "response_fields", ["id"]),
                                ("tokens", "default_scopes", ["nope"])):
        with pytest.raises(ConfigError, match=rf"\[{section}\] {key}: '{value[0]}' is not one of"):
            parse({section: {key: value}})
    assert TokenSettings().default_scopes == ()


def test_the_configs_grant_names_are_the_token_endpoints():
    from bearerbridge.config import GRANT_TYPE_NAMES
    from bearerbridge.oauth.grants import GRANT_TYPES
    assert GRANT_TYPE_NAMES == GRANT_TYPES == ServerSettings().grant_types


# -- the consent page ----------------------------------------------------------------------------

def test_the_consent_page_names_the_client_with_its_website_and_logo_and_says_the_answer_is_kept(bridge):
    _, challenge = pkce_pair()
    browser = bridge.browser()
    action, fields = form_of(browser.get(authorize_url("", "app", CB, challenge, "imap")))
    page = browser.post(action, data={**fields, "username": "alice", "password": PASSWORD})
    body = page.body.decode()
    assert '<strong id="client-name">Mail App</strong>' in body
    assert 'id="client-website" href="https://app.example/"' in body
    assert 'src="https://app.example/logo.png"' in body and 'id="remembered"' in body


def test_the_consent_pages_policy_lets_in_the_clients_logo_and_nothing_else(bridge):
    _, challenge = pkce_pair()
    browser = bridge.browser()
    action, fields = form_of(browser.get(authorize_url("", "app", CB, challenge, "imap")))
    assert "img-src" not in browser.get(authorize_url("", "app", CB, challenge, "imap")).header(
        "Content-Security-Policy")
    page = browser.post(action, data={**fields, "username": "alice", "password": PASSWORD})
    assert "img-src 'self' https://app.example;" in page.header("Content-Security-Policy") + ";"
