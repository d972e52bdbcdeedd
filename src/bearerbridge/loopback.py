"""The one test of "this host is this machine", for redirect URIs (RFC 8252 §7.3), plain-http
issuers and endpoints, and peers that are local proxies. Stdlib only."""

from __future__ import annotations

import ipaddress


def is_loopback_address(host: str | None) -> bool:
    """An IP literal (IPv6 without brackets) in 127.0.0.0/8 or ::1."""
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str | None) -> bool:
    """A loopback address or the name `localhost`: where plain http is acceptable."""
    return host == "localhost" or is_loopback_address(host)
