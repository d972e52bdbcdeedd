"""URI rules shared by the server, its command line and the token helper: which hosts are this
machine (RFC 8252 §7.3), and which redirect URIs may be registered and presented. Stdlib only.

A redirect URI is compared with the registered ones character for character (RFC 9700 §4.1.3);
only the port of a public client's loopback URI may differ. Before any comparison, anything a
browser could read differently from a parser is refused: a browser follows the WHATWG URL rules,
which read `http://evil.example\\@127.0.0.1:1234/cb` as a URL of `evil.example`, while Python's
`urlsplit` sees `127.0.0.1`. So characters outside RFC 3986 (the backslash among them), `@`
(userinfo), control characters and whitespace are refused, and so are their percent-encoded forms.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

# RFC 3986 §2: unreserved, reserved (less "@", which only userinfo and odd paths need) and "%".
_URI_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]!$&'()*+,;=%]+")
# Escaped control characters, space, "@" and "\": a server or browser that decodes once would
# see the very characters refused above.
_HIDDEN_CHARACTERS = re.compile(r"%(?:[01][0-9a-f]|20|40|5c|7f)", re.IGNORECASE)
# A loopback redirect as RFC 8252 §7.3 has it: the IP literal, an optional port, then the path.
_LOOPBACK_REDIRECT = re.compile(r"(http://(?:127\.0\.0\.1|\[::1\]))(?::[0-9]{1,5})?([/?].*)?")


def is_loopback_address(host: str | None) -> bool:
    """An IP literal (IPv6 without brackets) in 127.0.0.0/8 or ::1."""
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str | None) -> bool:
    """A loopback address or the name `localhost`: where plain http is acceptable."""
    return host == "localhost" or is_loopback_address(host)


# The out-of-band "redirect" (RFC 8252 §7 deprecates it; Prosody, Doorkeeper and their apps use
# it): the code is shown on a page for the user to copy into an app that cannot receive a redirect.
OUT_OF_BAND = "urn:ietf:wg:oauth:2.0:oob"


def redirect_uri_problem(uri: str) -> str | None:
    """Why `uri` may not be a redirect URI, or None when it may (RFC 6749 §3.1.2, RFC 8252 §7.3)."""
    if not _URI_CHARACTERS.fullmatch(uri):
        return "it holds characters a URI may not (RFC 3986), or a user name (@)"
    if _HIDDEN_CHARACTERS.search(uri):
        return "it holds an escaped control character, space, @ or backslash"
    parts = urlsplit(uri)
    if not parts.scheme or "#" in uri or (parts.scheme in ("http", "https") and not parts.hostname):
        return "it must be absolute and have no fragment"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return "plain http is allowed only to 127.0.0.1, [::1] or localhost"
    return None


def loopback_redirect_without_port(uri: str) -> str | None:
    """`http://127.0.0.1:PORT/path` as `http://127.0.0.1/path` (and so for [::1]); None when
    `uri` is no loopback redirect. Two such URIs differing only in their port are the same
    redirect for a native app, which listens on whatever port it could get (RFC 8252 §7.3)."""
    match = _LOOPBACK_REDIRECT.fullmatch(uri)
    return None if match is None else match.group(1) + (match.group(2) or "")
