"""bearerbridge-token: its decisions without a network, then the real script against a running bearerbridge."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from twisted.internet import defer

from bearerbridge.client.profile import (
    LOCK_POLL,
    MAX_AGE,
    DamagedProfile,
    Profile,
    ProfileFile,
    ProtocolError,
    apply_token_response,
    check_profile_name,
    config_dir,
    needs_refresh,
)
from bearerbridge.client.protocol import (
    HelperError,
    Refused,
    StrayCallback,
    authorize_url,
    check_callback,
    check_issuer,
    check_metadata,
    check_url,
    choose_flow,
    client_auth,
    discovery_urls,
    login_command,
    parse_device_response,
    pkce_pair,
    poll_decision,
    status_lines,
)

from ..support import BIN, Service, form_fields, free_port, introspect, login_and_consent, token_request
from ..test_tls import self_signed

HELPER = str(BIN / "bearerbridge-token")
ISSUER = "https://auth.example.org"
METADATA = {"issuer": ISSUER, "authorization_endpoint": f"{ISSUER}/authorize", "token_endpoint": f"{ISSUER}/token",
            "revocation_endpoint": f"{ISSUER}/revoke",
            "device_authorization_endpoint": f"{ISSUER}/device_authorization"}
PROFILE = Profile(issuer=ISSUER, client_id="cid", token_endpoint=f"{ISSUER}/token", scope="imap",
                  access_token="AT-secret", expires_at=1000.0, refresh_token="RT-secret", obtained_at=900.0)


# -- discovery and metadata (RFC 8414) -------------------------------------------------------

def test_discovery_urls_put_the_suffix_before_the_issuers_path():
    assert discovery_urls("https://a.example") == [
        "https://a.example/.well-known/oauth-authorization-server", "https://a.example/.well-known/openid-configuration"]
    assert discovery_urls("https://a.example:8443/tenant/") == [
        "https://a.example:8443/.well-known/oauth-authorization-server/tenant",
        "https://a.example:8443/tenant/.well-known/openid-configuration"]


def test_issuer_and_endpoints_must_use_tls_except_on_loopback():
    for ok in ("https://a.example", "http://127.0.0.1:8080", "http://[::1]:80/x", "http://localhost:1"):
        assert check_url(ok, "x") == ok
    for bad in ("http://a.example", "ftp://a.example", "https:///nohost", "a.example"):
        with pytest.raises(HelperError):
            check_url(bad, "x")
    with pytest.raises(HelperError, match="query or fragment"):
        check_issuer("https://a.example/?tenant=1")


def test_metadata_must_name_the_issuer_and_the_endpoints_the_flow_needs():
    assert check_metadata(ISSUER + "/", METADATA, "browser") is METADATA  # a trailing slash is tolerated
    with pytest.raises(HelperError, match="names the issuer"):
        check_metadata("https://evil.example", METADATA, "browser")
    without_device = {k: v for k, v in METADATA.items() if k != "device_authorization_endpoint"}
    with pytest.raises(HelperError, match="try --browser"):
        check_metadata(ISSUER, without_device, "device")
    with pytest.raises(HelperError, match="https"):
        check_metadata(ISSUER, {**METADATA, "token_endpoint": "http://auth.example.org/token"}, "browser")
    with pytest.raises(ProtocolError):
        check_metadata(ISSUER, ["not", "a", "dict"], "browser")


def test_the_device_grant_is_chosen_only_without_a_display_and_when_offered():
    assert choose_flow("browser", METADATA, {}) == "browser"
    assert choose_flow(None, METADATA, {}, platform="linux") == "device"
    assert choose_flow(None, METADATA, {"DISPLAY": ":0"}, platform="linux") == "browser"
    assert choose_flow(None, METADATA, {}, platform="darwin") == "browser"
    assert choose_flow(None, {"issuer": ISSUER}, {}, platform="linux") == "browser"


# -- the code grant: PKCE and the loopback answer ---------------------------------------------

def test_s256_matches_rfc7636_appendix_b():
    s256 = create_s256_code_challenge  # authlib's, which the helper uses
    assert s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128 and challenge == s256(verifier) and pkce_pair()[0] != verifier


def test_authorize_url_keeps_the_endpoints_query():
    url = authorize_url("https://a.example/authorize?tenant=1", "cid", "http://127.0.0.1:5/callback", "imap smtp",
                        "st", "ch")
    assert url.startswith("https://a.example/authorize?tenant=1&response_type=code&client_id=cid&")
    assert "scope=imap+smtp" in url and "code_challenge_method=S256" in url
    assert "scope=" not in authorize_url("https://a.example/authorize", "cid", "r", None, "st", "ch")


def test_the_callback_checks_state_then_iss_then_error():
    answer = {"code": "C", "state": "st", "iss": ISSUER}
    assert check_callback(answer, "st", ISSUER, iss_required=True) == "C"
    assert check_callback({"code": "C", "state": "st"}, "st", ISSUER, iss_required=False) == "C"
    for stray in ({**answer, "state": "other"}, {"code": "C"}):
        with pytest.raises(StrayCallback):  # not ours: the listener keeps waiting
            check_callback(stray, "st", ISSUER, iss_required=True)
    with pytest.raises(HelperError, match="mix-up"):
        check_callback({**answer, "iss": "https://evil.example"}, "st", ISSUER, iss_required=False)
    with pytest.raises(HelperError, match="lacks the iss"):
        check_callback({"code": "C", "state": "st"}, "st", ISSUER, iss_required=True)
    with pytest.raises(HelperError, match="denied"):
        check_callback({"error": "access_denied", "state": "st", "iss": ISSUER}, "st", ISSUER, iss_required=True)
    with pytest.raises(HelperError, match="unreadable"):
        check_callback({"error": "\x1b[31mred", "state": "st"}, "st", ISSUER, iss_required=False)


# -- the device grant (RFC 8628) -------------------------------------------------------------

def test_device_response_needs_its_fields_and_defaults_the_interval():
    grant = parse_device_response({"device_code": "D", "user_code": "BCDF-GHJK", "verification_uri": "https://a/device",
                                   "expires_in": 900})
    assert grant.interval == 5 and grant.verification_uri_complete is None
    for bad in ({"device_code": "D", "user_code": "U", "expires_in": 900},
                {"device_code": "D", "user_code": "U", "verification_uri": "v", "expires_in": "900"},
                {"device_code": "D", "user_code": "U", "verification_uri": "v", "expires_in": 9, "interval": 0}):
        with pytest.raises(ProtocolError):
            parse_device_response(bad)


def test_polling_waits_slows_down_and_stops():
    assert poll_decision("authorization_pending", 5) == 5
    assert poll_decision("slow_down", 5) == 10
    with pytest.raises(HelperError, match="denied"):
        poll_decision("access_denied", 5)
    with pytest.raises(HelperError, match="expired"):
        poll_decision("expired_token", 5)
    with pytest.raises(HelperError, match="invalid_client"):
        poll_decision("invalid_client", 5)


# -- tokens and what is kept -----------------------------------------------------------------

def test_refresh_when_missing_or_expiring_within_a_minute():
    assert not needs_refresh(PROFILE, now=939)
    assert needs_refresh(PROFILE, now=941)
    assert needs_refresh(Profile(ISSUER, "cid", "t"), now=0)  # no access token
    unknown = Profile(ISSUER, "cid", "t", access_token="A", refresh_token="R")
    assert needs_refresh(unknown, now=0)  # no lifetime given: refresh while we can
    assert not needs_refresh(Profile(ISSUER, "cid", "t", access_token="A"), now=0)


def test_refresh_when_older_than_max_age_to_learn_whether_the_login_still_stands():
    """A revoked login is noticed at the first print MAX_AGE (300) seconds after the token came."""
    assert MAX_AGE == 300
    young = dataclasses.replace(PROFILE, expires_at=5000.0)
    assert not needs_refresh(young, now=900 + MAX_AGE - 1)
    assert needs_refresh(young, now=900 + MAX_AGE)
    assert needs_refresh(young, now=899)  # the clock went back: its age is unknown
    assert not needs_refresh(young, now=1000, max_age=3600) and needs_refresh(young, now=1000, max_age=0)
    assert needs_refresh(dataclasses.replace(young, obtained_at=None), now=900)  # a profile from before
    # without a refresh token there is nothing to ask with: the token serves until it expires
    assert not needs_refresh(dataclasses.replace(young, refresh_token=None), now=4000)
    assert not needs_refresh(dataclasses.replace(young, refresh_token=None, obtained_at=None), now=4000)


def test_a_token_response_rotates_or_keeps_the_refresh_token():
    rotated = apply_token_response(PROFILE, {"access_token": "A2", "token_type": "bearer", "expires_in": 3600,
                                             "refresh_token": "R2", "scope": "smtp"}, requested_at=5000)
    assert (rotated.access_token, rotated.refresh_token, rotated.expires_at, rotated.scope) == (
        "A2", "R2", 8600, "smtp")
    assert rotated.obtained_at == 5000 and rotated.without_tokens().obtained_at is None
    kept = apply_token_response(PROFILE, {"access_token": "A2", "token_type": "Bearer"}, requested_at=5000)
    assert kept.refresh_token == "RT-secret" and kept.scope == "imap" and kept.expires_at is None
    asked = apply_token_response(Profile(ISSUER, "cid", "t"), {"access_token": "A", "token_type": "Bearer"}, 0, "smtp")
    assert asked.scope == "smtp"  # RFC 6749 §5.1: no scope in the reply means the one requested
    for bad in ({"token_type": "Bearer"}, {"access_token": "A", "token_type": "mac"},
                {"access_token": "A", "token_type": "Bearer", "expires_in": "soon"}, "not json"):
        with pytest.raises(ProtocolError) as caught:
            apply_token_response(PROFILE, bad, 0)
        assert "A" not in str(caught.value).replace("A JSON", "")  # the reply is never quoted


def test_errors_quote_only_the_error_fields_never_the_body():
    refusal = Refused("the token endpoint", 400, {"error": "invalid_grant",
                                                  "error_description": "Refresh token is gone",
                                                  "refresh_token": "RT-secret"})
    assert refusal.error == "invalid_grant"
    assert str(refusal) == "the token endpoint refused the request (HTTP 400, invalid_grant: Refresh token is gone)"
    assert Refused("x", 502, None).error is None and "RT" not in str(Refused("x", 500, {"error": "RT-secret\n"}))


def test_client_auth_is_none_or_client_secret_post():
    assert client_auth(PROFILE) == {"client_id": "cid"}
    confidential = Profile(ISSUER, "cid", "t", client_secret="s3")
    assert client_auth(confidential) == {"client_id": "cid", "client_secret": "s3"}


def test_status_never_shows_a_token_and_the_hint_says_how_to_log_in():
    text = "\n".join(status_lines("work", PROFILE, now=400))
    assert "secret" not in text
    assert "issuer: https://auth.example.org" in text and "scope: imap" in text and "(in 600 s)" in text
    assert "refresh token: held" in text
    assert login_command("work", PROFILE) == ("bearerbridge-token login --issuer https://auth.example.org "
                                              "--client-id cid --scope imap --profile work")
    assert login_command("default", None) == "bearerbridge-token login --issuer URL --client-id ID"


# -- the profile file ------------------------------------------------------------------------

def test_config_dir_follows_xdg():
    assert config_dir({"XDG_CONFIG_HOME": "/x/conf", "HOME": "/h"}) == Path("/x/conf/bearerbridge-token")
    assert config_dir({"XDG_CONFIG_HOME": "", "HOME": "/h"}) == Path("/h/.config/bearerbridge-token")
    assert config_dir({"XDG_CONFIG_HOME": "relative", "HOME": "/h"}) == Path("/h/.config/bearerbridge-token")


def test_profile_names_are_plain_file_names():
    assert check_profile_name("work-mail.2") == "work-mail.2"
    for bad in ("", ".hidden", "../x", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            check_profile_name(bad)


def test_profiles_are_written_atomically_0600_in_a_0700_directory(tmp_path):
    directory = tmp_path / "conf" / "bearerbridge-token"
    directory.mkdir(parents=True, mode=0o755)
    store = ProfileFile(directory, "default")
    assert store.load() is None
    store.save(PROFILE)
    assert store.load() == PROFILE
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # tightened
    store.save(PROFILE.without_tokens())
    assert sorted(p.name for p in directory.iterdir()) == ["default.json"]  # no temp file left
    assert store.load().refresh_token is None
    store.path.write_text("{not json")
    with pytest.raises(DamagedProfile):
        store.load()


def test_the_lock_is_exclusive_and_is_waited_for_without_blocking(tmp_path):
    store = ProfileFile(tmp_path, "default")
    store.ensure_directory()
    other = os.open(store.lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # another process in the middle of a refresh
    pauses = []

    async def pause(seconds):  # the event loop's sleep: here, count the waits, then let go
        pauses.append(seconds)
        if len(pauses) == 3:
            os.close(other)

    async def hold():
        async with store.locked(pause):
            fd = os.open(store.lock_path, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)

    done = defer.ensureDeferred(hold())
    assert done.called and done.result is None and pauses == [LOCK_POLL] * 3
    fd = os.open(store.lock_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    os.close(fd)


def test_a_profile_that_is_not_an_object_is_damaged(tmp_path):
    store = ProfileFile(tmp_path, "default")
    store.ensure_directory()
    store.path.write_text("[]")
    with pytest.raises(DamagedProfile):
        store.load()


# -- the real script against a running bearerbridge ------------------------------------------

def helper_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    return {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config")}


def helper(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([HELPER, *args], env=helper_env(home), capture_output=True, text=True, timeout=timeout)


def stored(home: Path, profile: str = "default") -> dict:
    return json.loads((home / "config" / "bearerbridge-token" / f"{profile}.json").read_text())


def browser_login(service: Service, home: Path, client: dict, username: str, password: str, *extra: str,
                  decision: str = "approve") -> subprocess.CompletedProcess:
    """Run `login --browser` and play the browser: read the URL it prints, sign in, consent, and
    follow the redirect to its loopback listener."""
    args = [HELPER, "login", "--browser", "--issuer", service.url, "--client-id", client["client_id"], *extra]
    process = subprocess.Popen(args, env=helper_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not (seen and seen[-1].startswith(("http://", "https://"))):
            line = process.stderr.readline()
            assert line, f"the helper ended before printing the URL: {''.join(seen)}"
            seen.append(line)
        with requests.Session() as browser:
            browser.trust_env, browser.verify = False, service.verify
            answer = login_and_consent(browser, service.url, seen[-1].strip(), username, password, decision)
            assert answer.status_code == 303, answer.text
            assert answer.headers["Location"].startswith("http://127.0.0.1:")
            page = browser.get(answer.headers["Location"], timeout=10)
            assert page.headers["Cache-Control"] == "no-store"
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(args, process.returncode, out, "".join(seen) + err)


def device_login(service: Service, home: Path, client: dict, username: str, password: str, *extra: str,
                 decision: str = "approve") -> subprocess.CompletedProcess:
    """Run `login` for the device grant and play the user: read the code it shows, sign in on the
    verification page (RFC 8628 §3.3), and decide."""
    args = [HELPER, "login", "--issuer", service.url, "--client-id", client["client_id"], *extra]
    process = subprocess.Popen(args, env=helper_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not (seen and "waiting for the approval" in seen[-1]):
            line = process.stderr.readline()
            assert line, f"the helper ended before showing the code: {''.join(seen)}"
            seen.append(line)
        shown = "".join(seen)
        assert f"visit {service.url}/device\n" in shown
        user_code = shown.split("enter the code ")[1].split()[0]
        complete = shown.split("or open ")[1].split()[0]
        assert complete.startswith(f"{service.url}/device") and user_code in complete
        with requests.Session() as browser:
            page = browser.get(complete)
            action, fields = form_fields(page.text)
            page = browser.post(service.url + action, data={**fields, "username": username, "password": password})
            action, fields = form_fields(page.text)
            assert fields["user_code"] == user_code
            page = browser.post(service.url + action, data=fields)
            action, fields = form_fields(page.text)
            assert fields.get("step") == "consent", page.text
            browser.post(service.url + action, data={**fields, "decision": decision})
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(args, process.returncode, out, shown + err)


@pytest.fixture(scope="module")
def short_service(tmp_path_factory):
    """Access tokens live 2 s, so every `print` refreshes."""
    running = Service.start(tmp_path_factory.mktemp("short"), extra="[tokens]\naccess_ttl = 2\n")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls-token")
    key, cert = self_signed(directory)
    port = free_port()
    running = Service.start(directory, url=f"https://127.0.0.1:{port}", verify=str(cert),
                            listen=[f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"])
    yield running
    running.stop()


def public_client(service: Service) -> dict:
    return service.client("--public", "--redirect-uri", "http://127.0.0.1/callback", "--scope", "imap smtp")


def test_browser_login_print_and_status(service, native_client, resource_server, tmp_path):
    username, password = service.user()
    login = browser_login(service, tmp_path, native_client, username, password, "--scope", "imap")
    assert login.returncode == 0, login.stderr
    assert login.stdout == "" and "logged in" in login.stderr
    directory = tmp_path / "config" / "bearerbridge-token"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "default.json").stat().st_mode) == 0o600
    saved = stored(tmp_path)
    assert saved["issuer"] == service.url and saved["client_id"] == native_client["client_id"]
    assert saved["token_endpoint"] == f"{service.url}/token" and saved["revocation_endpoint"] == f"{service.url}/revoke"
    assert saved["scope"] == "imap" and saved["refresh_token"] and saved["client_secret"] is None

    printed = helper(tmp_path, "print")
    assert printed.returncode == 0 and printed.stderr == ""
    assert printed.stdout == saved["access_token"] + "\n"  # valid for an hour: no refresh
    claims = introspect(service, resource_server, printed.stdout.strip())
    assert claims["active"] and claims["username"] == username and claims["scope"] == "imap"
    assert helper(tmp_path, "print").stdout == printed.stdout

    status = helper(tmp_path, "status")
    assert status.returncode == 0
    assert f"issuer: {service.url}" in status.stdout
    assert f"client: {native_client['client_id']} (public)" in status.stdout
    assert "scope: imap" in status.stdout and "refresh token: held" in status.stdout
    assert "access token: expires" in status.stdout
    for output in (login.stderr, status.stdout, status.stderr):
        assert saved["access_token"] not in output and saved["refresh_token"] not in output


def test_a_denied_login_stores_nothing(service, native_client, tmp_path):
    username, password = service.user()
    login = browser_login(service, tmp_path, native_client, username, password, decision="deny")
    assert login.returncode == 1 and "access was denied" in login.stderr
    assert not (tmp_path / "config" / "bearerbridge-token" / "default.json").exists()


def test_print_without_a_login_says_how_to_log_in(tmp_path):
    for command in ("print", "status"):
        result = helper(tmp_path, command, "--profile", "work")
        assert result.returncode == 3 and result.stdout == ""
        assert result.stderr == ("bearerbridge-token: no login under profile 'work'; run: "
                                 "bearerbridge-token login --issuer URL --client-id ID --profile work\n")


def test_print_refreshes_an_expiring_token_and_keeps_the_rotated_refresh_token(short_service, tmp_path):
    service = short_service
    client = public_client(service)
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    username, password = service.user()
    assert browser_login(service, tmp_path, client, username, password).returncode == 0
    before = stored(tmp_path)
    for _ in range(2):
        printed = helper(tmp_path, "print")
        assert printed.returncode == 0, printed.stderr
        after = stored(tmp_path)
        assert printed.stdout == after["access_token"] + "\n" != before["access_token"] + "\n"
        assert after["refresh_token"] != before["refresh_token"]  # rotated, and saved
        assert introspect(service, resource_server, after["access_token"])["active"]
        before = after


def test_concurrent_prints_never_replay_a_refresh_token(short_service, tmp_path):
    service = short_service
    client = public_client(service)
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    username, password = service.user()
    assert browser_login(service, tmp_path, client, username, password).returncode == 0
    processes = [subprocess.Popen([HELPER, "print"], env=helper_env(tmp_path), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.communicate(timeout=60), p.returncode) for p in processes]
    for (out, err), code in results:
        assert code == 0 and err == "" and len(out.strip()) >= 43, err
    # a replayed refresh token would have revoked the chain (RFC 9700 §4.14.2): it still works
    last = helper(tmp_path, "print")
    assert last.returncode == 0, last.stderr
    assert introspect(service, resource_server, last.stdout.strip())["active"]


def test_a_revoked_refresh_token_asks_for_a_new_login(short_service, tmp_path):
    service = short_service
    client = public_client(service)
    username, password = service.user()
    assert browser_login(service, tmp_path, client, username, password, "--profile", "mail").returncode == 0
    service.cli("token", "revoke", stored(tmp_path, "mail")["refresh_token"])
    result = helper(tmp_path, "print", "--profile", "mail")
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr == ("bearerbridge-token: the login has expired or was revoked; run: bearerbridge-token "
                             f"login --issuer {service.url} --client-id {client['client_id']} "
                             '--scope "imap smtp" --profile mail\n')
    assert stored(tmp_path, "mail")["refresh_token"] is None  # the dead token is not sent again
    assert "refresh token: none" in helper(tmp_path, "status", "--profile", "mail").stdout
    again = helper(tmp_path, "print", "--profile", "mail")
    assert again.returncode == 3 and again.stdout == "" and "run: bearerbridge-token login" in again.stderr


def test_print_notices_a_revoked_login_once_the_token_is_older_than_max_age(service, native_client, tmp_path):
    """Access tokens live an hour here; within --max-age print trusts the one it holds, after it
    asks the server (a refresh), which refuses a login revoked meanwhile: exit 3, log in again."""
    username, password = service.user()
    assert browser_login(service, tmp_path, native_client, username, password).returncode == 0
    held = stored(tmp_path)
    asked = helper(tmp_path, "print", "--max-age", "0")  # older than 0 s: refreshed, the login stands
    assert asked.returncode == 0 and asked.stdout.strip() != held["access_token"], asked.stderr
    assert stored(tmp_path)["refresh_token"] != held["refresh_token"]
    service.cli("token", "revoke", "--user", username)
    within = helper(tmp_path, "print", "--max-age", "3600")
    assert within.returncode == 0 and within.stdout == asked.stdout  # within the bound: not noticed yet
    time.sleep(1.1)
    after = helper(tmp_path, "print", "--max-age", "1")
    assert after.returncode == 3 and after.stdout == ""
    assert after.stderr == ("bearerbridge-token: the login has expired or was revoked; run: bearerbridge-token "
                            f"login --issuer {service.url} --client-id {native_client['client_id']} "
                            '--scope "imap smtp"\n')
    assert stored(tmp_path)["refresh_token"] is None


def test_print_documents_its_bound_and_refuses_a_bad_max_age(tmp_path):
    usage = helper(tmp_path, "print", "--help")
    assert usage.returncode == 0
    assert "--max-age SECONDS" in usage.stdout and "(default: 300;" in usage.stdout
    assert "revoked" in usage.stdout and "exits 3" in usage.stdout
    for bad in ("-1", "soon", "inf", "nan"):
        refused = helper(tmp_path, "print", "--max-age", bad)
        assert refused.returncode == 2 and "is not a number of seconds" in refused.stderr and refused.stdout == ""


def test_logout_revokes_at_the_server(service, native_client, resource_server, tmp_path):
    username, password = service.user()
    assert browser_login(service, tmp_path, native_client, username, password).returncode == 0
    saved = stored(tmp_path)
    result = helper(tmp_path, "logout")
    assert result.returncode == 0 and "revoked" in result.stderr, result.stderr
    assert not (tmp_path / "config" / "bearerbridge-token" / "default.json").exists()
    assert introspect(service, resource_server, saved["access_token"]) == {"active": False}
    refused = token_request(service, {"grant_type": "refresh_token", "refresh_token": saved["refresh_token"]},
                            native_client)
    assert refused.json()["error"] == "invalid_grant"
    assert helper(tmp_path, "logout").returncode == 0  # nothing left to do


def test_a_new_login_revokes_the_one_it_replaces(service, native_client, resource_server, tmp_path):
    username, password = service.user()
    assert browser_login(service, tmp_path, native_client, username, password).returncode == 0
    first = stored(tmp_path)
    assert browser_login(service, tmp_path, native_client, username, password).returncode == 0
    assert introspect(service, resource_server, first["access_token"]) == {"active": False}
    assert introspect(service, resource_server, stored(tmp_path)["access_token"])["active"]


def test_a_confidential_client_uses_client_secret_post_and_a_fixed_port(service, resource_server, tmp_path):
    port = free_port()
    client = service.client("--redirect-uri", f"http://127.0.0.1:{port}/callback", "--scope", "smtp")
    username, password = service.user()
    login = browser_login(service, tmp_path, client, username, password, "--client-secret", client["client_secret"],
                          "--port", str(port))
    assert login.returncode == 0, login.stderr
    assert client["client_secret"] not in login.stderr
    token = helper(tmp_path, "print").stdout.strip()
    assert introspect(service, resource_server, token)["client_id"] == client["client_id"]
    assert "(with a client secret)" in helper(tmp_path, "status").stdout
    assert helper(tmp_path, "logout").returncode == 0
    assert introspect(service, resource_server, token) == {"active": False}


def test_tls_with_a_private_ca(tls_service, tmp_path):
    service = tls_service
    client = public_client(service)
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    username, password = service.user()
    ca_file = service.verify
    login = browser_login(service, tmp_path, client, username, password, "--ca-file", ca_file)
    assert login.returncode == 0, login.stderr
    assert stored(tmp_path)["ca_file"] == ca_file
    printed = helper(tmp_path, "print")  # the CA file is remembered
    assert printed.returncode == 0, printed.stderr
    assert introspect(service, resource_server, printed.stdout.strip())["active"]
    assert f"CA file: {ca_file}" in helper(tmp_path, "status").stdout
    assert helper(tmp_path, "logout").returncode == 0


def test_tls_refuses_an_untrusted_certificate_or_another_name(tls_service, tmp_path):
    service = tls_service
    client = public_client(service)
    refused = helper(tmp_path, "login", "--browser", "--issuer", service.url, "--client-id", client["client_id"])
    assert refused.returncode == 1 and "certificate is not trusted" in refused.stderr, refused.stderr
    port = service.url.rsplit(":", 1)[1]
    wrong_name = helper(tmp_path, "login", "--browser", "--issuer", f"https://localhost:{port}",
                        "--client-id", client["client_id"], "--ca-file", service.verify)
    assert wrong_name.returncode == 1 and "not for this host name" in wrong_name.stderr, wrong_name.stderr
    assert not (tmp_path / "config" / "bearerbridge-token" / "default.json").exists()


def test_plain_http_is_refused_off_loopback(tmp_path):
    result = helper(tmp_path, "login", "--issuer", "http://auth.example.org", "--client-id", "x")
    assert result.returncode == 1 and "must be an https URL" in result.stderr


def device_client(service: Service) -> dict:
    return service.client("--public", "--grant", "device_code", "--grant", "refresh_token", "--scope", "imap smtp")


def test_device_login_then_print(service, resource_server, tmp_path):
    client = device_client(service)
    username, password = service.user()
    login = device_login(service, tmp_path, client, username, password, "--device", "--scope", "imap")
    assert login.returncode == 0, login.stderr
    assert login.stdout == "" and "logged in" in login.stderr
    saved = stored(tmp_path)
    assert saved["scope"] == "imap" and saved["refresh_token"]
    assert saved["access_token"] not in login.stderr and saved["refresh_token"] not in login.stderr
    printed = helper(tmp_path, "print")
    assert printed.returncode == 0 and printed.stdout == saved["access_token"] + "\n"
    assert introspect(service, resource_server, saved["access_token"])["username"] == username


def test_device_login_is_the_default_without_a_display_and_stops_when_denied(service, tmp_path):
    client = device_client(service)
    username, password = service.user()
    login = device_login(service, tmp_path, client, username, password, decision="deny")
    assert login.returncode == 1 and login.stderr.endswith("bearerbridge-token: access was denied at the server\n")
    assert not (tmp_path / "config" / "bearerbridge-token" / "default.json").exists()


def test_an_unreachable_server_is_a_passing_failure_that_keeps_the_tokens(tmp_path):
    port = free_port()  # nothing listens there
    store = ProfileFile(tmp_path / "config" / "bearerbridge-token", "default")
    expired = Profile(f"http://127.0.0.1:{port}", "cid", f"http://127.0.0.1:{port}/token", access_token="AT-old",
                      expires_at=1.0, refresh_token="RT-keep")
    store.save(expired)
    result = helper(tmp_path, "print")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"bearerbridge-token: could not reach http://127.0.0.1:{port}/token: ")
    assert "RT-keep" not in result.stderr and store.load() == expired  # worth trying again later
    store.path.write_text("{damaged")
    damaged = helper(tmp_path, "print")
    assert damaged.returncode == 3 and damaged.stdout == "" and "is damaged" in damaged.stderr
