"""WebDAV through a real nginx whose every request bearerbridge decides (auth_request to GET
/forward-auth), with conf/nginx/webdav.conf as the server block; the clients are `requests`, a
real rclone configured from conf/rclone/rclone.conf, and, for the issue's "done when", rclone
taking its tokens from `bearerbridge-token` after a device-grant login.

bearerbridge runs with its default [forward_auth] rule: reading methods need webdav:read, all
others webdav:write. Needs Debian's nginx, libnginx-mod-http-dav-ext and rclone
(scripts/install-peers); skips without them locally and fails under CI=true.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from .peers import CONF, log_since, log_size
from .peers_web import DAV_EXT_MODULE, NGINX, Nginx, start_nginx
from .support import BIN, Service, missing, require_peer
from .test_device import user_enters_code

pytestmark = pytest.mark.peer

WAIT = 10  # seconds: the bound on every HTTP exchange
RCLONE_TIMEOUT = 60  # seconds for one rclone command, killed with its process group after
# On a failed upload rclone retries DELETE, MKCOL and PUT, for minutes with its defaults.
RCLONE_BOUNDS = ("--retries", "1", "--low-level-retries", "1", "--timeout", "10s", "--contimeout", "5s")
LOGIN_TIMEOUT = 60  # seconds for `bearerbridge-token login --device` to print its code, then to finish
RCLONE_SNIPPET = CONF / "rclone" / "rclone.conf"
HELPER = BIN / "bearerbridge-token"
REALM = 'Bearer realm="bearerbridge"'
BOTH = "webdav:read webdav:write"


@dataclass
class Stack:
    """bearerbridge, and nginx serving a WebDAV share in front of it."""

    service: Service
    nginx: Nginx

    def logs(self) -> dict[str, Path]:
        return {"bearerbridge": self.service.directory / "twistd.log", "nginx error log": self.nginx.error_log_path,
                "nginx access log": self.nginx.access_log_path}

    def stop(self) -> None:
        try:
            self.nginx.stop()
        finally:
            self.service.stop()


def start_stack(directory: Path, extra: str = "") -> Stack:
    require_peer("nginx", NGINX)
    require_peer(str(DAV_EXT_MODULE))
    require_peer("rclone")
    (directory / "bearerbridge").mkdir(parents=True)
    service = Service.start(directory / "bearerbridge", extra=extra)
    try:
        nginx = start_nginx(directory / "nginx", service.url)
    except BaseException:
        service.stop()
        raise
    return Stack(service, nginx)


def no_process_left(directory: Path) -> None:
    """No nginx, rclone, twistd or helper whose command line names the stack's directory."""
    left = subprocess.run(["pgrep", "-a", "-f", str(directory)], capture_output=True, text=True, timeout=WAIT)
    assert left.stdout == "", f"processes left behind:\n{left.stdout}"


@pytest.fixture(scope="module")
def dav(tmp_path_factory) -> Stack:
    top = tmp_path_factory.mktemp("webdav")
    stack = start_stack(top)
    try:
        yield stack
    finally:
        stack.stop()
        no_process_left(top)


@pytest.fixture(scope="module")
def people(dav):
    """A user, and `token(scope)` issuing them a token for an app."""
    service = dav.service
    name, _ = service.user()
    app = service.client("--redirect-uri", "https://app.example/cb", "--scope", BOTH)

    def token(scope: str) -> str:
        return service.issue(name, app["client_id"], scope)
    return name, token


@pytest.fixture(autouse=True)
def peer_logs(request):
    """Print what each program logged during the test; pytest shows it only when the test fails."""
    if "dav" not in request.fixturenames:
        yield
        return
    stack = request.getfixturevalue("dav")
    offsets = {name: log_size(path) for name, path in stack.logs().items()}
    yield
    print_logs(stack, offsets)


def print_logs(stack: Stack, offsets: dict[str, int] | None = None) -> None:
    for name, path in stack.logs().items():
        print(f"----- {name} ({path}) -----\n{log_since(path, (offsets or {}).get(name, 0))}")


def dav_request(stack: Stack, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if method == "PROPFIND":
        headers.setdefault("Depth", "1")
    return requests.request(method, stack.nginx.url + path, headers=headers, timeout=WAIT, **kwargs)


def challenges(response: requests.Response) -> list[str]:
    """Every WWW-Authenticate header of the response, unmerged."""
    return response.raw.headers.getlist("WWW-Authenticate")


# -- WebDAV with requests ---------------------------------------------------------------------

def test_a_read_write_token_reads_and_writes(dav, people):
    name, token = people
    both = token(BOTH)
    put = dav_request(dav, "PUT", "/notes/2024/a.txt", both, data=b"hello over WebDAV\n")
    assert put.status_code == 201, put.text
    assert (dav.nginx.share / "notes" / "2024" / "a.txt").read_bytes() == b"hello over WebDAV\n"
    got = dav_request(dav, "GET", "/notes/2024/a.txt", both)
    assert (got.status_code, got.content) == (200, b"hello over WebDAV\n")
    listing = dav_request(dav, "PROPFIND", "/notes/2024/", both)
    assert listing.status_code == 207 and "/notes/2024/a.txt" in listing.text, listing.text
    assert challenges(listing) == []
    assert dav_request(dav, "MKCOL", "/notes/empty/", both).status_code == 201
    assert (dav.nginx.share / "notes" / "empty").is_dir()
    moved = dav_request(dav, "MOVE", "/notes/2024/a.txt", both,
                        headers={"Destination": dav.nginx.url + "/notes/b.txt"})
    assert moved.status_code in (201, 204), moved.text
    assert dav_request(dav, "DELETE", "/notes/b.txt", both).status_code == 204
    assert not (dav.nginx.share / "notes" / "b.txt").exists()
    options = dav_request(dav, "OPTIONS", "/", both)
    assert options.status_code == 200 and "PROPFIND" in options.headers.get("Allow", ""), options.headers
    # nginx logs the user bearerbridge named in X-Auth-User (auth_request_set $auth_user).
    assert f'127.0.0.1 {name} [' in dav.nginx.access_log_path.read_text()


def test_a_read_only_token_reads_but_may_not_write(dav, people):
    read_only = people[1]("webdav:read")
    (dav.nginx.share / "shelf").mkdir()
    (dav.nginx.share / "shelf" / "book.txt").write_text("to read\n")
    listing = dav_request(dav, "PROPFIND", "/shelf/", read_only)
    assert listing.status_code == 207 and "/shelf/book.txt" in listing.text, listing.text
    assert dav_request(dav, "GET", "/shelf/book.txt", read_only).text == "to read\n"
    for method, path in (("PUT", "/shelf/new.txt"), ("DELETE", "/shelf/book.txt"), ("MKCOL", "/shelf/sub/")):
        refused = dav_request(dav, method, path, read_only, data=b"no" if method == "PUT" else None)
        assert refused.status_code == 403, (method, refused.status_code, refused.text)
        # The RFC 6750 challenge reaches the client, once (the map in webdav.conf).
        assert challenges(refused) == [f'{REALM}, error="insufficient_scope", scope="webdav:write"'], method
    assert sorted(p.name for p in (dav.nginx.share / "shelf").iterdir()) == ["book.txt"]


def test_no_token_gets_the_bearer_challenge(dav):
    for method in ("PROPFIND", "GET", "PUT"):
        response = dav_request(dav, method, "/", data=b"x" if method == "PUT" else None)
        assert response.status_code == 401, (method, response.status_code)
        # auth_request copies bearerbridge's challenge on a 401 itself: exactly once.
        assert challenges(response) == [REALM], method


def test_a_bad_token_is_an_invalid_token(dav):
    response = dav_request(dav, "PROPFIND", "/", "not-a-token-anyone-issued")
    assert response.status_code == 401
    assert challenges(response) == [f'{REALM}, error="invalid_token"']
    basic = dav_request(dav, "GET", "/", headers={"Authorization": "Basic Ym9iOnNlY3JldA=="})
    assert basic.status_code == 401  # the default rule takes bearer tokens only


def test_the_client_cannot_steer_the_decision(dav, people):
    """A client's own X-Original-*/X-Forwarded-* headers (nginx passes every client header to the
    subrequest) do not change what bearerbridge is asked about."""
    read_only = people[1]("webdav:read")
    forged = {"X-Original-Method": "GET", "X-Forwarded-Method": "GET", "X-Original-URI": "/",
              "X-Forwarded-Uri": "/", "X-Forwarded-Host": "elsewhere.example"}
    refused = dav_request(dav, "PUT", "/forged.txt", read_only, data=b"x", headers=forged)
    assert refused.status_code == 403
    assert not (dav.nginx.share / "forged.txt").exists()
    # and the subrequest's location is internal
    assert dav_request(dav, "GET", "/_bearerbridge", read_only).status_code == 404


def raw_request(stack: Stack, method: str, target: str, token: str | None = None,
                headers: dict | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    """A request with `target` sent exactly as written (requests would normalize it)."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.nginx.port, timeout=WAIT)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# URIs whose path nginx normalizes into another one: webdav.conf refuses them (400).
PATH_TRICKS = ("/public/../private/secret.txt", "/public/%2e%2E/private/secret.txt", "//private/secret.txt",
               "/public//../private/secret.txt", "/%70rivate/secret.txt", "/pub%6Cic/../private/secret.txt",
               "/private%2fsecret.txt", "/private/./secret.txt")


def test_uris_that_nginx_would_rewrite_are_refused(dav, people):
    both = people[1](BOTH)
    for target in PATH_TRICKS:
        assert raw_request(dav, "GET", target, both)[0] == 400, target
    # Names that need encoding are fine, and so are dots that are not whole segments.
    assert raw_request(dav, "PUT", "/odd/caf%C3%A9%20menu..txt", both, body=b"\xe2\x98\x95\n")[0] == 201
    assert (dav.nginx.share / "odd" / "café menu..txt").exists()
    assert raw_request(dav, "PROPFIND", "/odd/.hidden", both, {"Depth": "0"})[0] == 404


RULES = """
[forward_auth]
[[forward_auth.rules]]
host = "scratch.example"
read_scope = "imap"
write_scope = "imap"
[[forward_auth.rules]]
path_prefix = "/public"
read_scope = "imap"
write_scope = "imap"
[[forward_auth.rules]]
path_prefix = "/"
"""


def test_a_token_for_one_folder_stays_out_of_the_others(tmp_path):
    """With a rule per folder, no URI trick or forged header lets a token for /public (scope
    imap) read /private (webdav:read): nginx serves the path bearerbridge decided on."""
    stack = start_stack(tmp_path / "stack", extra=RULES)
    try:
        service = stack.service
        name, _ = service.user()
        app = service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap")
        token = service.issue(name, app["client_id"], "imap")
        for folder in ("public", "private"):
            (stack.nginx.share / folder).mkdir()
            (stack.nginx.share / folder / "secret.txt").write_text(f"{folder}\n")
        assert raw_request(stack, "GET", "/public/secret.txt", token) == (200, b"public\n")
        assert raw_request(stack, "GET", "/private/secret.txt", token)[0] == 403
        for target in PATH_TRICKS:
            assert raw_request(stack, "GET", target, token)[0] == 400, target
        # With X-Original-URI only Host counts, and webdav.conf sets X-Forwarded-Host anyway: a client's
        # own names no other rule.
        forged = raw_request(stack, "GET", "/private/secret.txt", token, {"X-Forwarded-Host": "scratch.example"})
        assert forged[0] == 403
    finally:
        stack.stop()
        print_logs(stack)
    no_process_left(tmp_path / "stack")


# -- rclone -----------------------------------------------------------------------------------

def rclone_config(path: Path, url: str, *, token: str | None = None, command: str | None = None) -> Path:
    """conf/rclone/rclone.conf with the test's URL, and a static token or another command."""
    lines, seen = [], set()
    for line in RCLONE_SNIPPET.read_text().splitlines():
        key, equals, value = (part.strip() for part in line.partition("="))
        if equals and not line.lstrip().startswith("#"):
            seen.add(key)
            if key == "url":
                line = f"url = {url}/"
            elif key == "bearer_token_command":
                assert value == "bearerbridge-token print --profile dav", value
                line = f"bearer_token = {token}" if token else f"bearer_token_command = {command}"
        lines.append(line)
    assert "[dav]" in lines and {"type", "url", "vendor", "bearer_token_command"} <= seen, seen
    path.write_text("\n".join(lines) + "\n")
    return path


def run_bounded(command: list[str], *, timeout: float, env: dict | None = None, stdin: bytes | None = None
                ) -> subprocess.CompletedProcess:
    """Run `command` in a session of its own; on timeout kill its whole process group."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"{command} ran over {timeout}s:\n{err.decode(errors='replace')}") from None
    return subprocess.CompletedProcess(command, process.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def rclone(config: Path, *args: str, bounds=RCLONE_BOUNDS, env: dict | None = None) -> subprocess.CompletedProcess:
    done = run_bounded([require_peer("rclone"), "--config", str(config), *bounds, "-v", *args],
                       timeout=RCLONE_TIMEOUT, env=env)
    print(f"----- rclone {' '.join(args)}: exit {done.returncode} -----\n{done.stdout}{done.stderr}")
    return done


def test_rclone_with_a_read_write_token(dav, people, tmp_path):
    config = rclone_config(tmp_path / "rclone.conf", dav.nginx.url, token=people[1](BOTH))
    local = tmp_path / "report.txt"
    local.write_text("quarterly numbers\n")
    share = dav.nginx.share / "rclone-rw"

    assert rclone(config, "mkdir", "dav:rclone-rw").returncode == 0
    assert share.is_dir()
    assert rclone(config, "copy", str(local), "dav:rclone-rw/").returncode == 0
    assert (share / "report.txt").read_text() == "quarterly numbers\n"
    listed = rclone(config, "lsf", "dav:rclone-rw")
    assert (listed.returncode, listed.stdout) == (0, "report.txt\n")
    assert rclone(config, "deletefile", "dav:rclone-rw/report.txt").returncode == 0
    assert not (share / "report.txt").exists()


def test_rclone_with_a_read_only_token(dav, people, tmp_path):
    config = rclone_config(tmp_path / "rclone.conf", dav.nginx.url, token=people[1]("webdav:read"))
    share = dav.nginx.share / "rclone-ro"
    share.mkdir()
    (share / "old.txt").write_text("already here\n")
    local = tmp_path / "new.txt"
    local.write_text("not allowed\n")

    listed = rclone(config, "lsf", "dav:rclone-ro")
    assert (listed.returncode, listed.stdout) == (0, "old.txt\n")
    copied = rclone(config, "copy", str(local), "dav:rclone-ro/")
    assert copied.returncode != 0 and "403" in copied.stderr, copied.stderr
    assert sorted(p.name for p in share.iterdir()) == ["old.txt"]


def test_rclone_with_a_bad_token(dav, tmp_path):
    config = rclone_config(tmp_path / "rclone.conf", dav.nginx.url, token="not-a-token-anyone-issued")
    listed = rclone(config, "lsf", "dav:")
    assert listed.returncode != 0 and "401" in listed.stderr, listed.stderr


# -- done when: rclone with tokens from a device-grant login, kept fresh by bearerbridge-token ---

def helper_device_login(service, client_id: str, args: list[str], env: dict, user: str, password: str) -> str:
    """`bearerbridge-token login --device ARGS` with the user playing along: read the code it shows,
    enter it on the verification page, approve, and wait for the helper to finish (exit 0). Its
    stdout; its stderr is printed for the test's log."""
    login = subprocess.Popen(
        [str(HELPER), "login", "--issuer", service.url, "--client-id", client_id, "--device", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    stderr = Lines(login.stderr)
    try:
        code = stderr.wait_for(re.compile(r"\b([A-Z0-9]{4}-[A-Z0-9]{4})\b"), LOGIN_TIMEOUT).group(1)
        stderr.wait_for(re.compile(re.escape(f"{service.url}/device")), LOGIN_TIMEOUT)
        with requests.Session() as browser:
            done = user_enters_code(service, browser, user, password, f"{service.url}/device", typed=code)
        assert 'id="device-approved"' in done.text, done.text
        try:
            login.wait(LOGIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"login did not finish within {LOGIN_TIMEOUT}s:\n{stderr.text()}") from None
        assert login.returncode == 0, stderr.text()
        return login.stdout.read()
    finally:
        if login.poll() is None:
            os.killpg(login.pid, signal.SIGKILL)
            login.wait(WAIT)
        login.stdout.close()
        print("----- bearerbridge-token login, its stderr -----\n" + stderr.text())


def require_helper() -> None:
    if not HELPER.is_file():
        missing(f"{HELPER} is not installed (pip install . in the venv)")


class Lines:
    """The lines a process writes to a pipe, read by a thread so that waits can be bounded."""

    def __init__(self, pipe) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in iter(pipe.readline, ""):
            self._queue.put(line)
        self._queue.put(None)

    def text(self) -> str:
        """All read so far, without waiting."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return "".join(self.seen)
            if line is not None:
                self.seen.append(line)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.seen:
                if match := pattern.search(line):
                    return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern.pattern!r} within {timeout}s in:\n{''.join(self.seen)}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the output ended without {pattern.pattern!r}:\n{''.join(self.seen)}")
            self.seen.append(line)


def profile(xdg: Path) -> dict:
    return json.loads((xdg / "bearerbridge-token" / "dav.json").read_text())


def access_log_since(stack: Stack, offset: int) -> list[str]:
    return log_since(stack.nginx.access_log_path, offset, limit=1 << 20).splitlines()


def test_rclone_copies_with_a_device_grant_login_kept_fresh(tmp_path):
    require_helper()
    stack = start_stack(tmp_path / "stack", extra="[tokens]\naccess_ttl = 2\n")
    try:
        _device_grant_and_rclone(stack, tmp_path)
    finally:
        stack.stop()
        print_logs(stack)
    no_process_left(tmp_path / "stack")


def _device_grant_and_rclone(stack: Stack, tmp_path: Path) -> None:
    service = stack.service
    client = service.client("--public", "--grant", "device_code", "--grant", "refresh_token", "--scope", BOTH)
    username, password = service.user()
    xdg = tmp_path / "xdg"
    env = {**os.environ, "XDG_CONFIG_HOME": str(xdg)}

    # The user runs `login --device`, which prints a code and where to enter it, then polls, and
    # enters the code on another device: bearerbridge's verification page.
    out = helper_device_login(service, client["client_id"], ["--profile", "dav", "--scope", BOTH], env,
                              username, password)
    held = profile(xdg)
    assert held["refresh_token"] and held["access_token"] not in out  # only `print` shows a token
    assert (xdg / "bearerbridge-token" / "dav.json").stat().st_mode & 0o777 == 0o600

    # rclone runs `bearerbridge-token print --profile dav` (conf/rclone/rclone.conf) for its token.
    config = rclone_config(tmp_path / "rclone.conf", stack.nginx.url, command=f"{HELPER} print --profile dav")
    (tmp_path / "first.txt").write_text("copied with a device-grant token\n")
    assert rclone(config, "copy", str(tmp_path / "first.txt"), "dav:inbox/", env=env).returncode == 0
    assert (stack.nginx.share / "inbox" / "first.txt").read_text() == "copied with a device-grant token\n"
    assert f"127.0.0.1 {username} [" in stack.nginx.access_log_path.read_text()

    # The access token lives 2 s: after it expired, the helper refreshes it (rotating the refresh
    # token) when rclone asks for one, and the copy works as before.
    before = profile(xdg)
    time.sleep(2.5)
    (tmp_path / "second.txt").write_text("copied after the first token expired\n")
    assert rclone(config, "copy", str(tmp_path / "second.txt"), "dav:inbox/", env=env).returncode == 0
    assert (stack.nginx.share / "inbox" / "second.txt").read_text() == "copied after the first token expired\n"
    after = profile(xdg)
    assert after["access_token"] != before["access_token"] and after["expires_at"] > before["expires_at"]
    assert after["refresh_token"] != before["refresh_token"]

    # One rclone run outliving its token: `rcat` takes its token at start, then waits for its
    # input; we send it only after the token expired. rclone's next request gets a 401, rclone
    # runs the command again (it does so only after a 401) and retries with the fresh token. That
    # retry is a low-level one: with --low-level-retries 1 rclone gets the new token but fails.
    offset = stack.nginx.access_log_path.stat().st_size
    rcat = subprocess.Popen(
        [require_peer("rclone"), "--config", str(config), "--retries", "1", "--low-level-retries", "3",
         "--timeout", "10s", "--contimeout", "5s", "-vv", "rcat", "dav:inbox/late.txt"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        # rclone has its token once the helper refreshed the profile (a 2 s token always needs it);
        # it contacts the server only once its input has ended.
        deadline = time.monotonic() + RCLONE_TIMEOUT
        while profile(xdg)["access_token"] == after["access_token"]:
            assert rcat.poll() is None and time.monotonic() < deadline, "rclone rcat did not fetch a token"
            time.sleep(0.05)
        started_with = profile(xdg)["access_token"]
        time.sleep(2.5)
        out, err = rcat.communicate(b"written after the token rclone started with expired\n",
                                    timeout=RCLONE_TIMEOUT)
    finally:
        if rcat.poll() is None:
            os.killpg(rcat.pid, signal.SIGKILL)
            rcat.communicate()
    log = access_log_since(stack, offset)
    print("----- rclone rcat -----\n" + err.decode(errors="replace") + "\n".join(log))
    assert rcat.returncode == 0, err.decode(errors="replace")
    assert (stack.nginx.share / "inbox" / "late.txt").read_text() == \
        "written after the token rclone started with expired\n"
    statuses = [line.split('" ')[1].split()[0] for line in log if '" ' in line]
    assert "401" in statuses and statuses[-1] in ("200", "201", "204", "207"), log
    assert profile(xdg)["access_token"] != started_with
