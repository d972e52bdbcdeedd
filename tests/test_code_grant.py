"""The authorization code grant over real HTTP against a running `twistd bearerbridge`, end to end.
Its parts are tested in process: tests/oauth/test_server.py, tests/web/test_authorize.py and
tests/web/test_token.py."""

from __future__ import annotations

import requests

from .support import (
    authorize_url,
    form_fields,
    introspect,
    pkce_pair,
    redirect_params,
    token_request,
)


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


def test_metadata_lists_every_endpoint(service):
    document = requests.get(f"{service.url}/.well-known/oauth-authorization-server").json()
    assert document["issuer"] == service.url
    for name in ("authorization", "token", "introspection", "revocation"):
        assert requests.get(document[f"{name}_endpoint"]).status_code in (400, 405)
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["authorization_response_iss_parameter_supported"] is True


def test_healthz(service):
    response = requests.get(f"{service.url}/healthz")
    assert response.status_code == 200 and response.text == "ok\n"
