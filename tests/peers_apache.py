"""A real Apache httpd with mod_auth_openidc, an OpenID Connect relying party of bearerbridge.

Apache runs in the foreground as a single process (`apache2 -X`) from a throwaway config that reads
nothing of Debian's /etc/apache2 (see /work/shared/notes/idp-peers.md §2). It listens on a free
loopback port and protects `/private/`: a browser that asks for the page there is sent to the
provider's discovery URL's authorization endpoint, and once signed in sees the page, which shows
what Apache made of the user (REMOTE_USER from `preferred_username`, the claims, and the ID token
it accepted). The mod_auth_openidc settings are conf/apache/auth_openidc.conf itself, included as
an operator includes it, with only its placeholders replaced (the provider's and Apache's URLs,
the client's id and secret, the passphrase); the config around it holds what a throwaway instance
needs (its root, port, modules, logs) and what the test's page shows. Apache leads a session of
its own and is stopped by the PID it started with; if it does not answer within its bound,
`PeerError` carries its error log, which logs every call mod_auth_openidc makes to the provider
(`LogLevel auth_openidc:debug`), and its access log names the user of each request. Started as
root, Apache serves as `nobody` (it refuses to serve as root), who cannot enter pytest's
directories: so the documents live in one of their own under /tmp, which stop() removes; the
config and the logs stay in the test's directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

from .peers import CONF, START_TIMEOUT, ForegroundPeer, PeerError, log_since, log_size, tail, wait_until_serving
from .support import free_port

APACHE = "/usr/sbin/apache2"
MODULES = Path("/usr/lib/apache2/modules")
OPENIDC_MODULE = MODULES / "mod_auth_openidc.so"
OPENIDC_SNIPPET = CONF / "apache" / "auth_openidc.conf"
PROTECTED = '<Location "/private/">'  # the snippet's protected location ...
PAGE = "/private/whoami.shtml"  # ... where the test's page is
REDIRECT_PATH = "/private/redirect_uri"  # mod_auth_openidc's own: inside the protected path, not content
# The snippet's placeholders, each replaced by the test's value (see openidc_config).
ISSUER_PLACEHOLDER = "https://auth.example.org"
SITE_PLACEHOLDER = "https://app.example.org"
CLIENT_ID_PLACEHOLDER = "OIDCClientID CLIENT_ID\n"
CLIENT_SECRET_PLACEHOLDER = "OIDCClientSecret CLIENT_SECRET\n"
PASSPHRASE_PLACEHOLDER = "OIDCCryptoPassphrase CRYPTO_PASSPHRASE\n"
READY = "/ready.txt"  # a public file: Apache answers, and its child (`nobody`) reads the documents
# Not the tests' bound on a browser step: mod_auth_openidc's on each call to the provider.
PROVIDER_TIMEOUT = 10  # seconds


def redirect_uri(port: int) -> str:
    """The redirect URI of an Apache on `port`, to register before Apache starts with the client."""
    return f"http://127.0.0.1:{port}{REDIRECT_PATH}"


@dataclass
class Apache(ForegroundPeer):
    directory: Path  # config and logs
    port: int
    documents: Path  # under /tmp, for `nobody` to read (pytest's tmp is root's only); stop() removes it
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def page_url(self) -> str:
        return self.url + PAGE

    @property
    def redirect_uri(self) -> str:
        return redirect_uri(self.port)

    @property
    def config_path(self) -> Path:
        return self.directory / "httpd.conf"

    @property
    def error_log_path(self) -> Path:
        return self.directory / "error.log"

    @property
    def access_log_path(self) -> Path:
        return self.directory / "access.log"

    def log(self) -> str:
        return tail(self.error_log_path)

    def describe(self) -> str:
        return (f"Apache in {self.directory}; its error log:\n{self.log()}\n"
                f"its access log:\n{tail(self.access_log_path, 2000)}\n"
                f"its output:\n{tail(self.directory / 'apache.out', 2000)}")

    def logged_since(self, offset: int) -> str:
        """What Apache logged after `offset` (see `log_size`): its errors first, then all of it."""
        logged = log_since(self.error_log_path, offset, limit=20000)
        errors = "\n".join(line for line in logged.splitlines() if ":error] " in line)
        return f"its errors meanwhile:\n{errors or '(none)'}\nits error log meanwhile:\n{logged[-6000:]}"

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            shutil.rmtree(self.documents, ignore_errors=True)

    def authorization_request(self, issuer: str) -> dict[str, str]:
        """Ask for the protected page as a browser would, and return the query of the authorization
        request mod_auth_openidc redirects to, which must be at `issuer`. Raises `PeerError` with
        Apache's answer and what it logged meanwhile (e.g. why it could not read the discovery)."""
        offset = log_size(self.error_log_path)
        # Without `Accept: text/html` mod_auth_openidc answers 401 instead of redirecting (OIDCUnAuthAction).
        response = requests.get(self.page_url, headers={"Accept": "text/html"}, allow_redirects=False,
                                timeout=2 * PROVIDER_TIMEOUT)
        location = response.headers.get("Location", "")
        if response.status_code != 302 or not location.startswith(issuer.rstrip("/") + "/"):
            raise PeerError(f"Apache did not send a browser to {issuer}: {response.status_code} "
                            f"Location={location!r} {response.text[:300]!r}\n{self.logged_since(offset)}")
        return query(location)

    def requests_logged(self) -> list[tuple[str, str, int]]:
        """(user, request line, status) of each request in the access log; the user is "-" when none."""
        return [(user, line, int(status)) for user, line, status in
                re.findall(r'^\S+ (\S+) \[[^]]+\] "([^"]*)" (\d+) ', self.access_log_path.read_text(), re.MULTILINE)]


def query(url: str) -> dict[str, str]:
    """The query parameters of a URL, each with its first value."""
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def _replace(text: str, placeholder: str, value: str) -> str:
    if placeholder not in text:
        raise PeerError(f"{OPENIDC_SNIPPET} no longer has {placeholder!r}; tests/peers_apache.py replaces it")
    return text.replace(placeholder, value)


def openidc_config(issuer: str, site: str, client_id: str, client_secret: str, passphrase: str) -> str:
    """conf/apache/auth_openidc.conf with the test's provider `issuer`, Apache's own URL `site`,
    the client's credentials and a passphrase. Raises `PeerError` when a placeholder, the
    redirect URI or the protected location the test relies on is no longer there."""
    text = OPENIDC_SNIPPET.read_text()
    for needed in (f"OIDCRedirectURI {SITE_PLACEHOLDER}{REDIRECT_PATH}\n", PROTECTED):
        if needed not in text:
            raise PeerError(f"{OPENIDC_SNIPPET} no longer has {needed!r}; tests/peers_apache.py relies on it")
    for value in (client_id, client_secret, passphrase):
        if not value or any(c.isspace() or c in "\"'\\#" for c in value):
            raise ValueError(f"{value!r} is not one bare word of Apache's config")
    text = _replace(text, ISSUER_PLACEHOLDER, issuer.rstrip("/"))
    text = _replace(text, SITE_PLACEHOLDER, site)
    text = _replace(text, CLIENT_ID_PLACEHOLDER, f"OIDCClientID {client_id}\n")
    text = _replace(text, CLIENT_SECRET_PLACEHOLDER, f"OIDCClientSecret {client_secret}\n")
    return _replace(text, PASSPHRASE_PLACEHOLDER, f"OIDCCryptoPassphrase {passphrase}\n")


HTTPD_CONF = """\
# A throwaway Apache for bearerbridge's tests (tests/peers_apache.py). Apache allows whole-line
# comments only.
ServerRoot "{dir}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {dir}/run/httpd.pid
DefaultRuntimeDir {dir}/run
{user}LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so
LoadModule authn_core_module {modules}/mod_authn_core.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule authz_user_module {modules}/mod_authz_user.so
LoadModule mime_module {modules}/mod_mime.so
LoadModule include_module {modules}/mod_include.so
LoadModule reqtimeout_module {modules}/mod_reqtimeout.so
LoadModule auth_openidc_module {openidc}
# One process (-X) serves one connection at a time: no keep-alive, or a browser's idle connection
# would hold off the next browser for KeepAliveTimeout; and a connection that sends no request
# (Chromium opens speculative ones) is dropped after 2 s instead of Timeout's 60.
KeepAlive Off
RequestReadTimeout header=2 body=5
ErrorLog {dir}/error.log
LogLevel warn auth_openidc:debug
CustomLog {dir}/access.log "%h %u %t \\"%r\\" %>s %b"
TypesConfig /etc/mime.types
DocumentRoot "{documents}"

# conf/apache/auth_openidc.conf, as an operator includes it (its placeholders replaced).
Include {snippet}

# Test only: the page shows the ID token Apache accepted (its header names the key) and what userinfo said.
OIDCPassIDTokenAs claims serialized
OIDCPassUserInfoAs claims json
OIDCHTTPTimeoutShort {timeout}
OIDCHTTPTimeoutLong {timeout}

<Directory "{documents}">
  Options +Includes
  AddType text/html .shtml
  AddOutputFilter INCLUDES .shtml
</Directory>
"""

# What the relying party's application sees of the user, one element by id per variable.
WHOAMI = """\
<!DOCTYPE html>
<html><head><title>Apache relying party</title></head><body>
<h1>Signed in at Apache</h1>
<p>REMOTE_USER: <span id="remote-user"><!--#echo var="REMOTE_USER" --></span></p>
<p>preferred_username: <span id="preferred-username"><!--#echo var="OIDC_CLAIM_preferred_username" --></span></p>
<p>email: <span id="email"><!--#echo var="OIDC_CLAIM_email" --></span></p>
<p>sub: <span id="sub"><!--#echo var="OIDC_CLAIM_sub" --></span></p>
<p>ID token: <code id="id-token"><!--#echo var="OIDC_id_token" --></code></p>
<p>userinfo: <code id="userinfo"><!--#echo var="OIDC_userinfo_json" --></code></p>
</body></html>
"""


def start_apache(directory: Path, issuer: str, client_id: str, client_secret: str, *, port: int | None = None,
                 timeout: float = START_TIMEOUT) -> Apache:
    """Start Apache as the relying party `client_id` of the OpenID provider `issuer`.

    `port` is the one whose `redirect_uri(port)` the client registered. Returns once Apache serves
    its documents and sends a browser asking for the protected page to `issuer`, which it does
    after reading the discovery document: a provider without one fails here, with Apache's reason.
    """
    documents = Path(tempfile.mkdtemp(prefix="bearerbridge-apache-docs-"))
    apache = Apache(directory, port or free_port(), documents)
    try:
        for path in (directory / "run", documents / "private"):
            path.mkdir(parents=True, exist_ok=True)
        (documents / "private" / "whoami.shtml").write_text(WHOAMI)
        (documents / READY.lstrip("/")).write_text("ok\n")
        for path in (documents, documents / "private"):
            path.chmod(0o755)
        # As root, Apache serves as `nobody` (it refuses to serve as root); otherwise as the current user.
        user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
        snippet = directory / OPENIDC_SNIPPET.name
        snippet.write_text(openidc_config(issuer, apache.url, client_id, client_secret, os.urandom(16).hex()))
        snippet.chmod(0o600)  # it holds the client's secret
        apache.config_path.write_text(HTTPD_CONF.format(
            dir=directory, port=apache.port, user=user, modules=MODULES, openidc=OPENIDC_MODULE,
            documents=documents, snippet=snippet, timeout=PROVIDER_TIMEOUT))
        checked = subprocess.run([APACHE, "-t", "-f", str(apache.config_path)], capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        if checked.returncode != 0:
            raise PeerError(f"apache2 -t refused {apache.config_path}:\n{checked.stdout}{checked.stderr}")
        with (directory / "apache.out").open("wb") as output:
            # -X: one process in the foreground, so its PID is ours; in a session of its own, so that
            # stopping its group also stops anything it forked.
            apache.process = subprocess.Popen([APACHE, "-X", "-f", str(apache.config_path)],
                                              stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                              start_new_session=True, cwd=directory)
        _wait_until_serving(apache, timeout)
        apache.authorization_request(issuer)
    except BaseException:
        apache.stop()
        raise
    return apache


def _wait_until_serving(apache: Apache, timeout: float) -> None:
    wait_until_serving(apache, apache.url + READY, lambda r: r.status_code == 200 and r.text == "ok\n",
                       "Apache did not serve its ready page", timeout)
