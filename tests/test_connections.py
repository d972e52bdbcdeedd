"""What every listener allows (bearerbridge.connections): connections per peer address, and open files."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import policies, tls
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from bearerbridge.connections import LimitConnectionsByPeer, peer_address


def connect(factory, address):
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def served(protocol) -> bool:
    return isinstance(protocol, policies.ProtocolWrapper) and protocol.wrappedProtocol is not None


def ipv4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def test_one_address_gets_at_most_the_cap_and_a_slot_again_when_one_closes():
    limiter = LimitConnectionsByPeer(Factory.forProtocol(Protocol), 2)
    first, second = connect(limiter, ipv4("203.0.113.5")), connect(limiter, ipv4("203.0.113.5"))
    assert served(first[0]) and served(second[0])
    third, transport = connect(limiter, ipv4("203.0.113.5"))
    assert not served(third) and transport.disconnecting  # closed as it comes, unanswered
    assert transport.value() == b""
    assert served(connect(limiter, ipv4("198.51.100.7"))[0])  # others are not affected
    first[0].connectionLost(Failure(ConnectionDone()))
    assert served(connect(limiter, ipv4("203.0.113.5"))[0])
    third.connectionLost(Failure(ConnectionDone()))  # a refused connection frees no slot
    assert not served(connect(limiter, ipv4("203.0.113.5"))[0])


def test_the_count_forgets_closed_connections():
    limiter = LimitConnectionsByPeer(Factory.forProtocol(Protocol), 5)
    for _ in range(20):
        connect(limiter, ipv4("203.0.113.5"))[0].connectionLost(Failure(ConnectionDone()))
    assert limiter.peerConnections == {} and limiter.protocols == {}


def test_no_cap_on_a_unix_socket_where_every_peer_shares_one_address():
    limiter = LimitConnectionsByPeer(Factory.forProtocol(Protocol), 1)
    assert all(served(connect(limiter, UNIXAddress(None))[0]) for _ in range(10))


@pytest.mark.parametrize(("host", "counted_as"), [
    ("2001:db8::1", "2001:db8::/64"),
    ("2001:db8::ffff:1", "2001:db8::/64"),  # the same host, another address of its /64
    ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
    ("::ffff:203.0.113.5", "203.0.113.5"),  # IPv4 on a tcp6 listener
    ("fe80::1%eth0", "fe80::/64"),
])
def test_ipv6_peers_are_counted_by_their_64(host, counted_as):
    assert peer_address(IPv6Address("TCP", host, 1)) == counted_as


def test_over_the_cap_on_a_tls_listener_the_connection_is_closed_and_the_port_keeps_working():
    """TLS wraps whatever the factory builds: a None there would raise and take the port down."""
    limiter = LimitConnectionsByPeer(Factory.forProtocol(Protocol), 1)
    listener = tls.TLSMemoryBIOFactory(ssl.CertificateOptions(), False, limiter)
    assert served(connect(listener, ipv4("203.0.113.5"))[0].wrappedProtocol)
    refused, transport = connect(listener, ipv4("203.0.113.5"))
    assert not served(refused.wrappedProtocol) and transport.disconnecting


def test_the_soft_limit_of_open_files_is_raised_to_the_hard_one():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit of open files here is {hard}")
    script = ("import resource\nfrom bearerbridge.connections import raise_open_files_limit\n"
              "print(raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024))).stdout
    assert out.split() == ["1024", "1024", "1024"]


def test_a_tls_listener_still_learns_what_to_offer_in_alpn_through_the_cap():
    """TLS asks the factory it wraps for its ALPN protocols, and failed every handshake offering any
    (curl's, requests') when the cap hid the Site's answer (tests/test_tls.py shakes hands for real)."""
    capped_site = LimitConnectionsByPeer(Site(Resource()), 1)
    assert IProtocolNegotiationFactory.providedBy(capped_site)
    assert capped_site.acceptableProtocols() == [b"http/1.1"]
    assert not IProtocolNegotiationFactory.providedBy(LimitConnectionsByPeer(Factory.forProtocol(Protocol), 1))
