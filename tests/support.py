"""Helpers shared by the tests: a real running service, peers, and the browser side of OAuth."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from bearerbridge import cli

IN_CI = os.environ.get("CI") == "true"
BIN = Path(sys.executable).parent


def require_peer(*names: str) -> str:
    """The path of the first program found; skip without it, but fail under CI."""
    for name in names:
        found = shutil.which(name) or (Path(name).is_file() and name)
        if found:
            return str(found)
    missing(f"{' or '.join(names)} is not installed (scripts/install-peers installs it)")


def missing(reason: str) -> None:
    """Skip a test that lacks something on a developer's machine; under CI, fail it instead."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def postgres_schema():
    """A URL to a fresh schema of the PostgreSQL in BEARERBRIDGE_TEST_DATABASE_URL, dropped after.

    Skips without the variable, but fails under CI, which must test PostgreSQL."""
    import sqlalchemy as sa

    base = os.environ.get("BEARERBRIDGE_TEST_DATABASE_URL")
    if not base:
        if IN_CI:
            pytest.fail("CI must set BEARERBRIDGE_TEST_DATABASE_URL")
        pytest.skip("BEARERBRIDGE_TEST_DATABASE_URL is not set")
    schema = f"bb_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        # The schema is chosen through the connection's search_path.
        yield sa.engine.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}) \
            .render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # the service is still starting
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


UNTHROTTLED = "".join(f"\n[throttle.{door}]\nfree_failures = 1000000\naccount_block_after = 0\n"
                      "address_block_after = 0\n" for door in ("sign_in", "clients", "sasl"))


@dataclass
class Service:
    """A `twistd -n bearerbridge` process started from a temporary config."""

    directory: Path
    url: str
    config_path: Path
    process: subprocess.Popen | None = None
    verify: str | bool = True
    _names: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, directory: Path, *, url: str | None = None, listen: list[str] | None = None,
              extra: str = "", database_url: str | None = None, verify: str | bool = True,
              deadline: float | None = None, throttled: bool = False) -> Service:
        """A running service. Its throttles are off unless `throttled` (or `extra` sets them): a
        test session fails many logins from 127.0.0.1 on purpose, and would be slowed and blocked."""
        port = free_port()
        url = url or f"http://127.0.0.1:{port}"
        listen = listen or [f"tcp:{port}:interface=127.0.0.1"]
        database_url = database_url or f"sqlite:///{directory / 'bearerbridge.db'}"
        config = directory / "bearerbridge.toml"
        config.write_text(
            f'[server]\nissuer = "{url}"\nsecret_key_file = "{directory / "secret.key"}"\n'
            f'[http]\nlisten = {json.dumps(listen)}\n'
            f'[database]\nurl = "{database_url}"\n' + (f"deadline = {deadline}\n" if deadline else "") + extra
            + ("" if throttled or "[throttle" in extra else UNTHROTTLED))
        service = cls(directory, url, config, verify=verify)
        service.process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(directory / "twistd.log"),
             "bearerbridge", "--config", str(config)], cwd=directory)
        try:
            wait_for(lambda: requests.get(f"{url}/healthz", timeout=2, verify=verify).ok,
                     what="bearerbridge to answer /healthz")
        except BaseException:
            service.stop()
            raise
        return service

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)

    def log(self) -> str:
        return (self.directory / "twistd.log").read_text()

    def cli(self, *args: str, stdin: str = "") -> str:
        """Run `bearerbridge --config ... ARGS` in-process and return its stdout."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                _stdin(io.StringIO(stdin)):
            status = cli.main(["--config", str(self.config_path), *args])
        if status != 0:
            raise CliError(err.getvalue().strip())
        return out.getvalue().strip()

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(4)}"

    def user(self, password: str = "correct horse battery", email: str | None = None) -> tuple[str, str]:
        name = self.unique("user")
        self.cli("user", "add", name, "--password-stdin", *(["--email", email] if email else []),
                 stdin=password + "\n")
        return name, password

    def client(self, *args: str) -> dict:
        return json.loads(self.cli("client", "create", "--name", self.unique("app"), "--json", *args))

    def issue(self, user: str, client_id: str, scope: str, *extra: str) -> str:
        """An access token from `bearerbridge token issue` (extra: e.g. "--ttl", "60"), checked to
        carry exactly `scope`."""
        issued = json.loads(self.cli("token", "issue", "--user", user, f"--client={client_id}", "--scope", scope,
                                     "--json", *extra))
        assert issued["scope"] == scope, issued
        return issued["access_token"]


class CliError(Exception):
    pass


@contextlib.contextmanager
def _stdin(replacement):
    saved, sys.stdin = sys.stdin, replacement
    try:
        yield
    finally:
        sys.stdin = saved


# -- the browser's and the client's side of the code grant ----------------------------------

def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, create_s256_code_challenge(verifier)


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.forms.append({"action": attrs.get("action"), "fields": {}})
        elif tag == "input" and self.forms and attrs.get("name"):
            self.forms[-1]["fields"][attrs["name"]] = attrs.get("value", "")


def form_fields(html: str) -> tuple[str, dict]:
    """The action and the input fields of the page's first form."""
    parser = _Forms()
    parser.feed(html)
    assert parser.forms, f"no form in page: {html[:300]}"
    return parser.forms[0]["action"], parser.forms[0]["fields"]


def authorize_url(base: str, client_id: str, redirect_uri: str, challenge: str | None, scope: str | None = None,
                  state: str = "st-123", **extra: str) -> str:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": state}
    if scope is not None:
        params["scope"] = scope
    if challenge is not None:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    params.update(extra)
    return f"{base}/authorize?{urlencode(params)}"


def redirect_params(response: requests.Response) -> dict[str, str]:
    """The query a redirect sends to the client: 302 after a GET, 303 after a POST (RFC 9700 §4.12)."""
    expected = 303 if response.request.method == "POST" else 302
    assert response.status_code == expected, (response.status_code, response.text[:500])
    return {k: v[0] for k, v in parse_qs(urlsplit(response.headers["Location"]).query).items()}


def login_and_consent(browser: requests.Session, base: str, url: str, username: str, password: str,
                      decision: str = "approve") -> requests.Response:
    """Drive the login and consent forms as a browser would; returns the final redirect (a 302
    when consent was remembered, else the 303 answering the form)."""
    page = browser.get(url, allow_redirects=False)
    if page.status_code == 302:
        return page
    assert page.status_code == 200, page.text
    action, fields = form_fields(page.text)
    if fields.get("step") == "login":
        fields.update(username=username, password=password)
        page = browser.post(base + action, data=fields, allow_redirects=False)
        if page.status_code == 303:
            return page
        assert page.status_code == 200, page.text
        action, fields = form_fields(page.text)
    assert fields.get("step") == "consent", page.text
    return browser.post(base + action, data={**fields, "decision": decision}, allow_redirects=False)


def get_code(service: Service, client: dict, username: str, password: str, scope: str | None = None,
             redirect_uri: str | None = None) -> tuple[str, str]:
    """A fresh authorization code and its PKCE verifier."""
    verifier, challenge = pkce_pair()
    redirect_uri = redirect_uri or client["redirect_uris"][0]
    url = authorize_url(service.url, client["client_id"], redirect_uri, challenge, scope)
    with requests.Session() as browser:
        # REQUESTS_CA_BUNDLE in the environment would override the session's CA otherwise.
        browser.trust_env, browser.verify = False, service.verify
        params = redirect_params(login_and_consent(browser, service.url, url, username, password))
    return params["code"], verifier


def token_request(service: Service, data: dict, client: dict | None = None, basic: bool = True) -> requests.Response:
    auth = None
    data = dict(data)
    if client is not None:
        if client.get("client_secret") and basic:
            auth = (client["client_id"], client["client_secret"])
        else:
            data["client_id"] = client["client_id"]
            if client.get("client_secret"):
                data["client_secret"] = client["client_secret"]
    return requests.post(f"{service.url}/token", data=data, auth=auth, timeout=10, verify=service.verify)


def exchange_code(service: Service, client: dict, code: str, verifier: str,
                  redirect_uri: str = "https://app.example/cb", **kw) -> requests.Response:
    """POST /token with grant_type=authorization_code (see token_request for `kw`)."""
    return token_request(service, {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                   "redirect_uri": redirect_uri}, client, **kw)


def introspect(service: Service, resource_server: dict, token: str, **extra: str) -> dict:
    response = requests.post(f"{service.url}/introspect", data={"token": token, **extra},
                             auth=(resource_server["client_id"], resource_server["client_secret"]),
                             timeout=10, verify=service.verify)
    assert response.status_code == 200, response.text
    return response.json()
