"""The authorization code grant over real HTTP against a running `twistd bearerbridge`."""

from __future__ import annotations

import requests

from .support import (authorize_url, exchange_code, form_fields, get_code, introspect, login_and_consent, pkce_pair,
                      redirect_params, token_request)


def test_the_whole_code_grant(service, web_client, resource_server):
    """authorize → login → consent → code → token with PKCE → introspect → refresh →
    old refresh refused → revoke → introspect inactive."""
    username, password = service.user(email="ada@example.org")
    verifier, challenge = pkce_pair()
    url = authorize_url(service.url, web_client["client_id"], "https://app.example/cb", challenge, "imap")
    with requests.Session() as browser:
        page = browser.get(url, allow_redirects=False)
        assert page.status_code == 200 and "Sign in" in page.text
        assert web_client["name"] in page.text
        action, fields = form_fields(page.text)
        page = browser.post(service.url + action, data={**fields, "username": username, "password": password},
                            allow_redirects=False)
        assert page.status_code == 200, page.text
        assert "Read and manage your mail (IMAP)" in page.text  # the scope's description
        set_cookie = page.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie.replace("Lax", "lax")
        action, fields = form_fields(page.text)
        params = redirect_params(browser.post(service.url + action, data={**fields, "decision": "approve"},
                                              allow_redirects=False))
    assert params["state"] == "st-123"
    assert params["iss"] == service.url  # RFC 9207

    response = token_request(service, {"grant_type": "authorization_code", "code": params["code"],
                                       "redirect_uri": "https://app.example/cb", "code_verifier": verifier},
                             web_client)
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    tokens = response.json()
    assert tokens["token_type"] == "Bearer" and tokens["scope"] == "imap"
    assert tokens["expires_in"] == 3600
    assert len(tokens["access_token"]) >= 43  # 256 bits, base64url

    claims = introspect(service, resource_server, tokens["access_token"])
    assert claims["active"] is True
    assert claims["username"] == username and claims["sub"] == username
    assert claims["email"] == "ada@example.org"
    assert claims["scope"] == "imap" and claims["client_id"] == web_client["client_id"]
    assert claims["token_type"] == "Bearer" and claims["exp"] - claims["iat"] == 3600

    # a refresh token is no access token: only its own client sees it active
    assert introspect(service, resource_server, tokens["refresh_token"]) == {"active": False}
    own = introspect(service, web_client, tokens["refresh_token"], token_type_hint="refresh_token")
    assert own["active"] and own["token_type"] == "refresh_token"

    refreshed = token_request(service, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                              web_client)
    assert refreshed.status_code == 200, refreshed.text
    new = refreshed.json()
    assert new["refresh_token"] != tokens["refresh_token"]
    assert introspect(service, resource_server, new["access_token"])["active"] is True

    again = token_request(service, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                          web_client)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # the replay of a rotated refresh token revoked the whole chain
    assert introspect(service, resource_server, new["access_token"])["active"] is False
    chained = token_request(service, {"grant_type": "refresh_token", "refresh_token": new["refresh_token"]},
                            web_client)
    assert chained.json()["error"] == "invalid_grant"


def test_revocation_makes_introspection_inactive(service, web_client, resource_server):
    username, password = service.user()
    code, verifier = get_code(service, web_client, username, password)
    tokens = exchange_code(service, web_client, code, verifier).json()
    response = requests.post(f"{service.url}/revoke", data={"token": tokens["access_token"]},
                             auth=(web_client["client_id"], web_client["client_secret"]))
    assert response.status_code == 200
    assert introspect(service, resource_server, tokens["access_token"]) == {"active": False}
    assert introspect(service, resource_server, tokens["refresh_token"],
                      token_type_hint="refresh_token") == {"active": False}


def test_consent_is_remembered_for_the_same_or_fewer_scopes(service, web_client):
    username, password = service.user()
    get_code(service, web_client, username, password, scope="imap smtp")
    verifier, challenge = pkce_pair()
    with requests.Session() as browser:
        page = browser.get(authorize_url(service.url, web_client["client_id"], "https://app.example/cb",
                                         challenge, "smtp"), allow_redirects=False)
        action, fields = form_fields(page.text)
        response = browser.post(service.url + action, data={**fields, "username": username, "password": password},
                                allow_redirects=False)
        assert "code" in redirect_params(response)  # no consent page the second time


def test_no_scope_parameter_gets_the_registered_scopes(service, web_client):
    username, password = service.user()
    code, verifier = get_code(service, web_client, username, password, scope=None)
    tokens = exchange_code(service, web_client, code, verifier).json()
    assert tokens["scope"] == "imap smtp"


def test_public_native_client_uses_pkce_and_any_loopback_port(service, native_client, resource_server):
    username, password = service.user()
    redirect_uri = "http://127.0.0.1:53682/callback"
    code, verifier = get_code(service, native_client, username, password, "smtp", redirect_uri=redirect_uri)
    response = exchange_code(service, native_client, code, verifier, redirect_uri)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert introspect(service, resource_server, tokens["access_token"])["scope"] == "smtp"
    refreshed = token_request(service, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                              native_client)
    assert refreshed.status_code == 200, refreshed.text


def test_client_credentials(service, resource_server):
    prometheus = service.client("--grant", "client_credentials", "--scope", "metrics")
    response = token_request(service, {"grant_type": "client_credentials", "scope": "metrics"}, prometheus)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "metrics" and "refresh_token" not in body
    claims = introspect(service, resource_server, body["access_token"])
    assert claims["active"] and claims["sub"] == prometheus["client_id"] and "username" not in claims
    by_post = token_request(service, {"grant_type": "client_credentials"}, prometheus, basic=False)
    assert by_post.status_code == 200 and by_post.json()["scope"] == "metrics"


def test_metadata_lists_every_endpoint(service):
    document = requests.get(f"{service.url}/.well-known/oauth-authorization-server").json()
    assert document["issuer"] == service.url
    for name in ("authorization", "token", "introspection", "revocation"):
        assert requests.get(document[f"{name}_endpoint"]).status_code in (400, 405)
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["authorization_response_iss_parameter_supported"] is True


def test_pages_refuse_framing(service, web_client):
    _, challenge = pkce_pair()
    page = requests.get(authorize_url(service.url, web_client["client_id"], "https://app.example/cb", challenge))
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


def test_healthz(service):
    response = requests.get(f"{service.url}/healthz")
    assert response.status_code == 200 and response.text == "ok\n"


def test_logout_ends_the_session(service, web_client):
    username, password = service.user()
    _, challenge = pkce_pair()
    url = authorize_url(service.url, web_client["client_id"], "https://app.example/cb", challenge, "imap")
    with requests.Session() as browser:
        login_and_consent(browser, service.url, url, username, password)
        assert "Sign in" not in browser.get(url, allow_redirects=False).text
        page = browser.get(f"{service.url}/logout")
        action, fields = form_fields(page.text)
        assert "signed out" in browser.post(service.url + action, data=fields).text
        assert "Sign in" in browser.get(url, allow_redirects=False).text
