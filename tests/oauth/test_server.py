"""`BridgeServer.authorize`: what one request to /authorize gets, decided against a real store.

Path 1, steps 1 and 3, without the web: a request is an `HttpRequest` as `web/authorize.py`
snapshots it, the signed-in user is an id (or None), and the consent form's answer is the
decision. Every outcome is here: AskLogin, AskConsent, ErrorPage (never a redirect), and the
Redirects, each naming the issuer (RFC 9207).
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from bearerbridge.config import Config
from bearerbridge.oauth.requests import HttpRequest
from bearerbridge.oauth.server import AskConsent, AskLogin, AuthorizeOutcome, BridgeServer, ErrorPage, Redirect
from bearerbridge.storage.models import Client, SignIn, User
from bearerbridge.storage.store import SqlStore

from ..fakes import MemoryAudit, sqlite_store

ISSUER = "http://127.0.0.1:8080"
CB = "https://app.example/cb"
ADDRESS = "192.0.2.7"
LOOPBACK = "http://127.0.0.1/callback"
CODE_GRANT = ("authorization_code", "refresh_token")
VERIFIER = "v" * 64
CHALLENGE = create_s256_code_challenge(VERIFIER)
IMAP = ("imap", "Read and manage your mail (IMAP)")
SMTP = ("smtp", "Send mail as you (SMTP)")


@pytest.fixture
def store(tmp_path) -> SqlStore:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_client(Client("web", "Web App", (CB,), "imap smtp", CODE_GRANT, public=False), "web-secret")
        store.add_client(Client("native", "Native App", (LOOPBACK,), "imap smtp", CODE_GRANT, public=True), None)
        store.add_client(Client("two-uris", "Two URIs", (CB, "https://app.example/other"), "imap", CODE_GRANT,
                                public=False), "secret")
        store.add_client(Client("local", "Local App", ("http://127.0.0.1:8765/cb",), "imap", CODE_GRANT,
                                public=False), "secret")
        store.add_client(Client("machine", "Machine", (CB,), "metrics", ("client_credentials",), public=False),
                         "secret")
    yield store
    store.engine.dispose()


@pytest.fixture
def alice(store) -> User:
    with store.transaction():
        return store.add_user("alice", "alice@example.org", None)


@pytest.fixture
def audit() -> MemoryAudit:
    return MemoryAudit()


@pytest.fixture
def authorize(store, audit):
    """authorize(user_id, decision, **query) -> the outcome, for a code grant request of "web"
    (with PKCE S256, scope imap, state st-1) changed by `query` (None drops a parameter, a list
    repeats it), from a browser whose session is of `user_id`, signed in at `auth_time` (now)
    or `just_signed_in` by this request. A decision comes as the consent form's POST does, with
    the same query."""
    server = BridgeServer(store, Config(), audit)

    def authorize(user_id: int | None = None, decision: str | None = None, auth_time: int | None = None,
                  just_signed_in: bool = False, **query: str | list[str] | None) -> AuthorizeOutcome:
        params = {"response_type": "code", "client_id": "web", "redirect_uri": CB, "scope": "imap",
                  "state": "st-1", "code_challenge": CHALLENGE, "code_challenge_method": "S256", **query}
        lists = {k: v if isinstance(v, list) else [v] for k, v in params.items() if v is not None}
        method, form = ("GET", {}) if decision is None else ("POST", {"step": ["consent"], "decision": [decision]})
        request = HttpRequest(method, f"{ISSUER}/authorize?{urlencode(lists, doseq=True)}", {}, lists, form,
                              ADDRESS)
        with store.transaction():
            sign_in = None if user_id is None else SignIn(User(user_id, "?", None), auth_time or int(time.time()),
                                                          ("pwd",))
            return server.authorize(request, sign_in, decision, just_signed_in)
    return authorize


def redirected(outcome: AuthorizeOutcome, to: str = CB) -> dict[str, str]:
    """The parameters of a Redirect to `to`, each given once."""
    assert isinstance(outcome, Redirect), outcome
    parts = urlsplit(outcome.location)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == to
    query = parse_qs(parts.query)
    assert all(len(values) == 1 for values in query.values()), query
    return {k: v[0] for k, v in query.items()}


def consented(store: SqlStore, user: User, client_id: str = "web") -> set[str]:
    with store.transaction():
        return store.consented_scope(user.id, client_id)


# -- who is asking -----------------------------------------------------------------------------

def test_with_no_one_signed_in_it_asks_for_a_login_naming_the_client(authorize):
    assert authorize(None) == AskLogin("Web App", failed=False)


def test_a_signed_in_user_who_was_disabled_is_asked_to_log_in_again(store, alice, authorize):
    with store.transaction():
        store.set_disabled("alice", True)
    assert authorize(alice.id) == AskLogin("Web App")
    assert authorize(alice.id, "approve") == AskLogin("Web App")  # an approval from before counts for nothing
    assert consented(store, alice) == set()


def test_a_session_of_a_user_who_no_longer_exists_asks_for_a_login(authorize):
    assert authorize(4242) == AskLogin("Web App")


# -- consent -----------------------------------------------------------------------------------

def test_a_signed_in_user_is_asked_to_consent_to_each_scope_with_its_description(alice, authorize):
    assert authorize(alice.id, scope="smtp imap") == AskConsent("Web App", alice, (SMTP, IMAP))


def test_without_a_scope_consent_is_asked_for_the_registered_scopes(alice, authorize):
    assert authorize(alice.id, scope=None) == AskConsent("Web App", alice, (IMAP, SMTP))
    assert authorize(alice.id, scope="") == AskConsent("Web App", alice, (IMAP, SMTP))


def test_approving_redirects_with_a_code_the_state_and_the_issuer_and_remembers_the_consent(store, alice, authorize):
    before = int(time.time())
    params = redirected(authorize(alice.id, "approve"))
    assert set(params) == {"code", "state", "iss"}
    assert params["state"] == "st-1" and params["iss"] == ISSUER  # RFC 9207
    assert len(params["code"]) >= 43  # 256 bits, base64url
    assert consented(store, alice) == {"imap"}
    with store.transaction():
        code = store.find_code(params["code"])
    assert code is not None and not code.used
    assert (code.client_id, code.user_id, code.redirect_uri, code.scope) == ("web", alice.id, CB, "imap")
    assert (code.code_challenge, code.code_challenge_method) == (CHALLENGE, "S256")
    assert before + 600 <= code.expires_at <= int(time.time()) + 600  # [tokens] code_ttl


def test_each_approval_gets_a_new_code(alice, authorize):
    first = redirected(authorize(alice.id, "approve"))["code"]
    assert redirected(authorize(alice.id, "approve"))["code"] != first


def test_consent_is_remembered_for_the_same_or_fewer_scopes(store, alice, authorize):
    redirected(authorize(alice.id, "approve", scope="imap smtp"))
    for scope in ("imap smtp", "smtp imap", "smtp", "imap", None):
        params = redirected(authorize(alice.id, scope=scope))  # no consent page, no decision needed
        assert set(params) == {"code", "state", "iss"}, scope
    with store.transaction():
        assert store.find_code(params["code"]).scope == "imap smtp"  # no scope: the registered ones


def test_a_wider_request_asks_again_for_all_its_scopes_and_approving_adds_to_the_consent(store, alice, authorize):
    redirected(authorize(alice.id, "approve", scope="imap"))
    assert authorize(alice.id, scope="imap smtp") == AskConsent("Web App", alice, (IMAP, SMTP))
    redirected(authorize(alice.id, "approve", scope="smtp"))
    assert consented(store, alice) == {"imap", "smtp"}  # the union of what was approved
    redirected(authorize(alice.id, scope="imap smtp"))


def test_consent_is_remembered_per_user_and_client(store, alice, authorize):
    redirected(authorize(alice.id, "approve"))
    with store.transaction():
        bob = store.add_user("bob", None, None)
    assert authorize(bob.id) == AskConsent("Web App", bob, (IMAP,))
    assert authorize(alice.id, client_id="native", redirect_uri=LOOPBACK) == AskConsent("Native App", alice, (IMAP,))
    assert consented(store, alice, "native") == set()


def test_denying_redirects_with_access_denied_and_the_issuer_and_remembers_nothing(store, alice, authorize):
    params = redirected(authorize(alice.id, "deny"))
    assert params["error"] == "access_denied"
    assert params["state"] == "st-1" and params["iss"] == ISSUER
    assert "code" not in params
    assert consented(store, alice) == set()
    assert authorize(alice.id) == AskConsent("Web App", alice, (IMAP,))


def test_denying_wins_over_a_remembered_consent(store, alice, authorize):
    redirected(authorize(alice.id, "approve"))
    params = redirected(authorize(alice.id, "deny"))
    assert params["error"] == "access_denied" and "code" not in params and params["iss"] == ISSUER
    assert consented(store, alice) == {"imap"}  # a denial forgets nothing either


def test_a_public_client_may_redirect_to_any_loopback_port(alice, authorize):
    """RFC 8252 §7.3: a native app listens on whatever port it was given."""
    uri = "http://127.0.0.1:53682/callback"
    assert authorize(alice.id, client_id="native", redirect_uri=uri) == AskConsent("Native App", alice, (IMAP,))
    assert set(redirected(authorize(alice.id, "approve", client_id="native", redirect_uri=uri), to=uri)) == {
        "code", "state", "iss"}


def test_a_client_with_one_redirect_uri_may_leave_it_out(store, alice, authorize):
    params = redirected(authorize(alice.id, "approve", redirect_uri=None))
    with store.transaction():
        assert store.find_code(params["code"]).redirect_uri == ""  # so the token request leaves it out too


# -- errors shown to the user, never sent to an unverified redirect URI (RFC 6749 §4.1.2.1) -------

SIGNED_IN_OR_NOT = pytest.mark.parametrize("signed_in, decision", [(False, None), (True, None), (True, "approve")],
                                           ids=["anonymous", "signed-in", "approving"])


@SIGNED_IN_OR_NOT
@pytest.mark.parametrize("query, error", [
    ({"client_id": "no-such-client"}, "invalid_client"),
    ({"client_id": None}, "invalid_client"),
    ({"client_id": ""}, "invalid_client"),
    ({"redirect_uri": "https://evil.example/cb"}, "invalid_request"),
    ({"redirect_uri": "https://app.example/cb/"}, "invalid_request"),
    ({"redirect_uri": "https://app.example/cb?x=1"}, "invalid_request"),
    # any loopback port only for a public client, only on the registered path, only by address
    ({"client_id": "native", "redirect_uri": "http://127.0.0.1:9999/elsewhere"}, "invalid_request"),
    ({"client_id": "native", "redirect_uri": "http://localhost:9999/callback"}, "invalid_request"),
    ({"client_id": "local", "redirect_uri": "http://127.0.0.1:9999/cb"}, "invalid_request"),
    # with several registered, the request must say which
    ({"client_id": "two-uris", "redirect_uri": None}, "invalid_request"),
    # a repeated parameter (RFC 6749 §3.1) is refused before anything is trusted
    ({"client_id": ["web", "machine"]}, "invalid_request"),
    ({"scope": ["imap", "smtp"]}, "invalid_request"),
], ids=["unknown-client", "no-client-id", "empty-client-id", "other-host", "trailing-slash", "added-query",
        "loopback-other-path", "localhost-by-name", "confidential-other-port", "ambiguous", "repeated-client",
        "repeated-scope"])
def test_a_request_that_cannot_be_trusted_gets_an_error_page(store, alice, authorize, query, error, signed_in,
                                                             decision):
    outcome = authorize(alice.id if signed_in else None, decision, **query)
    assert isinstance(outcome, ErrorPage), outcome
    assert outcome.error == error and outcome.description
    assert consented(store, alice) == set()


ALL_DROPPED = dict.fromkeys(("response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge",
                              "code_challenge_method"))
GO_BACK = "Go back to it and try again"


@pytest.mark.parametrize("query, error, says", [
    (ALL_DROPPED, "unsupported_response_type", "this visit did not come with an app's request. To give an app "
                                               "access, start from the app."),
    ({"response_type": None, "client_id": "no-such-client"}, "unsupported_response_type",
     "it did not say what it asks for (response_type is missing)"),
    ({"response_type": "garbage", "client_id": "no-such-client"}, "unsupported_response_type",
     "it asked for a kind of access this server does not give (response_type must be code)"),
    ({"client_id": None}, "invalid_client", "it did not say which app is asking (client_id is missing)"),
    ({"client_id": "no-such-client"}, "invalid_client",
     "it is not registered with this server (its client_id is unknown)"),
    ({"redirect_uri": "https://evil.example/cb"}, "invalid_request",
     "it asked to send you back to an address it has not registered with this server (https://evil.example/cb), "
     "so you are not sent there"),
    ({"client_id": "two-uris", "redirect_uri": None}, "invalid_request",
     "it did not say where to send you back to (redirect_uri is missing, and the app has registered more than "
     "one address)"),
    ({"client_id": ["web", "machine"]}, "invalid_request", "it gave client_id more than once"),
    ({"redirect_uri": 'https://app.example/cb"'}, "invalid_request",
     "its request holds characters that are not allowed"),
], ids=["nothing-at-all", "no-response-type", "garbage-response-type", "no-client-id", "unknown-client",
        "unregistered-redirect", "ambiguous-redirect", "repeated", "unquotable"])
def test_an_error_page_says_in_words_what_is_wrong_and_what_to_do(authorize, query, error, says):
    """The person who followed an app's link learns that the app erred and to go back to it;
    the OAuth error code is authlib's, unchanged."""
    outcome = authorize(None, **query)
    assert isinstance(outcome, ErrorPage), outcome
    assert outcome.error == error and says in outcome.description
    if query is not ALL_DROPPED:
        assert outcome.description.startswith("The app that sent you here made a mistake: ")
        assert GO_BACK in outcome.description
    assert "None" not in outcome.description and "'" not in outcome.description.replace("app's", "")


@pytest.mark.parametrize("query", [
    {"redirect_uri": 'https://app.example/cb"'},
    {"redirect_uri": "https://app.example/cb\\"},
    {"redirect_uri": "https://app.example/cb/\u00e9"},
    {"response_type": 'co"de'},
], ids=["quote-in-uri", "backslash-in-uri", "non-ascii-in-uri", "quote-in-response-type"])
def test_a_parameter_that_cannot_be_quoted_in_an_error_description_still_gets_an_error(alice, authorize, query):
    outcome = authorize(alice.id, **query)
    if "redirect_uri" in query:
        assert isinstance(outcome, ErrorPage) and outcome.error == "invalid_request"
    else:  # the URI was verified, so the client may be told; or the user may
        assert isinstance(outcome, ErrorPage) or redirected(outcome)["error"] == "unsupported_response_type"


# -- errors sent back to the client's (verified) redirect URI ------------------------------------

@SIGNED_IN_OR_NOT
@pytest.mark.parametrize("query, to, error", [
    ({"response_type": "token"}, CB, "unsupported_response_type"),
    ({"response_type": None}, CB, "unsupported_response_type"),  # authlib's; §4.1.2.1 would say invalid_request
    ({"scope": "imap metrics"}, CB, "invalid_scope"),  # registered for imap smtp
    ({"scope": "no-such-scope"}, CB, "invalid_scope"),
    # PKCE (RFC 7636, S256 only per RFC 9700 §2.1.1): a public client must send a challenge
    ({"client_id": "native", "redirect_uri": "http://127.0.0.1:5000/callback", "code_challenge": None,
      "code_challenge_method": None}, "http://127.0.0.1:5000/callback", "invalid_request"),
    ({"code_challenge": VERIFIER, "code_challenge_method": "plain"}, CB, "invalid_request"),
    ({"code_challenge_method": None}, CB, "invalid_request"),  # which RFC 7636 would take for plain
    # a client registered for client_credentials only
    ({"client_id": "machine", "scope": "metrics"}, CB, "unauthorized_client"),
], ids=["response-type-token", "no-response-type", "unregistered-scope", "unknown-scope", "public-without-pkce",
        "plain-pkce", "challenge-without-method", "not-a-code-client"])
def test_a_bad_request_from_a_known_client_is_redirected_back_with_its_error(store, alice, authorize, query, to,
                                                                            error, signed_in, decision):
    params = redirected(authorize(alice.id if signed_in else None, decision, **query), to=to)
    assert params["error"] == error
    assert params["state"] == "st-1" and params["iss"] == ISSUER
    assert "code" not in params
    assert consented(store, alice, query.get("client_id") or "web") == set()


def test_a_confidential_client_must_use_pkce_unless_registered_without(store, alice, authorize):
    """OAuth 2.1 (RFC 9700 §2.1.1) wants PKCE from every client; a legacy confidential one, which
    authenticates at the token endpoint and whose library sends no challenge, may be let off."""
    refused = redirected(authorize(alice.id, "approve", code_challenge=None, code_challenge_method=None))
    assert refused["error"] == "invalid_request" and "PKCE is required" in refused["error_description"]
    with store.transaction():
        store.update_client("web", pkce_required=False)
    assert set(redirected(authorize(alice.id, "approve", code_challenge=None, code_challenge_method=None))) == {
        "code", "state", "iss"}


# -- the audit log -------------------------------------------------------------------------------

def test_a_consent_approved_or_denied_is_recorded_with_who_what_and_where(alice, audit, authorize):
    authorize(alice.id)  # the consent page alone decides nothing
    assert audit.events == []
    authorize(alice.id, "approve", scope="imap smtp")
    authorize(alice.id, "deny")
    assert audit.of("consent") == [
        {"user": "alice", "client_id": "web", "scope": "imap smtp", "approved": True, "address": ADDRESS},
        {"user": "alice", "client_id": "web", "scope": "imap", "approved": False, "address": ADDRESS}]


def test_a_remembered_consent_is_not_recorded_again(alice, audit, authorize):
    authorize(alice.id, "approve")
    redirected(authorize(alice.id))
    assert len(audit.of("consent")) == 1
