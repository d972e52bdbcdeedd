"""/token, /introspect and /revoke in process: the whole HTTP tree over a real SQLite store and
a pool without threads, the codes coming from the consent form as a browser gets them.

Path 1, step 4, and what resource servers ask afterwards: the code exchanged with PKCE, its
replay, refresh rotation and its replay, client credentials, introspection from the store and
from memory (RFC 7662), and revocation (RFC 7009).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from bearerbridge.config import Config
from bearerbridge.storage.models import Client
from bearerbridge.storage.schema import auth_codes

from ..fakes import (
    Answer,
    Bridge,
    cheap_password_hash,
    error_of,
    login_and_consent,
    redirect_params,
    sqlite_store,
    tokens_of,
)
from ..support import authorize_url, pkce_pair

CB = "https://app.example/cb"
LOOPBACK = "http://127.0.0.1/callback"
CODE_GRANT = ("authorization_code", "refresh_token")
PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class App:
    client_id: str
    secret: str | None
    redirect_uri: str = CB


WEB = App("web", "web-secret")                      # a confidential web application
OTHER = App("other", "other-secret")                # another one, at the same redirect URI
TWO_URIS = App("two-uris", "two-secret")            # registered with CB and .../other
NATIVE = App("native", None, LOOPBACK)              # a public native application
RS = App("rs", "rs-secret", "")                     # a resource server (IMAP, WebDAV) that introspects
PROMETHEUS = App("prometheus", "prom-secret", "")   # a machine with client_credentials for metrics


@pytest.fixture
def clock() -> Clock:
    """The clock of the memory of recent reads: it moves only when a test says."""
    return Clock()


@pytest.fixture
def bridge(tmp_path, clock) -> Bridge:
    store = sqlite_store(tmp_path / "x.db", ttl=1.0, clock=clock.seconds)
    with store.transaction():
        for app, scope in ((WEB, "imap smtp"), (OTHER, "imap smtp")):
            store.add_client(Client(app.client_id, app.client_id, (CB,), scope, CODE_GRANT, False), app.secret)
        store.add_client(Client("two-uris", "Two", (CB, "https://app.example/other"), "imap", CODE_GRANT, False),
                         TWO_URIS.secret)
        store.add_client(Client("native", "Native", (LOOPBACK,), "imap smtp", CODE_GRANT, True), None)
        store.add_client(Client("rs", "IMAP server", (), "imap", ("client_credentials",), False,
                                resource_server=True), RS.secret)
        store.add_client(Client("prometheus", "Prometheus", (), "metrics", ("client_credentials",), False),
                         PROMETHEUS.secret)
        store.add_user("alice", "alice@example.org", cheap_password_hash(PASSWORD))
    yield Bridge.over(store)
    store.engine.dispose()


# -- a client's side ---------------------------------------------------------------------------

def get_code(bridge: Bridge, app: App = WEB, scope: str | None = "imap", redirect_uri: str | None = None,
             username: str = "alice") -> tuple[str, str]:
    """A fresh code from alice's consent (a new browser each time) and its PKCE verifier."""
    verifier, challenge = pkce_pair()
    path = authorize_url("", app.client_id, redirect_uri or app.redirect_uri, challenge, scope)
    return redirect_params(login_and_consent(bridge.browser(), path, username, PASSWORD))["code"], verifier


def post(bridge: Bridge, path: str, data: dict, app: App | None, basic: bool = True, **kwargs) -> Answer:
    """POST as `app`: HTTP Basic (client_secret_basic), else the form (client_secret_post or, for a
    public client, its client_id alone)."""
    data = dict(data)
    auth = None
    if app is not None:
        if app.secret and basic:
            auth = (app.client_id, app.secret)
        else:
            data["client_id"] = app.client_id
            if app.secret:
                data["client_secret"] = app.secret
    return bridge.browser().post(path, data=data, auth=auth, **kwargs)


def token_request(bridge: Bridge, data: dict, app: App | None = WEB, basic: bool = True) -> Answer:
    return post(bridge, "/token", data, app, basic)


def exchange_code(bridge: Bridge, app: App, code: str, verifier: str | None, redirect_uri: str = CB,
                  basic: bool = True) -> Answer:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    if verifier is not None:
        data["code_verifier"] = verifier
    return token_request(bridge, data, app, basic)


def refresh(bridge: Bridge, refresh_token: str, app: App = WEB, **extra: str) -> Answer:
    return token_request(bridge, {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}, app)


def introspect(bridge: Bridge, token: str, app: App = RS, service: str | None = None, **extra: str) -> dict:
    headers = {"X-Dovecot-Auth-Service": service} if service else {}
    answer = post(bridge, "/introspect", {"token": token, **extra}, app, headers=headers)
    assert answer.code == 200, (answer.code, answer.body)
    return json.loads(answer.body)


def granted(bridge: Bridge, app: App = WEB, scope: str | None = "imap") -> dict:
    """The tokens of a whole code grant: consent, then the code exchanged with its verifier."""
    code, verifier = get_code(bridge, app, scope)
    return tokens_of(exchange_code(bridge, app, code, verifier, app.redirect_uri))


# -- the code grant at the token endpoint --------------------------------------------------------

def test_a_code_is_exchanged_with_its_pkce_verifier_for_an_access_and_a_refresh_token(bridge):
    verifier, challenge = pkce_pair()
    assert challenge == create_s256_code_challenge(verifier)
    path = authorize_url("", "web", CB, challenge, "imap smtp")
    code = redirect_params(login_and_consent(bridge.browser(), path, "alice", PASSWORD))["code"]
    answer = exchange_code(bridge, WEB, code, verifier)
    assert answer.header("Cache-Control") == "no-store" and answer.header("Pragma") == "no-cache"
    assert answer.header("Content-Type") == "application/json"
    tokens = tokens_of(answer)
    assert set(tokens) == {"token_type", "access_token", "expires_in", "refresh_token", "scope"}
    assert tokens["token_type"] == "Bearer" and tokens["scope"] == "imap smtp" and tokens["expires_in"] == 3600
    assert len(tokens["access_token"]) >= 43 and len(tokens["refresh_token"]) >= 43  # 256 bits, base64url
    with bridge.store.transaction():
        assert bridge.store.find_code(code).used
        stored = bridge.store.find_access_token(tokens["access_token"])
    assert (stored.client_id, stored.username, stored.scope) == ("web", "alice", "imap smtp")
    assert bridge.count("bearerbridge_token_requests_total", grant_type="authorization_code") == 1
    assert bridge.count("bearerbridge_tokens_issued_total", grant_type="authorization_code") == 1


def test_client_secret_post_works_as_basic_does(bridge):
    code, verifier = get_code(bridge)
    assert tokens_of(exchange_code(bridge, WEB, code, verifier, basic=False))["scope"] == "imap"


def test_reused_code_is_refused_and_revokes_what_it_issued(bridge):
    code, verifier = get_code(bridge)
    first = exchange_code(bridge, WEB, code, verifier)
    assert first.code == 200
    assert error_of(exchange_code(bridge, WEB, code, verifier)) == "invalid_grant"
    tokens = json.loads(first.body)
    assert introspect(bridge, tokens["access_token"]) == {"active": False}
    assert error_of(refresh(bridge, tokens["refresh_token"])) == "invalid_grant"
    assert bridge.count("bearerbridge_token_failures_total", grant_type="authorization_code",
                        reason="code_reused") == 1
    assert bridge.count("bearerbridge_token_failures_total", grant_type="authorization_code",
                        reason="invalid_grant") == 1
    assert bridge.count("bearerbridge_token_failures_total", grant_type="refresh_token", reason="invalid_grant") == 1


def test_a_code_replayed_after_a_refresh_revokes_the_refreshed_tokens_too(bridge):
    code, verifier = get_code(bridge)
    first = tokens_of(exchange_code(bridge, WEB, code, verifier))
    second = tokens_of(refresh(bridge, first["refresh_token"]))
    assert error_of(exchange_code(bridge, WEB, code, verifier)) == "invalid_grant"
    assert introspect(bridge, second["access_token"]) == {"active": False}
    assert error_of(refresh(bridge, second["refresh_token"])) == "invalid_grant"


def test_wrong_pkce_verifier(bridge):
    code, _ = get_code(bridge)
    wrong, _ = pkce_pair()
    assert error_of(exchange_code(bridge, WEB, code, wrong)) == "invalid_grant"


@pytest.mark.parametrize("verifier", ["wrong", None], ids=["wrong-verifier", "no-verifier"])
def test_a_code_presented_without_its_verifier_is_spent_all_the_same(bridge, verifier):
    """An attempt without the right verifier uses the code up (RFC 6749 §4.1.2: once): whoever
    sent it, the code is burnt, and no tokens come of it."""
    code, right = get_code(bridge)
    answer = exchange_code(bridge, WEB, code, verifier and pkce_pair()[0])
    assert error_of(answer) == ("invalid_grant" if verifier else "invalid_request")
    assert error_of(exchange_code(bridge, WEB, code, right)) == "invalid_grant"


def test_redirect_uri_must_match_at_the_token_endpoint(bridge):
    code, verifier = get_code(bridge, TWO_URIS)
    assert error_of(exchange_code(bridge, TWO_URIS, code, verifier, "https://app.example/other")) == "invalid_grant"


def test_a_redirect_uri_sent_at_authorization_must_be_sent_again(bridge):
    """RFC 6749 §4.1.3: "REQUIRED, if the redirect_uri parameter was included"."""
    code, verifier = get_code(bridge)
    data = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier}
    assert error_of(token_request(bridge, data)) == "invalid_grant"


def test_wrong_client_secret(bridge):
    code, verifier = get_code(bridge)
    forged = App("web", "not-the-secret")
    assert error_of(exchange_code(bridge, forged, code, verifier), 401) == "invalid_client"
    assert error_of(exchange_code(bridge, forged, code, verifier, basic=False), 401) == "invalid_client"
    # the client is refused before the code is looked at: the code is still good
    assert tokens_of(exchange_code(bridge, WEB, code, verifier))["scope"] == "imap"


def test_code_of_another_client(bridge):
    code, verifier = get_code(bridge)
    assert error_of(exchange_code(bridge, OTHER, code, verifier)) == "invalid_grant"


def test_an_unknown_code(bridge):
    assert error_of(exchange_code(bridge, WEB, "no-such-code", pkce_pair()[0])) == "invalid_grant"


def description_of(answer: Answer) -> str:
    assert answer.code in (400, 401), (answer.code, answer.body)
    return json.loads(answer.body)["error_description"]


def test_an_unknown_an_expired_and_a_replayed_code_are_told_apart(bridge):
    """All invalid_grant (RFC 6749 §5.2), each with its own description; the replay still
    revokes what the code issued."""
    unknown = exchange_code(bridge, WEB, "no-such-code", pkce_pair()[0])
    assert error_of(unknown) == "invalid_grant"
    assert description_of(unknown) == ("The code is unknown: this server did not issue it to this client "
                                       "(check that it was copied whole)")
    code, verifier = get_code(bridge)
    assert description_of(exchange_code(bridge, OTHER, code, verifier)) == description_of(unknown)

    with bridge.store.engine.begin() as db:  # as if the code had been issued 601 seconds ago
        db.execute(auth_codes.update().values(expires_at=auth_codes.c.expires_at - 601))
    for _ in range(2):  # an expired code is refused as expired however often it comes, and is no replay
        expired = exchange_code(bridge, WEB, code, verifier)
        assert error_of(expired) == "invalid_grant"
        assert description_of(expired) == ("The code has expired: a code must be exchanged within 600 seconds; "
                                           "ask for a new one")
    assert bridge.count("bearerbridge_token_failures_total", grant_type="authorization_code",
                        reason="code_reused") == 0

    code, verifier = get_code(bridge)
    tokens = tokens_of(exchange_code(bridge, WEB, code, verifier))
    replayed = exchange_code(bridge, WEB, code, verifier)
    assert error_of(replayed) == "invalid_grant"
    assert description_of(replayed) == ("The code was presented before: a code is good for one exchange only, "
                                        "and any tokens issued from it are now revoked")
    assert introspect(bridge, tokens["access_token"]) == {"active": False}
    assert bridge.count("bearerbridge_token_failures_total", grant_type="authorization_code",
                        reason="code_reused") == 1


@pytest.mark.parametrize("path", ["/token", "/introspect", "/revoke"])
@pytest.mark.parametrize("basic", [True, False], ids=["basic", "post"])
def test_a_wrong_client_secret_is_described_in_words_not_a_python_list(bridge, path, basic):
    """authlib says "The client cannot authenticate with methods: ['client_secret_basic', ...]"."""
    answer = post(bridge, path, {"grant_type": "client_credentials", "token": "t"}, App("web", "not-the-secret"),
                  basic=basic)
    assert error_of(answer, 401) == "invalid_client"
    methods = "client_secret_basic, client_secret_post" + (", none" if path == "/revoke" else "")  # the grant's
    assert description_of(answer) == (
        "Client authentication failed: the client secret is wrong or missing, or the client used a method this "
        f"endpoint does not take (it takes {methods})")
    assert "[" not in answer.header("WWW-Authenticate") and "'" not in answer.header("WWW-Authenticate")


def test_no_scope_parameter_gets_the_registered_scopes(bridge):
    code, verifier = get_code(bridge, scope=None)
    tokens = tokens_of(exchange_code(bridge, WEB, code, verifier))
    assert tokens["scope"] == "imap smtp"


def test_public_native_client_uses_pkce_and_any_loopback_port(bridge):
    redirect_uri = "http://127.0.0.1:53682/callback"
    code, verifier = get_code(bridge, NATIVE, "smtp", redirect_uri=redirect_uri)
    response = exchange_code(bridge, NATIVE, code, verifier, redirect_uri)
    assert response.code == 200, response.body
    tokens = json.loads(response.body)
    assert introspect(bridge, tokens["access_token"])["scope"] == "smtp"
    refreshed = refresh(bridge, tokens["refresh_token"], NATIVE)
    assert refreshed.code == 200, refreshed.body


def test_a_public_client_cannot_pass_off_as_a_confidential_one(bridge):
    """Naming a confidential client without its secret is no public client's login."""
    code, verifier = get_code(bridge)
    assert error_of(exchange_code(bridge, App("web", None), code, verifier), 401) == "invalid_client"


def test_a_disabled_users_codes_tokens_and_refresh_tokens_stop_working(bridge):
    """Moved from test_refusals.py::test_a_disabled_user with test_authorize.py::
    test_a_disabled_user_cannot_sign_in, which has its login form's part."""
    code, verifier = get_code(bridge)
    tokens = tokens_of(exchange_code(bridge, WEB, code, verifier))
    second_code, second_verifier = get_code(bridge)
    with bridge.store.transaction():
        bridge.store.set_disabled("alice", True)
    assert introspect(bridge, tokens["access_token"]) == {"active": False}
    assert error_of(exchange_code(bridge, WEB, second_code, second_verifier)) == "invalid_grant"
    assert error_of(refresh(bridge, tokens["refresh_token"])) == "invalid_grant"


# -- refresh (RFC 6749 §6, rotated: RFC 9700 §4.14.2) ------------------------------------------------

def test_a_refresh_rotates_the_refresh_token_and_keeps_the_old_access_token(bridge):
    tokens = granted(bridge, scope="imap smtp")
    new = tokens_of(refresh(bridge, tokens["refresh_token"]))
    assert new["refresh_token"] != tokens["refresh_token"] and new["access_token"] != tokens["access_token"]
    assert new["scope"] == "imap smtp" and new["expires_in"] == 3600
    assert introspect(bridge, new["access_token"])["active"] is True
    assert introspect(bridge, tokens["access_token"])["active"] is True  # until it expires
    assert tokens_of(refresh(bridge, new["refresh_token"]))["scope"] == "imap smtp"  # the new one works
    assert bridge.count("bearerbridge_tokens_issued_total", grant_type="refresh_token") == 2


def test_replaying_a_rotated_refresh_token_revokes_the_whole_family(bridge):
    tokens = granted(bridge)
    new = tokens_of(refresh(bridge, tokens["refresh_token"]))
    assert error_of(refresh(bridge, tokens["refresh_token"])) == "invalid_grant"
    assert introspect(bridge, new["access_token"])["active"] is False
    assert introspect(bridge, tokens["access_token"])["active"] is False
    assert error_of(refresh(bridge, new["refresh_token"])) == "invalid_grant"
    assert bridge.count("bearerbridge_token_failures_total", grant_type="refresh_token", reason="refresh_reused") == 1


def test_a_refresh_token_is_good_only_for_its_own_client(bridge):
    tokens = granted(bridge)
    assert error_of(refresh(bridge, tokens["refresh_token"], OTHER)) == "invalid_grant"
    assert error_of(refresh(bridge, tokens["refresh_token"], App("web", "not-the-secret")), 401) == "invalid_client"
    assert introspect(bridge, tokens["access_token"])["active"] is True  # neither counts as a replay
    assert tokens_of(refresh(bridge, tokens["refresh_token"]))["scope"] == "imap"


def test_an_unknown_refresh_token(bridge):
    assert error_of(refresh(bridge, "no-such-token")) == "invalid_grant"
    assert error_of(token_request(bridge, {"grant_type": "refresh_token"})) == "invalid_request"


def test_a_refresh_may_ask_for_less_but_never_more(bridge):
    tokens = granted(bridge, scope="imap")
    assert error_of(refresh(bridge, tokens["refresh_token"], scope="imap smtp")) == "invalid_scope"


def test_a_refresh_refused_for_its_scope_leaves_the_refresh_token_usable(bridge):
    tokens = granted(bridge, scope="imap")
    assert error_of(refresh(bridge, tokens["refresh_token"], scope="imap smtp")) == "invalid_scope"
    assert tokens_of(refresh(bridge, tokens["refresh_token"]))["scope"] == "imap"
    assert introspect(bridge, tokens["access_token"])["active"] is True


def test_a_narrowed_refresh_keeps_the_grants_scope_for_the_next_one(bridge):
    tokens = granted(bridge, scope="imap smtp")
    narrow = tokens_of(refresh(bridge, tokens["refresh_token"], scope="imap"))
    assert narrow["scope"] == "imap"
    assert tokens_of(refresh(bridge, narrow["refresh_token"]))["scope"] == "imap smtp"


# -- client credentials and other grants --------------------------------------------------------------

def test_client_credentials(bridge):
    response = token_request(bridge, {"grant_type": "client_credentials", "scope": "metrics"}, PROMETHEUS)
    assert response.code == 200, response.body
    body = json.loads(response.body)
    assert body["scope"] == "metrics" and "refresh_token" not in body
    claims = introspect(bridge, body["access_token"])
    assert claims["active"] and claims["sub"] == PROMETHEUS.client_id and "username" not in claims
    by_post = token_request(bridge, {"grant_type": "client_credentials"}, PROMETHEUS, basic=False)
    assert by_post.code == 200 and json.loads(by_post.body)["scope"] == "metrics"
    assert bridge.count("bearerbridge_tokens_issued_total", grant_type="client_credentials") == 2


def test_public_client_cannot_use_client_credentials(bridge):
    response = token_request(bridge, {"grant_type": "client_credentials"}, NATIVE)
    assert error_of(response, 401) == "invalid_client"


def test_a_code_grant_client_cannot_use_client_credentials(bridge):
    assert error_of(token_request(bridge, {"grant_type": "client_credentials"}, WEB)) == "unauthorized_client"


def test_client_credentials_for_an_unregistered_scope(bridge):
    response = token_request(bridge, {"grant_type": "client_credentials", "scope": "imap"}, PROMETHEUS)
    assert error_of(response) == "invalid_scope"


def test_unsupported_grant_type(bridge):
    assert error_of(token_request(bridge, {"grant_type": "password"}, WEB)) == "unsupported_grant_type"
    assert bridge.count("bearerbridge_token_requests_total", grant_type="other") == 1
    assert bridge.count("bearerbridge_token_failures_total", grant_type="other", reason="unsupported_grant_type") == 1


def test_a_token_request_from_no_client(bridge):
    assert error_of(token_request(bridge, {"grant_type": "client_credentials"}, None), 401) == "invalid_client"


# -- introspection (RFC 7662) -----------------------------------------------------------------------

def test_introspection_of_an_access_token(bridge):
    tokens = granted(bridge)
    claims = introspect(bridge, tokens["access_token"])
    assert claims == {"active": True, "scope": "imap", "client_id": "web", "token_type": "Bearer",
                      "sub": "alice", "username": "alice", "email": "alice@example.org",
                      "exp": claims["exp"], "iat": claims["iat"]}
    assert claims["exp"] - claims["iat"] == 3600
    assert introspect(bridge, "no-such-token") == {"active": False}
    assert bridge.count("bearerbridge_introspections_total", result="active") == 1
    assert bridge.count("bearerbridge_introspections_total", result="inactive") == 1


def test_introspection_answers_the_same_from_memory_as_from_the_store(bridge, clock):
    tokens = granted(bridge)
    hops = bridge.pool.hops
    from_store = introspect(bridge, tokens["access_token"])
    assert bridge.pool.hops == hops + 1
    from_memory = introspect(bridge, tokens["access_token"])  # the client and the token were read lately
    assert bridge.pool.hops == hops + 1
    assert from_memory == from_store and from_store["active"] is True
    over_a_dead_database = bridge.without_database()
    answer = over_a_dead_database.post("/introspect", data={"token": tokens["access_token"]}, auth=("rs", "rs-secret"))
    assert (answer.code, json.loads(answer.body)) == (200, from_store)
    # client_secret_post is remembered as well as Basic
    answer = over_a_dead_database.post("/introspect", data={"token": tokens["access_token"], "client_id": "rs",
                                                            "client_secret": "rs-secret"})
    assert (answer.code, json.loads(answer.body)) == (200, from_store)
    clock.advance(1.0)  # [sasl] cache_ttl later, memory has forgotten: only the database can answer
    answer = over_a_dead_database.post("/introspect", data={"token": tokens["access_token"]}, auth=("rs", "rs-secret"))
    assert answer.code == 503 and json.loads(answer.body)["error"] == "temporarily_unavailable"
    assert introspect(bridge, tokens["access_token"]) == from_store


def test_memory_answers_only_what_it_read_for_a_client_that_proves_itself(bridge):
    tokens = granted(bridge)
    introspect(bridge, tokens["access_token"])  # remembered now, with the client rs
    dead = bridge.without_database()

    def asked(data: dict, auth: tuple[str, str] | None = ("rs", "rs-secret")) -> int:
        return dead.post("/introspect", data=data, auth=auth).code
    assert asked({"token": tokens["access_token"]}) == 200
    assert asked({"token": "never-seen"}) == 503
    assert asked({"token": tokens["refresh_token"]}) == 503  # refresh tokens are never remembered
    assert asked({"token": tokens["access_token"], "token_type_hint": "refresh_token"}) == 503
    assert asked({"token": tokens["access_token"]}, ("rs", "not-the-secret")) == 503
    assert asked({"token": tokens["access_token"]}, ("web", "web-secret")) == 200  # read at the token exchange
    assert asked({"token": tokens["access_token"]}, ("other", "other-secret")) == 503  # a client not read lately
    assert asked({"token": tokens["access_token"]}, None) == 503
    # where the database answers, a wrong secret is refused, never answered from memory
    wrong = bridge.browser().post("/introspect", data={"token": tokens["access_token"]}, auth=("rs", "nope"))
    assert error_of(wrong, 401) == "invalid_client"


def test_a_revoked_or_disabled_token_is_never_answered_active_from_memory(bridge):
    tokens = granted(bridge)
    other = granted(bridge)
    assert introspect(bridge, tokens["access_token"])["active"] is True
    assert introspect(bridge, other["access_token"])["active"] is True  # both remembered
    assert post(bridge, "/revoke", {"token": tokens["access_token"]}, WEB).code == 200
    dead = bridge.without_database()
    assert dead.post("/introspect", data={"token": tokens["access_token"]}, auth=("rs", "rs-secret")).code == 503
    assert introspect(bridge, tokens["access_token"]) == {"active": False}
    assert introspect(bridge, other["access_token"])["active"] is True
    with bridge.store.transaction():
        bridge.store.set_disabled("alice", True)
    assert dead.post("/introspect", data={"token": other["access_token"]}, auth=("rs", "rs-secret")).code == 503
    assert introspect(bridge, other["access_token"]) == {"active": False}


@pytest.mark.parametrize("remembered", [False, True], ids=["from-the-store", "from-memory"])
def test_a_named_service_sees_only_tokens_with_its_scope(bridge, clock, remembered):
    """X-Dovecot-Auth-Service (Dovecot's send_auth_headers) names the service being logged into;
    `[sasl.services]` says which scope it needs."""
    tokens = granted(bridge, scope="imap")
    introspect(bridge, tokens["access_token"])  # the client and the token are remembered now
    for service, active in (("imap", True), ("smtp", False), ("pop3", False), (None, True)):
        if not remembered:
            clock.advance(1.0)  # memory has forgotten
        hops = bridge.pool.hops
        claims = introspect(bridge, tokens["access_token"], service=service)
        assert claims["active"] is active, service
        assert active or claims == {"active": False}
        assert bridge.pool.hops == hops + (0 if remembered else 1)


def test_a_refresh_token_is_shown_only_to_its_own_client(bridge):
    tokens = granted(bridge)
    # a refresh token is no access token: only its own client sees it active
    assert introspect(bridge, tokens["refresh_token"]) == {"active": False}
    assert introspect(bridge, tokens["refresh_token"], token_type_hint="refresh_token") == {"active": False}
    own = introspect(bridge, tokens["refresh_token"], WEB, token_type_hint="refresh_token")
    assert own["active"] and own["token_type"] == "refresh_token" and own["username"] == "alice"
    assert introspect(bridge, tokens["refresh_token"], WEB)["token_type"] == "refresh_token"  # without a hint too
    assert introspect(bridge, tokens["refresh_token"], WEB, service="imap")["active"] is True
    # once rotated, not even to its own client
    tokens_of(refresh(bridge, tokens["refresh_token"]))
    assert introspect(bridge, tokens["refresh_token"], WEB, token_type_hint="refresh_token") == {"active": False}


def test_introspection_needs_a_registered_confidential_client(bridge):
    response = bridge.browser().post("/introspect", data={"token": "x"})
    assert error_of(response, 401) == "invalid_client"
    response = bridge.browser().post("/introspect", data={"token": "x", "client_id": NATIVE.client_id})
    assert error_of(response, 401) == "invalid_client"
    assert introspect(bridge, "no-such-token", WEB) == {"active": False}
    assert bridge.count("bearerbridge_introspections_total", result="error") == 2


# -- revocation (RFC 7009) ----------------------------------------------------------------------------

def test_revocation_makes_introspection_inactive(bridge):
    code, verifier = get_code(bridge)
    tokens = tokens_of(exchange_code(bridge, WEB, code, verifier))
    response = post(bridge, "/revoke", {"token": tokens["access_token"]}, WEB)
    assert response.code == 200
    assert introspect(bridge, tokens["access_token"]) == {"active": False}
    assert introspect(bridge, tokens["refresh_token"], token_type_hint="refresh_token") == {"active": False}


def test_revoking_the_refresh_token_revokes_the_grant(bridge):
    tokens = granted(bridge)
    new = tokens_of(refresh(bridge, tokens["refresh_token"]))
    response = post(bridge, "/revoke", {"token": new["refresh_token"], "token_type_hint": "refresh_token"}, WEB)
    assert response.code == 200
    for access_token in (tokens["access_token"], new["access_token"]):
        assert introspect(bridge, access_token) == {"active": False}
    assert error_of(refresh(bridge, new["refresh_token"])) == "invalid_grant"


def test_a_public_client_revokes_its_own_tokens_by_its_id(bridge):
    code, verifier = get_code(bridge, NATIVE)
    tokens = tokens_of(exchange_code(bridge, NATIVE, code, verifier, LOOPBACK))
    assert post(bridge, "/revoke", {"token": tokens["refresh_token"]}, NATIVE).code == 200
    assert introspect(bridge, tokens["access_token"]) == {"active": False}


def test_a_client_cannot_revoke_another_clients_token(bridge):
    tokens = granted(bridge)
    assert error_of(post(bridge, "/revoke", {"token": tokens["access_token"]}, OTHER)) == "invalid_grant"
    assert introspect(bridge, tokens["access_token"])["active"] is True


def test_revoking_an_unknown_token_succeeds_and_revoking_needs_a_client(bridge):
    """RFC 7009 §2.2: an invalid token is no error, for the client could do nothing about it."""
    assert post(bridge, "/revoke", {"token": "no-such-token"}, WEB).code == 200
    assert error_of(post(bridge, "/revoke", {"token": "no-such-token"}, App("web", "nope")), 401) == "invalid_client"
    assert error_of(post(bridge, "/revoke", {"token": "no-such-token"}, None), 401) == "invalid_client"


# -- input authlib cannot even describe in an error --------------------------------------------------

@pytest.mark.parametrize("data", [
    {"grant_type": 'client_"credentials'}, {"grant_type": "client\\credentials"},
    {"grant_type": "client_credentials\u00e9"}, {"grant_type": "client_credentials", "scope": 'metrics"'},
    {"grant_type": "authorization_code", "code": 'x"', "redirect_uri": "https://app.example/\u00e9"},
])
def test_a_parameter_no_error_may_quote_gets_an_oauth_error_not_a_503(bridge, data):
    with capturedLogs() as events:
        answer = token_request(bridge, data, PROMETHEUS)
    assert error_of(answer) in ("invalid_request", "unsupported_grant_type", "invalid_scope", "invalid_grant",
                                "unauthorized_client")
    assert not any(e.get("log_failure") for e in events)


def test_a_basic_header_that_is_not_ascii_gets_invalid_client(bridge):
    for path in ("/token", "/introspect", "/revoke", "/sasl"):
        with capturedLogs() as events:
            answer = bridge.browser().post(path, data={"grant_type": "client_credentials", "token": "t",
                                                       "mechanism": "OAUTHBEARER", "service": "imap"},
                                           headers={"Authorization": "Basic \u00e9t\u00e9"})
        assert error_of(answer, 401) == "invalid_client", path
        assert answer.header("WWW-Authenticate") == "Basic", path
        assert len(events) == 1 and not events[0].get("log_failure"), path


DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


# -- scopes only the operator grants ---------------------------------------------------------------

def test_a_device_cannot_ask_for_an_operator_scope(bridge):
    with bridge.store.transaction():
        bridge.store.add_client(Client("tv", "TV", (), "imap metrics", (DEVICE_GRANT,), True), None)
    answer = bridge.browser().post("/device_authorization", data={"client_id": "tv", "scope": "imap metrics"})
    assert error_of(answer) == "invalid_scope"
    answer = bridge.browser().post("/device_authorization", data={"client_id": "tv", "scope": "imap"})
    assert answer.code == 200 and json.loads(answer.body)["user_code"]


def test_client_credentials_may_have_an_operator_scope(bridge):
    assert tokens_of(token_request(bridge, {"grant_type": "client_credentials", "scope": "metrics"},
                                   PROMETHEUS))["scope"] == "metrics"


# -- who may introspect what ---------------------------------------------------------------------------

def test_a_client_sees_its_own_tokens_and_only_a_resource_server_sees_others(bridge):
    tokens = granted(bridge)
    assert introspect(bridge, tokens["access_token"], app=WEB)["active"] is True         # its own
    assert introspect(bridge, tokens["access_token"], app=RS)["active"] is True          # a resource server
    assert introspect(bridge, tokens["access_token"], app=OTHER) == {"active": False}    # another web app
    assert introspect(bridge, tokens["access_token"], app=PROMETHEUS) == {"active": False}


def test_a_token_naming_no_user_is_not_active_for_a_users_service(bridge):
    machine = tokens_of(token_request(bridge, {"grant_type": "client_credentials"}, PROMETHEUS))["access_token"]
    with bridge.store.transaction():
        bridge.store.update_client("prometheus", resource_server=True)
    assert introspect(bridge, machine, app=PROMETHEUS)["active"] is True  # no service named: the token is good
    assert introspect(bridge, machine, app=RS, service="imap") == {"active": False}  # judge_token: no_user


# -- item 18: parameters given twice, and device codes without end ---------------------------------------

def test_a_parameter_given_twice_is_refused_at_every_token_endpoint(bridge):
    tokens = granted(bridge)
    introspect(bridge, tokens["access_token"])  # remembered now: memory must refuse it too
    for path, data in (("/token", [("grant_type", "client_credentials"), ("scope", "metrics"), ("scope", "x")]),
                       ("/introspect", [("token", tokens["access_token"]), ("token", "other")]),
                       ("/revoke", [("token", tokens["access_token"]), ("token", tokens["refresh_token"])])):
        app = PROMETHEUS if path == "/token" else RS
        answer = bridge.browser().post(path, data=data, auth=(app.client_id, app.secret))
        assert error_of(answer) == "invalid_request", path
        assert "given more than once" in json.loads(answer.body)["error_description"], path
    assert introspect(bridge, tokens["access_token"])["active"] is True  # nothing was revoked


def test_a_client_may_have_only_so_many_device_codes_waiting(tmp_path):
    config = Config()
    config = dataclasses.replace(config, tokens=dataclasses.replace(config.tokens, device_codes_per_client=2))
    store = sqlite_store(tmp_path / "d.db")
    with store.transaction():
        store.add_client(Client("tv", "TV", (), "imap", (DEVICE_GRANT,), True), None)
        store.add_client(Client("radio", "Radio", (), "imap", (DEVICE_GRANT,), True), None)
    bridge = Bridge.over(store, config)
    ask = lambda client_id: bridge.browser().post("/device_authorization", data={"client_id": client_id})  # noqa: E731
    assert [ask("tv").code for _ in range(2)] == [200, 200]
    refused = ask("tv")
    assert error_of(refused, 429) == "slow_down"
    assert ask("radio").code == 200  # another client is not held up
    with store.transaction():
        assert store.waiting_device_codes("tv") == 2
    store.engine.dispose()
