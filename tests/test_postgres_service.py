"""The same service on PostgreSQL: twistd with a PostgreSQL URL runs the code grant end to end."""

from __future__ import annotations

import os
import secrets

import pytest
import sqlalchemy as sa

from .support import IN_CI, Service, get_code, introspect, token_request

POSTGRES_URL = os.environ.get("BEARERBRIDGE_TEST_DATABASE_URL")


@pytest.fixture(scope="module")
def pg_service(tmp_path_factory):
    if not POSTGRES_URL:
        if IN_CI:
            pytest.fail("CI must set BEARERBRIDGE_TEST_DATABASE_URL")
        pytest.skip("BEARERBRIDGE_TEST_DATABASE_URL is not set")
    schema = f"bb_service_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = sa.engine.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    running = Service.start(tmp_path_factory.mktemp("pg"), database_url=url.render_as_string(hide_password=False))
    yield running
    running.stop()
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_code_grant_refresh_and_revocation_on_postgresql(pg_service):
    service = pg_service
    client = service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap")
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap")
    username, password = service.user()
    code, verifier = get_code(service, client, username, password)
    response = token_request(service, {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                       "redirect_uri": "https://app.example/cb"}, client)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert introspect(service, resource_server, tokens["access_token"])["username"] == username
    assert token_request(service, {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                   "redirect_uri": "https://app.example/cb"}, client).json()["error"] == "invalid_grant"
    assert introspect(service, resource_server, tokens["access_token"]) == {"active": False}  # the replay revoked it
