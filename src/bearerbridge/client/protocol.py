"""Sans-IO half of `bearerbridge-token`: the OAuth decisions, testable without a network.

Discovery URLs and metadata checks (RFC 8414), PKCE (RFC 7636), the loopback redirect's answer
(RFC 6749 §4.1.2, RFC 9207), device polling (RFC 8628 §3.5), client authentication, and the
messages. Errors are typed here and turned into one stderr line and an exit status in
`bearerbridge.client.cli`; no message quotes a token or a response body.
"""

from __future__ import annotations

import hmac
import re
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from authlib.oauth2.rfc7636 import create_s256_code_challenge

from bearerbridge.client.profile import APP, Profile, ProtocolError
from bearerbridge.uris import is_loopback_host

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
EXIT_FAILED, EXIT_LOGIN_NEEDED, EXIT_INTERRUPTED = 1, 3, 130
_PRINTABLE = re.compile(r"[\x20-\x7e]+")  # RFC 6749 §5.2's characters for error fields


class HelperError(Exception):
    """A failure reported as one line on stderr; its message never carries a token."""

    exit_code = EXIT_FAILED


class LoginNeeded(HelperError):
    """Only a new `login` can help: no profile, or the refresh token was refused."""

    exit_code = EXIT_LOGIN_NEEDED


class Unreachable(HelperError):
    """The request got no HTTP answer (connection, TLS or timeout)."""


class Refused(HelperError):
    """An HTTP error answer; `error` is its RFC 6749 §5.2 error code, if it had one."""

    def __init__(self, what: str, status: int, body: object) -> None:
        self.error = printable(body.get("error"), 64) if isinstance(body, dict) else None
        detail = printable(body.get("error_description"), 200) if isinstance(body, dict) else None
        super().__init__(f"{what} refused the request (HTTP {status}"
                         + (f", {self.error}" if self.error else "") + (f": {detail}" if detail else "") + ")")


class StrayCallback(Exception):
    """A request to the loopback listener that is not the answer to our request (wrong state)."""


def printable(value: object, limit: int) -> str | None:
    """`value` if it is a short printable-ASCII string, which is safe to show on a terminal."""
    return value if isinstance(value, str) and len(value) <= limit and _PRINTABLE.fullmatch(value) else None


def terminal_safe(value: object) -> str:
    """A server-chosen string with control characters (terminal escapes) removed."""
    return "".join(c for c in str(value) if c.isprintable())[:500]


# -- protocol decisions (pure) ---------------------------------------------------------------

def check_url(url: str, what: str) -> str:
    """Endpoints must use TLS (RFC 6749 §3.1, §3.2); plain http is accepted only to loopback."""
    parts = urlsplit(url)
    if parts.hostname and (parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname))):
        return url
    raise HelperError(f"{what} {terminal_safe(url)!r} must be an https URL (plain http only to loopback)")


def check_issuer(issuer: str) -> str:
    """RFC 8414 §2: an https URL with no query or fragment."""
    if urlsplit(issuer).query or urlsplit(issuer).fragment:
        raise HelperError(f"the issuer {issuer!r} may not have a query or fragment")
    return check_url(issuer, "the issuer")


def discovery_urls(issuer: str) -> list[str]:
    """Where to look for metadata: RFC 8414 §3.1 puts the well-known suffix between the host and
    the issuer's path; OpenID Connect Discovery §4 appends it to the issuer."""
    parts = urlsplit(issuer)
    origin, path = f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")
    return [f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}{path}/.well-known/openid-configuration"]


def check_metadata(issuer: str, document: object, flow: str) -> dict[str, Any]:
    """The metadata, if it is for `issuer` (RFC 8414 §3.3) and names the endpoints `flow` needs."""
    if not isinstance(document, dict) or not isinstance(document.get("issuer"), str):
        raise ProtocolError("the server's metadata is not an RFC 8414 document")
    if document["issuer"].rstrip("/") != issuer.rstrip("/"):
        raise HelperError(f"the metadata names the issuer {terminal_safe(document['issuer'])!r}, not {issuer!r}")
    needed = {"browser": "authorization_endpoint", "device": "device_authorization_endpoint"}[flow]
    for name in ("token_endpoint", needed):
        if not isinstance(document.get(name), str):
            raise HelperError(f"the server's metadata has no {name}"
                              + (" (it does not offer the device grant; try --browser)" if flow == "device" else ""))
    for name in ("token_endpoint", needed, "revocation_endpoint"):
        if document.get(name) is not None:
            check_url(str(document[name]), f"the {name}")
    return document


def graphical(environ: Mapping[str, str], platform: str = sys.platform) -> bool:
    """Whether a browser can probably be opened here (rather than over SSH or in a container)."""
    return platform in ("darwin", "win32") or bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def choose_flow(requested: str | None, metadata: Mapping[str, Any], environ: Mapping[str, str],
                platform: str = sys.platform) -> str:
    """`--device`/`--browser` if given; else the device grant where no browser can open and the
    server offers it (RFC 8628 §1), else the browser (RFC 8252 §4.1)."""
    if requested:
        return requested
    if not graphical(environ, platform) and "device_authorization_endpoint" in metadata:
        return "device"
    return "browser"


def pkce_pair() -> tuple[str, str]:
    """A code verifier of 86 unreserved characters (RFC 7636 §4.1) and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)
    return verifier, create_s256_code_challenge(verifier)


def authorize_url(endpoint: str, client_id: str, redirect_uri: str, scope: str | None, state: str,
                  challenge: str) -> str:
    """RFC 6749 §4.1.1 with RFC 7636 §4.3; keeps any query the endpoint already has (§3.1)."""
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": state,
              "code_challenge": challenge, "code_challenge_method": "S256"}
    if scope:
        params["scope"] = scope
    return endpoint + ("&" if urlsplit(endpoint).query else "?") + urlencode(params)


def check_callback(params: Mapping[str, str], state: str, issuer: str, iss_required: bool) -> str:
    """The code from the redirect to our listener (RFC 6749 §4.1.2, §4.1.2.1).

    A wrong or missing `state` is not our answer (StrayCallback: keep waiting). `iss` must be the
    issuer, and is required when the metadata promises it (RFC 9207 §2.4)."""
    if not hmac.compare_digest(params.get("state", "").encode(), state.encode()):
        raise StrayCallback()
    if "iss" in params and params["iss"] != issuer:
        raise HelperError("the authorization response came from another issuer (RFC 9207 mix-up); not using it")
    if "iss" not in params and iss_required:
        raise HelperError("the authorization response lacks the iss the server promised (RFC 9207)")
    if "error" in params:
        error = printable(params["error"], 64) or "an unreadable error"
        raise HelperError("access was denied at the server" if error == "access_denied"
                          else f"the authorization failed: {error}")
    if not params.get("code"):
        raise HelperError("the authorization response has no code")
    return params["code"]


@dataclass(frozen=True)
class DeviceGrant:
    """A device authorization response (RFC 8628 §3.2)."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


def parse_device_response(body: object) -> DeviceGrant:
    """RFC 8628 §3.2: the required fields, with `interval` defaulting to 5 seconds."""
    if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body[k]
                                             for k in ("device_code", "user_code", "verification_uri")):
        raise ProtocolError("the device authorization reply lacks device_code, user_code or verification_uri")
    expires_in, interval = body.get("expires_in"), body.get("interval", 5)
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 for n in (expires_in, interval)):
        raise ProtocolError("the device authorization reply has a bad expires_in or interval")
    complete = body.get("verification_uri_complete")
    # expires_in is a positive number by the check above, which the type checker cannot follow through all().
    return DeviceGrant(body["device_code"], body["user_code"], body["verification_uri"],
                       complete if isinstance(complete, str) else None, expires_in, interval)  # type: ignore[arg-type]


def poll_decision(error: str | None, interval: float) -> float:
    """RFC 8628 §3.5: the seconds to wait before polling again, or an error that ends the login."""
    if error == "authorization_pending":
        return interval
    if error == "slow_down":
        return interval + 5
    if error == "access_denied":
        raise HelperError("access was denied at the server")
    if error == "expired_token":
        raise HelperError("the code expired before anyone approved it; run login again")
    raise HelperError(f"the token endpoint refused the device code ({error or 'no error code'})")


def client_auth(profile: Profile) -> dict[str, str]:
    """A public client sends only its id (RFC 6749 §3.2.1, RFC 8252 §8.4); with a secret,
    client_secret_post (§2.3.1)."""
    if profile.client_secret is None:
        return {"client_id": profile.client_id}
    return {"client_id": profile.client_id, "client_secret": profile.client_secret}


def login_command(name: str, profile: Profile | None) -> str:
    """The command that logs in again, for messages."""
    if profile is None:
        words = [APP, "login", "--issuer", "URL", "--client-id", "ID"]
    else:
        words = [APP, "login", "--issuer", profile.issuer, "--client-id", profile.client_id]
        if profile.scope:
            words += ["--scope", f'"{profile.scope}"' if " " in profile.scope else profile.scope]
        if profile.ca_file:
            words += ["--ca-file", profile.ca_file]
        if profile.client_secret:
            words += ["--client-secret", "SECRET"]
    return " ".join(words + (["--profile", name] if name != "default" else []))


def status_lines(name: str, profile: Profile, now: float) -> list[str]:
    """What `status` shows: never the tokens themselves."""
    if profile.access_token is None:
        access = "none"
    elif profile.expires_at is None:
        access = "held, lifetime unknown"
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(profile.expires_at))
        left = int(profile.expires_at - now)
        access = f"expires {when} (in {left} s)" if left > 0 else f"expired {when}"
    return [f"profile: {name}", f"issuer: {profile.issuer}",
            f"client: {profile.client_id} ({'with a client secret' if profile.client_secret else 'public'})",
            f"scope: {profile.scope or '-'}", f"access token: {access}",
            f"refresh token: {'held' if profile.refresh_token else 'none: log in again'}",
            *([f"CA file: {profile.ca_file}"] if profile.ca_file else [])]

