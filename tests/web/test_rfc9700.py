"""RFC 9700 requirements that SECURITY.md had no test for, in process: the whole HTTP tree over a
real SQLite store and a pool without threads, driven as browsers, clients, proxies and
Prometheus drive it; and the operator's command line on a database of its own.

One test a requirement: a PKCE downgrade (§4.8.2), CORS (§2.6), tokens in a query string
(§4.3.2), who gets refresh tokens and for how long (§4.14.2), who chooses client ids (§2.6,
§4.15.1), and what a page may load or leak (§4.2.4).
"""

from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser

import pytest

from bearerbridge import cli
from bearerbridge.config import Config
from bearerbridge.storage.models import Client
from bearerbridge.storage.schema import tokens as tokens_table

from ..fakes import (
    Answer,
    Bridge,
    cheap_password_hash,
    error_of,
    form_of,
    login_and_consent,
    redirect_params,
    sqlite_store,
    tokens_of,
)
from ..support import authorize_url, pkce_pair

CB = "https://app.example/cb"
CODE_GRANT = ("authorization_code", "refresh_token")
PASSWORD = "correct horse battery"
REFRESH_TTL = 600  # [tokens] refresh_ttl for these tests: not the default 30 days, so we see it honoured
SECRETS = {"web": "web-secret", "legacy": "legacy-secret", "no-refresh": "no-refresh-secret",
           "rs": "rs-secret", "prometheus": "prom-secret"}


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_client(Client("web", "Web App", (CB,), "imap smtp", CODE_GRANT, public=False), SECRETS["web"])
        # A legacy confidential client let off PKCE (`client create --no-pkce`).
        store.add_client(Client("legacy", "Legacy App", (CB,), "imap", CODE_GRANT, public=False,
                                pkce_required=False), SECRETS["legacy"])
        # A code-grant client registered without the refresh_token grant (`--grant authorization_code`).
        store.add_client(Client("no-refresh", "No Refresh", (CB,), "imap", ("authorization_code",), public=False),
                         SECRETS["no-refresh"])
        store.add_client(Client("rs", "IMAP server", (), "imap", ("client_credentials",), False,
                                resource_server=True), SECRETS["rs"])
        store.add_client(Client("prometheus", "Prometheus", (), "metrics", ("client_credentials",), False),
                         SECRETS["prometheus"])
        alice = store.add_user("alice", "alice@example.org", cheap_password_hash(PASSWORD))
        store.save_token("dav-token", None, "web", alice.id, "webdav:read webdav:write", 3600, None)
    config = Config()
    config = dataclasses.replace(config, tokens=dataclasses.replace(config.tokens, refresh_ttl=REFRESH_TTL))
    yield Bridge.over(store, config)
    store.engine.dispose()


def get_code(bridge: Bridge, client_id: str = "web", challenge: str | None = "new") -> tuple[str, str | None]:
    """A fresh code from alice's consent (a new browser each time) and the verifier of its challenge
    (None when the authorization request sent no challenge)."""
    verifier = None
    if challenge == "new":
        verifier, challenge = pkce_pair()
    path = authorize_url("", client_id, CB, challenge, "imap")
    return redirect_params(login_and_consent(bridge.browser(), path, "alice", PASSWORD))["code"], verifier


def token_request(bridge: Bridge, client_id: str, data: dict, **kwargs) -> Answer:
    return bridge.browser().post("/token", data=data, auth=(client_id, SECRETS[client_id]), **kwargs)


def exchange_code(bridge: Bridge, client_id: str, code: str, verifier: str | None, **kwargs) -> Answer:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": CB}
    if verifier is not None:
        data["code_verifier"] = verifier
    return token_request(bridge, client_id, data, **kwargs)


# -- §2.1.1, §4.8.2: PKCE downgrade ------------------------------------------------------------------

def test_a_code_issued_without_a_challenge_is_refused_with_a_verifier_and_exchanged_without_one(bridge):
    """§4.8.2: a token request with a code_verifier, for a code whose authorization request had no
    code_challenge, is refused; else an attacker who strips the challenge downgrades PKCE unseen."""
    code, _ = get_code(bridge, "legacy", challenge=None)
    with bridge.store.transaction():
        assert bridge.store.find_code(code).code_challenge is None
    attacker_verifier, _ = pkce_pair()
    assert error_of(exchange_code(bridge, "legacy", code, attacker_verifier)) in ("invalid_request", "invalid_grant")
    assert error_of(exchange_code(bridge, "legacy", code, None)) == "invalid_grant"  # and the code is spent

    code, _ = get_code(bridge, "legacy", challenge=None)
    assert tokens_of(exchange_code(bridge, "legacy", code, None))["scope"] == "imap"  # the legacy way works
    # The client is let off PKCE, not out of it: a challenge it does send is enforced.
    code, verifier = get_code(bridge, "legacy")
    assert error_of(exchange_code(bridge, "legacy", code, None)) == "invalid_request"
    code, verifier = get_code(bridge, "legacy")
    assert tokens_of(exchange_code(bridge, "legacy", code, verifier))["scope"] == "imap"


# -- §2.6: no CORS but at the discovery document -----------------------------------------------------

def test_no_answer_but_the_discovery_document_allows_other_origins(bridge):
    """§2.6: CORS must not be supported at the authorization endpoint; nor is it at the token,
    introspection and revocation endpoints. Asked from another origin, with a preflight too."""
    origin = {"Origin": "https://evil.example"}
    browser = bridge.browser()
    login = browser.get(authorize_url("", "web", CB, pkce_pair()[1], "imap"), headers=origin)
    action, fields = form_of(login)
    consent = browser.post(action, data={**fields, "username": "alice", "password": PASSWORD}, headers=origin)
    action, fields = form_of(consent)
    approved = browser.post(action, data={**fields, "decision": "approve"}, headers=origin)
    code, verifier = get_code(bridge)
    exchanged = exchange_code(bridge, "web", code, verifier, headers=origin)
    access_token = tokens_of(exchanged)["access_token"]
    answers = {
        "login page": login,
        "consent page": consent,
        "redirect with a code": approved,
        "error page": browser.get(authorize_url("", "no-such-client", CB, pkce_pair()[1]), headers=origin),
        "token": exchanged,
        "token error": token_request(bridge, "web", {"grant_type": "password"}, headers=origin),
        "introspect": bridge.browser().post("/introspect", data={"token": access_token},
                                            auth=("rs", SECRETS["rs"]), headers=origin),
        "revoke": bridge.browser().post("/revoke", data={"token": access_token},
                                        auth=("web", SECRETS["web"]), headers=origin),
    }
    preflight = {**origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    for path in ("/authorize", "/token", "/introspect", "/revoke"):
        answers[f"preflight {path}"] = bridge.browser().request("OPTIONS", path, headers=preflight)
    assert [login.code, consent.code, approved.code] == [200, 200, 303]
    assert answers["introspect"].code == 200 and answers["revoke"].code == 200
    for name, answer in answers.items():
        assert not answer.headers.hasHeader("Access-Control-Allow-Origin"), name
        assert not answer.headers.hasHeader("Access-Control-Allow-Credentials"), name
        if name.startswith("preflight"):
            assert answer.code >= 400, name  # no OPTIONS handler: a preflight never succeeds

    discovery = bridge.browser().get("/.well-known/oauth-authorization-server", headers=origin)
    assert discovery.code == 200 and discovery.header("Access-Control-Allow-Origin") == "*"


# -- §4.3.2: access tokens only in the Authorization header --------------------------------------------

def test_a_token_in_a_query_string_is_ignored_at_forward_auth_and_metrics(bridge):
    """§4.3.2 (and RFC 6750 §2.3): a token in a URI's query lands in logs and histories, so the
    resource-server surfaces never read one there; the same token in the header works."""
    proxy = {"Host": "files.example", "X-Original-Method": "GET", "X-Original-URI": "/files/a.txt",
             "X-Forwarded-Host": "files.example"}
    # At /forward-auth's own query, and at the query of the request the proxy asks about.
    for path, uri in (("/forward-auth?access_token=dav-token", "/files/a.txt"),
                      ("/forward-auth", "/files/a.txt?access_token=dav-token")):
        answer = bridge.browser().get(path, headers={**proxy, "X-Original-URI": uri})
        assert answer.code == 401, (path, uri)
        assert answer.header("WWW-Authenticate") == 'Bearer realm="bearerbridge"'  # as if no token was sent
        assert answer.header("X-Auth-User") is None
    allowed = bridge.browser().get("/forward-auth", headers={**proxy, "Authorization": "Bearer dav-token"})
    assert allowed.code == 200 and allowed.header("X-Auth-User") == "alice"

    issued = token_request(bridge, "prometheus", {"grant_type": "client_credentials", "scope": "metrics"})
    metrics_token = tokens_of(issued)["access_token"]
    for query in (f"access_token={metrics_token}", f"bearer={metrics_token}"):
        answer = bridge.browser().get(f"/metrics?{query}")
        assert answer.code == 401 and answer.header("WWW-Authenticate") == 'Bearer realm="metrics"', query
        assert b"bearerbridge_" not in answer.body
    scraped = bridge.browser().get("/metrics", headers={"Authorization": f"Bearer {metrics_token}"})
    assert scraped.code == 200 and b"bearerbridge_" in scraped.body


# -- §4.14.2: who gets refresh tokens, and for how long ---------------------------------------------------

def test_a_code_grant_client_registered_without_refresh_token_gets_no_refresh_token(bridge):
    code, verifier = get_code(bridge, "no-refresh")
    tokens = tokens_of(exchange_code(bridge, "no-refresh", code, verifier))
    assert "refresh_token" not in tokens and tokens["scope"] == "imap"
    with bridge.store.transaction():
        stored = bridge.store.find_access_token(tokens["access_token"])
    assert stored.refresh_expires_at is None  # nothing kept that a refresh could use either
    asked = token_request(bridge, "no-refresh", {"grant_type": "refresh_token", "refresh_token": "anything"})
    assert error_of(asked) == "unauthorized_client"
    code, verifier = get_code(bridge, "web")  # while a client registered with the grant gets one
    assert "refresh_token" in tokens_of(exchange_code(bridge, "web", code, verifier))


def age_tokens(bridge: Bridge, seconds: int) -> None:
    """As if every token had been issued `seconds` earlier. Time moves in the records, not in the
    clock: the stored instants are what the grant compares with time.time(), so this needs no
    knowledge of which module reads the clock (monkeypatching `time.time` would), and no sleeping.
    tests/web/test_token.py ages codes the same way."""
    with bridge.store.engine.begin() as db:
        db.execute(tokens_table.update().values(
            issued_at=tokens_table.c.issued_at - seconds, expires_at=tokens_table.c.expires_at - seconds,
            refresh_expires_at=tokens_table.c.refresh_expires_at - seconds))


def test_a_refresh_token_left_unused_for_refresh_ttl_is_refused(bridge):
    """§4.14.2: a refresh token expires after `[tokens] refresh_ttl` without use; each refresh
    issues a new one, so only a grant left idle that long ends. The margins (half the TTL, then
    one second past it) keep whole-second storage and a slow machine from deciding the test."""
    code, verifier = get_code(bridge)
    first = tokens_of(exchange_code(bridge, "web", code, verifier))
    with bridge.store.transaction():
        stored = bridge.store.find_refresh_token(first["refresh_token"])
    assert stored.refresh_expires_at - stored.issued_at == REFRESH_TTL

    age_tokens(bridge, REFRESH_TTL // 2)  # used in time: works, and the new one has a TTL of its own
    refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    second = tokens_of(token_request(bridge, "web", refresh))
    age_tokens(bridge, REFRESH_TTL // 2 + 1)  # the first would have expired by now; the second has not
    third = tokens_of(token_request(bridge, "web", {**refresh, "refresh_token": second["refresh_token"]}))

    age_tokens(bridge, REFRESH_TTL + 1)  # left unused for longer than refresh_ttl
    expired = token_request(bridge, "web", {**refresh, "refresh_token": third["refresh_token"]})
    assert error_of(expired) == "invalid_grant"
    assert error_of(token_request(bridge, "web", {**refresh, "refresh_token": third["refresh_token"]})) \
        == "invalid_grant"  # for good


# -- §2.6, §4.15.1: client ids come from the server -------------------------------------------------------

def test_client_ids_are_chosen_by_the_server_never_by_whoever_registers(tmp_path, capsys):
    """§4.15.1: a client id nobody could choose cannot be made to look like a user or another
    client. `client create` makes it (128 random bits, hex) and takes no option naming it; there
    is no dynamic registration."""
    config = tmp_path / "bearerbridge.toml"
    config.write_text(f'[server]\nsecret_key_file = "{tmp_path / "key"}"\n'
                      f'[database]\nurl = "sqlite:///{tmp_path / "bb.db"}"\n')
    ids = []
    for _ in range(2):  # the same name, redirect URI and scope twice
        status = cli.main(["--config", str(config), "client", "create", "--name", "alice",
                           "--redirect-uri", "https://alice.example/cb", "--scope", "imap", "--json"])
        out = capsys.readouterr().out
        assert status == 0, out
        ids.append(json.loads(out)["client_id"])
    assert all(re.fullmatch("[0-9a-f]{32}", client_id) for client_id in ids), ids
    assert ids[0] != ids[1]
    for option in ("--client-id", "--id"):
        with pytest.raises(SystemExit) as refused:
            cli.main(["--config", str(config), "client", "create", "--name", "x", option, "alice", "--json"])
        assert refused.value.code == 2 and option in capsys.readouterr().err  # argparse: unrecognized arguments

    bridge = Bridge.over(sqlite_store(tmp_path / "x.db"))
    assert "registration_endpoint" not in json.loads(bridge.browser().get("/.well-known/oauth-authorization-server")
                                                     .body)
    assert bridge.browser().post("/register", json={"client_id": "alice", "redirect_uris": [CB]}).code == 404
    bridge.store.engine.dispose()


# -- §4.2.4: nothing on a page leaks a code through Referer ----------------------------------------------

class _Addresses(HTMLParser):
    """Every address a page loads, links or posts to."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.addresses += [value or "" for name, value in attrs if name in ("src", "href", "action", "srcset")]


def test_pages_load_only_their_own_resources_and_send_no_referer(bridge):
    """§4.2.4: the authorization endpoint's pages hold a code's request in their URL; they load
    nothing from a third party (CSP `default-src 'self'`, and no such address in the page) and
    tell the browser to send no Referer anywhere (`Referrer-Policy: no-referrer`)."""
    browser = bridge.browser()
    path = authorize_url("", "web", CB, pkce_pair()[1], "imap")
    login = browser.get(path)
    action, fields = form_of(login)
    consent = browser.post(action, data={**fields, "username": "alice", "password": PASSWORD})
    wrong = bridge.browser()
    action, fields = form_of(wrong.get(path))
    pages = {"login": login, "consent": consent,
             "wrong password": wrong.post(action, data={**fields, "username": "alice", "password": "wrong"}),
             "error": browser.get(authorize_url("", "web", "https://evil.example/cb", pkce_pair()[1]))}
    assert [page.code for page in pages.values()] == [200, 200, 401, 400]
    action, fields = form_of(consent)
    approved = browser.post(action, data={**fields, "decision": "approve"})
    for name, page in {**pages, "redirect with a code": approved}.items():
        policy = [directive.strip() for directive in page.header("Content-Security-Policy").split(";")]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, name
        assert page.header("Referrer-Policy") == "no-referrer", name
    for name, page in pages.items():
        parser = _Addresses()
        parser.feed(page.body.decode())
        assert parser.addresses, name
        for address in parser.addresses:  # a path on this server: never another host, nor "//host"
            assert address.startswith("/") and not address.startswith("//"), (name, address)
    assert redirect_params(approved)["code"]

