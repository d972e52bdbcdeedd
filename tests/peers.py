"""Real mail peers for the tests: Postfix and Dovecot, each run as root from a throwaway config.

Every peer gets its own directories under the test's temporary directory, listens on free loopback
ports, and is stopped by the PID it started with (with its whole process group, so that no smtpd
or imap-login outlives a test). A peer that does not come up within its bound raises `PeerError`
carrying its own log.

Each config is built from the operator snippets in conf/ (conf/postfix/main.cf.snippet,
conf/dovecot/oauth2.conf and dovecot-oauth2.conf.ext), overriding only what a loopback test must:
addresses, ports, credentials, directories, and TLS (none here).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

from .support import free_port

START_TIMEOUT = 30.0  # seconds for a peer to accept connections
STOP_TIMEOUT = 15.0  # seconds for a peer to exit, SIGKILL included
CONF = Path(__file__).resolve().parent.parent / "conf"
POSTFIX_SNIPPET = CONF / "postfix" / "main.cf.snippet"
DOVECOT_SNIPPET = CONF / "dovecot" / "oauth2.conf"
DOVECOT_OAUTH2_SNIPPET = CONF / "dovecot" / "dovecot-oauth2.conf.ext"
DOVECOT_OAUTH2_PATH = "/etc/dovecot/dovecot-oauth2.conf.ext"  # as the snippet names it


class PeerError(RuntimeError):
    """A peer failed to start or to stop; the message carries the end of its log."""


# -- helpers ---------------------------------------------------------------------------------

def tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return text if len(text) <= limit else "…" + text[-limit:]


def read_settings(path: Path) -> dict[str, str]:
    """The `name = value` lines of a main.cf-style file, in order.

    Blank and `#` lines are skipped; a line starting with white space continues the value above.
    """
    settings: dict[str, str] = {}
    name = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name is not None:
            settings[name] = f"{settings[name]} {line.strip()}"
            continue
        name, equals, value = (part.strip() for part in line.partition("="))
        if not equals or not name:
            raise ValueError(f"{path}:{number}: not a `name = value` line: {line!r}")
        settings[name] = value
    return settings


def format_settings(settings: Mapping[str, str]) -> str:
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


def read_greeting(port: int, timeout: float = 5.0) -> bytes:
    """Connect to 127.0.0.1:port and return the first line the server sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def wait_for_greeting(port: int, prefix: bytes, alive: Callable[[], bool], describe: Callable[[], str],
                      timeout: float = START_TIMEOUT) -> bytes:
    """Wait until the server on `port` greets with `prefix`; `alive()` false means it died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not alive():
            raise PeerError(f"{describe()}\n(it exited while starting)")
        try:
            greeting = read_greeting(port)
            if greeting.startswith(prefix):
                return greeting
            last = greeting
        except OSError as error:
            last = error
        time.sleep(0.1)
    raise PeerError(f"no greeting on 127.0.0.1:{port} within {timeout:.0f}s (last: {last!r}) from "
                    f"{describe()}")


def wait_for_sasl(service, port: int) -> None:
    """Until bearerbridge's [sasl] listener on `port` greets. Postfix must not start before it:
    its smtpd would exit at the first client and be throttled for a minute."""
    wait_for_greeting(port, b"VERSION\t1\t2\n", lambda: service.process.poll() is None,
                      lambda: f"bearerbridge's [sasl] listener; its log:\n{tail(service.directory / 'twistd.log')}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int, process: subprocess.Popen | None = None, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the master `pgid` and every process of its group: SIGTERM, then SIGKILL, bounded.

    The whole group at once: a master alone takes seconds (Dovecot's waits for its login
    processes' clients and its log process lingers; Postfix's for its children), and a throwaway
    instance needs no graceful shutdown. `process` is the master if it is our child, to reap.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout / 2
        while time.monotonic() < deadline:
            if process is not None:
                process.poll()  # reap our child, or its zombie keeps the group alive
            if not group_alive(pgid):
                return
            time.sleep(0.05)
    raise PeerError(f"process group {pgid} survived SIGKILL")


def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


class ForegroundPeer:
    """A peer run in the foreground as our child (`process`), leading its own process group."""

    process: subprocess.Popen | None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process.pid, self.process)
            self.process = None


def wait_until_serving(peer, url: str, ready: Callable[[requests.Response], bool], what: str,
                       timeout: float, request_timeout: float = 2) -> None:
    """Poll `url` until `ready` likes its answer. PeerError, with what `peer.describe()` tells (its
    logs), if the peer exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not peer.alive():
            raise PeerError(f"{peer.describe()}\n(it exited while starting)")
        try:
            response = requests.get(url, timeout=request_timeout)
            if ready(response):
                return
            last = (response.status_code, response.text[:500])
        except requests.RequestException as error:
            last = error
        time.sleep(0.1)
    raise PeerError(f"{what} at {url} within {timeout:.0f}s (last: {last!r}) from {peer.describe()}")


# -- Postfix ---------------------------------------------------------------------------------

@dataclass
class Postfix:
    """A Postfix instance: its own config and queue directories; one smtpd on `port`."""

    directory: Path
    port: int
    data_directory: Path | None = None
    pid: int | None = None  # the master's, read from its pid file; it leads its process group

    @property
    def config_directory(self) -> Path:
        return self.directory / "etc"

    @property
    def log_path(self) -> Path:
        return self.directory / "postfix.log"

    def log(self) -> str:
        return tail(self.log_path)

    def describe(self) -> str:
        return f"Postfix in {self.directory}; its log:\n{self.log()}"

    def alive(self) -> bool:
        return self.pid is None or group_alive(self.pid)

    def stop(self) -> None:
        if self.pid is not None:
            stop_group(self.pid)
            self.pid = None
        if self.data_directory is not None:
            shutil.rmtree(self.data_directory, ignore_errors=True)
            self.data_directory = None


# One smtpd on the test's port, not chrooted (chroot column `n`) so that it reaches the auth
# endpoint and the directories; and the internal services an smtpd talks to.
POSTFIX_MASTER_CF = """\
# service       type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n       -       n       -       -       smtpd
pickup          unix  n       -       n       60      1       pickup
cleanup         unix  n       -       n       -       0       cleanup
qmgr            unix  n       -       n       300     1       qmgr
rewrite         unix  -       -       n       -       -       trivial-rewrite
bounce          unix  -       -       n       -       0       bounce
defer           unix  -       -       n       -       0       bounce
trace           unix  -       -       n       -       0       bounce
verify          unix  -       -       n       -       1       verify
flush           unix  n       -       n       1000?   0       flush
proxymap        unix  -       -       n       -       -       proxymap
smtp            unix  -       -       n       -       -       smtp
showq           unix  n       -       n       -       -       showq
error           unix  -       -       n       -       -       error
retry           unix  -       -       n       -       -       error
discard         unix  -       -       n       -       -       discard
anvil           unix  -       -       n       -       1       anvil
scache          unix  -       -       n       -       1       scache
tlsmgr          unix  -       -       n       1000?   1       tlsmgr
postlog         unix-dgram n  -       n       -       1       postlogd
"""


def start_postfix(directory: Path, sasl_path: str, *, overrides: Mapping[str, str] | None = None,
                  timeout: float = START_TIMEOUT) -> Postfix:
    """Start Postfix running conf/postfix/main.cf.snippet, asking the auth endpoint `sasl_path`.

    `sasl_path` is `inet:127.0.0.1:PORT` or an absolute path to a UNIX socket. Unlike the
    snippet, AUTH is offered without TLS, which only a loopback test should do.
    """
    # The master opens data_directory/master.lock as mail_owner, who cannot traverse pytest's
    # root-only tmp: so that directory lives directly under /tmp, and stop() removes it.
    data = Path(tempfile.mkdtemp(prefix="bearerbridge-postfix-data-"))
    os.chown(data, *_ids("postfix"))
    postfix = Postfix(directory, free_port(), data)
    etc, queue = postfix.config_directory, directory / "spool"
    for path in (etc, queue):  # owned by root; `postfix start` makes the queue's subdirectories
        path.mkdir(parents=True, exist_ok=True)
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(queue),
        "data_directory": str(data),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        # Logs go to a file through postlogd: there is no syslog in CI containers.
        "maillog_file": str(postfix.log_path),
        "maillog_file_prefixes": str(directory),
        "myhostname": "mail.bearerbridge.test",
        "mydomain": "bearerbridge.test",
        "mydestination": "",
        "relayhost": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        # No trusted networks: only SASL-authenticated clients may relay, even from loopback.
        "mynetworks": "",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "biff": "no",
        "smtpd_banner": "$myhostname ESMTP",
        **read_settings(POSTFIX_SNIPPET),
        # Test only: AUTH on plain-text loopback sessions (the snippet requires STARTTLS).
        "smtpd_tls_security_level": "none",
        "smtpd_tls_auth_only": "no",
        "smtpd_sasl_path": sasl_path,
        **(overrides or {}),
    }
    (etc / "main.cf").write_text("# A throwaway Postfix for bearerbridge's tests (tests/peers.py).\n"
                                 + format_settings(settings))
    (etc / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=postfix.port))
    try:
        # `start` runs `postfix check`'s checks, then waits for the master's initialization
        # (master -w) before the master goes to the background.
        done = subprocess.run(["/usr/sbin/postfix", "-c", str(etc), "start"], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise PeerError(f"postfix start failed ({done.returncode}):\n{done.stdout}{done.stderr}\n"
                            f"{postfix.describe()}")
        postfix.pid = int((queue / "pid" / "master.pid").read_text().split()[0])
        wait_for_greeting(postfix.port, b"220 ", postfix.alive, postfix.describe, timeout)
    except BaseException:
        postfix.stop()
        raise
    return postfix


def log_size(path: Path) -> int:
    """Where a log ends now, so that a test can show only what was written after."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(path: Path, offset: int, limit: int = 8000) -> str:
    """What a log gained after `offset` (its last `limit` bytes)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read()[-limit:].decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"


# -- Dovecot ---------------------------------------------------------------------------------

@dataclass
class Dovecot(ForegroundPeer):
    """A Dovecot instance serving IMAP on `port`, authenticating through the oauth2 passdb."""

    directory: Path
    port: int
    process: subprocess.Popen | None = None  # the master, in the foreground, leading its group

    @property
    def config_path(self) -> Path:
        return self.directory / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "dovecot.log"

    def log(self) -> str:
        return tail(self.log_path)

    def describe(self) -> str:
        return (f"Dovecot in {self.directory}; its log:\n{self.log()}\n"
                f"its output:\n{tail(self.directory / 'dovecot.out')}")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


DOVECOT_CONF = """\
# A throwaway Dovecot for bearerbridge's tests (tests/peers.py): IMAP on loopback only.
base_dir = {base}
state_dir = {state}
log_path = {log}
auth_verbose = yes
auth_debug = yes
protocols = imap
listen = 127.0.0.1
ssl = no
# Test only: the bearer mechanisms count as plaintext, and there is no TLS here.
disable_plaintext_auth = no
# Test only: refusals are answered at once, without the 2 s failure delay nor the per-IP penalty
# (2, 4, 8, 15 s) that all the tests' failures from 127.0.0.1 would add up to.
auth_failure_delay = 0
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
# Mail processes chroot (as root) into the test's mail directory before becoming `nobody`, who
# could not otherwise reach it through pytest's root-only tmp.
valid_chroot_dirs = {mail}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail}/./
}}
mail_location = maildir:~/Maildir

# conf/dovecot/oauth2.conf, as an operator installs it:
{snippet}"""


def start_dovecot(directory: Path, issuer: str, client_id: str, client_secret: str, *,
                  overrides: Mapping[str, str] | None = None, oauth2_text: str | None = None,
                  extra_conf: str = "", timeout: float = START_TIMEOUT) -> Dovecot:
    """Start Dovecot's IMAP with the conf/dovecot snippets, introspecting at `issuer`/introspect.

    `client_id` and `client_secret` are a confidential client's; `overrides` replace settings of
    dovecot-oauth2.conf.ext. `oauth2_text`, if given, is the whole of dovecot-oauth2.conf.ext
    instead (e.g. built from dovecot-oauth2-local.conf.ext); the other arguments then do not go
    into it. `extra_conf` is appended to dovecot.conf (e.g. conf/dovecot/doveadm-http.conf).
    """
    dovecot = Dovecot(directory, free_port())
    base, state, mail = directory / "run", directory / "state", directory / "mail"
    for path in (base, state, mail):
        path.mkdir(parents=True, exist_ok=True)
    uid, gid = _ids("nobody")
    os.chown(mail, uid, gid)
    oauth2 = directory / "dovecot-oauth2.conf.ext"
    settings = {
        **read_settings(DOVECOT_OAUTH2_SNIPPET),
        "introspection_url": f"{issuer}/introspect",
        "client_id": client_id,
        "client_secret": client_secret,
        "openid_configuration_url": f"{issuer}/.well-known/openid-configuration",
        **(overrides or {}),
    }
    oauth2.write_text(format_settings(settings) if oauth2_text is None else oauth2_text)
    oauth2.chmod(0o600)
    snippet = DOVECOT_SNIPPET.read_text()
    if DOVECOT_OAUTH2_PATH not in snippet:
        raise PeerError(f"{DOVECOT_SNIPPET} no longer names {DOVECOT_OAUTH2_PATH}")
    dovecot.config_path.write_text(DOVECOT_CONF.format(
        base=base, state=state, log=dovecot.log_path, port=dovecot.port, mail=mail, uid=uid, gid=gid,
        snippet=snippet.replace(DOVECOT_OAUTH2_PATH, str(oauth2))) + ("\n" + extra_conf if extra_conf else ""))
    try:
        with (directory / "dovecot.out").open("wb") as output:
            # -F: the master stays in the foreground, so its PID is ours; in a session of its own,
            # so that its children can be waited for as one process group.
            dovecot.process = subprocess.Popen(
                ["/usr/sbin/dovecot", "-F", "-c", str(dovecot.config_path)], stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True, cwd=directory)
        wait_for_greeting(dovecot.port, b"* OK", dovecot.alive, dovecot.describe, timeout)
    except BaseException:
        dovecot.stop()
        raise
    return dovecot
