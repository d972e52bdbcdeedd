"""The security events the grants and endpoints record (oauth/server.py, grants.py, endpoints.py,
device.py), through the whole HTTP tree in process: what each says, and that none holds a secret."""

from __future__ import annotations

import json

import pytest

from bearerbridge.oauth import device
from bearerbridge.oauth.server import BridgeServer
from bearerbridge.storage.models import Client, SignIn

from ..fakes import Answer, Bridge, cheap_password_hash, login_and_consent, redirect_params, sqlite_store
from ..support import authorize_url, pkce_pair

CB = "https://app.example/cb"
PASSWORD = "correct horse battery"
SECRETS = {"web": "web-secret", "machine": "machine-secret"}
ADDRESS = "127.0.0.1"  # where StubTreq's requests come from


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_client(Client("web", "Web App", (CB,), "imap smtp", ("authorization_code", "refresh_token"),
                                False), SECRETS["web"])
        store.add_client(Client("machine", "Machine", (), "metrics", ("client_credentials",), False),
                         SECRETS["machine"])
        store.add_client(Client("tv", "TV", (), "imap", (device.GRANT_TYPE, "refresh_token"), True), None)
        store.add_user("alice", None, cheap_password_hash(PASSWORD))
    yield Bridge.over(store)
    store.engine.dispose()


def token(bridge: Bridge, client_id: str | None, **data: str) -> Answer:
    auth = (client_id, SECRETS[client_id]) if client_id in SECRETS else None
    if client_id is not None and auth is None:
        data["client_id"] = client_id
    return bridge.browser().post("/token", data=data, auth=auth)


def tokens_of(answer: Answer) -> dict:
    assert answer.code == 200, (answer.code, answer.body)
    return json.loads(answer.body)


def code_grant(bridge: Bridge) -> tuple[dict, str, str]:
    """alice's consent for "web", and its code exchanged: (the tokens, the code, the verifier)."""
    verifier, challenge = pkce_pair()
    path = authorize_url("", "web", CB, challenge, "imap")
    code = redirect_params(login_and_consent(bridge.browser(), path, "alice", PASSWORD))["code"]
    answer = token(bridge, "web", grant_type="authorization_code", code=code, redirect_uri=CB,
                   code_verifier=verifier)
    return tokens_of(answer), code, verifier


def test_a_code_grant_records_the_consent_and_the_token_issued(bridge):
    tokens, _, _ = code_grant(bridge)
    assert bridge.audit.of("consent") == [
        {"user": "alice", "client_id": "web", "scope": "imap", "approved": True, "address": ADDRESS}]
    [issued] = bridge.audit.of("token_issued")
    with bridge.store.transaction():
        saved = bridge.store.find_refresh_token(tokens["refresh_token"])
    assert issued == {"grant_type": "authorization_code", "client_id": "web", "user": "alice", "scope": "imap",
                      "token_id": saved.id, "family": saved.family, "address": ADDRESS}


def test_a_refresh_records_the_new_pair_in_the_same_family_and_the_one_it_replaces(bridge):
    tokens, _, _ = code_grant(bridge)
    refreshed = tokens_of(token(bridge, "web", grant_type="refresh_token", refresh_token=tokens["refresh_token"]))
    [issued], [rotated] = bridge.audit.of("token_issued"), bridge.audit.of("token_refreshed")
    with bridge.store.transaction():
        saved = bridge.store.find_refresh_token(refreshed["refresh_token"])
    assert rotated == {"grant_type": "refresh_token", "client_id": "web", "user": "alice", "scope": "imap",
                       "token_id": saved.id, "family": issued["family"], "previous_token_id": issued["token_id"],
                       "address": ADDRESS}


def test_client_credentials_record_a_token_issued_to_no_user(bridge):
    tokens_of(token(bridge, "machine", grant_type="client_credentials", scope="metrics"))
    [issued] = bridge.audit.of("token_issued")
    assert issued["grant_type"] == "client_credentials" and issued["client_id"] == "machine"
    assert "user" not in issued and issued["scope"] == "metrics" and isinstance(issued["token_id"], int)


def test_the_device_grant_records_the_users_consent_and_the_token_issued(bridge):
    started = json.loads(bridge.browser().post("/device_authorization", data={"client_id": "tv"}).body)
    with bridge.store.transaction():
        alice = bridge.store.get_user_by_name("alice")
        assert device.decide(BridgeServer(bridge.store, bridge.config, bridge.audit), started["user_code"],
                             SignIn(alice, 0, ("pwd",)), True, "192.0.2.7")
    tokens_of(token(bridge, "tv", grant_type=device.GRANT_TYPE, device_code=started["device_code"]))
    assert bridge.audit.of("consent") == [{"user": "alice", "client_id": "tv", "scope": "imap", "approved": True,
                                           "grant_type": device.GRANT_TYPE, "address": "192.0.2.7"}]
    [issued] = bridge.audit.of("token_issued")
    assert (issued["grant_type"], issued["client_id"], issued["user"]) == (device.GRANT_TYPE, "tv", "alice")


def test_a_replayed_code_records_what_its_replay_revoked(bridge):
    _, code, verifier = code_grant(bridge)
    again = token(bridge, "web", grant_type="authorization_code", code=code, redirect_uri=CB, code_verifier=verifier)
    assert again.code == 400
    assert bridge.audit.of("code_replayed") == [
        {"client_id": "web", "user": "alice", "scope": "imap", "revoked": 1, "address": ADDRESS}]


def test_a_replayed_refresh_token_records_the_family_it_revoked(bridge):
    tokens, _, _ = code_grant(bridge)
    tokens_of(token(bridge, "web", grant_type="refresh_token", refresh_token=tokens["refresh_token"]))
    assert token(bridge, "web", grant_type="refresh_token", refresh_token=tokens["refresh_token"]).code == 400
    [issued] = bridge.audit.of("token_issued")
    assert bridge.audit.of("refresh_replayed") == [
        {"client_id": "web", "user": "alice", "token_id": issued["token_id"], "family": issued["family"],
         "revoked": 2, "address": ADDRESS}]  # token pairs: the first and its rotation


def test_a_revocation_records_the_family_it_revoked(bridge):
    tokens, _, _ = code_grant(bridge)
    answer = bridge.browser().post("/revoke", data={"token": tokens["refresh_token"]}, auth=("web", "web-secret"))
    assert answer.code == 200
    [issued] = bridge.audit.of("token_issued")
    assert bridge.audit.of("token_revoked") == [
        {"client_id": "web", "user": "alice", "token_type": "refresh_token", "token_id": issued["token_id"],
         "family": issued["family"], "revoked": 1, "address": ADDRESS}]


def test_no_event_holds_a_token_a_code_a_verifier_a_secret_or_a_password(bridge):
    tokens, code, verifier = code_grant(bridge)
    refreshed = tokens_of(token(bridge, "web", grant_type="refresh_token", refresh_token=tokens["refresh_token"]))
    token(bridge, "web", grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    token(bridge, "web", grant_type="authorization_code", code=code, redirect_uri=CB, code_verifier=verifier)
    bridge.browser().post("/revoke", data={"token": refreshed["access_token"]}, auth=("web", "web-secret"))
    recorded = json.dumps(bridge.audit.events)
    assert {e["event"] for e in bridge.audit.events} >= {"consent", "token_issued", "token_refreshed",
                                                         "refresh_replayed", "code_replayed", "token_revoked"}
    for secret in (tokens["access_token"], tokens["refresh_token"], refreshed["access_token"],
                   refreshed["refresh_token"], code, verifier, "web-secret", PASSWORD):
        assert secret not in recorded
