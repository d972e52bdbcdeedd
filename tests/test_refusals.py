"""Every way a request to the authorization server is refused, each with its exact OAuth error."""

from __future__ import annotations

import time

import pytest
import requests

from .support import (Service, authorize_url, exchange_code, form_fields, get_code, introspect, pkce_pair, redirect_params,
                      token_request)

CB = "https://app.example/cb"


def error_of(response: requests.Response, status: int = 400) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()["error"]


# -- at the token endpoint ----------------------------------------------------------------------

def test_wrong_pkce_verifier(service, web_client):
    username, password = service.user()
    code, _ = get_code(service, web_client, username, password)
    wrong, _ = pkce_pair()
    assert error_of(exchange_code(service, web_client, code, wrong)) == "invalid_grant"


def test_reused_code_is_refused_and_revokes_what_it_issued(service, web_client, resource_server):
    username, password = service.user()
    code, verifier = get_code(service, web_client, username, password)
    first = exchange_code(service, web_client, code, verifier)
    assert first.status_code == 200
    assert error_of(exchange_code(service, web_client, code, verifier)) == "invalid_grant"
    tokens = first.json()
    assert introspect(service, resource_server, tokens["access_token"]) == {"active": False}
    refresh = token_request(service, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                            web_client)
    assert error_of(refresh) == "invalid_grant"


def test_redirect_uri_must_match_at_the_token_endpoint(service):
    client = service.client("--redirect-uri", CB, "--redirect-uri", "https://app.example/other", "--scope", "imap")
    username, password = service.user()
    code, verifier = get_code(service, client, username, password)
    assert error_of(exchange_code(service, client, code, verifier, "https://app.example/other")) == "invalid_grant"


def test_wrong_client_secret(service, web_client):
    username, password = service.user()
    code, verifier = get_code(service, web_client, username, password)
    forged = {**web_client, "client_secret": "not-the-secret"}
    assert error_of(exchange_code(service, forged, code, verifier), 401) == "invalid_client"
    assert error_of(exchange_code(service, forged, code, verifier, basic=False), 401) == "invalid_client"


def test_code_of_another_client(service, web_client):
    other = service.client("--redirect-uri", CB, "--scope", "imap")
    username, password = service.user()
    code, verifier = get_code(service, web_client, username, password)
    assert error_of(exchange_code(service, other, code, verifier)) == "invalid_grant"


def test_public_client_cannot_use_client_credentials(service, native_client):
    response = token_request(service, {"grant_type": "client_credentials"}, native_client)
    assert error_of(response, 401) == "invalid_client"


def test_client_credentials_for_an_unregistered_scope(service):
    machine = service.client("--grant", "client_credentials", "--scope", "metrics")
    response = token_request(service, {"grant_type": "client_credentials", "scope": "imap"}, machine)
    assert error_of(response) == "invalid_scope"


def test_unsupported_grant_type(service, web_client):
    assert error_of(token_request(service, {"grant_type": "password"}, web_client)) == "unsupported_grant_type"


def test_a_disabled_user(service, web_client, resource_server):
    username, password = service.user()
    code, verifier = get_code(service, web_client, username, password)
    tokens = exchange_code(service, web_client, code, verifier).json()
    second_code, second_verifier = get_code(service, web_client, username, password)
    service.cli("user", "disable", username)
    assert introspect(service, resource_server, tokens["access_token"]) == {"active": False}
    assert error_of(exchange_code(service, web_client, second_code, second_verifier)) == "invalid_grant"
    refresh = token_request(service, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                            web_client)
    assert error_of(refresh) == "invalid_grant"
    _, challenge = pkce_pair()
    with requests.Session() as browser:  # the login form refuses a disabled user
        action, fields = form_fields(browser.get(authorize_url(service.url, web_client["client_id"], CB, challenge)).text)
        page = browser.post(service.url + action, data={**fields, "username": username, "password": password})
    assert page.status_code == 401 and "Wrong username or password, or the account is disabled" in page.text


def test_a_deleted_client(service, resource_server):
    client = service.client("--redirect-uri", CB, "--scope", "imap")
    username, password = service.user()
    code, verifier = get_code(service, client, username, password)
    tokens = exchange_code(service, client, code, verifier).json()
    service.cli("client", "delete", client["client_id"])
    assert introspect(service, resource_server, tokens["access_token"]) == {"active": False}
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    # Its tokens went with it at once; the service, another process than the CLI, may still
    # know the client itself for [sasl] cache_ttl (1 s), then calls it invalid_client.
    assert token_request(service, refresh, client).json()["error"] in ("invalid_grant", "invalid_client")
    time.sleep(1.05)
    assert error_of(token_request(service, refresh, client), 401) == "invalid_client"
    _, challenge = pkce_pair()
    page = requests.get(authorize_url(service.url, client["client_id"], CB, challenge), allow_redirects=False)
    assert page.status_code == 400 and 'id="error">invalid_client' in page.text


def test_introspection_needs_a_registered_confidential_client(service, web_client, native_client):
    response = requests.post(f"{service.url}/introspect", data={"token": "x"})
    assert error_of(response, 401) == "invalid_client"
    response = requests.post(f"{service.url}/introspect", data={"token": "x", "client_id": native_client["client_id"]})
    assert error_of(response, 401) == "invalid_client"
    assert introspect(service, web_client, "no-such-token") == {"active": False}


# -- at the authorization endpoint ------------------------------------------------------------------

def authorize(service, client_id, redirect_uri=CB, challenge="default", scope="imap", **extra):
    if challenge == "default":
        _, challenge = pkce_pair()
    return requests.get(authorize_url(service.url, client_id, redirect_uri, challenge, scope, **extra),
                        allow_redirects=False)


def test_unknown_client_gets_an_error_page_not_a_redirect(service):
    page = authorize(service, "no-such-client")
    assert page.status_code == 400 and "Location" not in page.headers
    assert 'id="error">invalid_client' in page.text


def test_mismatched_redirect_uri_gets_an_error_page_not_a_redirect(service, web_client, native_client):
    for uri in ("https://evil.example/cb", "https://app.example/cb/", "https://app.example/cb?x=1"):
        page = authorize(service, web_client["client_id"], uri)
        assert page.status_code == 400 and "Location" not in page.headers
        assert 'id="error">invalid_request' in page.text
    # any loopback port only for a public client, and only on the registered path
    page = authorize(service, native_client["client_id"], "http://127.0.0.1:9999/elsewhere")
    assert page.status_code == 400 and "Location" not in page.headers
    confidential = service.client("--redirect-uri", "http://127.0.0.1:8765/cb", "--scope", "imap")
    page = authorize(service, confidential["client_id"], "http://127.0.0.1:9999/cb")
    assert page.status_code == 400 and "Location" not in page.headers


def test_disallowed_scope_redirects_with_invalid_scope(service, web_client):
    params = redirect_params(authorize(service, web_client["client_id"], scope="imap metrics"))
    assert params["error"] == "invalid_scope" and params["state"] == "st-123" and params["iss"] == service.url


def test_public_client_without_pkce(service, native_client):
    params = redirect_params(authorize(service, native_client["client_id"], "http://127.0.0.1:5000/callback",
                                       challenge=None))
    assert params["error"] == "invalid_request"


def test_plain_pkce_is_refused(service, web_client):
    verifier, _ = pkce_pair()
    page = requests.get(authorize_url(service.url, web_client["client_id"], CB, None, "imap",
                                      code_challenge=verifier, code_challenge_method="plain"), allow_redirects=False)
    assert redirect_params(page)["error"] == "invalid_request"


def test_unsupported_response_type(service, web_client):
    params = redirect_params(authorize(service, web_client["client_id"], response_type="token"))
    assert params["error"] == "unsupported_response_type"


def test_denied_consent(service, web_client):
    from .support import login_and_consent
    username, password = service.user()
    _, challenge = pkce_pair()
    with requests.Session() as browser:
        response = login_and_consent(browser, service.url, authorize_url(service.url, web_client["client_id"], CB,
                                                                         challenge, "imap"),
                                     username, password, decision="deny")
    params = redirect_params(response)
    assert params["error"] == "access_denied" and params["state"] == "st-123" and "code" not in params


def test_wrong_password(service, web_client):
    username, _ = service.user()
    _, challenge = pkce_pair()
    with requests.Session() as browser:
        page = browser.get(authorize_url(service.url, web_client["client_id"], CB, challenge, "imap"))
        action, fields = form_fields(page.text)
        page = browser.post(service.url + action, data={**fields, "username": username, "password": "wrong"},
                            allow_redirects=False)
    assert page.status_code == 401 and "Wrong username or password" in page.text
    assert "bb_session" not in page.headers.get("Set-Cookie", "")


@pytest.mark.parametrize("tamper", ["missing", "forged", "other-browser"])
def test_forms_need_their_csrf_token(service, web_client, tamper):
    username, password = service.user()
    _, challenge = pkce_pair()
    url = authorize_url(service.url, web_client["client_id"], CB, challenge, "imap")
    with requests.Session() as browser:
        action, fields = form_fields(browser.get(url).text)
        fields.update(username=username, password=password)
        if tamper == "missing":
            del fields["csrf"]
        elif tamper == "forged":
            fields["csrf"] = fields["csrf"][:-4] + "AAAA"
        else:
            browser.cookies.clear()
        page = browser.post(service.url + action, data=fields, allow_redirects=False)
    assert page.status_code == 400 and 'id="error">invalid_request' in page.text
    assert "bb_session" not in page.headers.get("Set-Cookie", "")


def test_consent_token_is_bound_to_the_request(service, web_client):
    """A consent form's token cannot approve a different request (say, wider scopes)."""
    username, password = service.user()
    _, challenge = pkce_pair()
    narrow = authorize_url(service.url, web_client["client_id"], CB, challenge, "imap")
    wide = authorize_url(service.url, web_client["client_id"], CB, challenge, "imap smtp")
    with requests.Session() as browser:
        action, fields = form_fields(browser.get(narrow).text)
        page = browser.post(service.url + action, data={**fields, "username": username, "password": password})
        _, consent = form_fields(page.text)
        page = browser.post(wide, data={**consent, "decision": "approve"}, allow_redirects=False)
    assert page.status_code == 400 and 'id="error">invalid_request' in page.text


@pytest.mark.parametrize("query", [
    "response_type=code&client_id=%ff%fe",                      # not UTF-8
    "&".join(f"p{i}=1" for i in range(200)),                    # too many parameters
    "response_type=code&client_id=a&client_id=b",               # repeated parameter
])
def test_hostile_parameters(service, query):
    page = requests.get(f"{service.url}/authorize?{query}", allow_redirects=False)
    assert page.status_code == 400 and "Location" not in page.headers
    assert requests.get(f"{service.url}/healthz").status_code == 200


def test_oversized_token_request(service, web_client):
    response = requests.post(f"{service.url}/token", data={"grant_type": "client_credentials", "x": "a" * 70000})
    assert error_of(response) == "invalid_request"


# -- expiry ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_lived(tmp_path_factory):
    running = Service.start(tmp_path_factory.mktemp("short"), extra="[tokens]\ncode_ttl = 1\naccess_ttl = 2\n")
    yield running
    running.stop()


def test_expired_code_and_token(short_lived):
    service = short_lived
    client = service.client("--redirect-uri", CB, "--scope", "imap")
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap")
    username, password = service.user()
    code, verifier = get_code(service, client, username, password)
    tokens = exchange_code(service, client, code, verifier).json()
    assert tokens["expires_in"] == 2
    stale_code, stale_verifier = get_code(service, client, username, password)
    time.sleep(2.2)
    assert error_of(exchange_code(service, client, stale_code, stale_verifier)) == "invalid_grant"
    assert introspect(service, resource_server, tokens["access_token"]) == {"active": False}
    # the refresh token outlives the access token
    refreshed = token_request(service, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                              client)
    assert refreshed.status_code == 200, refreshed.text
