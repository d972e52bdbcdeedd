"""The same service on PostgreSQL: twistd with a PostgreSQL URL runs the code grant end to end."""

from __future__ import annotations

import pytest

from .support import Service, exchange_code, get_code, introspect, postgres_schema


@pytest.fixture(scope="module")
def pg_service(tmp_path_factory):
    with postgres_schema() as url:
        running = Service.start(tmp_path_factory.mktemp("pg"), database_url=url)
        yield running
        running.stop()


def test_code_grant_refresh_and_revocation_on_postgresql(pg_service):
    service = pg_service
    client = service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap")
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    username, password = service.user()
    code, verifier = get_code(service, client, username, password)
    response = exchange_code(service, client, code, verifier)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert introspect(service, resource_server, tokens["access_token"])["username"] == username
    assert exchange_code(service, client, code, verifier).json()["error"] == "invalid_grant"
    assert introspect(service, resource_server, tokens["access_token"]) == {"active": False}  # the replay revoked it
