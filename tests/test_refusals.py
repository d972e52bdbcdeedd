"""Refusals that take a running process to show, each with its exact OAuth error: a client deleted by
another process (the CLI), hostile input on a real socket, codes and tokens that expire in real time.
The other refusals are tested in process: tests/oauth/test_server.py, tests/web/test_authorize.py and
tests/web/test_token.py."""

from __future__ import annotations

import time

import pytest
import requests

from .support import (
    Service,
    authorize_url,
    exchange_code,
    get_code,
    introspect,
    pkce_pair,
    token_request,
)

CB = "https://app.example/cb"


def error_of(response: requests.Response, status: int = 400) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()["error"]


# -- at the token endpoint ----------------------------------------------------------------------

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


# -- at the authorization endpoint ------------------------------------------------------------------

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
    assert error_of(response, 413) == "invalid_request"  # refused on its Content-Length, unread


# -- expiry ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_lived(tmp_path_factory):
    running = Service.start(tmp_path_factory.mktemp("short"), extra="[tokens]\ncode_ttl = 1\naccess_ttl = 2\n")
    yield running
    running.stop()


def test_expired_code_and_token(short_lived):
    service = short_lived
    client = service.client("--redirect-uri", CB, "--scope", "imap")
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
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
