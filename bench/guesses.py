"""Guess rates: how fast one address can try passwords, client secrets and tokens at bearerbridge.

    .venv/bin/python bench/guesses.py [--duration 60] [--only login|token|dovecot] [--connections 8]

For each of three doors, a fresh `twistd -n bearerbridge` (SQLite in a temporary directory, HTTP
and `[sasl] listen` on free loopback ports) is started, users and clients are made with the
`bearerbridge` command line, and for --duration seconds (default 60, so that the figures are per
minute as measured, not extrapolated) one attacking address guesses as fast as it can:

- login:   the login form of /authorize, from 127.0.0.2: wrong passwords for one user, over
           --connections keep-alive connections (a 401 with the form again = one guess);
- token:   POST /token grant_type=client_credentials from 127.0.0.2 with wrong secrets for one
           confidential client, HTTP Basic (a 401 invalid_client = one guess);
- dovecot: one connection to the Dovecot auth socket, AUTH OAUTHBEARER with wrong tokens, all
           with rip=192.0.2.66, up to --in-flight requests outstanding (a FAIL = one guess).

Meanwhile another user, from another address, logs in the right way every --interval seconds
(127.0.0.3 at the login form and /token; a second Dovecot connection with rip=192.0.2.7 and a
valid access token), and the time each good login takes is reported: what the attack costs
everyone else. Answers that refuse without checking (429, or a Dovecot FAIL saying "too many")
are counted apart from guesses, so the same script measures the server before and after
throttling. The server's CPU and memory (VmHWM: its peak RSS) are printed per door.

The twistd and bearerbridge programs are those next to the Python running this script.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import html
import http.client
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from benchserver import BIN, BenchServer, cpu_seconds, free_port, machine_busy_seconds

ATTACKER_IP, USER_IP = "127.0.0.2", "127.0.0.3"  # all of 127.0.0.0/8 is on loopback (Linux)
ATTACKER_RIP, USER_RIP = "192.0.2.66", "192.0.2.7"  # the remote addresses Dovecot/Postfix would pass
REDIRECT_URI = "https://app.example/cb"
SERVICE = "imap"  # the Dovecot service, and the scope it needs ([sasl] services' default)
DOORS = ("login", "token", "dovecot")
TITLES = {"login": "login form", "token": "/token client auth", "dovecot": "Dovecot socket"}
# bearerbridge FAILs an AUTH beyond 256 live requests on one Dovecot connection ("too many concurrent
# requests", a protocol error; 10 of those close the connection): the attacker stays well below.
MAX_IN_FLIGHT = 200


def log(message: str) -> None:
    print(f"[guesses] {message}", file=sys.stderr, flush=True)


# -- what was seen ---------------------------------------------------------------------------------

@dataclass
class Tally:
    """The attacker's answers inside the window, by class; shared by its threads."""

    guesses: int = 0
    guess_kinds: Counter[str] = field(default_factory=Counter)  # e.g. "401 login form"
    refused: int = 0
    refused_kinds: Counter[str] = field(default_factory=Counter)  # e.g. "429"
    other: Counter[str] = field(default_factory=Counter)  # anything else, by status or error
    retry_after: list[float] = field(default_factory=list)  # the Retry-After headers of refusals
    late: int = 0  # answers that came after the window closed: in no rate
    samples: dict[str, str] = field(default_factory=dict)  # one answer body per class, to show
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, detail: str, in_window: bool, sample: str = "", retry_after: str | None = None) -> None:
        """`kind` is "guess", "refused" or "other"; `detail` says which refusal or other answer."""
        with self.lock:
            if not in_window:
                self.late += 1
                return
            if kind == "guess":
                self.guesses += 1
                self.guess_kinds[detail] += 1
            elif kind == "refused":
                self.refused += 1
                self.refused_kinds[detail] += 1
            else:
                self.other[detail] += 1
            if retry_after is not None:
                try:
                    self.retry_after.append(float(retry_after))
                except ValueError:
                    pass  # an HTTP date, or garbage: shown in the sample
            key = f"{kind}: {detail}"
            if sample and key not in self.samples:
                self.samples[key] = " ".join(sample.split())[:300]


@dataclass
class GoodLogins:
    """The other user's logins during the window: seconds each took, and the failures."""

    seconds: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def record(self, elapsed: float, failure: str | None) -> None:
        self.seconds.append(elapsed)
        if failure is not None:
            self.failures[failure] += 1


@dataclass
class DoorResult:
    door: str
    how: str  # the attack, in words
    good_how: str  # the good logins, in words
    duration: float
    tally: Tally
    good: GoodLogins
    in_flight_at_end: int  # requests unanswered when the window closed
    idle_seconds: list[float]  # good logins before the attack, one at a time
    server_cpu: float  # seconds, over the window
    client_cpu: float
    other_cpu: float  # the rest of the machine
    rss_start_kib: int
    rss_end_kib: int
    hwm_kib: int


def proc_status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), in KiB; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- the server --------------------------------------------------------------------------------------

class Server:
    """A fresh bearerbridge in its own directory, with the Dovecot socket on, and its command line."""

    def __init__(self, keep: bool) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="bearerbridge-guesses-"))
        self.keep = keep
        self.sasl_port = free_port()
        self.bench = BenchServer(
            self.directory, None,
            extra=f'[sasl]\nlisten = ["tcp:{self.sasl_port}:interface=127.0.0.1"]\n',
            ready=lambda: socket.create_connection(("127.0.0.1", self.sasl_port), timeout=2).close())
        self.port = self.bench.port

    def __enter__(self) -> Server:
        try:
            self.bench.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.bench.stop()  # SIGTERM by PID, wait, SIGKILL after 15 s
        if self.keep:
            log(f"kept {self.directory}")
        else:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self.bench.pid

    def cli(self, *args: str, stdin: str = "") -> str:
        """`bearerbridge --config F ARGS` as an operator runs it (the program beside this Python)."""
        done = subprocess.run([str(BIN / "bearerbridge"), "--config", str(self.bench.config_path), *args],
                              input=stdin, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"bearerbridge {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def user(self, prefix: str, password: str) -> str:
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.cli("user", "add", name, "--password-stdin", stdin=password + "\n")
        return name

    def client(self, *args: str) -> dict[str, str]:
        made: dict[str, str] = json.loads(self.cli("client", "create", "--json", *args))
        return made


# -- HTTP from a chosen source address ------------------------------------------------------------

class Forms(HTMLParser):
    """The input fields of each form of a page (name -> value), as a browser would post them."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.forms.append({})
        elif tag == "input" and self.forms and values.get("name"):
            self.forms[-1][values["name"] or ""] = values.get("value") or ""


def form_of(page: bytes, step: str) -> dict[str, str] | None:
    """The page's form whose hidden `step` field is `step` (login, consent), if there is one."""
    parser = Forms()
    parser.feed(page.decode("utf-8", "replace"))
    return next((f for f in parser.forms if f.get("step") == step), None)


class Browser:
    """One keep-alive HTTP connection from `source` with its cookies: a browser or an HTTP client.

    http.client reconnects by itself when the server closed the connection after an answer;
    any error closes it, and the next request opens a new one."""

    def __init__(self, port: int, source: str, timeout: float) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            self.conn.request(method, path, body=body, headers=sent)
            response = self.conn.getresponse()
            data = response.read()
        except BaseException:
            self.conn.close()
            raise
        for value in response.headers.get_all("Set-Cookie") or ():
            jar: SimpleCookie = SimpleCookie()
            jar.load(value)
            for name, morsel in jar.items():
                self.cookies[name] = morsel.value
        return response.status, response.headers, data

    def close(self) -> None:
        self.conn.close()


HTTP_ERRORS = (OSError, http.client.HTTPException)  # socket.timeout is an OSError


def error_name(error: BaseException) -> str:
    return "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"[:80]


def text_of(body: bytes) -> str:
    """An answer's words, for a sample: an HTML page without its tags (a JSON body as it is)."""
    text = body.decode("utf-8", "replace")
    if "<body" in text:  # the page's text, not its head
        text = re.sub(r"<[^>]*>", " ", re.split(r"<body[^>]*>", text, maxsplit=1)[-1])
    return " ".join(html.unescape(text).split())


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def authorize_path(client_id: str) -> str:
    """An /authorize request of the code grant with PKCE (S256), as an app would send the browser."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    return "/authorize?" + urlencode({
        "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT_URI,
        "code_challenge": challenge.decode(), "code_challenge_method": "S256", "state": secrets.token_hex(8)})


# -- the login form ---------------------------------------------------------------------------------

def login_attacker(port: int, path: str, username: str, tally: Tally, t_end: float, timeout: float) -> None:
    """One attacking connection: GET the form once (its cookie and CSRF token), then POST wrong
    passwords back to it as fast as the answers come, taking the fresh CSRF token of each page."""
    browser = Browser(port, ATTACKER_IP, timeout)
    csrf: str | None = None
    try:
        while time.monotonic() < t_end:
            try:
                if csrf is None:
                    status, _, page = browser.request("GET", path)
                    form = form_of(page, "login")
                    if status != 200 or form is None:
                        tally.add("other", f"GET {status} without a login form", time.monotonic() < t_end,
                                  text_of(page))
                        time.sleep(0.1)  # no form to post: not worth a busy loop
                        continue
                    csrf = form["csrf"]
                status, headers, page = browser.request("POST", path, form={
                    "csrf": csrf, "step": "login", "username": username, "password": secrets.token_urlsafe(12)})
                in_window = time.monotonic() < t_end
                form = form_of(page, "login")
                if status == 401 and form is not None:
                    csrf = form.get("csrf") or csrf
                    tally.add("guess", "401 login form", in_window)
                elif status == 429:
                    if form is not None:  # the page may offer the form again, with a fresh token
                        csrf = form.get("csrf") or csrf
                    tally.add("refused", "429", in_window, text_of(page), headers.get("Retry-After"))
                else:
                    if form is None:
                        csrf = None  # e.g. a 400 "form has expired": fetch a fresh form
                    tally.add("other", f"POST {status}", in_window, text_of(page))
            except HTTP_ERRORS as e:
                tally.add("other", error_name(e), time.monotonic() < t_end)
                time.sleep(0.05)  # a refused connection fails at once: no busy loop
    finally:
        browser.close()


def good_login(port: int, path: str, username: str, password: str, timeout: float) -> str | None:
    """A person signing in from 127.0.0.3 with a fresh browser: the form, then the right password.
    None when it worked (the consent page, or a redirect when consent is remembered), else why not."""
    browser = Browser(port, USER_IP, timeout)
    try:
        status, _, page = browser.request("GET", path)
        form = form_of(page, "login")
        if status != 200 or form is None:
            return f"GET {status}"
        status, _, page = browser.request("POST", path, form={**form, "username": username, "password": password})
        if status == 303 or (status == 200 and form_of(page, "consent") is not None):
            return None
        return f"POST {status}"
    except HTTP_ERRORS as e:
        return error_name(e)
    finally:
        browser.close()


# -- /token client authentication ------------------------------------------------------------------

def token_attacker(port: int, client_id: str, tally: Tally, t_end: float, timeout: float) -> None:
    """One attacking connection: client_credentials with a wrong secret, over and over."""
    browser = Browser(port, ATTACKER_IP, timeout)
    try:
        while time.monotonic() < t_end:
            try:
                status, headers, body = browser.request(
                    "POST", "/token", form={"grant_type": "client_credentials"},
                    headers=basic(client_id, secrets.token_urlsafe(32)))
            except HTTP_ERRORS as e:
                tally.add("other", error_name(e), time.monotonic() < t_end)
                time.sleep(0.05)  # a refused connection fails at once: no busy loop
                continue
            in_window = time.monotonic() < t_end
            error = json_error(body)
            if status == 401 and error == "invalid_client":
                tally.add("guess", "401 invalid_client", in_window)
            elif status == 429:
                tally.add("refused", f"429 {error}", in_window, text_of(body), headers.get("Retry-After"))
            else:
                tally.add("other", f"{status} {error}", in_window, text_of(body))
    finally:
        browser.close()


def json_error(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", "-"))
    except (ValueError, AttributeError):
        return "(not JSON)"


def good_token(port: int, client_id: str, secret: str, timeout: float) -> str | None:
    """Another client, from 127.0.0.3 on a new connection, with its right secret: a token or why not."""
    browser = Browser(port, USER_IP, timeout)
    try:
        status, _, body = browser.request("POST", "/token", form={"grant_type": "client_credentials"},
                                          headers=basic(client_id, secret))
        return None if status == 200 and b"access_token" in body else f"{status} {json_error(body)}"
    except HTTP_ERRORS as e:
        return error_name(e)
    finally:
        browser.close()


# -- the Dovecot auth socket -------------------------------------------------------------------------

def auth_line(request_id: int, username: str, token: str, rip: str) -> bytes:
    """An AUTH as Postfix or Dovecot sends it for OAUTHBEARER, with the RFC 7628 gs2 header."""
    message = f"n,a={username},\x01host=mail.example\x01port=143\x01auth=Bearer {token}\x01\x01"
    resp = base64.b64encode(message.encode()).decode()
    return (f"AUTH\t{request_id}\tOAUTHBEARER\tservice={SERVICE}\tnologin\tlip=127.0.0.1\trip={rip}"
            f"\tresp={resp}\n").encode()


def dovecot_connect(port: int, timeout: float) -> tuple[socket.socket, bytes]:
    """A connection past the handshake: the server's greeting read up to DONE, ours sent. Returns
    the socket (blocking, with `timeout`) and whatever came after DONE."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small lines, answered one by one
    buffer = b""
    while b"\nDONE\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            raise ConnectionError(f"closed during the handshake: {buffer!r}")
        buffer += chunk
    sock.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
    return sock, buffer.split(b"\nDONE\n", 1)[1]


def fail_reason(fields: list[bytes]) -> tuple[str, bool]:
    """A FAIL's reason= and whether it is marked temp (the check could not be made)."""
    reason = next((f[7:].decode(errors="replace") for f in fields if f.startswith(b"reason=")), "")
    return reason, b"temp" in fields


class DovecotAttacker:
    """One connection pipelining AUTHs with fresh wrong tokens, up to `in_flight` outstanding.

    Each wrong OAUTHBEARER token first gets a CONT with the RFC 7628 JSON error, which the client
    must acknowledge with ^A (`AQ==`) before the FAIL comes, as Postfix does for its SMTP client."""

    def __init__(self, port: int, username: str, in_flight: int, timeout: float, tally: Tally) -> None:
        self.sock, self.inbuf = dovecot_connect(port, timeout)
        self.sock.setblocking(False)
        self.username = username
        self.cap = in_flight
        self.timeout = timeout
        self.tally = tally
        self.outbuf = b""
        self.outstanding: dict[bytes, float] = {}  # id -> send time
        self.acknowledged: set[bytes] = set()  # ids whose error challenge was answered
        self.next_id = 1
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ)

    def run(self, t_end: float) -> int:
        """Attack until t_end; the number of requests still unanswered then."""
        next_expiry = 0.0
        try:
            while (now := time.monotonic()) < t_end:
                if now >= next_expiry:  # a request unanswered after `timeout`: give up on it
                    next_expiry = now + 0.5
                    for rid, sent in list(self.outstanding.items()):
                        if now - sent > self.timeout:
                            del self.outstanding[rid]
                            self.acknowledged.discard(rid)
                            self.tally.add("other", f"no answer within {self.timeout:g} s", True)
                            self.send(b"CANCEL\t" + rid + b"\n")
                self.fill(now)
                for _, events in self.selector.select(min(0.05, max(0.0, t_end - now))):
                    if events & selectors.EVENT_WRITE:
                        self.send(b"")
                    if events & selectors.EVENT_READ:
                        self.receive(t_end)
        finally:
            self.sock.close()
            self.selector.close()
        return len(self.outstanding)

    def fill(self, now: float) -> None:
        lines = []
        while len(self.outstanding) < self.cap:
            rid = self.next_id
            self.next_id += 1
            lines.append(auth_line(rid, self.username, secrets.token_urlsafe(32), ATTACKER_RIP))
            self.outstanding[b"%d" % rid] = now
        if lines:
            self.send(b"".join(lines))

    def send(self, data: bytes) -> None:
        data = self.outbuf + data
        try:
            sent = self.sock.send(data) if data else 0
        except BlockingIOError:
            sent = 0
        self.outbuf = data[sent:]
        self.selector.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0))

    def receive(self, t_end: float) -> None:
        try:
            chunk = self.sock.recv(262144)
        except BlockingIOError:
            return
        if not chunk:
            raise ConnectionError("the server closed the Dovecot connection")
        in_window = time.monotonic() < t_end
        *lines, self.inbuf = (self.inbuf + chunk).split(b"\n")
        for line in lines:
            kind, rid, *fields = line.split(b"\t")
            if rid not in self.outstanding:
                self.tally.add("other", f"reply to no request: {kind.decode(errors='replace')}", in_window,
                               line.decode(errors="replace"))
                continue
            if kind == b"CONT" and rid not in self.acknowledged:
                self.acknowledged.add(rid)
                self.send(b"CONT\t" + rid + b"\tAQ==\n")
                continue
            del self.outstanding[rid]
            self.acknowledged.discard(rid)
            if kind == b"FAIL":
                reason, temporary = fail_reason(fields)
                # A throttled address is refused as a temporary failure ("too many ...; try again
                # later", marked temp), so that reason goes first; any other temp FAIL means the
                # database or the validator failed, and nothing was checked either.
                if "too many" in reason.lower():
                    self.tally.add("refused", f"FAIL {reason}{' (temp)' if temporary else ''}", in_window,
                                   line.decode(errors="replace"))
                elif temporary:
                    self.tally.add("other", f"FAIL temp: {reason}", in_window, line.decode(errors="replace"))
                else:
                    self.tally.add("guess", f"FAIL {reason}", in_window)
            else:
                self.tally.add("other", kind.decode(errors="replace"), in_window, line.decode(errors="replace"))


class DovecotUser:
    """The other user's connection (rip=192.0.2.7): one AUTH at a time with a valid token."""

    def __init__(self, port: int, username: str, token: str, timeout: float) -> None:
        self.port, self.username, self.token, self.timeout = port, username, token, timeout
        self.sock: socket.socket | None = None
        self.inbuf = b""
        self.next_id = 1

    def login(self) -> str | None:
        try:
            if self.sock is None:
                self.sock, self.inbuf = dovecot_connect(self.port, self.timeout)
            rid = b"%d" % self.next_id
            self.next_id += 1
            self.sock.sendall(auth_line(int(rid), self.username, self.token, USER_RIP))
            while True:
                while b"\n" not in self.inbuf:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("the server closed the Dovecot connection")
                    self.inbuf += chunk
                line, self.inbuf = self.inbuf.split(b"\n", 1)
                kind, got, *fields = line.split(b"\t")
                if got != rid:
                    continue
                if kind == b"OK":
                    return None
                if kind == b"CONT":  # refused: acknowledge, and report the FAIL that follows
                    self.sock.sendall(b"CONT\t" + rid + b"\tAQ==\n")
                    continue
                return f"{kind.decode(errors='replace')} {fail_reason(fields)[0]}"
        except OSError as e:
            self.close()  # a timed-out connection may still answer later: start afresh
            return error_name(e)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- one door -----------------------------------------------------------------------------------------

def good_logins(login: Callable[[], str | None], good: GoodLogins, go: float, t_end: float,
                interval: float) -> None:
    """One good login every `interval` s from `go`, one at a time: a slow one delays the next (so
    the count shrinks) rather than piling up logins the attacker's slowness caused."""
    due = go
    while due < t_end:
        time.sleep(max(0.0, due - time.monotonic()))
        started = time.monotonic()
        failure = login()
        good.record(time.monotonic() - started, failure)
        due = max(due + interval, time.monotonic())


@dataclass
class Door:
    """One door set up on a server: its attackers (each run until the end of the window) and the
    other user's login (None when it worked, else why not)."""

    how: str  # the attack, in words
    good_how: str  # the good logins, in words
    attackers: list[Callable[[float], object]]
    good_login: Callable[[], str | None]
    unanswered: Callable[[], int] = int  # the attacker's requests still in flight at the end (0)
    close: Callable[[], None] = lambda: None


def login_door(server: Server, args: argparse.Namespace, tally: Tally) -> Door:
    victim = server.user("victim", secrets.token_urlsafe(16))
    password = secrets.token_urlsafe(16)
    other = server.user("other", password)
    app = server.client("--name", "guesses web app", "--redirect-uri", REDIRECT_URI, "--public")
    path = authorize_path(app["client_id"])
    return Door(
        how=f"wrong passwords for user {victim}, {args.connections} connections from {ATTACKER_IP}",
        good_how=f"user {other} from {USER_IP}: GET the form + POST the right password, new connection",
        attackers=[functools.partial(login_attacker, server.port, path, victim, tally, timeout=args.timeout)
                   for _ in range(args.connections)],
        # The other user's app asks with its own state and PKCE challenge.
        good_login=functools.partial(good_login, server.port, authorize_path(app["client_id"]), other, password,
                                     args.timeout))


def token_door(server: Server, args: argparse.Namespace, tally: Tally) -> Door:
    target = server.client("--name", "guesses target", "--scope", SERVICE)
    other = server.client("--name", "guesses other", "--scope", SERVICE)
    return Door(
        how=(f"client_credentials, wrong secrets for client {target['client_id'][:8]}…, HTTP Basic, "
             f"{args.connections} connections from {ATTACKER_IP}"),
        good_how=f"another client with its right secret from {USER_IP}, new connection",
        attackers=[functools.partial(token_attacker, server.port, target["client_id"], tally, timeout=args.timeout)
                   for _ in range(args.connections)],
        good_login=functools.partial(good_token, server.port, other["client_id"], other["client_secret"],
                                     args.timeout))


def dovecot_door(server: Server, args: argparse.Namespace, tally: Tally) -> Door:
    victim = server.user("victim", secrets.token_urlsafe(16))
    other = server.user("other", secrets.token_urlsafe(16))
    mail = server.client("--name", "guesses mail app", "--scope", SERVICE)
    token = json.loads(server.cli("token", "issue", "--user", other, "--client", mail["client_id"],
                                  "--scope", SERVICE, "--json"))["access_token"]
    attacker = DovecotAttacker(server.sasl_port, victim, args.in_flight, args.timeout, tally)
    user = DovecotUser(server.sasl_port, other, token, args.timeout)
    return Door(
        how=(f"OAUTHBEARER with wrong tokens for user {victim}, rip={ATTACKER_RIP}, one connection, "
             f"up to {args.in_flight} in flight"),
        good_how=f"user {other} with a valid token, rip={USER_RIP}, its own connection",
        attackers=[attacker.run], good_login=user.login, unanswered=lambda: len(attacker.outstanding),
        close=user.close)


SETUP = {"login": login_door, "token": token_door, "dovecot": dovecot_door}


def wait_until_quiet(limit: float, threshold: float = 0.25, window: float = 3.0) -> float:
    """Wait up to `limit` s for `window` seconds in which the whole machine was busy less than
    `threshold` of one core (on a shared VM a test run beside us halves what the server gets);
    the last share seen."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - before) / window
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def run_door(name: str, args: argparse.Namespace) -> DoorResult:
    """A fresh server (so that neither memory nor any throttling carries over from another door),
    the door's users and clients, then the attack and the good logins at once."""
    with Server(args.keep) as server:
        log(f"{name}: twistd pid {server.pid}, http 127.0.0.1:{server.port}, "
            f"dovecot 127.0.0.1:{server.sasl_port}, {server.directory}")
        busy = wait_until_quiet(args.settle) if args.settle > 0 else 0.0
        if busy >= 0.25:
            log(f"{name}: the machine is still busy ({100 * busy:.0f}% of a core) after {args.settle:g} s; "
                "measuring anyway")
        tally, good = Tally(), GoodLogins()
        door = SETUP[name](server, args, tally)
        try:
            return attack(server, name, door, tally, good, args)
        finally:
            door.close()


def attack(server: Server, name: str, door: Door, tally: Tally, good: GoodLogins,
           args: argparse.Namespace) -> DoorResult:
    # The good login must work before the attack, or the figures mean nothing; a few of them,
    # one at a time, give what a login takes on the idle server, to compare with.
    idle: list[float] = []
    for _ in range(args.idle_logins):
        started = time.monotonic()
        failure = door.good_login()
        idle.append(time.monotonic() - started)
        if failure is not None:
            raise RuntimeError(f"{name}: the good login fails before any attack: {failure}\n"
                               f"{server.bench.log_tail()}")

    go = time.monotonic() + 0.2
    t_end = go + args.duration
    errors: list[BaseException] = []

    def attacker(fn: Callable[[float], object]) -> None:
        time.sleep(max(0.0, go - time.monotonic()))
        try:
            fn(t_end)
        except BaseException as e:  # reported after the run, not lost in a thread
            errors.append(e)

    threads = [threading.Thread(target=attacker, args=(fn,), daemon=True) for fn in door.attackers]
    threads.append(threading.Thread(target=good_logins, args=(door.good_login, good, go, t_end, args.interval),
                                    daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, go - time.monotonic()))
    server_cpu, client_cpu, machine_cpu = cpu_seconds(server.pid), time.process_time(), machine_busy_seconds()
    rss_start = proc_status_kib(server.pid, "VmRSS")
    time.sleep(max(0.0, t_end - time.monotonic()))
    server_cpu = cpu_seconds(server.pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    machine_cpu = machine_busy_seconds() - machine_cpu
    # VmHWM: the peak RSS of the process's life, which is this door's (a fresh server each).
    rss_end, hwm = proc_status_kib(server.pid, "VmRSS"), proc_status_kib(server.pid, "VmHWM")
    unanswered = door.unanswered()
    # Requests sent just before the end are answered within `timeout`; they count as late.
    for thread in threads:
        thread.join(args.timeout + 5)
    if errors:
        raise RuntimeError(f"{name}: an attacker failed: {errors[0]!r}\n{server.bench.log_tail()}")
    if any(thread.is_alive() for thread in threads):
        log(f"{name}: a client thread is still waiting for an answer; left behind")
    return DoorResult(
        door=name, how=door.how, good_how=door.good_how, duration=args.duration, tally=tally, good=good,
        in_flight_at_end=unanswered, idle_seconds=idle, server_cpu=server_cpu, client_cpu=client_cpu,
        other_cpu=max(0.0, machine_cpu - server_cpu - client_cpu),
        rss_start_kib=rss_start, rss_end_kib=rss_end, hwm_kib=hwm)


# -- output -------------------------------------------------------------------------------------------

def per_minute(count: int, duration: float) -> float:
    return count * 60.0 / duration


def ms(seconds: float) -> str:
    return f"{1000 * seconds:,.0f} ms" if seconds >= 0.01 else f"{1000 * seconds:.1f} ms"


def report(result: DoorResult) -> str:
    t, d = result.tally, result.duration
    out = [f"== {TITLES[result.door]}: {result.how}, {d:g} s",
           f"  guesses (checked and refused):  {per_minute(t.guesses, d):>10,.0f}/min  ({t.guesses:,} in {d:g} s)"]
    out += [f"      {n:,} x {kind}" for kind, n in t.guess_kinds.most_common()]
    out.append(f"  refused without a check:        {per_minute(t.refused, d):>10,.0f}/min  ({t.refused:,})")
    out += [f"      {n:,} x {kind}" for kind, n in t.refused_kinds.most_common()]
    if t.retry_after:
        out.append(f"      Retry-After: {min(t.retry_after):g} to {max(t.retry_after):g} s "
                   f"(in {len(t.retry_after):,} of them)")
    other = sum(t.other.values())
    out.append(f"  other answers:                  {per_minute(other, d):>10,.0f}/min  ({other:,})")
    out += [f"      {n:,} x {kind}" for kind, n in t.other.most_common()]
    if t.late or result.in_flight_at_end:
        out.append(f"  after the window: {t.late:,} answers came late, {result.in_flight_at_end:,} requests "
                   "were still unanswered (in no figure)")
    for kind, sample in t.samples.items():
        out.append(f"  e.g. {kind}: {sample}")
    g = result.good
    if g.seconds:
        out.append(f"  good logins meanwhile ({result.good_how}): {len(g.seconds)} "
                   f"({sum(g.failures.values())} failed), median {ms(statistics.median(g.seconds))}, "
                   f"max {ms(max(g.seconds))}")
    else:
        out.append(f"  good logins meanwhile ({result.good_how}): none completed")
    out += [f"      {n} failed: {why}" for why, n in g.failures.most_common()]
    if result.idle_seconds:
        out.append(f"      (before the attack, one at a time: median {ms(statistics.median(result.idle_seconds))}, "
                   f"max {ms(max(result.idle_seconds))} of {len(result.idle_seconds)})")
    out.append(f"  server: CPU {100 * result.server_cpu / d:.0f}% of one core; memory: VmRSS "
               f"{result.rss_start_kib / 1024:,.0f} MB at the start, {result.rss_end_kib / 1024:,.0f} MB at the end, "
               f"peak (VmHWM) {result.hwm_kib / 1024:,.0f} MB")
    other_share = result.other_cpu / d
    out.append(f"  this script: CPU {100 * result.client_cpu / d:.0f}%; "
               f"the rest of the machine: {100 * other_share:.0f}%"
               + (" (something else ran meanwhile: the figures are suspect)" if other_share > 0.1 else ""))
    return "\n".join(out)


def summary(results: list[DoorResult]) -> str:
    lines = [f"{'door':<20} {'guesses/min':>12} {'refused/min':>12} {'other/min':>10} {'good n':>7} "
             f"{'good p50':>10} {'good max':>10} {'srv cpu':>8} {'VmHWM':>8}"]
    for r in results:
        g = r.good.seconds
        lines.append(
            f"{TITLES[r.door]:<20} {per_minute(r.tally.guesses, r.duration):>12,.0f} "
            f"{per_minute(r.tally.refused, r.duration):>12,.0f} "
            f"{per_minute(sum(r.tally.other.values()), r.duration):>10,.0f} {len(g):>7} "
            f"{ms(statistics.median(g)) if g else '-':>10} {ms(max(g)) if g else '-':>10} "
            f"{100 * r.server_cpu / r.duration:>7.0f}% {r.hwm_kib / 1024:>6,.0f}MB")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--duration", "-d", type=float, default=60,
                   help="measured seconds per door (default 60: the figures are per minute as counted)")
    p.add_argument("--only", action="append", choices=DOORS, help="run only this door (repeatable)")
    p.add_argument("--connections", "-c", type=int, default=8, help="the HTTP attacker's concurrent connections")
    p.add_argument("--in-flight", type=int, default=128,
                   help=f"the Dovecot attacker's outstanding requests (at most {MAX_IN_FLIGHT})")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between the other user's good logins")
    p.add_argument("--idle-logins", type=int, default=5,
                   help="good logins before the attack, to check they work and time them on the idle server")
    p.add_argument("--timeout", type=float, default=30,
                   help="seconds to wait for any one answer (throttled answers may come slowly: not an error)")
    p.add_argument("--settle", type=float, default=120,
                   help="seconds to wait, before each door, for the machine to be idle (0: do not wait)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (config, database, log)")
    args = p.parse_args(argv)
    if not 1 <= args.in_flight <= MAX_IN_FLIGHT:
        p.error(f"--in-flight must be 1..{MAX_IN_FLIGHT}")
    if args.duration <= 0 or args.connections < 1 or args.interval <= 0 or args.timeout <= 0 or args.idle_logins < 1:
        p.error("--duration, --connections, --interval, --timeout and --idle-logins must be positive")
    for program in ("twistd", "bearerbridge"):
        if not (BIN / program).exists():
            p.error(f"no {BIN / program}: run this with the Python of a venv where bearerbridge is installed")
    args.doors = [d for d in DOORS if d in (args.only or DOORS)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through `finally`: stop the server
    for source in (ATTACKER_IP, USER_IP):  # all of 127/8 answers on Linux; say so plainly if not
        with socket.socket() as s:
            try:
                s.bind((source, 0))
            except OSError as e:
                raise SystemExit(f"[guesses] cannot use source address {source}: {e}") from None
    print(f"bearerbridge guess rates: {time.strftime('%Y-%m-%d %H:%M:%S %z')}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {BIN}", flush=True)
    results = []
    for door in args.doors:
        result = run_door(door, args)
        results.append(result)
        print(report(result) + "\n", flush=True)
    print(summary(results))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server was stopped and its directory removed on the way out
        log("interrupted")
        sys.exit(130)
