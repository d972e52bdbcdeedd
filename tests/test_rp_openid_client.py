"""Node's openid-client (v6, tests/js) as an OpenID Connect relying party of a real bearerbridge.

openid-client checks what OpenID Connect Core §3.1.3.7 asks of a relying party, so a flow it
accepts proves the server's side:
- discovery: the document at /.well-known/openid-configuration names the issuer asked for;
- the code flow with PKCE S256, state, nonce and RFC 9207's `iss`: the ID token's signature
  (ES256 for one client, RS256 for another, each client refusing any other algorithm), iss, aud,
  exp, iat and nonce; then /userinfo answers for the same `sub` (Core §5.3.4);
- the claims: `sub` is opaque (not the user name) and stable, `preferred_username` and `email`;
- client authentication by client_secret_basic and by client_secret_post, and a wrong secret
  refused with invalid_client;
- a key rotation: `bearerbridge keys rotate` and a restart, after which the SAME relying party,
  whose JWKS was fetched before the rotation, validates an ID token signed with the new key (another
  kid) without fetching the JWKS again: the new key had been published as the "next" one.

The relying party is tests/js/rp.mjs, one node process a client, asked over JSON lines; the
browser's part (login, consent) is driven with requests. The operator's example,
conf/clients/openid-client.mjs, runs too, as a script serving its login and callback: a user
signs in through it end to end. Needs node and `npm ci --prefix tests/js` (which `make test`
runs); skips without them, fails under CI=true.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from .support import Service, free_port, login_and_consent, missing, redirect_params, require_peer

pytestmark = pytest.mark.peer

JS = Path(__file__).parent / "js"
EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "clients" / "openid-client.mjs"
WAIT = 20  # seconds: the bound on each answer of the relying party (its own requests time out at 10)
REDIRECT_URI = "https://rp.example/cb"  # never served: the test reads the final redirect's Location
SCOPE = "openid profile email"
EMAIL = "grace@example.org"


class RelyingParty:
    """tests/js/rp.mjs in a node process: one openid-client Configuration, asked one JSON line at a time."""

    def __init__(self, node: str, log: Path) -> None:
        self.log = log
        self.metadata: dict = {}  # the issuer's, as discovered
        with log.open("w") as stderr:
            self.process = subprocess.Popen([node, str(JS / "rp.mjs")], cwd=JS, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.answers.put(line)
        self.answers.put(None)

    def ask(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        try:
            line = self.answers.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"rp.mjs did not answer {op} within {WAIT}s:\n{self.log.read_text()}") from None
        assert line is not None, f"rp.mjs exited ({self.process.poll()}):\n{self.log.read_text()}"
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()  # the driver ends with its input
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(WAIT)


@dataclass
class Issuer:
    """A bearerbridge of this module's own (the tests rotate its keys and restart it), with one user."""

    service: Service
    username: str
    password: str

    def restart(self) -> None:
        """Stop and start again on the same directory (database, secret), URL and port."""
        self.service.stop()
        port = urlsplit(self.service.url).port
        self.service = Service.start(self.service.directory, url=self.service.url,
                                     listen=[f"tcp:{port}:interface=127.0.0.1"])


@pytest.fixture(scope="module")
def node() -> str:
    """node 20 or later (openid-client's baseline; Debian 12's nodejs is 18) and tests/js's packages."""
    found = require_peer("node")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=WAIT).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        missing(f"openid-client needs node 20 or later, not {version}")
    if not (JS / "node_modules" / "openid-client").is_dir():
        missing("openid-client is not installed: npm ci --prefix tests/js (make test runs it)")
    return found


@pytest.fixture(scope="module")
def issuer(node, tmp_path_factory) -> Issuer:
    service = Service.start(tmp_path_factory.mktemp("oidc"))
    running = Issuer(service, *service.user(email=EMAIL))
    yield running
    running.service.stop()


@pytest.fixture
def start_rp(node, issuer, tmp_path):
    """Start a relying party for a client, discovered with `auth` ("basic" or "post")."""
    started: list[RelyingParty] = []

    def start(client: dict, auth: str, secret: str | None = None, alg: str | None = None) -> RelyingParty:
        rp = RelyingParty(node, tmp_path / f"rp-{len(started)}.log")
        started.append(rp)
        found = rp.ask("discover", issuer=issuer.service.url, client_id=client["client_id"],
                       client_secret=secret or client["client_secret"], auth=auth, id_token_alg=alg)
        assert found["ok"], found
        rp.metadata = found["metadata"]
        return rp

    yield start
    for rp in started:
        rp.close()


def oidc_client(issuer: Issuer, alg: str) -> dict:
    return issuer.service.client("--redirect-uri", REDIRECT_URI, "--scope", SCOPE, "--id-token-alg", alg)


def sign_in(rp: RelyingParty, issuer: Issuer) -> dict:
    """One code flow: openid-client builds the request, requests plays the user, openid-client
    redeems the code, validates the ID token and fetches /userinfo; its answer (or error)."""
    begun = rp.ask("begin", redirect_uri=REDIRECT_URI, scope=SCOPE)
    assert begun["ok"], begun
    with requests.Session() as browser:
        browser.trust_env = False
        final = login_and_consent(browser, issuer.service.url, begun["url"], issuer.username, issuer.password)
    assert "code" in redirect_params(final), final.headers["Location"]
    return rp.ask("finish", callback_url=final.headers["Location"])


def assert_signed_in(result: dict, issuer: Issuer, alg: str) -> None:
    assert result["ok"], result
    assert result["header"]["alg"] == alg and result["header"]["kid"] in result["jwks"]["kids"]
    claims, userinfo = result["claims"], result["userinfo"]
    assert claims["iss"] == issuer.service.url
    assert claims["sub"] and claims["sub"] != issuer.username
    assert userinfo["sub"] == claims["sub"]  # openid-client checked it too
    for found in (claims, userinfo):
        assert found["preferred_username"] == issuer.username
        assert found["email"] == EMAIL and isinstance(found["email_verified"], bool)


def test_discovery_names_the_issuer_its_endpoints_and_algorithms(issuer, start_rp):
    metadata = start_rp(oidc_client(issuer, "ES256"), "basic").metadata
    base = issuer.service.url
    assert metadata["issuer"] == base
    assert (metadata["authorization_endpoint"], metadata["token_endpoint"], metadata["userinfo_endpoint"],
            metadata["jwks_uri"]) == (f"{base}/authorize", f"{base}/token", f"{base}/userinfo", f"{base}/jwks")
    assert {"ES256", "RS256"} <= set(metadata["id_token_signing_alg_values_supported"])
    assert {"client_secret_basic", "client_secret_post", "none"} <= set(
        metadata["token_endpoint_auth_methods_supported"])


def test_es256_and_rs256_clients_sign_in_before_and_after_a_key_rotation(issuer, start_rp):
    clients = {"ES256": (oidc_client(issuer, "ES256"), "basic"), "RS256": (oidc_client(issuer, "RS256"), "post")}
    rps = {alg: start_rp(client, auth, alg=alg) for alg, (client, auth) in clients.items()}
    before = {alg: sign_in(rp, issuer) for alg, rp in rps.items()}
    for alg, result in before.items():
        assert_signed_in(result, issuer, alg)

    issuer.service.cli("keys", "rotate")
    issuer.restart()  # rather than waiting up to 60 s for the running service to see the rotation

    for alg, rp in rps.items():
        after = sign_in(rp, issuer)
        assert_signed_in(after, issuer, alg)
        kid = after["header"]["kid"]
        assert kid != before[alg]["header"]["kid"]
        # the new kid was in the JWKS fetched before the rotation, and that JWKS was not fetched again
        assert kid in before[alg]["jwks"]["kids"]
        assert after["jwks"]["fetched_at"] == before[alg]["jwks"]["fetched_at"]
        assert after["claims"]["sub"] == before[alg]["claims"]["sub"]  # the same user to the same client


def test_a_wrong_client_secret_is_refused_with_invalid_client(issuer, start_rp):
    rp = start_rp(oidc_client(issuer, "ES256"), "basic", secret="not-the-secret")
    result = sign_in(rp, issuer)
    assert not result["ok"] and result["oauth_error"] == "invalid_client", result
    assert result["status"] == 401, result  # RFC 6749 §5.2: the client tried HTTP Basic


def test_a_relying_party_expecting_rs256_refuses_the_es256_token_of_its_client(issuer, start_rp):
    """The algorithm checks above are openid-client's own, not only this test's reading of the header."""
    rp = start_rp(oidc_client(issuer, "ES256"), "basic", alg="RS256")
    result = sign_in(rp, issuer)
    assert not result["ok"] and "alg" in result["cause"], result


@pytest.fixture
def example(node, issuer, tmp_path) -> str:
    """conf/clients/openid-client.mjs run as an operator would, for a new client; its URL."""
    port = free_port()
    redirect_uri = f"http://127.0.0.1:{port}/callback"
    client = issuer.service.client("--redirect-uri", redirect_uri, "--scope", SCOPE)
    # node resolves the example's `import 'openid-client'` from the file's own directory: run a
    # copy beside a link to tests/js's packages.
    script = tmp_path / EXAMPLE.name
    script.write_bytes(EXAMPLE.read_bytes())
    (tmp_path / "node_modules").symlink_to(JS / "node_modules")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ISSUER": issuer.service.url,
           "CLIENT_ID": client["client_id"], "CLIENT_SECRET": client["client_secret"],
           "REDIRECT_URI": redirect_uri, "PORT": str(port)}
    log = tmp_path / "example.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([node, script.name], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], WAIT)
        line = process.stdout.readline() if ready else ""
        url = f"http://127.0.0.1:{port}/"
        assert line.strip() == f"listening on {url}", f"{line!r}; its errors:\n{log.read_text()}"
        yield url
    finally:
        process.terminate()
        process.wait(WAIT)
        process.stdout.close()


def test_the_example_in_conf_clients_signs_a_user_in_end_to_end(issuer, example):
    """conf/clients/openid-client.mjs sends the browser to bearerbridge with PKCE S256, state and a
    nonce, and on the callback shows the ID token's claims it checked and userinfo's answer; its
    state is good for one callback only."""
    url = example
    with requests.Session() as browser:
        browser.trust_env = False
        start = browser.get(url, allow_redirects=False, timeout=WAIT)
        assert start.status_code == 302, start.text
        location = start.headers["Location"]
        assert location.startswith(f"{issuer.service.url}/authorize?"), location
        request = redirect_params(start)
        assert request["code_challenge_method"] == "S256" and request["code_challenge"]
        assert request["nonce"] and request["state"]
        final = login_and_consent(browser, issuer.service.url, location, issuer.username, issuer.password)
        callback = final.headers["Location"]
        assert callback.startswith(f"{url}callback?") and "code" in redirect_params(final), callback

        answer = browser.get(callback, timeout=WAIT)
        again = browser.get(callback, timeout=WAIT)

    assert answer.status_code == 200, answer.text
    claims, userinfo = answer.json()["claims"], answer.json()["userinfo"]
    assert claims["iss"] == issuer.service.url and claims["aud"] in (request["client_id"], [request["client_id"]])
    assert claims["nonce"] == request["nonce"]
    assert claims["sub"] and claims["sub"] != issuer.username and userinfo["sub"] == claims["sub"]
    for found in (claims, userinfo):
        assert found["preferred_username"] == issuer.username and found["email"] == EMAIL
    assert again.status_code == 400 and "state" in again.text
