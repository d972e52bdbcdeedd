"""Registering a client: the checks the operator's command line (`client create`) and /admin
(web/admin_clients.py) share, so that both refuse the same things with the same reasons.

A face describes what the operator asked for as a `Registration`; `ClientRules.client` turns it
into the `Client` to store, or raises `RegistrationError` saying why not. Only the name of a
field in a refusal differs between the faces (`--redirect-uri` on the command line, "redirect URI"
on the page): each passes its `Names`. No Twisted.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bearerbridge.config import GRANT_TYPE_NAMES, TOKEN_FORMATS, Config
from bearerbridge.keys import ALGORITHMS, DEFAULT_ALGORITHM
from bearerbridge.storage.models import Client
from bearerbridge.uris import redirect_uri_problem

# The grants a client may be registered for, by their short names (`device_code` for RFC 8628's URN).
GRANTS = {grant_type.rpartition(":")[2]: grant_type for grant_type in GRANT_TYPE_NAMES}
NAME_MAX_LENGTH = 255  # schema.clients.name
PUBLIC_NEEDS_PKCE = "a public client must use PKCE (it has no secret to prove itself with)"


class RegistrationError(ValueError):
    """A registration refused; the message says why."""


@dataclass(frozen=True)
class Names:
    """How a face names the fields its refusals mention."""

    redirect_uri: str
    scope: str
    website: str
    logo_uri: str


COMMAND_LINE = Names(redirect_uri="--redirect-uri", scope="--scope", website="--website", logo_uri="--logo-uri")


@dataclass(frozen=True)
class Registration:
    """What the operator asks for. Scopes None: every scope but the operator's (for a client using
    client_credentials they must be named); grants None: the code grant with refresh tokens when
    there is a redirect URI or the client is public, else client_credentials."""

    name: str
    redirect_uris: tuple[str, ...] = ()
    scopes: tuple[str, ...] | None = None
    grants: tuple[str, ...] | None = None  # short names, as GRANTS has them
    public: bool = False
    resource_server: bool = False
    pkce_required: bool = True
    id_token_alg: str = DEFAULT_ALGORITHM
    token_format: str | None = None  # None: [tokens] format
    website: str | None = None
    logo_uri: str | None = None
    post_logout_redirect_uris: tuple[str, ...] = ()


class ClientRules:
    """The server's scopes (and which of them only the operator grants), against which a
    registration is checked."""

    def __init__(self, scopes: Mapping[str, str], operator_scopes: tuple[str, ...]) -> None:
        self.scopes = scopes
        self.operator_scopes = operator_scopes

    @classmethod
    def of(cls, config: Config) -> ClientRules:
        return cls(config.scopes, config.server.operator_scopes)

    @property
    def user_scopes(self) -> list[str]:
        """The scopes a client gets when none are named: all but the operator's."""
        return [s for s in self.scopes if s not in self.operator_scopes]

    def client(self, asked: Registration, names: Names = COMMAND_LINE) -> Client:
        """The client to store for `asked`, with a new random id; RegistrationError if it may not be."""
        name = asked.name.strip()
        if not name or len(name) > NAME_MAX_LENGTH:
            raise RegistrationError(f"a client needs a name of 1 to {NAME_MAX_LENGTH} characters")
        unknown_grants = [g for g in asked.grants or () if g not in GRANTS]
        if asked.grants is not None and (unknown_grants or not asked.grants):
            raise RegistrationError(f"unknown grant(s) {' '.join(unknown_grants)}; known: {' '.join(GRANTS)}"
                                    if unknown_grants else "choose at least one grant")
        grants = tuple(dict.fromkeys(GRANTS[g] for g in asked.grants or (
            ["client_credentials"] if not asked.redirect_uris and not asked.public
            else ["authorization_code", "refresh_token"])))
        if asked.public and asked.resource_server:
            raise RegistrationError("a public client cannot be a resource server (it has no secret to introspect "
                                    "with)")
        if asked.public and not asked.pkce_required:
            raise RegistrationError(PUBLIC_NEEDS_PKCE)
        if asked.public and "client_credentials" in grants:
            raise RegistrationError("a public client cannot use client_credentials (it has no secret)")
        if "authorization_code" in grants and not asked.redirect_uris:
            raise RegistrationError(f"the authorization_code grant needs at least one {names.redirect_uri}")
        if asked.scopes is None and "client_credentials" in grants:
            raise RegistrationError(f"name the scopes a client_credentials client may get with {names.scope}")
        scopes = list(asked.scopes) if asked.scopes is not None else self.user_scopes
        if not scopes:
            raise RegistrationError("choose at least one scope")
        unknown = [s for s in scopes if s not in self.scopes]
        if unknown:
            raise RegistrationError(f"unknown scope(s) {' '.join(unknown)}; known: {' '.join(self.scopes)}")
        if asked.id_token_alg not in ALGORITHMS:
            raise RegistrationError(f"ID tokens are signed with one of {', '.join(ALGORITHMS)}")
        if asked.token_format not in (None, *TOKEN_FORMATS):
            raise RegistrationError(f"an access token is one of {', '.join(TOKEN_FORMATS)}")
        return Client(client_id=secrets.token_hex(16), name=name,
                      redirect_uris=tuple(check_redirect_uri(u) for u in dict.fromkeys(asked.redirect_uris)),
                      scope=" ".join(dict.fromkeys(scopes)), grant_types=grants, public=asked.public,
                      resource_server=asked.resource_server, pkce_required=asked.pkce_required,
                      id_token_alg=asked.id_token_alg, website=check_web_address(names.website, asked.website),
                      logo_uri=check_web_address(names.logo_uri, asked.logo_uri),
                      access_token_format=asked.token_format,
                      post_logout_redirect_uris=tuple(check_redirect_uri(u) for u in asked.post_logout_redirect_uris))


def check_redirect_uri(uri: str) -> str:
    """A URI that may be registered (`uris.redirect_uri_problem`), else a refusal saying why."""
    problem = redirect_uri_problem(uri)
    if problem is not None:
        raise RegistrationError(f"redirect URI {uri!r}: {problem}")
    return uri


def check_web_address(label: str, url: str | None) -> str | None:
    """A page or image a browser shows the user (the consent page's link and logo): https, or
    http on loopback; refused otherwise, saying why."""
    if url is None:
        return None
    parts = urlsplit(url)
    if redirect_uri_problem(url) is not None or parts.scheme not in ("http", "https") or parts.fragment:
        raise RegistrationError(f"{label} {url!r}: expected an https URL (http only on loopback), without a fragment")
    return url


def grant_names(client: Client) -> list[str]:
    """A client's grants by their short names (`device_code`), as GRANTS has them."""
    return [grant.rpartition(":")[2] for grant in client.grant_types]


def describe(client: Client) -> dict[str, Any]:
    """A client's settings, never its secret: `client show`, and what the audit log says of a new one."""
    return {"client_id": client.client_id, "name": client.name, "public": client.public,
            "redirect_uris": list(client.redirect_uris), "scope": client.scope,
            "grant_types": list(client.grant_types), "resource_server": client.resource_server,
            "pkce_required": client.pkce_required, "id_token_alg": client.id_token_alg,
            "post_logout_redirect_uris": list(client.post_logout_redirect_uris), "website": client.website,
            "logo_uri": client.logo_uri, "token_format": client.access_token_format}


def audited(client: Client) -> dict[str, Any]:
    """What an `admin` audit event says of a client registered (`name` is `client_name` there)."""
    return {("client_name" if key == "name" else key): value for key, value in describe(client).items()}
