"""The mail clients' example configs of conf/clients/, run against a real Postfix and Dovecot that
ask one running bearerbridge (as in test_peers_mail.py), with tokens from `bearerbridge-token`
after a device-grant login (as in test_peers_webdav.py).

- msmtp (conf/clients/msmtprc): sends a message through Postfix with OAUTHBEARER, its password
  from `passwordeval bearerbridge-token print --profile mail`; fails once the grant is revoked.
- mbsync (conf/clients/mbsyncrc): syncs Dovecot's INBOX into a maildir with XOAUTH2 (Cyrus SASL's
  plugin from libsasl2-modules-kdexoauth2), the token from its PassCmd.
- aerc (conf/clients/aerc-accounts.conf): parsed only (aerc is a terminal UI); its URLs name the
  oauthbearer mechanisms, and its cred-cmds print a token that introspection reports active for
  imap and smtp and that Dovecot and Postfix accept with OAUTHBEARER.

Each config is the example with only what a loopback test must change: host, port, user, paths,
and TLS off (the example's commands are kept, `bearerbridge-token` given the venv's absolute
path). Needs Debian's postfix, dovecot-imapd, msmtp, isync and libsasl2-modules-kdexoauth2
(scripts/install-peers) and root; skips without them locally and fails under CI=true.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .peer_setup import (
    MailPeers,
    StartedPeers,
    logs_printed,
    new_resource_server,
    peer_directories,
    require_peers_as_root,
    start_dovecot_asking,
)
from .peers import CONF, start_postfix, wait_for_sasl
from .support import Service, free_port, introspect, require_peer
from .test_peers_mail import IMAP_OK, SMTP_OK, imap_auth, oauthbearer, smtp_auth
from .test_peers_webdav import HELPER, helper_device_login, require_helper, run_bounded

pytestmark = pytest.mark.peer

WAIT = 10  # seconds: the bound on every exchange the test makes itself
CLIENT_TIMEOUT = 60  # seconds for one msmtp or mbsync run, killed with its process group after
REVOCATION_BOUND = 1.2  # seconds: [sasl] cache_ttl = 1, plus slack
CLIENTS = CONF / "clients"
MSMTPRC = CLIENTS / "msmtprc"
MBSYNCRC = CLIENTS / "mbsyncrc"
AERC = CLIENTS / "aerc-accounts.conf"
PRINT = "bearerbridge-token print --profile mail"  # what every example runs for its token
KDEXOAUTH2 = Path("/usr/lib/x86_64-linux-gnu/sasl2/libkdexoauth2.so")


@dataclass
class Stack(MailPeers):
    resource_server: dict  # a confidential client that may introspect (Dovecot's)
    app: dict  # a public client for `bearerbridge-token login --device`


def no_process_left(directory: Path) -> None:
    left = subprocess.run(["pgrep", "-a", "-f", str(directory)], check=False, capture_output=True, text=True,
                          timeout=WAIT)
    assert left.stdout == "", f"processes left behind:\n{left.stdout}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    require_peers_as_root("/usr/sbin/postfix", "/usr/sbin/dovecot")
    require_helper()
    top = tmp_path_factory.mktemp("clients")
    directories = peer_directories(top, "bearerbridge", "postfix", "dovecot")
    sasl_port = free_port()
    with StartedPeers() as started:
        service = started(Service.start(directories["bearerbridge"], extra=f"""
[sasl]
listen = ["tcp:{sasl_port}:interface=127.0.0.1"]
identity = ["username", "email"]
cache_ttl = 1
[sasl.services]
smtp = "smtp"
imap = "imap"
"""))
        wait_for_sasl(service, sasl_port)
        postfix = started(start_postfix(directories["postfix"], f"inet:127.0.0.1:{sasl_port}"))
        resource_server = new_resource_server(service)
        dovecot = started(start_dovecot_asking(service, directories["dovecot"], resource_server))
        app = service.client("--public", "--grant", "device_code", "--grant", "refresh_token",
                             "--scope", "imap smtp")
        yield Stack(service, postfix, dovecot, resource_server, app)
    no_process_left(top)


@pytest.fixture(autouse=True)
def peer_logs(stack):
    """Print what each program logged during the test; pytest shows it only when the test fails."""
    with logs_printed(stack.logs()):
        yield


@dataclass
class Login:
    user: str
    email: str
    xdg: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "XDG_CONFIG_HOME": str(self.xdg), "HOME": str(self.xdg.parent)}

    @property
    def profile_path(self) -> Path:
        return self.xdg / "bearerbridge-token" / "mail.json"


def device_login(stack: Stack, home: Path, scope: str = "imap smtp") -> Login:
    """A new user runs the examples' `bearerbridge-token login --device --profile mail`."""
    service = stack.service
    email = f"{service.unique('reader')}@example.org"
    user, password = service.user(email=email)
    login = Login(user, email, home / "xdg")
    helper_device_login(service, stack.app["client_id"], ["--profile", "mail", "--scope", scope], login.env,
                        user, password)
    assert json.loads(login.profile_path.read_text())["scope"] == scope
    return login


@pytest.fixture(scope="module")
def login(stack, tmp_path_factory) -> Login:
    """The one login the three examples share (profile `mail`, scope "imap smtp")."""
    return device_login(stack, tmp_path_factory.mktemp("home"))


def helper_command(value: str) -> str:
    """An example's token command, with the venv's `bearerbridge-token`."""
    assert value == PRINT, value
    return value.replace("bearerbridge-token", str(HELPER), 1)


def expect_active(stack: Stack, login: Login, token: str) -> dict:
    claims = introspect(stack.service, stack.resource_server, token)
    assert claims["active"] is True, claims
    assert set(claims["scope"].split()) == {"imap", "smtp"}, claims
    assert claims["username"] == login.user, claims
    return claims


# -- msmtp ------------------------------------------------------------------------------------

def msmtprc(path: Path, stack: Stack, login: Login) -> Path:
    """conf/clients/msmtprc for the loopback Postfix: TLS off (no STARTTLS here), our user."""
    out, seen = [], {}
    for line in MSMTPRC.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            out.append(line)
            continue
        key, _, value = line.strip().partition(" ")
        seen[key] = value.strip()
        replaced = {
            "tls": "tls off",
            "tls_starttls": "tls_starttls off",
            "tls_trust_file": None,
            "logfile": f"logfile {path.parent / 'msmtp.log'}",
            "host": "host 127.0.0.1",
            "port": f"port {stack.postfix.port}",
            "user": f"user {login.user}",
            "from": f"from {login.email}",
        }.get(key, line)
        if key == "passwordeval":
            replaced = f"passwordeval {helper_command(value.strip())}"
        if replaced is not None:
            out.append(replaced)
    assert seen.get("auth") == "oauthbearer", seen
    assert {"account", "host", "port", "user", "passwordeval", "from"} <= set(seen), seen
    path.write_text("\n".join(out) + "\n")
    path.chmod(0o600)
    return path


def msmtp(config: Path, login: Login, subject: str) -> subprocess.CompletedProcess:
    message = (f"From: {login.email}\nTo: someone@example.net\nSubject: {subject}\n\n"
               "Sent by msmtp with a bearerbridge token.\n").encode()
    done = run_bounded([require_peer("msmtp"), "-C", str(config), "-a", "bearerbridge", "--debug",
                        "someone@example.net"], timeout=CLIENT_TIMEOUT, env=login.env, stdin=message)
    print(f"----- msmtp: exit {done.returncode} -----\n{done.stdout}{done.stderr}")
    return done


def sasl_logins(stack: Stack, user: str) -> int:
    return stack.postfix.log().count(f"sasl_method=OAUTHBEARER, sasl_username={user}")


def wait_for_sasl_logins(stack: Stack, user: str, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while sasl_logins(stack, user) < count:
        assert time.monotonic() < deadline, stack.postfix.log()
        time.sleep(0.1)


def test_msmtp_sends_through_postfix_with_the_example_config(stack, login, tmp_path):
    require_peer("msmtp")
    config = msmtprc(tmp_path / "msmtprc", stack, login)
    done = msmtp(config, login, "from the example msmtprc")
    assert done.returncode == 0, done.stderr
    # Postfix records the mechanism and the name bearerbridge reported.
    wait_for_sasl_logins(stack, login.user, 1)


def test_msmtp_fails_once_the_grant_is_revoked(stack, tmp_path):
    require_peer("msmtp")
    login = device_login(stack, tmp_path)
    config = msmtprc(tmp_path / "msmtprc", stack, login)
    assert msmtp(config, login, "before the revocation").returncode == 0
    wait_for_sasl_logins(stack, login.user, 1)

    stack.service.cli("token", "revoke", "--user", login.user)
    time.sleep(REVOCATION_BOUND)  # past [sasl] cache_ttl
    # The helper still holds an access token it thinks valid: Postfix refuses it.
    done = msmtp(config, login, "with the revoked access token")
    assert done.returncode != 0, done.stderr
    assert "535" in done.stderr or "authentication failed" in done.stderr.lower(), done.stderr

    # Once it has expired, the helper's refresh is refused too: passwordeval fails, and msmtp.
    profile = json.loads(login.profile_path.read_text())
    login.profile_path.write_text(json.dumps({**profile, "expires_at": 0}, indent=2) + "\n")
    done = msmtp(config, login, "after the refresh was refused")
    assert done.returncode != 0, done.stderr
    assert "bearerbridge-token: the login has expired or was revoked" in done.stderr, done.stderr
    assert sasl_logins(stack, login.user) == 1, stack.postfix.log()


# -- mbsync -----------------------------------------------------------------------------------

def mbsyncrc(path: Path, stack: Stack, login: Login, maildir: Path) -> Path:
    """conf/clients/mbsyncrc for the loopback Dovecot: no TLS, our user, a maildir under tmp."""
    out, seen = [], {}
    for line in MBSYNCRC.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            out.append(line)
            continue
        key, _, value = line.strip().partition(" ")
        value = value.strip()
        seen[key] = value
        if key == "Host":
            out += ["Host 127.0.0.1", f"Port {stack.dovecot.port}"]
        elif key == "SSLType":
            assert value == "IMAPS", value
            out.append("SSLType None")
        elif key == "CertificateFile":
            continue
        elif key == "User":
            out.append(f"User {login.user}")
        elif key == "PassCmd":
            out.append(f'PassCmd "{helper_command(shlex.split(value)[0])}"')
        elif key == "Path":
            out.append(f"Path {maildir}/")
        elif key == "Inbox":
            out.append(f"Inbox {maildir}/INBOX")
        else:
            out.append(line)
    assert seen.get("AuthMechs") == "XOAUTH2", seen
    assert {"IMAPAccount", "Host", "User", "PassCmd", "IMAPStore", "MaildirStore", "Channel"} <= set(seen), seen
    path.write_text("\n".join(out) + "\n")
    return path


def deliver(stack: Stack, name: str, text: str) -> None:
    """Put a message straight into the (shared) Maildir of the test's Dovecot."""
    maildir = stack.dovecot.directory / "mail" / "Maildir"
    nobody = (os.stat(stack.dovecot.directory / "mail").st_uid, os.stat(stack.dovecot.directory / "mail").st_gid)
    for sub in ("", "cur", "new", "tmp"):
        (maildir / sub).mkdir(exist_ok=True)
        os.chown(maildir / sub, *nobody)
    message = maildir / "new" / f"{int(time.time())}.{name}.bearerbridge"
    message.write_text(text)
    os.chown(message, *nobody)


def mbsync(config: Path, login: Login, *args: str) -> subprocess.CompletedProcess:
    done = run_bounded([require_peer("mbsync"), "-c", str(config), *args], timeout=CLIENT_TIMEOUT, env=login.env)
    print(f"----- mbsync {' '.join(args)}: exit {done.returncode} -----\n{done.stdout}{done.stderr}")
    return done


def test_mbsync_syncs_from_dovecot_with_the_example_config(stack, login, tmp_path):
    require_peer("mbsync")
    require_peer(str(KDEXOAUTH2))  # Cyrus SASL's XOAUTH2 client plugin
    maildir = tmp_path / "Mail" / "bearerbridge"
    config = mbsyncrc(tmp_path / "mbsyncrc", stack, login, maildir)
    subject = f"for mbsync {os.urandom(4).hex()}"
    deliver(stack, subject.replace(" ", "-"), f"From: someone@example.net\nSubject: {subject}\n\nhello\n")
    maildir.mkdir(parents=True)  # as the example says: mbsync does not create Path itself

    done = mbsync(config, login, "--verbose", "bearerbridge")
    assert done.returncode == 0, done.stderr
    messages = [p for sub in ("cur", "new") for p in (maildir / "INBOX" / sub).iterdir()]
    assert any(f"Subject: {subject}\n" in p.read_text() for p in messages), messages
    log = stack.dovecot.log()
    assert f"imap-login: Info: Login: user=<{login.user}>, method=XOAUTH2," in log, log


# -- aerc -------------------------------------------------------------------------------------

def test_aerc_accounts_parse_and_their_cred_cmds_give_a_working_token(stack, login):
    accounts = configparser.ConfigParser(interpolation=None)
    accounts.read_string(AERC.read_text())
    account = accounts["bearerbridge"]
    source, outgoing = urlsplit(account["source"]), urlsplit(account["outgoing"])
    assert (source.scheme, source.password) == ("imaps+oauthbearer", None), account["source"]
    assert (outgoing.scheme, outgoing.password) == ("smtp+oauthbearer", None), account["outgoing"]
    assert source.username == outgoing.username and source.username, (source, outgoing)
    assert account.getboolean("smtp-starttls") is True

    for key, service, port, expected in (("source-cred-cmd", "imap", stack.dovecot.port, IMAP_OK),
                                         ("outgoing-cred-cmd", "smtp", stack.postfix.port, SMTP_OK)):
        # aerc runs a cred-cmd with `sh -c`.
        done = run_bounded(["sh", "-c", helper_command(account[key])], timeout=WAIT * 3, env=login.env)
        assert done.returncode == 0, done.stderr
        token = done.stdout.rstrip("\n")
        assert token and "\n" not in token, done.stdout
        expect_active(stack, login, token)
        # The mechanism the URL names, with this token, against the real server.
        attempt = (imap_auth if service == "imap" else smtp_auth)(port, "OAUTHBEARER", oauthbearer(login.user, token))
        assert (attempt.code, attempt.text) == expected, (key, attempt)
