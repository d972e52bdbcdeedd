"""A real Roundcube webmail (Debian's roundcube-core 1.6.5), run from a throwaway config.

Its config.inc.php is conf/roundcube/config.inc.php itself, as an operator appends it, with only
what a loopback test must change: bearerbridge's URLs, the client's credentials and the IMAP
server (plain IMAP on a loopback port instead of STARTTLS). Before it come the settings an
installation already has (database, des_key, directories), all in the test's directory: the
database is a SQLite file there, so the MariaDB or MySQL that Debian's package may have set up is
never touched. The config directory also holds symlinks to Debian's defaults.inc.php and
mimetypes.php, which Roundcube reads from the same directory (ROUNDCUBE_CONFIG_DIR).

Roundcube is served by PHP's built-in web server in a session of its own, stopped by the PID it
started with; if it does not answer within its bound, `PeerError` carries its logs.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .peers import CONF, START_TIMEOUT, ForegroundPeer, PeerError, tail, wait_until_serving
from .support import free_port

PHP = "/usr/bin/php"
ROUNDCUBE_SNIPPET = CONF / "roundcube" / "config.inc.php"
DEBIAN_CONFIG = Path("/etc/roundcube")  # defaults.inc.php and mimetypes.php
INSTALL_PATH = Path("/var/lib/roundcube")  # Debian's; Roundcube's program/ and the docroot below
DOCUMENT_ROOT = INSTALL_PATH / "public_html"
# Test only: any 24 characters (Roundcube encrypts the IMAP password, here the token, with it).
DES_KEY = "bearerbridge-test-only!!"
# The snippet's placeholders, each replaced by the test's value (see roundcube_config).
ISSUER_PLACEHOLDER = "https://auth.example.org"
IMAP_PLACEHOLDER = "'tls://mail.example.org:143'"
CLIENT_ID_PLACEHOLDER = "'CLIENT_ID'"
CLIENT_SECRET_PLACEHOLDER = "'CLIENT_SECRET'"


@dataclass
class Roundcube(ForegroundPeer):
    """A Roundcube served on `port`; its config, database, temp and log files in `directory`.

    Made before it starts (`Roundcube(directory)` picks the port), so that its redirect URI is
    known when its client is registered; then start_roundcube."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None  # php -S, leading its process group

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redirect_uri(self) -> str:
        """The redirect URI Roundcube sends: its address and /index.php/login/oauth."""
        return f"{self.url}/index.php/login/oauth"

    @property
    def config_directory(self) -> Path:
        return self.directory / "config"

    @property
    def log_directory(self) -> Path:
        return self.directory / "logs"

    @property
    def database(self) -> Path:
        return self.directory / "roundcube.sqlite"

    def log(self) -> str:
        """Roundcube's own logs (errors, IMAP conversation) and the web server's output."""
        parts = [f"--- {path.name} ---\n{tail(path)}" for path in sorted(self.log_directory.glob("*.log"))]
        parts.append(f"--- php -S output ---\n{tail(self.directory / 'php.out')}")
        return "\n".join(parts)

    def describe(self) -> str:
        return f"Roundcube in {self.directory}; its logs:\n{self.log()}"


def _replace(text: str, placeholder: str, value: str) -> str:
    if placeholder not in text:
        raise PeerError(f"{ROUNDCUBE_SNIPPET} no longer has {placeholder}; tests/peers_roundcube.py replaces it")
    return text.replace(placeholder, value)


def roundcube_config(issuer: str, client_id: str, client_secret: str, imap_host: str) -> str:
    """conf/roundcube/config.inc.php with the test's issuer, client and IMAP server, as PHP source.

    The values are put in as PHP single-quoted strings, so they must not hold `'` or `\\`
    (URLs, host:port, and bearerbridge's client ids and secrets do not)."""
    for value in (issuer, client_id, client_secret, imap_host):
        if "'" in value or "\\" in value:
            raise ValueError(f"cannot put {value!r} in a PHP single-quoted string")
    text = ROUNDCUBE_SNIPPET.read_text()
    if not text.startswith("<?php\n"):
        raise PeerError(f"{ROUNDCUBE_SNIPPET} must start with a `<?php` line")
    text = _replace(text, ISSUER_PLACEHOLDER, issuer.rstrip("/"))
    text = _replace(text, IMAP_PLACEHOLDER, f"'{imap_host}'")
    text = _replace(text, CLIENT_ID_PLACEHOLDER, f"'{client_id}'")
    return _replace(text, CLIENT_SECRET_PLACEHOLDER, f"'{client_secret}'")


ROUNDCUBE_CONF = """\
<?php
// A throwaway Roundcube for bearerbridge's tests (tests/peers_roundcube.py).
$config = [];
$config['db_dsnw'] = 'sqlite:///{database}?mode=0600';
$config['des_key'] = '{des_key}';
$config['temp_dir'] = '{directory}/temp/';
$config['log_dir'] = '{directory}/logs/';
$config['log_driver'] = 'file';
// The IMAP conversation in logs/imap.log, shown when a test fails.
$config['imap_debug'] = true;
$config['plugins'] = [];
$config['skin'] = 'elastic';
$config['enable_spellcheck'] = false;
$config['support_url'] = '';

// conf/roundcube/config.inc.php, as an operator appends it:
{snippet}"""


def _environment(roundcube: Roundcube) -> dict[str, str]:
    """Ours, with ROUNDCUBE_CONFIG_DIR naming the instance's config directory. Nothing else from
    the caller's environment may reconfigure it: Roundcube reads any option from
    ROUNDCUBE_<OPTION>, and more config directories from RCUBE_CONFIG_PATH."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("ROUNDCUBE_", "RCUBE_"))}
    env["ROUNDCUBE_CONFIG_DIR"] = str(roundcube.config_directory)
    return env


def start_roundcube(roundcube: Roundcube, issuer: str, client_id: str, client_secret: str, imap_port: int, *,
                    timeout: float = START_TIMEOUT) -> Roundcube:
    """Write the config of `roundcube` and serve it with `php -S` until it answers."""
    directory = roundcube.directory
    for path in (roundcube.config_directory, directory / "temp", roundcube.log_directory):
        path.mkdir(parents=True, exist_ok=True)
    for name in ("defaults.inc.php", "mimetypes.php"):
        link = roundcube.config_directory / name
        if not link.is_symlink():
            link.symlink_to(DEBIAN_CONFIG / name)
    snippet = roundcube_config(issuer, client_id, client_secret, f"127.0.0.1:{imap_port}")
    config = roundcube.config_directory / "config.inc.php"
    config.write_text(ROUNDCUBE_CONF.format(database=roundcube.database, des_key=DES_KEY, directory=directory,
                                            snippet=snippet.removeprefix("<?php\n")))
    config.chmod(0o600)  # it holds the client's secret
    env = _environment(roundcube)
    # A few workers: the browser fetches a page's scripts and styles at once.
    env["PHP_CLI_SERVER_WORKERS"] = "4"
    command = [PHP, "-S", f"127.0.0.1:{roundcube.port}", "-t", str(DOCUMENT_ROOT)]
    try:
        with (directory / "php.out").open("wb") as output:
            roundcube.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                                 stderr=subprocess.STDOUT, start_new_session=True,
                                                 cwd=directory, env=env)
        _wait_until_serving(roundcube, timeout)
    except BaseException:
        roundcube.stop()
        raise
    return roundcube


def _wait_until_serving(roundcube: Roundcube, timeout: float) -> None:
    """Until its login page answers 200; that first request also creates the SQLite database."""
    wait_until_serving(roundcube, roundcube.url + "/", lambda r: r.status_code == 200 and 'id="rcmloginuser"' in r.text,
                       "Roundcube did not show its login page", timeout, request_timeout=5)


# Roundcube keeps the IMAP password of a session, for an OAuth login the "<token_type>
# <access_token>" it got from the token endpoint, encrypted with des_key in its session table.
# This decrypts the one given as argv[1] with Roundcube's own code and this instance's config.
DECRYPT_PHP = f"""
define('INSTALL_PATH', '{INSTALL_PATH}/');
require_once INSTALL_PATH . 'program/include/clisetup.php';
$clear = $rcmail->decrypt($argv[1]);
if ($clear === false) {{ fwrite(STDERR, "cannot decrypt\\n"); exit(1); }}
echo $clear;
"""


def session_authorizations(roundcube: Roundcube, timeout: float = 10.0) -> list[str]:
    """The IMAP credentials that Roundcube's live sessions hold, decrypted: after an OAuth login,
    `"<token_type> <access_token>"` exactly as it builds the XOAUTH2 `auth=` value."""
    with contextlib.closing(sqlite3.connect(f"file:{roundcube.database}?mode=ro", uri=True,
                                            timeout=timeout)) as db:
        rows = db.execute("SELECT vars FROM session").fetchall()
    env = _environment(roundcube)
    found = []
    for (encoded,) in rows:
        # PHP's session encoding: name|serialized-value...; the password is a base64 string.
        match = re.search(rb'(?:^|[;}])password\|s:\d+:"([A-Za-z0-9+/=]*)"', base64.b64decode(encoded))
        if match:
            done = subprocess.run([PHP, "-r", DECRYPT_PHP, match.group(1).decode()], capture_output=True,
                                  text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise PeerError(f"decrypting a Roundcube session failed: {done.stderr}{done.stdout}")
            found.append(done.stdout)
    return found
