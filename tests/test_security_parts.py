"""Keyed digests, signed values, passwords, and the client rules authlib calls."""

from __future__ import annotations

import pytest

from bearerbridge.crypto import Keyring, check_password, hash_password, new_secret
from bearerbridge.storage.models import Client


def test_new_secrets_carry_256_bits():
    values = {new_secret() for _ in range(100)}
    assert len(values) == 100 and all(len(v) == 43 for v in values)


def test_digests_are_keyed():
    assert Keyring(b"a" * 32).digest("t") == Keyring(b"a" * 32).digest("t") != Keyring(b"b" * 32).digest("t")


def test_digests_keep_their_stored_form():
    # HMAC-SHA-256 under a subkey: stored digests of tokens and secrets must never change.
    keyring = Keyring(b"a" * 32)
    assert keyring.digest("t") == "5558898c5b20075443bf4486ecbbed8d74c2278168fe77d5ff59650d229bc9ae"
    assert keyring.digest("t") == keyring.digest("t")  # the keyed state is copied, never used up


def test_signed_values():
    keyring = Keyring(b"k" * 32)
    value = keyring.sign("session", "42", now=1000)
    assert keyring.unsign("session", value, max_age=60, now=1030) == "42"
    assert keyring.unsign("session", value, max_age=60, now=1061) is None       # too old
    assert keyring.unsign("csrf", value, max_age=60, now=1030) is None          # other purpose
    assert keyring.unsign("session", "43" + value[2:], max_age=60, now=1030) is None  # tampered
    assert keyring.unsign("session", "garbage", max_age=60) is None
    assert Keyring(b"x" * 32).unsign("session", value, max_age=60, now=1030) is None


def test_passwords_use_argon2id():
    stored = hash_password("hunter2")
    assert stored.startswith("$argon2id$")
    assert check_password(stored, "hunter2") and not check_password(stored, "hunter3")
    assert not check_password(None, "hunter2") and not check_password("not a hash", "x")


def client(public=False, uris=("https://app.example/cb",)):
    return Client(client_id="c", name="C", redirect_uris=uris, scope="imap smtp",
                  grant_types=("authorization_code", "refresh_token", "client_credentials"), public=public)


@pytest.mark.parametrize("public, registered, presented, ok", [
    (False, "https://app.example/cb", "https://app.example/cb", True),
    (False, "https://app.example/cb", "https://app.example/cb/", False),
    (False, "https://app.example/cb", "https://APP.example/cb", False),
    (False, "http://127.0.0.1:8000/cb", "http://127.0.0.1:9000/cb", False),  # confidential: exact
    (True, "http://127.0.0.1/cb", "http://127.0.0.1:9000/cb", True),        # RFC 8252 §7.3
    (True, "http://[::1]/cb", "http://[::1]:9000/cb", True),
    (True, "http://127.0.0.1/cb", "http://127.0.0.1:9000/other", False),
    (True, "http://127.0.0.1/cb", "http://localhost:9000/cb", False),
    (True, "http://127.0.0.1/cb", "http://127.0.0.1.evil.example:9000/cb", False),
])
def test_redirect_uri_matching(public, registered, presented, ok):
    assert client(public, (registered,)).check_redirect_uri(presented) is ok


def test_scopes_a_client_may_ask_for():
    c = client()
    assert c.get_allowed_scope(None) == "imap smtp"
    assert c.get_allowed_scope("smtp") == "smtp"
    assert c.get_allowed_scope("smtp metrics") is None


def test_public_clients_authenticate_by_none_only_and_never_use_client_credentials():
    assert client(public=True).check_endpoint_auth_method("none", "token")
    assert not client(public=True).check_endpoint_auth_method("client_secret_basic", "token")
    assert not client().check_endpoint_auth_method("none", "token")
    assert not client(public=True).check_grant_type("client_credentials")
    assert not client(public=True).check_client_secret("")
