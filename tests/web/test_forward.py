"""GET /forward-auth in process: the whole HTTP tree over a real SQLite store, asked as nginx,
Traefik and Caddy ask it, with a rule per host and per folder.

Every way a proxy may name the original request (nginx's X-Original-URI and Host; Traefik's and
Caddy's X-Forwarded-Uri and X-Forwarded-Host, Caddy's in absolute-form too) is decided one way
only: what a server could read two ways is refused (403, reason `ambiguous_path`, or
`malformed` for a host), and a token for one folder or host never opens another.
"""

from __future__ import annotations

import dataclasses

import pytest
from twisted.logger import capturedLogs
from twisted.web.test.requesthelper import DummyRequest

from bearerbridge.config import Config, ForwardAuthRule, ForwardAuthSettings
from bearerbridge.sasl.verdict import Reason
from bearerbridge.storage.models import Client
from bearerbridge.web.forward import Original, original_request

from ..fakes import Answer, Bridge, sqlite_store

RULES = (
    ForwardAuthRule(host="secret.example", read_scope="xmpp", write_scope="xmpp"),
    ForwardAuthRule(path_prefix="/private", read_scope="smtp", write_scope="smtp"),
    ForwardAuthRule(path_prefix="/public", read_scope="imap", write_scope="imap"),
    ForwardAuthRule(path_prefix="/"),  # webdav:read and webdav:write
)
# Tokens of alice's, by what they hold.
TOKENS = {"public": "imap", "dav": "webdav:read", "private": "smtp", "secret": "xmpp",
          "all": "imap smtp xmpp webdav:read webdav:write"}
INSUFFICIENT = 'Bearer realm="bearerbridge", error="insufficient_scope"'


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_client(Client("app", "App", ("https://app.example/cb",), " ".join(set(TOKENS.values())),
                                ("authorization_code",), public=False), "app-secret")
        alice = store.add_user("alice", "alice@example.org", None)
        for token, scope in TOKENS.items():
            store.save_token(token, None, "app", alice.id, scope, 3600, None)
    config = dataclasses.replace(Config(), forward_auth=ForwardAuthSettings(rules=RULES))
    yield Bridge.over(store, config)
    store.engine.dispose()


def nginx(bridge: Bridge, uri: str, token: str | None = "all", method: str = "GET", host: str = "files.example",
          **extra: str | list[str]) -> Answer:
    """As conf/nginx/webdav.conf asks: X-Original-Method, X-Original-URI and Host ($request_uri, $host)."""
    headers: dict[str, str | list[str]] = {"Host": host, "X-Original-Method": method, "X-Original-URI": uri,
                                           "X-Forwarded-Host": host, **extra}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return bridge.browser().get("/forward-auth", headers=headers)


def traefik(bridge: Bridge, uri: str, token: str | None = "all", method: str = "GET", host: str = "files.example",
            **extra: str | list[str]) -> Answer:
    """As Traefik's ForwardAuth and Caddy's forward_auth ask: X-Forwarded-Method/-Uri/-Host, and
    every header of the client's besides."""
    headers: dict[str, str | list[str]] = {"Host": "bearerbridge.internal", "X-Forwarded-Method": method,
                                           "X-Forwarded-Uri": uri, "X-Forwarded-Host": host, **extra}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return bridge.browser().get("/forward-auth", headers=headers)


ASK = {"nginx": nginx, "traefik": traefik}


def refusals(bridge: Bridge, reason: str) -> float:
    """How many requests were refused before any rule was tried, for `reason`."""
    return bridge.count("bearerbridge_sasl_decisions_total", surface="forward_auth", mechanism="bearer",
                        service="-", result="failed", reason=reason)


@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_a_token_opens_its_own_folder_and_host_only(bridge, style):
    ask = ASK[style]
    assert ask(bridge, "/public/a.txt", "public").code == 200
    assert ask(bridge, "/public/a.txt", "public").header("X-Auth-User") == "alice"
    assert ask(bridge, "/private/a.txt", "public").code == 403
    assert ask(bridge, "/private/a.txt", "private").code == 200
    assert ask(bridge, "/elsewhere", "dav").code == 200
    assert ask(bridge, "/elsewhere", "dav", host="secret.example").code == 403
    assert ask(bridge, "/elsewhere", "secret", host="secret.example").code == 200


# Each names /private (or a place a server could take for it) while looking like /public, or
# could be read two ways some other way: refused before any rule is tried, whatever the token.
REFUSED = [
    "/public#/../private/x",            # nginx cuts at "#"; Go's servers keep it and clean the path
    "/public/x#frag",                   # a fragment, which no request carries
    "/public/x?next=1#/../../private",  # "#" anywhere
    "/public%23/../private/x",
    "/public/x%23",                     # an encoded "#": a server decoding first cuts there
    "/private%23/x",
    "/private%3f/x",                    # likewise "?"
    "/private%3F",
    "/public/..;/private/x",            # Tomcat and Jetty drop path parameters: /private/x to them
    "/private;jsessionid=1/x",
    "/private%3b/x",
    "/public/..\\private/x",            # a backslash, "/" to some servers
    "/public/%5c../private/x",
    "/public/%2e%2e/private/x",         # encoded dots and slashes
    "/public/%2E./private/x",
    "/public%2f..%2fprivate/x",
    "/public/%252e%252e/private/x",     # "%2e%2e" after one decoding: ".." after a second
    "/public/%2525",
    "/public/a%zz",                     # a "%" that starts no escape
    "/public/a%",
    "/public/a%c0%ae%c0%ae/private/x",  # an overlong "." (not UTF-8)
    "/public/%c0%af",                   # an overlong "/"
    "/public/%e0%80%ae",
    "/public/%ed%a0%80",                # a surrogate
    "/public/%ff",
    "/public/a%00.txt",                 # NUL and other controls, encoded
    "/public/a%0a.txt",
    "/public/a%7f.txt",
    "/public/a%c2%85.txt",              # NEL, a C1 control
    "/public/a\tb",                     # raw controls and spaces
    "/public/a b",
    "/public/caf\u00c3\u00a9",          # raw non-ASCII (UTF-8 bytes, read as Latin-1)
    "/public/../private/x",             # what was refused before stays refused
    "/public/./x",
    "/public/.",
    "/public/..",
    "/public/..?x",
    "//private/x",
    "/public//x",
    "public/x",                         # not a path
    "*",
    "?x",
    "http:///public/x",                 # absolute-form without a host
    "ftp://files.example/public/x",
]


@pytest.mark.parametrize("uri", REFUSED)
@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_uris_that_could_be_read_two_ways_are_refused(bridge, style, uri):
    before = refusals(bridge, "ambiguous_path")
    answer = ASK[style](bridge, uri, "all")
    assert (answer.code, answer.header("WWW-Authenticate")) == (403, INSUFFICIENT)
    assert answer.header("X-Auth-User") is None
    assert refusals(bridge, "ambiguous_path") == before + 1


def test_the_item_17_attack_no_longer_opens_private_with_a_public_token(bridge):
    """Caddy hands on the request target as sent; Go keeps "#" in the path and cleans it to
    /private/x, which bearerbridge judged as /public."""
    assert traefik(bridge, "/public#/../private/x", "public").code == 403
    assert nginx(bridge, "/public#/../private/x", "public").code == 403


@pytest.mark.parametrize("uri, token", [
    ("/public/caf%C3%A9%20menu..txt", "public"),   # names that need encoding; dots inside a name
    ("/public/.hidden", "public"),
    ("/public/100%25.txt", "public"),               # a "%" of a name, encoded once
    ("/public/a%2Bb%26c%40d", "public"),            # other encoded reserved characters are plain
    ("/public/a+b&c=d@e:f,g!h$i'j(k)l*m", "public"),
    ("/public/a~b-c_d.e", "public"),
    ("/public", "public"),
    ("/public/", "public"),
    ("/%70rivate/x", "private"),                    # decoded before the rules see it
])
@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_ordinary_names_are_decided_by_their_rule(bridge, style, uri, token):
    assert ASK[style](bridge, uri, token).code == 200
    assert ASK[style](bridge, uri, "dav").code == 403  # and by no other


@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_the_query_takes_no_part_in_matching(bridge, style):
    ask = ASK[style]
    assert ask(bridge, "/public/x?/../../private/y", "public").code == 200
    assert ask(bridge, "/public/x?a=%2e%2e%2f;b=%00", "public").code == 200
    assert ask(bridge, "/private/x?/public/", "public").code == 403
    assert ask(bridge, "/private/x?next=/public/x", "private").code == 200
    assert ask(bridge, "/public?x", "public").code == 200


@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_path_prefixes_compare_case_sensitively(bridge, style):
    """As URL paths do (RFC 3986 §6.2.2.1): /PRIVATE is not under the rule for /private, but
    under the catch-all. The README and conf/bearerbridge.toml say so."""
    ask = ASK[style]
    assert ask(bridge, "/PRIVATE/x", "private").code == 403
    assert ask(bridge, "/PRIVATE/x", "dav").code == 200
    assert ask(bridge, "/Public/x", "public").code == 403


@pytest.mark.parametrize("host", ["secret.example", "SECRET.example", "secret.example.", "Secret.Example.",
                                  "secret.example:8443", "secret.example.:443"])
@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_hosts_compare_case_insensitively_without_port_or_trailing_dot(bridge, style, host):
    ask = ASK[style]
    assert ask(bridge, "/x", "dav", host=host).code == 403  # not the catch-all's webdav:read
    assert ask(bridge, "/x", "secret", host=host).code == 200


def test_a_rule_written_with_a_trailing_dot_or_capitals_matches_too(tmp_path):
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_client(Client("app", "App", ("https://app.example/cb",), "xmpp webdav:read",
                                ("authorization_code",), public=False), "app-secret")
        alice = store.add_user("alice", None, None)
        store.save_token("dav", None, "app", alice.id, "webdav:read", 3600, None)
    rules = (ForwardAuthRule(host="Secret.Example.", read_scope="xmpp"), ForwardAuthRule())
    bridge = Bridge.over(store, dataclasses.replace(Config(), forward_auth=ForwardAuthSettings(rules=rules)))
    assert traefik(bridge, "/x", "dav", host="secret.example").code == 403
    assert traefik(bridge, "/x", "dav", host="files.example").code == 200
    store.engine.dispose()


@pytest.mark.parametrize("host", [
    "secret.example..", ".secret.example", "secret..example", "files.example, secret.example", "alice@secret.example",
    "secret.example/x", "secret\\.example", "s\u00e9cret.example", "secret.example:80:80", "secret example", "[::1",
])
@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_a_host_no_server_would_accept_is_refused(bridge, style, host):
    before = refusals(bridge, "malformed")
    answer = ASK[style](bridge, "/x", "all", host=host)
    assert (answer.code, answer.header("WWW-Authenticate")) == (403, INSUFFICIENT)
    assert refusals(bridge, "malformed") == before + 1


def test_ip_literals_are_hosts(bridge):
    assert traefik(bridge, "/x", "dav", host="[::1]:8080").code == 200
    assert traefik(bridge, "/x", "dav", host="127.0.0.1:8080").code == 200


def test_an_absolute_form_target_must_name_the_host_it_is_decided_for(bridge):
    """Caddy passes the client's request target on as sent, absolute-form too (RFC 9112 §3.2.2),
    and Go then takes the host from it."""
    assert traefik(bridge, "http://files.example/public/x", "public").code == 200
    assert traefik(bridge, "HTTPS://Files.Example.:443/public/x?y", "public").code == 200
    assert traefik(bridge, "http://files.example/private/x", "public").code == 403
    for uri in ("http://secret.example/public/x", "http://alice@files.example/public/x",
                "http://files.example\\@secret.example/public/x", "http://files.example", "http://files.example?x"):
        before = refusals(bridge, "ambiguous_path")
        assert traefik(bridge, uri, "all").code == 403, uri
        assert refusals(bridge, "ambiguous_path") == before + 1, uri


def test_behind_traefik_a_clients_own_x_original_uri_is_not_believed(bridge):
    """Traefik and Caddy pass every client header on: a client asking for /private with
    `X-Original-URI: /public/x` of its own must not be judged as /public/x."""
    answer = traefik(bridge, "/private/x", "public", **{"X-Original-URI": "/public/x", "X-Original-Method": "GET"})
    assert answer.code == 403
    assert traefik(bridge, "/private/x", "all", **{"X-Original-URI": "/private/x"}).code == 403


def test_behind_nginx_a_clients_own_x_forwarded_uri_or_method_is_refused(bridge):
    """The shipped webdav.conf removes them; a config that does not gets a refusal, not a guess."""
    assert nginx(bridge, "/public/x", "all", **{"X-Forwarded-Uri": "/public/x"}).code == 403
    assert nginx(bridge, "/public/x", "all", method="PUT", **{"X-Forwarded-Method": "GET"}).code == 403
    assert nginx(bridge, "/public/x", "public", method="PUT").code == 200  # without them, decided


@pytest.mark.parametrize("name", ["X-Original-URI", "X-Original-Method"])
def test_a_header_naming_the_request_twice_is_refused_behind_nginx(bridge, name):
    values = {"X-Original-URI": ["/public/x", "/private/x"], "X-Original-Method": ["GET", "PUT"]}[name]
    before = refusals(bridge, "ambiguous_path")
    assert nginx(bridge, "/public/x", "all", **{name: values}).code == 403
    assert refusals(bridge, "ambiguous_path") == before + 1


def test_two_host_headers_are_refused():
    """Twisted's own client will not send two (nor does nginx), so a DummyRequest carries them."""
    request = DummyRequest([b"forward-auth"])
    for name, value in ((b"X-Original-URI", b"/x"), (b"Host", b"files.example"), (b"Host", b"secret.example")):
        request.requestHeaders.addRawHeader(name, value)
    assert original_request(request) == Original("", "", "Host twice", Reason.AMBIGUOUS_PATH)
    request.requestHeaders.setRawHeaders(b"Host", [b"secret.example."])
    assert original_request(request) == Original("GET", "secret.example", "/x")


@pytest.mark.parametrize("name", ["X-Forwarded-Uri", "X-Forwarded-Method", "X-Forwarded-Host"])
def test_a_header_naming_the_request_twice_is_refused_behind_traefik(bridge, name):
    values = {"X-Forwarded-Uri": ["/public/x", "/private/x"], "X-Forwarded-Method": ["GET", "PUT"],
              "X-Forwarded-Host": ["files.example", "secret.example"]}[name]
    assert traefik(bridge, "/public/x", "all", **{name: values}).code == 403


@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_methods_are_case_sensitive(bridge, style):
    """RFC 9110 §9.1: `get` is not GET, so it is not a reading method and needs the write scope."""
    ask = ASK[style]
    assert ask(bridge, "/x", "dav", method="GET").code == 200
    assert ask(bridge, "/x", "dav", method="PROPFIND").code == 200
    for method in ("get", "Get", "propfind"):
        answer = ask(bridge, "/x", "dav", method=method)
        assert answer.code == 403, method
        assert answer.header("WWW-Authenticate") == f'{INSUFFICIENT}, scope="webdav:write"'


def test_a_refusal_is_logged_with_the_uri_as_sent(bridge):
    with capturedLogs() as events:
        nginx(bridge, "/public#/../private/x\x0b", "all")
    [line] = [e for e in events if e.get("log_format", "").startswith("forward-auth")]
    assert line["reason"] == "ambiguous_path" and line["path"] == "/public#/../private/x\x0b"
    assert line["host"] == "files.example" and line["user"] is None
