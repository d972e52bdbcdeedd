"""`twistd bearerbridge`: command-line options and the service tree."""

from __future__ import annotations

import functools
import gc
from importlib import resources

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from bearerbridge import config as configuration
from bearerbridge.bootstrap import open_store
from bearerbridge.connections import LimitConnectionsByPeer, raise_open_files_limit
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
