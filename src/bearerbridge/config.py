"""Settings: frozen dataclasses read from a TOML file (see conf/bearerbridge.toml).

Every section is a dataclass whose field names are the TOML keys, so the file, the
defaults and the validation cannot drift apart. An unknown key or a value of the
wrong kind raises `ConfigError` naming the key, and the service refuses to start.
Relative paths in a file resolve against the file's directory (`resolve_paths`); the
built-in defaults, used without a file, stay relative to the working directory.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bearerbridge.sasl.mechanisms import MECHANISMS
from bearerbridge.throttle import ThrottleRules
from bearerbridge.uris import is_loopback_host

ENV_VAR = "BEARERBRIDGE_CONFIG"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


# Every grant the token endpoint knows (oauth.grants.GRANT_TYPES, which a test holds equal).
GRANT_TYPE_NAMES = ("authorization_code", "refresh_token", "client_credentials",
                    "urn:ietf:params:oauth:grant-type:device_code")
# What an access token is: random bits, or an RFC 9068 JWT.
TOKEN_FORMATS = ("opaque", "jwt")
# Fields a token response may carry besides RFC 6749's: Doorkeeper's created_at, ownCloud's user_id.
RESPONSE_FIELDS = ("created_at", "user_id")


@dataclass(frozen=True)
class ServerSettings:
    issuer: str = "http://127.0.0.1:8080"
    site_name: str = "bearerbridge"
    # A random key created on first start; it keys the token hashes and signs cookies,
    # so every instance sharing a database must read the same file.
    secret_key_file: str = "var/secret.key"
    session_ttl: int = 12 * 3600
    # Scopes only the operator grants (client credentials, `token issue`): no user can consent
    # to them, and `client create` includes them only when named.
    operator_scopes: tuple[str, ...] = ("metrics",)
    # The grants this server gives at all (Prosody's allowed_oauth2_grant_types): a client
    # registered for one left out is refused it (unauthorized_client).
    grant_types: tuple[str, ...] = GRANT_TYPE_NAMES
    # Who must sign in with a second factor (a TOTP code or a passkey) before approving an app, a
    # device or using /admin: "none", "admins" or "everyone". One who has none set up is sent to
    # their account page to make one.
    require_second_factor: str = "none"


@dataclass(frozen=True)
class HttpSettings:
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    # A file for the access log (combined log format); none when empty.
    access_log: str = ""
    # Connections open at once from one IP address (an IPv6 /64); a unix: listener has no cap.
    max_connections_per_peer: int = 256
    # Proxies (IP addresses) whose X-Forwarded-For names the client, for throttling and the audit
    # log: a reverse proxy on this host by default. Behind one, every request comes from its
    # address: have it send the header (nginx: proxy_set_header X-Forwarded-For $remote_addr).
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///var/bearerbridge.db"
    # SQLite lets one writer in at a time, so more threads only queue on its lock; PostgreSQL
    # gains from a few.
    threads: int = 1
    # Seconds a request waits for the database before it is answered "try later": also the
    # connect and statement timeout of PostgreSQL and the time SQLite waits for its write lock.
    deadline: float = 5.0


@dataclass(frozen=True)
class TokenSettings:
    access_ttl: int = 3600
    refresh_ttl: int = 30 * 24 * 3600
    code_ttl: int = 600
    device_ttl: int = 900
    # Device codes a client may have waiting for their users at once (RFC 8628 §5.2: each is a row).
    device_codes_per_client: int = 100
    # What a code or device grant asking for no scope gets: these, of the scopes its client may
    # have (Doorkeeper's default scopes); empty: every scope the client may have.
    default_scopes: tuple[str, ...] = ()
    # Extra fields of the token response (RESPONSE_FIELDS): `created_at` (Unix time), `user_id`
    # (the user name), for clients made for Doorkeeper or ownCloud.
    response_fields: tuple[str, ...] = ()
    # Access tokens: "opaque" (256 random bits, checked by asking bearerbridge) or "jwt" (RFC 9068,
    # signed with the [keys], which a resource server may check by itself); a client may be
    # registered for either (`client create --token-format`).
    format: str = "opaque"
    # The JWT header's typ: RFC 9068's "at+jwt", or "JWT" for resource servers that insist on it
    # (Dovecot before 2.3.21 validates a JWT locally only when typ is "JWT").
    jwt_type: str = "at+jwt"
    # The `aud` of JWT access tokens: the resource servers' name for themselves; empty: the issuer.
    jwt_audience: str = ""
    # How JWT access tokens are signed: ES256 or RS256.
    jwt_algorithm: str = "ES256"


@dataclass(frozen=True)
class AuditSettings:
    # The file security events are appended to, one JSON object a line (see audit.py); created
    # mode 0600. Empty: no audit log.
    file: str = "var/audit.log"


# Keys that may be empty although their default is not: empty turns something off.
MAY_BE_EMPTY = frozenset({"[audit] file", "[openid] acr", "[tokens] jwt_audience"})


# How the identity a SASL client names (OAUTHBEARER authzid, XOAUTH2 user, PLAIN authcid)
# may match the token's user, and the forms of user name reported back to a service.
IDENTITY_RULES = ("username", "email", "user@realm")
REPORTED_NAMES = ("username", "email", "localpart", "user@realm")


@dataclass(frozen=True)
class SaslSettings:
    # Twisted endpoints speaking the Dovecot authentication protocol; none by default.
    listen: tuple[str, ...] = ()
    mechanisms: tuple[str, ...] = ("OAUTHBEARER", "XOAUTH2")
    # Services that also accept PLAIN with an access token as the password.
    plain: tuple[str, ...] = ()
    identity: tuple[str, ...] = ("username", "email")
    realm: str = ""
    # Seconds a validated token is remembered; bounds how late another process's revocation
    # is noticed (this process's own revocations take effect at once).
    cache_ttl: float = 1.0
    # Service name (Dovecot's AUTH service=, the HTTP endpoint's service) = the scope it needs.
    services: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType(
        {"smtp": "smtp", "imap": "imap", "xmpp": "xmpp"}))
    # Service name = the form of user name reported to it (default: username).
    usernames: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    # Connections open at once from one IP address (an IPv6 /64); a unix: listener has no cap.
    max_connections_per_peer: int = 256
    # Services where an app password (made on /account) is taken as the PLAIN or Basic password;
    # "*": every service that takes PLAIN (`plain`) or Basic (a forward-auth rule's `basic`).
    app_passwords: tuple[str, ...] = ("*",)

    def app_passwords_at(self, service: str) -> bool:
        """Whether the operator allows app passwords at `service` (where PLAIN or Basic is taken)."""
        return "*" in self.app_passwords or service in self.app_passwords

    @property
    def offered(self) -> tuple[str, ...]:
        """The mechanisms every surface accepts: `mechanisms`, and PLAIN where `plain` names a service."""
        return self.mechanisms + (("PLAIN",) if self.plain and "PLAIN" not in self.mechanisms else ())


@dataclass(frozen=True)
class ForwardAuthRule:
    """Requests to `host` (any host when empty) under `path_prefix` need `read_scope` for
    reading methods and `write_scope` for the others. `basic` also accepts HTTP Basic with
    the token as the password, for WebDAV clients that only know passwords."""
    host: str = ""
    path_prefix: str = "/"
    read_scope: str = "webdav:read"
    write_scope: str = "webdav:write"
    basic: bool = False

    @property
    def service(self) -> str:
        """The service the rule guards, as uses are noted and app passwords name it: its host when
        it names one, else its read scope up to a colon ("webdav" for the default rule)."""
        return self.host.lower().removesuffix(".") if self.host else (self.read_scope.partition(":")[0]
                                                                      or "forward-auth")


@dataclass(frozen=True)
class ForwardAuthSettings:
    # The header that carries the user's name back to the proxy on success.
    user_header: str = "X-Auth-User"
    realm: str = "bearerbridge"
    rules: tuple[ForwardAuthRule, ...] = (ForwardAuthRule(),)


@dataclass(frozen=True)
class ThrottleSettings:
    # The login form of /authorize and /device, and the device user code: counted in the
    # database, so that every instance sharing it sees the same counts.
    sign_in: ThrottleRules = field(default_factory=ThrottleRules)
    # Client authentication at /token, /introspect, /revoke, /device_authorization and /sasl:
    # client secrets are 256 random bits, so a client is only delayed (blocking it would let
    # anyone who knows its id stop it); its address is blocked. Counted in each process's memory.
    clients: ThrottleRules = field(default_factory=lambda: ThrottleRules(
        free_failures=3, first_delay=1.0, max_delay=4.0, account_block_after=0, address_block_after=50))
    # Tokens on the Dovecot socket (per user named and per `rip`) and POST /sasl (per user named
    # and caller): every failure answered after 2 s, as Dovecot's own auth_failure_delay; an
    # address blocked, a user never (that would lock them out of mail and protect no 256-bit
    # token). Counted in each process's memory.
    sasl: ThrottleRules = field(default_factory=lambda: ThrottleRules(
        free_failures=0, first_delay=2.0, max_delay=2.0, account_block_after=0, address_block_after=100))


@dataclass(frozen=True)
class KeySettings:
    # Seconds between automatic rotations of the signing keys (keys.py); `bearerbridge keys
    # rotate` rotates at once. A retired key stays in the JWKS until its tokens have expired.
    rotate_every: int = 90 * 24 * 3600


@dataclass(frozen=True)
class PasswordSettings:
    # Password checks (argon2id) running at once: memory stays under this many times
    # `memory_cost`; more wait their turn.
    checks_at_once: int = 4
    # argon2id's parameters for new hashes (argon2-cffi's defaults, RFC 9106's second choice);
    # a stored hash keeps the parameters it was made with. memory_cost is in KiB.
    time_cost: int = 3
    memory_cost: int = 65536
    parallelism: int = 4


@dataclass(frozen=True)
class OpenIdSettings:
    # The `acr` claim of every ID token (OpenID Connect Core §2), if the operator names the level
    # of assurance its sign-in gives; none when empty.
    acr: str = ""


@dataclass(frozen=True)
class PagesSettings:
    # A directory of Jinja2 templates: one named like a built-in template (login.html, base.html,
    # ...) replaces it; `builtin/NAME` is the built-in one still. Empty: the built-in pages.
    templates: str = ""
    # The image in the page header, in place of the site name (its alt text): a path on this host,
    # or an https URL (http only on loopback). Empty: the site name.
    logo: str = ""
    # CSS colours (#rgb, #rrggbb or a name) of links and buttons, the page around the box, and
    # the text; empty: the built-in look.
    accent_colour: str = ""
    background_colour: str = ""
    text_colour: str = ""


@dataclass(frozen=True)
class DovecotSettings:
    # Dovecot's doveadm HTTP API (conf/dovecot/doveadm-http.conf), e.g.
    # http://127.0.0.1:8081/doveadm/v1: revoking a grant or an app password on /account, and an
    # admin disabling a user on /admin, then end the user's live Dovecot sessions with `doveadm
    # kick` (doveadm/, web/mail_kick.py); the command line does not. http only on loopback. Empty: off.
    doveadm_url: str = ""
    # A file holding Dovecot's doveadm_api_key (white space around it ignored), read at start.
    doveadm_key_file: str = ""
    # Seconds to wait for Dovecot's answer; the user's page waits as long. At most 30.
    timeout: float = 5.0
    # The form of user name Dovecot knows users by (REPORTED_NAMES); empty: what [sasl.usernames]
    # reports to imap (the username unless set). With Dovecot's oauth2 passdb, the form of its
    # username_attribute: "email" for `username_attribute = email`.
    username: str = ""
    # Services whose last-use addresses narrow a kick, and whose scopes ([sasl.services]) mean a
    # grant could have opened a Dovecot session at all.
    services: tuple[str, ...] = ("imap", "pop3")
    # End only the sessions from the addresses the grant was last used from at those services,
    # when every such use has one; else all of the user's sessions.
    narrow_by_address: bool = True


def _check_dovecot(dovecot: DovecotSettings, sasl: SaslSettings) -> None:
    url = dovecot.doveadm_url
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"[dovecot] doveadm_url: expected an http(s) URL without query, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError("[dovecot] doveadm_url: no user or password in the URL; the key goes in doveadm_key_file")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ConfigError("[dovecot] doveadm_url: plain http is allowed only on loopback; use https")
        if not dovecot.doveadm_key_file:
            raise ConfigError("[dovecot] doveadm_key_file: needed with doveadm_url (a file holding doveadm_api_key)")
    if dovecot.timeout > 30:
        raise ConfigError("[dovecot] timeout: at most 30 seconds (the user's page waits for the answer)")
    if dovecot.username:
        _one_of("[dovecot] username", [dovecot.username], REPORTED_NAMES)
        if dovecot.username == "user@realm" and not sasl.realm:
            raise ConfigError("[sasl] realm: needed by the user@realm form of [dovecot] username")
    if not dovecot.services:
        raise ConfigError("[dovecot] services: name at least one service (imap, pop3)")


def doveadm_key(dovecot: DovecotSettings) -> bytes:
    """The doveadm API key from `[dovecot] doveadm_key_file`, without the white space around it;
    ConfigError naming the key, the file and why when it cannot be read or is empty."""
    path = dovecot.doveadm_key_file
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"[dovecot] doveadm_key_file: cannot read {path}: {e.strerror}") from None
    if not key:
        raise ConfigError(f"[dovecot] doveadm_key_file: {path} is empty")
    return key


# The CSS named colours (CSS Color 4 §6.1): with #rgb and #rrggbb, all a [pages] colour may be, so
# that nothing else can reach the pages' <style> element.
CSS_COLOUR_NAMES = frozenset("""
aliceblue antiquewhite aqua aquamarine azure beige bisque black blanchedalmond blue blueviolet brown burlywood
cadetblue chartreuse chocolate coral cornflowerblue cornsilk crimson cyan darkblue darkcyan darkgoldenrod
darkgray darkgreen darkgrey darkkhaki darkmagenta darkolivegreen darkorange darkorchid darkred darksalmon
darkseagreen darkslateblue darkslategray darkslategrey darkturquoise darkviolet deeppink deepskyblue dimgray
dimgrey dodgerblue firebrick floralwhite forestgreen fuchsia gainsboro ghostwhite gold goldenrod gray green
greenyellow grey honeydew hotpink indianred indigo ivory khaki lavender lavenderblush lawngreen lemonchiffon
lightblue lightcoral lightcyan lightgoldenrodyellow lightgray lightgreen lightgrey lightpink lightsalmon
lightseagreen lightskyblue lightslategray lightslategrey lightsteelblue lightyellow lime limegreen linen magenta
maroon mediumaquamarine mediumblue mediumorchid mediumpurple mediumseagreen mediumslateblue mediumspringgreen
mediumturquoise mediumvioletred midnightblue mintcream mistyrose moccasin navajowhite navy oldlace olive
olivedrab orange orangered orchid palegoldenrod palegreen paleturquoise palevioletred papayawhip peachpuff peru
pink plum powderblue purple rebeccapurple red rosybrown royalblue saddlebrown salmon sandybrown seagreen
seashell sienna silver skyblue slateblue slategray slategrey snow springgreen steelblue tan teal thistle tomato
turquoise violet wheat white whitesmoke yellow yellowgreen""".split())
PAGES_COLOURS = ("accent_colour", "background_colour", "text_colour")


def is_css_colour(value: str) -> bool:
    """#rgb, #rrggbb or a CSS colour name (any case)."""
    return re.fullmatch(r"#[0-9a-fA-F]{3}|#[0-9a-fA-F]{6}", value) is not None or value.lower() in CSS_COLOUR_NAMES


def logo_origin(logo: str) -> str | None:
    """The origin the pages' Content-Security-Policy must allow images from for `[pages] logo`:
    None for a path on this host (or no logo)."""
    if not logo or logo.startswith("/"):
        return None
    parts = urlsplit(logo)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _check_pages(pages: PagesSettings) -> None:
    for key in PAGES_COLOURS:
        value = getattr(pages, key)
        if value and not is_css_colour(value):
            raise ConfigError(f"[pages] {key}: {value!r} is not a CSS colour: use #rgb, #rrggbb or a name such as teal")
    logo = pages.logo
    if any(c.isspace() or not c.isprintable() or c in "\"'<>\\" for c in logo):
        raise ConfigError(f"[pages] logo: {logo!r} has spaces, quotes or angle brackets; percent-encode them")
    if not logo or logo.startswith("/") and not logo.startswith("//"):
        return
    parts = urlsplit(logo)  # the origin goes into a Content-Security-Policy: a host and a port, no more
    if parts.scheme not in ("http", "https") or not re.fullmatch(
            r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?", parts.netloc):
        raise ConfigError(f"[pages] logo: expected a path on this host (/...) or an https URL, got {logo!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError("[pages] logo: plain http is allowed only on loopback; use https")


DEFAULT_SCOPES: Mapping[str, str] = types.MappingProxyType({
    "openid": "Know who you are: sign you in to it (OpenID Connect)",
    "profile": "See your user name and your name",
    "email": "See your e-mail address",
    "imap": "Read and manage your mail (IMAP)",
    "smtp": "Send mail as you (SMTP)",
    "xmpp": "Chat as you (XMPP)",
    "webdav:read": "Read your files (WebDAV)",
    "webdav:write": "Change and delete your files (WebDAV)",
    "metrics": "Read the service's metrics",
})


@dataclass(frozen=True)
class Config:
    server: ServerSettings = field(default_factory=ServerSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    tokens: TokenSettings = field(default_factory=TokenSettings)
    sasl: SaslSettings = field(default_factory=SaslSettings)
    forward_auth: ForwardAuthSettings = field(default_factory=ForwardAuthSettings)
    throttle: ThrottleSettings = field(default_factory=ThrottleSettings)
    passwords: PasswordSettings = field(default_factory=PasswordSettings)
    keys: KeySettings = field(default_factory=KeySettings)
    openid: OpenIdSettings = field(default_factory=OpenIdSettings)
    pages: PagesSettings = field(default_factory=PagesSettings)
    dovecot: DovecotSettings = field(default_factory=DovecotSettings)
    scopes: Mapping[str, str] = field(default_factory=lambda: DEFAULT_SCOPES)

    @property
    def https(self) -> bool:
        return self.server.issuer.startswith("https://")

    @property
    def app_password_services(self) -> dict[str, str]:
        """The services an app password may be made for: those taking PLAIN, and the forward-auth
        rules taking Basic, that `[sasl] app_passwords` allows; in that order, each once, with
        what it opens in words (the descriptions of the scopes a token needs there: at a
        forward-auth rule an app password reads and writes)."""
        sasl = self.sasl
        found: list[tuple[str, tuple[str, ...]]] = [
            (s, (sasl.services[s],)) for s in sasl.services if s in sasl.plain and sasl.app_passwords_at(s)]
        found += [(r.service, (r.read_scope, r.write_scope)) for r in self.forward_auth.rules
                  if r.basic and sasl.app_passwords_at(r.service)]
        services: dict[str, str] = {}
        for service, scopes in found:
            services.setdefault(service, "; ".join(dict.fromkeys(self.scopes[s] for s in scopes if s in self.scopes)))
        return services


def _check_value(where: str, kind: Any, value: Any, minimum: int = 1) -> Any:
    """Return `value` converted to `kind`, or raise ConfigError naming `where`."""
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
            raise ConfigError(f"{where}: expected {what}, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typing.get_origin(kind) is tuple and dataclasses.is_dataclass(typing.get_args(kind)[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array of tables ([[...]]), got {value!r}")
        table = where[1:].replace("] ", ".")  # "[forward_auth] rules" -> "forward_auth.rules"
        return tuple(_section(typing.get_args(kind)[0], f"{table}[{i}]", item) for i, item in enumerate(value))
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{where}: expected a positive number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
        return value
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(_check_value(f"{where}[{i}]", str, item) for i, item in enumerate(value))
    if typing.get_origin(kind) is collections.abc.Mapping:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of name = \"value\", got {value!r}")
        return types.MappingProxyType({k: _check_value(f"{where}.{k}", str, v) for k, v in value.items()})
    raise TypeError(f"no rule for {kind!r}")  # a programming error: a new field type


def _section(cls: type, name: str, table: Any, defaults: Any = None) -> Any:
    """A dataclass from a TOML table: `defaults` (else the class's own) with the table's keys
    replaced; a key whose kind is a dataclass is a table of its own (`[throttle.sign_in]`)."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}]: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls() if defaults is None else defaults
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"[{name}] {key}: unknown key (known: {', '.join(sorted(fields))})")
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _section(hints[key], f"{name}.{key}", value, getattr(defaults, key))
        elif value == "" and (getattr(defaults, key) == "" or f"[{name}] {key}" in MAY_BE_EMPTY):
            values[key] = value
        else:
            values[key] = _check_value(f"[{name}] {key}", hints[key], value, fields[key].metadata.get("min", 1))
    return dataclasses.replace(defaults, **values)


def _scopes(table: Any) -> Mapping[str, str]:
    if not isinstance(table, dict) or not table:
        raise ConfigError("[scopes]: expected a table of name = \"description\"")
    for name, description in table.items():
        if not name or any(c in name for c in ' "\\') or not name.isprintable():
            raise ConfigError(f"[scopes] {name!r}: a scope name has no spaces, quotes or backslashes")
        _check_value(f"[scopes] {name}", str, description)
    return types.MappingProxyType(dict(table))


def parse(data: Mapping[str, Any]) -> Config:
    """Build a Config from parsed TOML, refusing unknown sections and keys."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    values: dict[str, Any] = {}
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(f"[{name}]: unknown section (known: {', '.join(sorted(sections))})")
        values[name] = _scopes(table) if name == "scopes" else _section(hints[name], name, table)
    config = Config(**values)
    _cross_check(config)
    _check_pages(config.pages)
    _check_dovecot(config.dovecot, config.sasl)
    issuer = urlsplit(config.server.issuer)
    if issuer.scheme not in ("http", "https") or not issuer.netloc or issuer.query or issuer.fragment:
        raise ConfigError(f"[server] issuer: expected an http(s) URL without query, got {config.server.issuer!r}")
    if issuer.scheme == "http" and not is_loopback_host(issuer.hostname):
        raise ConfigError("[server] issuer: plain http is allowed only on loopback; use https")
    if issuer.path not in ("", "/"):
        raise ConfigError("[server] issuer: a path in the issuer is not supported; serve bearerbridge at the root")
    return config


def _one_of(where: str, values: Any, allowed: tuple[str, ...]) -> None:
    for value in values:
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _cross_check(config: Config) -> None:
    """Cross-checks that one key's rules cannot express."""
    sasl = config.sasl
    if len(config.http.listen) == 0:
        raise ConfigError("[http] listen: name at least one endpoint")
    _one_of("[sasl] mechanisms", sasl.mechanisms, MECHANISMS)
    _one_of("[sasl] identity", sasl.identity, IDENTITY_RULES)
    for service, form in sasl.usernames.items():
        _one_of(f"[sasl.usernames] {service}", [form], REPORTED_NAMES)
    uses_realm = "user@realm" in sasl.identity or "user@realm" in sasl.usernames.values()
    if uses_realm and not sasl.realm:
        raise ConfigError("[sasl] realm: needed by the user@realm form")
    if config.server.operator_scopes != ServerSettings.operator_scopes:  # the default may name a scope left out
        for scope in config.server.operator_scopes:
            if scope not in config.scopes:
                raise ConfigError(f"[server] operator_scopes: {scope!r} is not in [scopes]")
    for service, scope in sasl.services.items():
        if scope not in config.scopes:
            raise ConfigError(f"[sasl.services] {service}: scope {scope!r} is not in [scopes]")
    _one_of("[sasl] plain", sasl.plain, tuple(sasl.services))
    password_services = tuple(sasl.plain) + tuple(r.service for r in config.forward_auth.rules if r.basic)
    _one_of("[sasl] app_passwords (a service in [sasl] plain, or of a forward-auth rule with basic = true, or *)",
            [s for s in sasl.app_passwords if s != "*"], password_services + ("*",))
    _one_of("[server] grant_types", config.server.grant_types, GRANT_TYPE_NAMES)
    _one_of("[server] require_second_factor", [config.server.require_second_factor], ("none", "admins", "everyone"))
    _one_of("[tokens] response_fields", config.tokens.response_fields, RESPONSE_FIELDS)
    _one_of("[tokens] default_scopes", config.tokens.default_scopes, tuple(config.scopes))
    _one_of("[tokens] format", [config.tokens.format], TOKEN_FORMATS)
    _one_of("[tokens] jwt_type", [config.tokens.jwt_type], ("at+jwt", "JWT"))
    _one_of("[tokens] jwt_algorithm", [config.tokens.jwt_algorithm], ("ES256", "RS256"))
    for i, rule in enumerate(config.forward_auth.rules):
        for key in ("read_scope", "write_scope"):
            if getattr(rule, key) not in config.scopes:
                raise ConfigError(f"[forward_auth.rules[{i}]] {key}: {getattr(rule, key)!r} is not in [scopes]")
        if not rule.path_prefix.startswith("/"):
            raise ConfigError(f"[forward_auth.rules[{i}]] path_prefix: must start with /")
    if sasl.cache_ttl > 60:
        raise ConfigError("[sasl] cache_ttl: at most 60 seconds (it delays other processes' revocations)")
    for i, proxy in enumerate(config.http.trusted_proxies):
        try:
            ipaddress.ip_address(proxy)
        except ValueError:
            raise ConfigError(f"[http] trusted_proxies[{i}]: {proxy!r} is not an IP address") from None
    for door in ("sign_in", "clients", "sasl"):
        rules = getattr(config.throttle, door)
        if rules.max_delay < rules.first_delay:
            raise ConfigError(f"[throttle.{door}] max_delay: less than first_delay ({rules.first_delay})")
    if config.passwords.memory_cost < 8 * config.passwords.parallelism:
        raise ConfigError("[passwords] memory_cost: argon2 needs at least 8 KiB for each of its parallelism lanes")
    scheme, separator, _ = config.database.url.partition("://")
    if not separator or scheme.partition("+")[0] not in DATABASES:
        what = f"a {scheme}:// URL" if separator else "a URL without a scheme://"
        raise ConfigError(f"[database] url: {what} is not supported; bearerbridge keeps its data in SQLite "
                          "(sqlite:///PATH) or PostgreSQL (postgresql+psycopg://USER@HOST/NAME)")


# The SQLAlchemy backends bearerbridge is tested on (the part of a URL's scheme before any +driver).
DATABASES = ("sqlite", "postgresql")


def _sqlite_path(url: str) -> tuple[str, str] | None:
    """(the path, the rest) of an SQLite URL naming a file, else None (another database, memory,
    or a URI filename, which SQLite resolves itself)."""
    scheme, _, rest = url.partition("://")
    if scheme.partition("+")[0] != "sqlite" or not rest.startswith("/"):
        return None
    path, query, parameters = rest[1:].partition("?")
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return path, query + parameters


def resolve_paths(config: Config, base: Path) -> Config:
    """`config` with its relative paths made absolute against `base`, the config file's directory:
    `[server] secret_key_file`, `[http] access_log`, `[audit] file`, `[pages] templates`,
    `[dovecot] doveadm_key_file` and an SQLite `[database] url`. Paths inside
    endpoint strings (`unix:` sockets, TLS keys and certificates) are Twisted's: they stay
    relative to the working directory."""
    def resolved(path: str) -> str:
        return str(base / path) if path and not os.path.isabs(path) else path

    url = config.database.url
    sqlite = _sqlite_path(url)
    if sqlite is not None:
        url = f"{url.partition('://')[0]}:///{resolved(sqlite[0])}{sqlite[1]}"
    return dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, secret_key_file=resolved(config.server.secret_key_file)),
        http=dataclasses.replace(config.http, access_log=resolved(config.http.access_log)),
        audit=dataclasses.replace(config.audit, file=resolved(config.audit.file)),
        pages=dataclasses.replace(config.pages, templates=resolved(config.pages.templates)),
        dovecot=dataclasses.replace(config.dovecot, doveadm_key_file=resolved(config.dovecot.doveadm_key_file)),
        database=dataclasses.replace(config.database, url=url))


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the config from `path`, else from $BEARERBRIDGE_CONFIG, else use the defaults. Relative
    paths in a file are relative to its directory; the defaults' to the working directory."""
    path = path or os.environ.get(ENV_VAR)
    if not path:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        config = resolve_paths(parse(data), Path(path).absolute().parent)
        templates = config.pages.templates
        if templates and not os.path.isdir(templates):
            raise ConfigError(f"[pages] templates: {templates} is not a directory")
        return config
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def secret_key(config: Config) -> bytes:
    """Read the server's secret key, creating it (mode 0600) on first use. A key that cannot be
    read or created raises ConfigError naming the key, the file and why."""
    path = Path(config.server.secret_key_file)
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        raise ConfigError(f"[server] secret_key_file: {path} does not hold a hex key") from None
    except OSError as e:
        raise ConfigError(f"[server] secret_key_file: cannot read {path}: {e.strerror}") from None
    key = os.urandom(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"[server] secret_key_file: cannot create {path.parent}: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return secret_key(config)
    except OSError as e:
        raise ConfigError(f"[server] secret_key_file: cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key
