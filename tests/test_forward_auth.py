"""GET /forward-auth as nginx auth_request, Traefik and Caddy call it, against a running service."""

from __future__ import annotations

import base64
import time

import pytest
import requests

from bearerbridge.web.forward import canonical_path

from .support import Service

RULES = """
[forward_auth]
user_header = "X-Remote-User"  # not the defaults, so that the settings are seen to work
realm = "files"
[[forward_auth.rules]]
host = "legacy.example"
basic = true
[[forward_auth.rules]]
path_prefix = "/dav"
[[forward_auth.rules]]
path_prefix = "/mail"
read_scope = "imap"
write_scope = "smtp"
"""


@pytest.fixture(scope="module")
def proxy_service(tmp_path_factory):
    running = Service.start(tmp_path_factory.mktemp("forward"), extra=RULES)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def people(proxy_service):
    service = proxy_service
    name = service.unique("dora")
    service.cli("user", "add", name, "--password-stdin", stdin="pw\n")
    client = service.client("--redirect-uri", "https://app.example/cb")

    def token(scope):
        return service.issue(name, client["client_id"], scope)
    return name, token


def ask(service, method, uri, token=None, host="files.example", basic=None, style="nginx"):
    headers = {"Host": host}
    if style == "nginx":
        headers.update({"X-Original-Method": method, "X-Original-URI": uri})
    else:  # Traefik and Caddy
        headers.update({"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, "X-Forwarded-Host": host})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
    return requests.get(f"{service.url}/forward-auth", headers=headers)


@pytest.mark.parametrize("style", ["nginx", "traefik"])
def test_read_and_write_scopes(proxy_service, people, style):
    name, token = people
    both, read_only = token("webdav:read webdav:write"), token("webdav:read")
    for method in ("GET", "PROPFIND", "PUT", "DELETE", "MKCOL", "MOVE"):
        response = ask(proxy_service, method, "/dav/notes/a.txt", both, style=style)
        assert response.status_code == 200 and response.headers["X-Remote-User"] == name
    assert ask(proxy_service, "PROPFIND", "/dav/", read_only, style=style).status_code == 200
    refused = ask(proxy_service, "PUT", "/dav/a.txt", read_only, style=style)
    assert refused.status_code == 403
    assert refused.headers["WWW-Authenticate"] == \
        'Bearer realm="files", error="insufficient_scope", scope="webdav:write"'


def test_rules_pick_the_scope_by_path(proxy_service, people):
    _, token = people
    mail = token("imap")
    assert ask(proxy_service, "GET", "/mail/inbox", mail).status_code == 200
    assert ask(proxy_service, "POST", "/mail/send", mail).status_code == 403     # needs smtp
    assert ask(proxy_service, "GET", "/dav/x", mail).status_code == 403          # needs webdav:read
    assert ask(proxy_service, "GET", "/elsewhere", mail).status_code == 403      # no rule matches
    assert ask(proxy_service, "GET", "/davx", token("webdav:read")).status_code == 403  # a prefix is a path


def test_bad_missing_expired_and_revoked_tokens(proxy_service, people):
    _, token = people
    missing = ask(proxy_service, "GET", "/dav/")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == 'Bearer realm="files"'
    bad = ask(proxy_service, "GET", "/dav/", "not-a-token")
    assert bad.status_code == 401
    assert bad.headers["WWW-Authenticate"] == 'Bearer realm="files", error="invalid_token"'
    revoked = token("webdav:read")
    assert ask(proxy_service, "GET", "/dav/", revoked).status_code == 200
    proxy_service.cli("token", "revoke", revoked)
    deadline = time.monotonic() + 1.2
    while ask(proxy_service, "GET", "/dav/", revoked).status_code == 200:
        assert time.monotonic() < deadline, "revocation not noticed within cache_ttl"
        time.sleep(0.05)
    assert ask(proxy_service, "GET", "/dav/", revoked).status_code == 401


def test_basic_with_the_token_as_password_only_where_the_rule_allows(proxy_service, people):
    name, token = people
    dav = token("webdav:read webdav:write")
    challenge = ask(proxy_service, "GET", "/", host="legacy.example")
    assert challenge.status_code == 401 and challenge.headers["WWW-Authenticate"].startswith('Basic realm="files"')
    ok = ask(proxy_service, "PUT", "/f", host="legacy.example", basic=(name, dav))
    assert ok.status_code == 200 and ok.headers["X-Remote-User"] == name
    assert ask(proxy_service, "PUT", "/f", host="legacy.example", basic=("mallory", dav)).status_code == 401
    assert ask(proxy_service, "GET", "/dav/", basic=(name, dav)).status_code == 401  # not on that rule


def test_decisions_are_counted(proxy_service, people):
    _, token = people
    ask(proxy_service, "GET", "/dav/", token("webdav:read"))
    metrics_client = proxy_service.client("--grant", "client_credentials", "--scope", "metrics")
    bearer = requests.post(f"{proxy_service.url}/token", data={"grant_type": "client_credentials"},
                           auth=(metrics_client["client_id"], metrics_client["client_secret"])).json()["access_token"]
    text = requests.get(f"{proxy_service.url}/metrics", headers={"Authorization": f"Bearer {bearer}"}).text
    assert 'surface="forward_auth"' in text and 'service="webdav:read"' in text


@pytest.mark.parametrize("uri, path", [
    ("/dav/notes/a.txt", "/dav/notes/a.txt"),
    ("/dav/caf%C3%A9%20menu.txt?x=1", "/dav/café menu.txt"),
    ("/%70rivate/secret.txt", "/private/secret.txt"),          # decoded before the rules see it
    ("/public/../private/secret.txt", None),
    ("/public/%2e%2e/private/secret.txt", None),
    ("//private/secret.txt", None),
    ("/public//../private/secret.txt", None),
    ("/public/./x", None),
    ("/public%2fprivate", None),
    ("/a%00b", None),
    ("/a%ffb", None),                                           # not UTF-8
    ("relative/path", None),
    # issue 9, item 17: what a proxy other than nginx may hand on
    ("/dav/x?a=1&b=/../../mail", "/dav/x"),                     # the query takes no part
    ("/dav/x?", "/dav/x"),
    ("/public#/../private/x", None),                            # "#": nginx cuts there, Go keeps it
    ("/dav/x#frag", None),
    ("/dav/x?q#frag", None),
    ("/public%23/../private/x", None),                          # encoded "#", "?", ";"
    ("/private%23", None),
    ("/private%3Fx", None),
    ("/private%3bx", None),
    ("/public/..;/private/x", None),                            # Tomcat's path parameters
    ("/private;x/secret.txt", None),
    ("/public\\..\\private", None),                             # backslashes, raw and encoded
    ("/public/%5C../private", None),
    ("/public/%252e%252e/private", None),                       # a second decoding would differ
    ("/100%25.txt", "/100%.txt"),                               # one that would not
    ("/a%zz", None),                                            # "%" starting no escape
    ("/a%4", None),
    ("/a%c0%ae%c0%ae/x", None),                                 # overlong forms of "." and "/"
    ("/a%c0%af", None),
    ("/a%e0%80%af", None),
    ("/a%ed%a0%80", None),                                      # a surrogate
    ("/a%0d%0ab", None),                                        # controls, C0 and C1
    ("/a%7f", None),
    ("/a%c2%9b", None),
    ("/a\tb", None),                                           # raw controls, space, non-ASCII
    ("/a b", None),
    ("/caf\u00e9", None),
    ("/.well-known/x", "/.well-known/x"),                       # dots inside a name are fine
    ("/a..b/c.", "/a..b/c."),
    ("/Dav/X", "/Dav/X"),                                       # case kept: prefixes are case-sensitive
    ("http://files.example/dav/x?y", "/dav/x"),                 # absolute-form (Caddy hands it on)
    ("http://files.example", None),
    ("ftp://files.example/dav/x", None),
    ("*", None),
])
def test_canonical_path(uri, path):
    assert canonical_path(uri) == path


@pytest.mark.parametrize("style", ["nginx", "traefik"])
@pytest.mark.parametrize("uri", ["/dav/../private/x", "//private/x", "/dav/%2e%2e/x", "/dav#/../private/x",
                                 "/dav%23/../mail/x", "/dav/..;/mail/x", "/dav/%252e%252e/mail/x", "/dav/a%c0%ae"])
def test_ambiguous_paths_are_refused(proxy_service, people, uri, style):
    _, token = people
    assert ask(proxy_service, "GET", uri, token("webdav:read webdav:write imap smtp"), style=style).status_code == 403


def test_the_fragment_trick_of_item_17_is_refused(proxy_service, people):
    """`/mail#/../dav/x` was judged as /mail: an imap token opened /dav behind a proxy that keeps "#"."""
    _, token = people
    imap = token("imap")
    assert ask(proxy_service, "GET", "/mail/x", imap, style="traefik").status_code == 200
    assert ask(proxy_service, "GET", "/mail#/../dav/x", imap, style="traefik").status_code == 403


def test_a_host_rule_holds_for_any_case_port_and_a_trailing_dot(proxy_service, people):
    name, token = people
    dav = token("webdav:read webdav:write")
    for host in ("legacy.example", "LEGACY.Example.", "legacy.example.:8443"):
        for style in ("nginx", "traefik"):
            answer = ask(proxy_service, "PUT", "/f", host=host, basic=(name, dav), style=style)
            assert answer.status_code == 200, (host, style)
    assert ask(proxy_service, "PUT", "/f", host="legacy.example..", basic=(name, dav)).status_code == 403


def test_behind_traefik_a_clients_x_original_uri_is_refused(proxy_service, people):
    """Traefik passes the client's headers on: its own X-Original-URI must not pick the rule."""
    _, token = people
    imap = token("imap")
    headers = {"Host": "files.example", "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/dav/x",
               "X-Forwarded-Host": "files.example", "X-Original-URI": "/mail/x", "Authorization": f"Bearer {imap}"}
    assert requests.get(f"{proxy_service.url}/forward-auth", headers=headers).status_code == 403


def test_behind_nginx_a_forwarded_host_from_the_client_is_ignored(proxy_service, people):
    """nginx passes the client's headers on: with X-Original-URI only Host counts."""
    name, token = people
    dav = token("webdav:read")
    basic = "Basic " + base64.b64encode(f"{name}:{dav}".encode()).decode()
    as_legacy = {"Host": "legacy.example", "X-Original-Method": "GET", "X-Original-URI": "/f", "Authorization": basic}
    assert requests.get(f"{proxy_service.url}/forward-auth", headers=as_legacy).status_code == 200
    forged = {**as_legacy, "Host": "files.example", "X-Forwarded-Host": "legacy.example"}
    # files.example has no rule for /f: the client's X-Forwarded-Host did not make it legacy.example
    assert requests.get(f"{proxy_service.url}/forward-auth", headers=forged).status_code == 403
