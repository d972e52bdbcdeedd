"""`twistd bearerbridge`: command-line options and the service tree."""

from __future__ import annotations

import functools
import gc
import sys
import time
from importlib import resources
from typing import NoReturn

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from bearerbridge import config as configuration
from bearerbridge.audit import AuditLog, open_audit_log
from bearerbridge.bootstrap import OpenError, open_store
from bearerbridge.connections import LimitConnectionsByPeer, raise_open_files_limit
from bearerbridge.crypto import use_password_parameters
from bearerbridge.doveadm.client import Doveadm
from bearerbridge.guard import DatabaseDoor, MemoryDoor
from bearerbridge.metrics import Metrics
from bearerbridge.oauth.registration import ClientRules
from bearerbridge.oauth.server import BridgeServer, discovery_url, metadata
from bearerbridge.passkeys import RelyingParty
from bearerbridge.sasl.dovecot import DovecotAuthFactory
from bearerbridge.sasl.validator import Validator
from bearerbridge.storage.pool import StorePool
from bearerbridge.uses import LastUses, UseRecorder
from bearerbridge.web.account import Account
from bearerbridge.web.admin import Admin
from bearerbridge.web.app_passwords import AppPasswordsPage
from bearerbridge.web.authorize import Authorize, Logout
from bearerbridge.web.device import DevicePage
from bearerbridge.web.forward import ForwardAuth
from bearerbridge.web.mail_kick import MailKick
from bearerbridge.web.monitoring import Health, MetricsResource
from bearerbridge.web.oidc import Jwks, UserInfo
from bearerbridge.web.passkeys import Passkeys
from bearerbridge.web.passkeys_page import PasskeysPage
from bearerbridge.web.sasl import SaslEndpoint
from bearerbridge.web.sessions import PasswordLogin, Sessions
from bearerbridge.web.site import BridgeSite, JsonDocument, Landing, Pages, SecuredRoot, StaticFiles
from bearerbridge.web.token import ClientAuthThrottle, EndpointResource, IntrospectionResource, TokenEndpoint
from bearerbridge.web.twofactor import TwoFactorPage

log = Logger()
PURGE_INTERVAL = 3600
KEY_CHECK_INTERVAL = 3600


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = ("Run the bearerbridge authorization server. Without --config it reads "
                f"${configuration.ENV_VAR}, else runs on built-in defaults "
                "(SQLite under ./var, HTTP on 127.0.0.1:8080).")
    optParameters = [["config", "c", None, "Path to the TOML configuration file."]]

    def postOptions(self) -> None:
        """Read the config and parse its endpoints; a mistake stops twistd with one line (`refuse`):
        twistd would print its whole usage text above a UsageError, for what is not a usage error."""
        try:
            self.config = configuration.load(self["config"])
        except configuration.ConfigError as e:
            refuse(str(e))
        for key, descriptions in (("[http] listen", self.config.http.listen),
                                  ("[sasl] listen", self.config.sasl.listen)):
            for i, description in enumerate(descriptions):
                try:
                    serverFromString(reactor, description)
                except (ValueError, KeyError, TypeError, OSError) as e:  # OSError: a TLS file unread
                    refuse(f"{key}[{i}]: bad endpoint {description!r}: {e}")


def refuse(message: str) -> NoReturn:
    """Stop twistd before its log starts: Python prints the SystemExit's message, one line on
    stderr, and exits with status 1."""
    raise SystemExit(f"twistd bearerbridge: {message}")


class BridgeService(MultiService):
    """The top of the service tree. A listener that cannot listen (a port in use, a socket's
    directory missing) stops twistd with one line naming the key, on stderr and in the log, and
    status 1: it happens after twistd has started its log, where Python would print a traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: dict[IService, str] = {}

    def listen(self, key: str, description: str, listener: IService) -> None:
        self.listeners[listener] = f"{key} {description!r}"
        listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except (CannotListenError, OSError) as e:  # OSError: a unix: socket's lock file
                error = e.socketError if isinstance(e, CannotListenError) else e
                reason = getattr(error, "strerror", None) or error
                line = f"twistd bearerbridge: {self.listeners.get(child, 'a listener')}: cannot listen: {reason}"
                log.critical("{line}", line=line)
                if sys.__stderr__ is not None:
                    print(line, file=sys.__stderr__, flush=True)
                raise SystemExit(1) from None


def _check_access_log(path: str) -> None:
    """Open the access log now, so that a file that cannot be written is named at start."""
    if path:
        try:
            open(path, "a").close()
        except OSError as e:
            raise configuration.ConfigError(f"[http] access_log: cannot write {path}: {e.strerror}") from None


def make_service(config: configuration.Config) -> MultiService:
    """Build the service tree; the pool comes first so that it stops last. A key, database or
    access log that cannot be used raises ConfigError or OpenError, saying which and why."""
    raise_open_files_limit()
    use_password_parameters(config.passwords)
    _check_access_log(config.http.access_log)
    audit = open_audit_log(config.audit, lambda message: log.error("{message}", message=message))
    store = open_store(config)
    metrics = Metrics()
    metrics.audit_lost.set_function(lambda: audit.lost)
    top = BridgeService()
    pool = StorePool(store, config.database.threads, config.database.deadline)
    pool.setServiceParent(top)
    uses = LastUses()  # when each grant was last used where: noted where tokens are accepted, written behind
    UseRecorder(uses, pool, metrics, audit=audit).setServiceParent(top)  # after the pool, so that it stops first
    validator = Validator(pool, config.sasl)
    # One count of failed SASL logins for the Dovecot socket and POST /sasl.
    sasl_door = MemoryDoor("sasl", config.throttle.sasl, metrics, audit)
    site = BridgeSite(http_root(config, pool, metrics, validator, audit, sasl_door, uses=uses), config.http.access_log,
                      trusted_proxies=config.http.trusted_proxies)
    http_listener = LimitConnectionsByPeer(site, config.http.max_connections_per_peer)
    for i, description in enumerate(config.http.listen):
        top.listen(f"[http] listen[{i}]", description, strports.service(description, http_listener))
    if config.sasl.listen:
        dovecot = DovecotAuthFactory(
            validator.validate, openid_configuration=discovery_url(config.server.issuer),
            mechanisms=config.sasl.offered, door=sasl_door, uses=uses,
            on_decision=functools.partial(metrics.sasl_decision, "dovecot", config.sasl.services))
        sasl_listener = LimitConnectionsByPeer(dovecot, config.sasl.max_connections_per_peer)
        for i, description in enumerate(config.sasl.listen):
            top.listen(f"[sasl] listen[{i}]", description, strports.service(description, sasl_listener))
    TimerService(PURGE_INTERVAL, _purge, pool).setServiceParent(top)
    TimerService(KEY_CHECK_INTERVAL, _rotate_keys_if_due, pool, config).setServiceParent(top)
    reactor.callWhenRunning(_settle_garbage_collector)
    return top


def http_root(config: configuration.Config, pool: StorePool, metrics: Metrics, validator: Validator,
              audit: AuditLog, sasl_door: MemoryDoor | None = None, clock: IReactorTime | None = None,
              uses: LastUses | None = None) -> Resource:
    """The resource tree served on every [http] listener, each resource given what it uses; the
    process's one audit log goes to whoever records security events."""
    issuer = config.server.issuer
    server = BridgeServer(pool.store, config, audit, metrics, clock.seconds if clock else time.monotonic)
    pages = Pages(config.server.site_name, config.pages)
    sessions = Sessions(pool, config.server.session_ttl, secure=config.https)
    if sasl_door is None:  # no Dovecot socket shares its count with /sasl
        sasl_door = MemoryDoor("sasl", config.throttle.sasl, metrics, audit, clock)
    sign_in = DatabaseDoor("sign_in", config.throttle.sign_in, pool, metrics, audit, clock)
    passkeys = Passkeys(RelyingParty.of(issuer, config.server.site_name), sessions, pool)
    login = PasswordLogin(pool, sessions, metrics, sign_in, audit, config.passwords.checks_at_once, passkeys)
    clients = ClientAuthThrottle(MemoryDoor("clients", config.throttle.clients, metrics, audit, clock))
    top = SecuredRoot(https=config.https, pages=pages)
    top.putChild(b"authorize", Authorize(pages, issuer, sessions, login, pool, server, metrics))
    top.putChild(b"logout", Logout(pages, issuer, sessions, pool, server))
    mail = MailKick(Doveadm.from_config(config), audit)  # revoking ends live Dovecot sessions, if configured
    top.putChild(b"account", account := Account(pages, issuer, sessions, login, pool, audit, config.scopes, mail))
    account.putChild(b"app-passwords", AppPasswordsPage(pages, issuer, sessions, login, pool, audit,
                                                        config.app_password_services,
                                                        config.server.require_second_factor, mail))
    account.putChild(b"two-factor", TwoFactorPage(pages, issuer, config.server.site_name, sessions, login, pool, audit))
    account.putChild(b"passkeys", PasskeysPage(pages, issuer, sessions, login, passkeys, pool, audit))
    top.putChild(b"admin", Admin(pages, issuer, sessions, login, pool, audit, ClientRules.of(config),
                                 config.server.require_second_factor, mail))
    top.putChild(b"device", DevicePage(pages, issuer, sessions, login, pool, server, metrics, sign_in))
    top.putChild(b"token", TokenEndpoint(issuer, pool, server, metrics, clients))
    top.putChild(b"introspect", IntrospectionResource(issuer, pool, server, pool.store.recent, config.sasl,
                                                      metrics, clients, uses))
    top.putChild(b"revoke", EndpointResource(issuer, pool, server, "revocation", clients))
    top.putChild(b"device_authorization", EndpointResource(issuer, pool, server, "device_authorization", clients))
    top.putChild(b"sasl", SaslEndpoint(issuer, pool, server, validator.validate, config.sasl, metrics, clients,
                                       sasl_door, uses))
    top.putChild(b"forward-auth", ForwardAuth(validator.check_scope, config.forward_auth, metrics, uses))
    top.putChild(b"metrics", MetricsResource(pool, metrics))
    top.putChild(b"healthz", Health(pool))
    top.putChild(b"jwks", Jwks(pool, clock))
    top.putChild(b"userinfo", UserInfo(issuer, pool, server, uses))
    top.putChild(b"", Landing(pages))
    well_known = Resource()
    document = JsonDocument(metadata(config))
    well_known.putChild(b"oauth-authorization-server", document)
    well_known.putChild(b"openid-configuration", document)
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


def _rotate_keys_if_due(pool: StorePool, config: configuration.Config) -> None:
    """Make the signing keys on first start, and rotate them once the current ones are `[keys]
    rotate_every` seconds old (every instance checks; the store decides under a lock)."""
    def check() -> bool:
        pool.store.ensure_signing_keys()
        return pool.store.rotate_signing_keys(config.tokens.access_ttl, config.keys.rotate_every)

    pool.run(check).addCallbacks(
        lambda rotated: log.info("Rotated the signing keys") if rotated else None,
        lambda failure: log.error("Checking the signing keys failed (tried again in an hour): {error}",
                                  error=failure.getErrorMessage()))


def makeService(options: Options) -> MultiService:
    """twistd's entry point: start-up failures are one line and status 1, never a traceback."""
    try:
        return make_service(options.config)
    except (configuration.ConfigError, OpenError) as e:
        refuse(str(e))
