"""What every listener allows: connections at once per peer address, and as many open files as
the system lets a process have. Twisted's own policy, in working order."""

from __future__ import annotations

import ipaddress
import resource
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from zope.interface import directlyProvides

log = Logger()


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one, and return it: every connection holds
    a descriptor, and under the usual soft limit of 1,024, 1,100 idle connections once shut
    everyone out (the cap per peer keeps one address from doing so, this raises the bar for many)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warn("Could not raise the limit of open files to {hard}: {error}", hard=hard, error=e)
    log.info("Open files: at most {soft} (hard limit {hard}); each connection holds one", soft=soft, hard=hard)
    return soft


def peer_address(address: IAddress) -> str | None:
    """The address whose connections are counted together: an IPv4 address, an IPv6 /64 (a
    host holds a whole one to pick from) or the IPv4 address mapped in one; None on a UNIX
    socket, where every peer shares one nameless address."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return counted_address(address.host)
    return None


def counted_address(host: str) -> str:
    """`host` (an IP address in text) as `peer_address` counts it; ValueError if it is none."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class _Refused(Protocol):
    """A connection past the cap: closed as soon as it is made, unanswered."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class LimitConnectionsByPeer(policies.WrappingFactory):
    """Twisted's `policies.LimitConnectionsByPeer` in working order (it indexes addresses as the
    tuples they no longer are, and never forgets a closed connection): at most `limit`
    connections at once from one peer (`peer_address`); one more is closed as it comes. None is
    refused on a UNIX socket: its mode says who may connect, and all of Postfix's smtpd
    processes and Prosody would share one cap there."""

    def __init__(self, wrapped: Factory[Any], limit: int) -> None:
        super().__init__(wrapped)
        self.limit = limit
        self.peerConnections: dict[str, int] = {}
        if IProtocolNegotiationFactory.providedBy(wrapped):
            # TLS asks the factory it wraps (this one) what to offer in ALPN; without an answer
            # it fails every handshake whose client offers any (a Site offers http/1.1).
            directlyProvides(self, IProtocolNegotiationFactory)

    def acceptableProtocols(self) -> list[bytes]:
        return list(IProtocolNegotiationFactory(self.wrappedFactory).acceptableProtocols())

    # Past the cap, a protocol that closes at once: not None, which a TLS listener's wrapper
    # would wrap all the same, and fail on (taking the listening port down).
    def buildProtocol(self, addr: IAddress | None) -> policies.ProtocolWrapper | Protocol:  # type: ignore[override]
        peer = None if addr is None else peer_address(addr)
        if peer is not None:
            count = self.peerConnections.get(peer, 0)
            if count >= self.limit:
                return _Refused()
            self.peerConnections[peer] = count + 1
        return super().buildProtocol(addr)

    def unregisterProtocol(self, p: policies.ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        peer = peer_address(p.getPeer())
        if peer is not None and peer in self.peerConnections:
            self.peerConnections[peer] -= 1
            if not self.peerConnections[peer]:
                del self.peerConnections[peer]
