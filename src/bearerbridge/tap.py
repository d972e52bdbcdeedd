"""`twistd bearerbridge`: command-line options and the service tree."""

from __future__ import annotations

import functools
import gc
import ipaddress
import resource
from importlib import resources
from typing import Any

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python import usage
from twisted.web.resource import Resource
from zope.interface import directlyProvides

from bearerbridge import config as configuration
from bearerbridge.bootstrap import open_store
from bearerbridge.metrics import Metrics
from bearerbridge.oauth.server import BridgeServer, discovery_url, metadata
from bearerbridge.sasl.dovecot import DovecotAuthFactory
from bearerbridge.sasl.validator import Validator
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.authorize import Authorize, Logout
from bearerbridge.web.device import DevicePage
from bearerbridge.web.forward import ForwardAuth
from bearerbridge.web.monitoring import Health, MetricsResource
from bearerbridge.web.sasl import SaslEndpoint
from bearerbridge.web.sessions import PasswordLogin, Sessions
from bearerbridge.web.site import BridgeSite, JsonDocument, Pages, SecuredRoot, StaticFiles
from bearerbridge.web.token import EndpointResource, IntrospectionResource, TokenEndpoint

log = Logger()
PURGE_INTERVAL = 3600


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = ("Run the bearerbridge authorization server. Without --config it reads "
                f"${configuration.ENV_VAR}, else runs on built-in defaults "
                "(SQLite under ./var, HTTP on 127.0.0.1:8080).")
    optParameters = [["config", "c", None, "Path to the TOML configuration file."]]

    def postOptions(self) -> None:
        try:
            self.config = configuration.load(self["config"])
        except configuration.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        for key, descriptions in (("[http] listen", self.config.http.listen),
                                  ("[sasl] listen", self.config.sasl.listen)):
            for i, description in enumerate(descriptions):
                try:
                    serverFromString(reactor, description)
                except (ValueError, KeyError, TypeError) as e:
                    raise usage.UsageError(f"{key}[{i}]: bad endpoint {description!r}: {e}") from None


def make_service(config: configuration.Config) -> MultiService:
    """Build the service tree; the pool comes first so that it stops last."""
    raise_open_files_limit()
    store = open_store(config)
    metrics = Metrics()
    top = MultiService()
    pool = StorePool(store, config.database.threads, config.database.deadline)
    pool.setServiceParent(top)
    validator = Validator(pool, config.sasl)
    site = BridgeSite(http_root(config, pool, metrics, validator), config.http.access_log)
    http_listener = LimitConnectionsByPeer(site, config.http.max_connections_per_peer)
    for description in config.http.listen:
        strports.service(description, http_listener).setServiceParent(top)
    if config.sasl.listen:
        dovecot = DovecotAuthFactory(
            validator.validate, openid_configuration=discovery_url(config.server.issuer),
            mechanisms=config.sasl.offered,
            on_decision=functools.partial(metrics.sasl_decision, "dovecot", config.sasl.services))
        sasl_listener = LimitConnectionsByPeer(dovecot, config.sasl.max_connections_per_peer)
        for description in config.sasl.listen:
            strports.service(description, sasl_listener).setServiceParent(top)
    TimerService(PURGE_INTERVAL, _purge, pool).setServiceParent(top)
    reactor.callWhenRunning(_settle_garbage_collector)
    return top


def http_root(config: configuration.Config, pool: StorePool, metrics: Metrics, validator: Validator) -> Resource:
    """The resource tree served on every [http] listener, each resource given what it uses."""
    issuer = config.server.issuer
    server = BridgeServer(pool.store, config, metrics)
    pages = Pages(config.server.site_name)
    sessions = Sessions(pool, config.server.session_ttl, secure=config.https)
    login = PasswordLogin(pool, sessions, metrics)
    top = SecuredRoot(https=config.https, pages=pages)
    top.putChild(b"authorize", Authorize(pages, issuer, sessions, login, pool, server, metrics))
    top.putChild(b"logout", Logout(pages, issuer, sessions))
    top.putChild(b"device", DevicePage(pages, issuer, sessions, login, pool, server, metrics))
    top.putChild(b"token", TokenEndpoint(issuer, pool, server, metrics))
    top.putChild(b"introspect", IntrospectionResource(issuer, pool, server, pool.store.recent, config.sasl,
                                                      metrics))
    top.putChild(b"revoke", EndpointResource(issuer, pool, server, "revocation"))
    top.putChild(b"device_authorization", EndpointResource(issuer, pool, server, "device_authorization"))
    top.putChild(b"sasl", SaslEndpoint(issuer, pool, server, validator.validate, config.sasl, metrics))
    top.putChild(b"forward-auth", ForwardAuth(validator.check_scope, config.forward_auth, metrics))
    top.putChild(b"metrics", MetricsResource(pool, metrics))
    top.putChild(b"healthz", Health(pool))
    well_known = Resource()
    well_known.putChild(b"oauth-authorization-server", JsonDocument(metadata(config)))
    top.putChild(b".well-known", well_known)
    top.putChild(b"static", StaticFiles(str(resources.files("bearerbridge.web") / "static")))
    return top


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
    if isinstance(address, IPv4Address):
        return address.host
    if isinstance(address, IPv6Address):
        ip = ipaddress.IPv6Address(address.host.partition("%")[0])
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return None


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


def _settle_garbage_collector() -> None:
    """Exempt what start-up built from collection, and collect the young less often: under
    load, requests in flight otherwise set off a full collection every few tenths of a
    second, and those pauses were the worst latencies measured (bench/README.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def _purge(pool: StorePool) -> None:
    pool.run(pool.store.purge_expired).addCallbacks(
        lambda count: log.info("Purged {count} expired codes and tokens", count=count),
        lambda failure: log.failure("Purging expired codes and tokens failed", failure))


def makeService(options: Options) -> MultiService:
    return make_service(options.config)
