"""Throttled guessing at the HTTP doors, in process: the login form (counted in the store) and
client authentication at /token (counted in memory), on a Clock so that held answers show."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from twisted.internet import defer

from bearerbridge import config as configuration
from bearerbridge.storage.models import Client
from bearerbridge.throttle import ThrottleRules
from bearerbridge.web.sessions import PasswordLogin

from ..fakes import (
    PASSWORD,
    Bridge,
    Http,
    NewUser,
    SyncPool,
    form_of,
    login_and_consent,
    redirect_params,
    sqlite_bridge,
    sqlite_store,
)
from ..support import authorize_url, pkce_pair

CB = "https://app.example/cb"
# No delay before the fifth failure; the account blocked at 5, the address at 8.
SIGN_IN = ThrottleRules(free_failures=4, first_delay=1.0, max_delay=4.0, account_block_after=5,
                        address_block_after=8, block=300, forget_after=900)
CLIENTS = ThrottleRules(free_failures=2, first_delay=1.0, max_delay=4.0, account_block_after=0,
                        address_block_after=4, block=120, forget_after=900)


@pytest.fixture
def bridge(tmp_path) -> Iterator[Bridge]:
    config = configuration.Config(throttle=configuration.ThrottleSettings(sign_in=SIGN_IN, clients=CLIENTS))
    with sqlite_bridge(tmp_path / "x.db", [
        Client("web", "Web App", (CB,), "imap", ("authorization_code",), public=False),
        Client("svc", "Service", (), "imap", ("client_credentials",), public=False),
    ], [NewUser(name) for name in ("alice", "bob", "carol")], config) as bridge:
        yield bridge


def signed_in(answers: list) -> bool:
    """Whether a login form's answer went on to the consent page (the user is signed in)."""
    return bool(answers) and answers[0].code == 200 and b'name="decision"' in answers[0].body


def sign_in(http: Http, username: str, password: str) -> list:
    """Post the login form of a fresh /authorize page; the answer's list (empty while held)."""
    _, challenge = pkce_pair()
    page = http.get(authorize_url("", "web", CB, challenge, "imap"))
    action, fields = form_of(page)
    return http.pending("POST", action, data={**fields, "username": username, "password": password})


def test_failed_sign_ins_are_answered_later_and_later_then_blocked_with_a_clear_page(bridge):
    browser = bridge.browser()
    for _ in range(4):
        assert sign_in(browser, "alice", "wrong")[0].code == 401  # answered at once
    held = sign_in(browser, "alice", "wrong")
    assert held == []  # the fifth failure waits first_delay
    bridge.clock.advance(1.0)
    browser.flush()
    assert held[0].code == 401
    blocked = sign_in(browser, "alice", PASSWORD)[0]  # the block: even the right password is not checked
    assert blocked.code == 429 and blocked.header("Retry-After") == "299"  # the block began a second ago
    assert "try again in 5 minutes" in blocked.body.decode() and 'name="password"' in blocked.body.decode()
    assert bridge.audit.of("throttled") == [{"door": "sign_in", "account": "alice", "seconds": 300}]
    assert [e["reason"] for e in bridge.audit.of("sign_in_failed")] == ["wrong_password"] * 5
    assert bridge.count("bearerbridge_throttle_refused_total", door="sign_in") == 1
    assert bridge.count("bearerbridge_throttle_blocks_total", door="sign_in", key="account") == 1
    assert signed_in(sign_in(bridge.browser(), "bob", PASSWORD))  # another user signs in meanwhile
    bridge.clock.advance(300)
    assert signed_in(sign_in(bridge.browser(), "alice", PASSWORD))  # no block outlives its 300 s


def test_a_browser_that_signed_in_as_the_user_before_is_not_shut_out_by_their_block(bridge):
    own = bridge.browser()
    assert signed_in(sign_in(own, "alice", PASSWORD))
    action, fields = form_of(own.get("/logout"))
    assert own.post(action, data=fields).code == 200  # signed out: the next sign-in checks the password
    attacker = bridge.browser()
    for _ in range(5):
        sign_in(attacker, "alice", "guess")
        bridge.clock.advance(4)
        attacker.flush()
    assert sign_in(attacker, "alice", PASSWORD)[0].code == 429  # the attacker is blocked
    assert signed_in(sign_in(own, "alice", PASSWORD))  # the owner's browser is not


def test_an_address_that_fails_for_many_users_is_blocked_for_all(bridge):
    browser = bridge.browser()
    for i in range(8):  # eight names, one failure each: only the address adds up
        sign_in(browser, f"nobody{i}", "guess")
        bridge.clock.advance(4)
        browser.flush()
    answer = sign_in(browser, "carol", PASSWORD)[0]
    assert answer.code == 429
    assert [e["reason"] for e in bridge.audit.of("sign_in_failed")][:1] == ["unknown_user"]
    assert bridge.count("bearerbridge_throttle_blocks_total", door="sign_in", key="address") == 1


def test_password_checks_run_a_few_at_a_time(tmp_path):
    """However many sign in at once, at most `checks_at_once` argon2 checks run: memory stays bounded."""
    store = sqlite_store(tmp_path / "x.db")

    class SlowChecks(SyncPool):
        def __init__(self, store):
            super().__init__(store)
            self.running: list[defer.Deferred] = []

        def run_apart(self, fn, *args):
            d = defer.Deferred()
            self.running.append(d)
            return d.addCallback(lambda _: fn(*args))

    pool = SlowChecks(store)
    bridge = Bridge.over(store)
    from bearerbridge.guard import DatabaseDoor
    from bearerbridge.web.sessions import Sessions

    sessions = Sessions(pool, 3600, secure=False)
    login = PasswordLogin(pool, sessions, bridge.metrics, DatabaseDoor("sign_in", SIGN_IN, pool, bridge.metrics,
                                                                        bridge.audit, bridge.clock),
                          bridge.audit, checks_at_once=2)

    class Req:
        received_cookies: dict = {}

        def getCookie(self, name):
            return None

        def getClientAddress(self):
            return None

        def getHeader(self, name):
            return None

    results = [login(Req(), {"username": f"u{i}", "password": "x"}) for i in range(6)]
    assert len(pool.running) == 2  # two checks run; four wait their turn
    assert bridge.metrics.registry.get_sample_value("bearerbridge_password_checks_waiting") == 4
    finished = 0
    while finished < len(pool.running):  # each check done lets the next begin
        pool.running[finished].callback(None)
        finished += 1
    assert finished == 6 and all(r.called for r in results)
    store.engine.dispose()


def client_credentials(http: Http, secret: str) -> list:
    return http.pending("POST", "/token", data={"grant_type": "client_credentials"}, auth=("svc", secret))


def test_wrong_client_secrets_are_answered_later_then_the_address_is_refused_with_retry_after(bridge):
    program = bridge.browser()
    assert [client_credentials(program, "wrong")[0].code for _ in range(2)] == [401, 401]
    held = client_credentials(program, "wrong")
    assert held == []
    bridge.clock.advance(1)
    program.flush()
    assert held[0].code == 401
    held = client_credentials(program, "wrong")
    bridge.clock.advance(2)
    program.flush()
    refused = client_credentials(program, "svc-secret")[0]  # the fourth failure blocked the address
    assert refused.code == 429 and refused.header("Retry-After") == "118"  # blocked at the fourth, 2 s ago
    assert b"temporarily_unavailable" in refused.body and b"try again in 118 seconds" in refused.body
    assert bridge.count("bearerbridge_throttle_blocks_total", door="clients", key="address") == 1
    bridge.clock.advance(120)
    assert client_credentials(program, "svc-secret")[0].code == 200


def test_a_good_client_is_not_slowed_by_its_own_successes(bridge):
    program = bridge.browser()
    for _ in range(20):
        assert client_credentials(program, "svc-secret")[0].code == 200
    assert bridge.count("bearerbridge_throttle_delayed_total", door="clients") == 0


def test_a_code_grant_still_works_after_a_mistyped_password(bridge):
    browser = bridge.browser()
    _, challenge = pkce_pair()
    path = authorize_url("", "web", CB, challenge, "imap")
    page = browser.get(path)
    action, fields = form_of(page)
    assert browser.post(action, data={**fields, "username": "alice", "password": "typo"}).code == 401
    assert "code" in redirect_params(login_and_consent(browser, path, "alice", PASSWORD))


def test_the_rules_are_read_from_the_config():
    loaded = configuration.parse({"throttle": {"sign_in": {"block": 60}}})
    assert loaded.throttle.sign_in == dataclasses.replace(ThrottleRules(), block=60)
    assert loaded.throttle.sasl.first_delay == 2.0  # the other doors keep their own defaults
