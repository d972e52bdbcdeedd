"""The decisions around the webauthn library (bearerbridge/passkeys.py) and the passkeys table
(storage/passkeys.py), without a browser: the RP ID refused for an IP address, a challenge
spent once and forgotten after its lifetime, the amr values, the counter that only goes forward,
one user handle per user. The browser's side: tests/test_browser_passkeys.py."""

from __future__ import annotations

import json

import pytest

from bearerbridge import passkeys
from bearerbridge.passkeys import Assertion, NewPasskey, PasskeyRefused, RelyingParty, SpentChallenges

from .fakes import cheap_password_hash, sqlite_store


def test_the_relying_party_is_the_issuers_host_name_and_none_for_an_ip_address():
    assert RelyingParty.of("http://localhost:8080", "bb") == RelyingParty("localhost", "http://localhost:8080", "bb")
    assert RelyingParty.of("https://id.example.org/", "bb").id == "id.example.org"
    assert RelyingParty.of("http://127.0.0.1:8080", "bb") is None
    assert RelyingParty.of("http://[::1]:8080", "bb") is None


def test_a_challenge_is_spent_once_and_forgotten_after_its_lifetime():
    spent = SpentChallenges()
    assert spent.spend("c1", 1000.0)
    assert not spent.spend("c1", 1000.0 + passkeys.CHALLENGE_TTL - 1)
    assert spent.spend("c2", 1000.0)
    assert spent.spend("c1", 1000.0 + passkeys.CHALLENGE_TTL + 1)  # its signature has expired by then anyway


def test_a_full_memory_refuses_rather_than_forgets():
    spent = SpentChallenges(limit=3)
    assert all(spent.spend(f"c{i}", 0.0) for i in range(3))
    assert not spent.spend("c3", 1.0)


def test_amr_says_what_the_passkey_proved():
    assert Assertion(1, True, hardware=True).amr(after_password=False) == ("hwk", "user", "mfa")
    assert Assertion(1, False, hardware=True).amr(after_password=True) == ("pwd", "hwk", "user", "mfa")
    assert Assertion(0, True, hardware=False).amr(after_password=False) == ("swk", "user", "mfa")
    assert Assertion(0, False, hardware=False).amr(after_password=False) == ("swk", "user")


def test_options_carry_the_rp_the_user_handle_and_the_challenge():
    rp = RelyingParty("localhost", "http://localhost:1", "bb")
    handle, challenge = passkeys.new_user_handle(), passkeys.new_challenge()
    created = json.loads(passkeys.registration_options(rp, challenge, "alice", handle, []))
    assert created["rp"] == {"id": "localhost", "name": "bb"} and created["user"]["id"] == handle
    assert created["challenge"] == challenge and created["authenticatorSelection"]["residentKey"] == "required"
    got = json.loads(passkeys.authentication_options(rp, challenge))
    assert got["userVerification"] == "required" and got["allowCredentials"] == []


@pytest.mark.parametrize("credential", ["", "{", "[]", '{"id": 5}', '{"id": "!!"}', '{"response": {}}'])
def test_a_malformed_answer_is_refused(credential):
    with pytest.raises(PasskeyRefused):
        passkeys.parse(credential)


def test_the_counter_only_goes_forward_and_a_user_keeps_one_handle(tmp_path):
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        user = store.add_user("alice", None, cheap_password_hash("pw"))
    uid = user.id if hasattr(user, "id") else user
    with store.transaction():
        assert store.passkey_handle(uid) is None
        assert store.add_passkey(uid, "h" * 43, NewPasskey("cred-1", "key", 5, "internal"), "Laptop")
        assert not store.add_passkey(uid, "h" * 43, NewPasskey("cred-1", "key", 5, "internal"), "Again")
        assert store.passkey_handle(uid) == "h" * 43
        assert store.passkey_used("cred-1", 6)
        assert not store.passkey_used("cred-1", 6)  # the same count again: a replay or a clone
        assert not store.passkey_used("cred-1", 3)
        assert store.passkey("cred-1").sign_count == 6
        assert uid in store.second_factor_users()
        assert store.reset_second_factor(uid) and store.passkeys(uid) == []
    store.engine.dispose()
