"""`twistd bearerbridge`: command-line options and the service tree."""

from __future__ import annotations

import functools
import gc

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from . import config as configuration
from . import oauth, web
from .dovecot import DovecotAuthFactory
from .bootstrap import open_store
from .metrics import Metrics
from .pool import StorePool
from .recent import RecentReads, RememberedStore
from .validator import Validator
from .web_device import DevicePage
from .web_forward import ForwardAuth
from .web_sasl import SaslEndpoint

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


def make_app(config: configuration.Config) -> tuple[MultiService, web.App]:
    """Build the service tree; the pool comes first so that it stops last."""
    store = open_store(config)
    recent = store.recent = RecentReads(config.sasl.cache_ttl)
    metrics = Metrics()
    top = MultiService()
    pool = StorePool(store, config.database.threads)
    pool.setServiceParent(top)
    app = web.App(config, store.keyring, pool, oauth.BridgeServer(store, config, metrics), metrics,
                  remembered=oauth.BridgeServer(RememberedStore(store, recent), config, metrics))
    sasl = config.sasl
    validator = Validator(pool, sasl)
    resource = web.root(app)
    resource.putChild(b"sasl", SaslEndpoint(app, validator.validate, sasl.services, sasl.offered))
    resource.putChild(b"device", DevicePage(app))
    resource.putChild(b"forward-auth", ForwardAuth(app, validator.check_scope, config.forward_auth))
    site = web.BridgeSite(resource, config.http.access_log)
    for description in config.http.listen:
        strports.service(description, site).setServiceParent(top)
    if sasl.listen:
        dovecot = DovecotAuthFactory(
            validator.validate, openid_configuration=oauth.discovery_url(config), mechanisms=sasl.offered,
            on_decision=functools.partial(metrics.sasl_decision, "dovecot", sasl.services))
        for description in sasl.listen:
            strports.service(description, dovecot).setServiceParent(top)
    TimerService(PURGE_INTERVAL, _purge, pool).setServiceParent(top)
    reactor.callWhenRunning(_settle_garbage_collector)
    return top, app


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
    return make_app(options.config)[0]
