"""A real nginx serving WebDAV behind bearerbridge's forward-auth, run from a throwaway config.

The server block is conf/nginx/webdav.conf itself, as an operator installs it, with only what a
loopback test must change: the listener (plain HTTP on a free 127.0.0.1 port instead of TLS on
443), the share's root, the access log, and the address of bearerbridge in `proxy_pass`. Around it
goes a minimal nginx.conf whose temporary files, logs and pid file all live in the test's
directory. nginx runs in the foreground (`daemon off`) in a session of its own, so that its
master and worker are stopped together by the PID it started with; if it does not answer within
its bound, `PeerError` carries its error log.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .peers import CONF, START_TIMEOUT, ForegroundPeer, PeerError, tail, wait_until_serving
from .support import free_port

NGINX = "/usr/sbin/nginx"
NGINX_SNIPPET = CONF / "nginx" / "webdav.conf"
# Debian's nginx loads this through /etc/nginx/modules-enabled/, which a throwaway nginx.conf does
# not include; PROPFIND and OPTIONS come from it.
DAV_EXT_MODULE = Path("/usr/lib/nginx/modules/ngx_http_dav_ext_module.so")


@dataclass
class Nginx(ForegroundPeer):
    directory: Path
    port: int
    share: Path  # the WebDAV root
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def error_log_path(self) -> Path:
        return self.directory / "error.log"

    @property
    def access_log_path(self) -> Path:
        return self.directory / "webdav.access.log"

    def log(self) -> str:
        return tail(self.error_log_path)

    def describe(self) -> str:
        return (f"nginx in {self.directory}; its error log:\n{self.log()}\n"
                f"its output:\n{tail(self.directory / 'nginx.out')}")


NGINX_CONF = """\
# A throwaway nginx for bearerbridge's tests (tests/peers_web.py). daemon, pid and error_log come
# from the command line.
{user}worker_processes 1;
load_module {dav_ext};
events {{
    worker_connections 64;
}}
http {{
    default_type application/octet-stream;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    access_log {dir}/access.log;

# conf/nginx/webdav.conf, as an operator installs it (with the test's listener, paths and upstream):
{snippet}
}}
"""


def _directives(text: str, name: str) -> list[re.Match]:
    return list(re.finditer(rf"(?m)^[ \t]*{re.escape(name)}[ \t][^;\n]*;[ \t]*\n", text))


def _replace_one(text: str, name: str, replacement: str) -> str:
    found = _directives(text, name)
    if len(found) != 1:
        raise PeerError(f"{NGINX_SNIPPET} has {len(found)} `{name}` directives; tests/peers_web.py expects one")
    match = found[0]
    line = match.group(0)
    indent = line[:len(line) - len(line.lstrip())]
    return text[:match.start()] + indent + replacement + "\n" + text[match.end():]


def _remove_all(text: str, name: str) -> str:
    for match in reversed(_directives(text, name)):
        text = text[:match.start()] + text[match.end():]
    return text


def webdav_snippet(port: int, share: Path, access_log: Path, bearerbridge_url: str) -> str:
    """conf/nginx/webdav.conf with the test's listener, share, access log and bearerbridge."""
    text = NGINX_SNIPPET.read_text()
    if not _directives(text, "listen"):
        raise PeerError(f"{NGINX_SNIPPET} has no `listen` directive")
    # Test only: plain HTTP on loopback (the snippet serves TLS on 443, IPv4 and IPv6).
    first = _directives(text, "listen")[0]
    text = text[:first.start()] + "    @LISTEN@\n" + text[first.end():]
    text = _remove_all(text, "listen").replace("@LISTEN@", f"listen 127.0.0.1:{port};")
    text = _remove_all(text, "ssl_certificate")
    text = _remove_all(text, "ssl_certificate_key")
    text = _replace_one(text, "root", f"root {share};")
    access = _directives(text, "access_log")
    if len(access) != 1 or not access[0].group(0).rstrip().endswith(" bearerbridge_webdav;"):
        raise PeerError(f"{NGINX_SNIPPET}: expected one `access_log ... bearerbridge_webdav;`")
    text = _replace_one(text, "access_log", f"access_log {access_log} bearerbridge_webdav;")
    upstream = _directives(text, "proxy_pass")
    if len(upstream) != 1 or not upstream[0].group(0).rstrip().endswith("/forward-auth;"):
        raise PeerError(f"{NGINX_SNIPPET}: expected one `proxy_pass .../forward-auth;`")
    return _replace_one(text, "proxy_pass", f"proxy_pass {bearerbridge_url.rstrip('/')}/forward-auth;")


def start_nginx(directory: Path, bearerbridge_url: str, *, timeout: float = START_TIMEOUT) -> Nginx:
    """Start nginx serving a WebDAV share in `directory`/share, authorized by `bearerbridge_url`."""
    nginx = Nginx(directory, free_port(), directory / "share")
    for path in (nginx.share, directory / "tmp"):
        path.mkdir(parents=True, exist_ok=True)
    # As root, the workers would otherwise run as `nobody`, who cannot reach pytest's root-only
    # tmp; without root, nginx ignores the directive and all runs as the current user.
    user = "user root;\n" if os.geteuid() == 0 else ""
    nginx.config_path.write_text(NGINX_CONF.format(
        user=user, dav_ext=DAV_EXT_MODULE, dir=directory,
        snippet=webdav_snippet(nginx.port, nginx.share, nginx.access_log_path, bearerbridge_url)))
    command = [NGINX, "-p", f"{directory}/", "-c", str(nginx.config_path), "-e", str(nginx.error_log_path),
               "-g", f"daemon off; pid {directory}/nginx.pid; error_log {nginx.error_log_path} info;"]
    try:
        with (directory / "nginx.out").open("wb") as output:
            nginx.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                             stderr=subprocess.STDOUT, start_new_session=True, cwd=directory)
        _wait_until_serving(nginx, timeout)
    except BaseException:
        nginx.stop()
        raise
    return nginx


def _wait_until_serving(nginx: Nginx, timeout: float) -> None:
    # Any answer from nginx will do (401 without a token, 500 if bearerbridge is down).
    wait_until_serving(nginx, nginx.url + "/", lambda r: r.headers.get("Server", "").startswith("nginx"),
                       "nginx did not answer", timeout)
