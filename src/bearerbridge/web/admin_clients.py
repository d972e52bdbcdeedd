"""The clients' pages of /admin: register one (the secret shown once), see one with how many users
granted it, rotate its secret (the new one shown once, the old one refused at once), delete it
after a confirmation. A registration is checked by the very rules `bearerbridge client create`
uses (`oauth.registration.ClientRules`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bearerbridge.crypto import new_secret
from bearerbridge.guard import Recorder
from bearerbridge.keys import ALGORITHMS, DEFAULT_ALGORITHM
from bearerbridge.oauth.registration import (
    GRANTS,
    ClientRules,
    Names,
    Registration,
    RegistrationError,
    audited,
    grant_names,
)
from bearerbridge.storage.models import Client
from bearerbridge.storage.pool import StorePool
from bearerbridge.storage.store import SqlStore
from bearerbridge.web.account import when
from bearerbridge.web.admin_base import Act, Section, client_path
from bearerbridge.web.site import Pages, Reply

# How the form names its fields in a refusal (the command line says --redirect-uri and so on).
NAMES = Names(redirect_uri="redirect URI", scope="scope", website="website", logo_uri="logo")
# A checkbox per scope and per grant: `scope:imap`, `grant:refresh_token`.
SCOPE, GRANT = "scope:", "grant:"
DEFAULT_GRANTS = ("authorization_code", "refresh_token")
GRANT_WORDS = {
    "authorization_code": "Users sign in and say yes in a browser",
    "refresh_token": "It renews its access without asking the user again",
    "client_credentials": "It acts as itself, for no user (a server, a monitor)",
    "device_code": "Users say yes on another device (a TV, a command line)",
}


def sentence(error: Exception) -> str:
    """A refusal as the page says it: a capital letter and a full stop."""
    text = str(error)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


class ClientPages(Section):
    def __init__(self, pages: Pages, pool: StorePool, audit: Recorder, rules: ClientRules) -> None:
        super().__init__(pages, pool, audit)
        self._rules = rules

    # -- registering -----------------------------------------------------------------------------

    async def new(self, act: Act) -> Reply:
        return self._form(act, 200, {"name": "", "redirect_uris": "", "scopes": set(self._rules.user_scopes),
                                     "grants": set(DEFAULT_GRANTS), "public": False, "pkce": True,
                                     "resource_server": False, "id_token_alg": DEFAULT_ALGORITHM})

    def _form(self, act: Act, status: int, values: Mapping[str, Any], error: str = "") -> Reply:
        scopes = self._rules.scopes
        return self.render(act, status, "admin_client_new.html", values=values, error=error, grants=list(GRANTS),
                           grant_words=GRANT_WORDS, algorithms=ALGORITHMS,
                           user_scopes=[(s, scopes[s]) for s in self._rules.user_scopes],
                           operator_scopes=[(s, scopes[s]) for s in self._rules.operator_scopes if s in scopes])

    @staticmethod
    def _values(form: Mapping[str, str]) -> dict[str, Any]:
        """The form as it was filled in, to check it and to show it again."""
        return {"name": form.get("name", ""), "redirect_uris": form.get("redirect_uris", ""),
                "scopes": [k.removeprefix(SCOPE) for k in form if k.startswith(SCOPE)],
                "grants": [k.removeprefix(GRANT) for k in form if k.startswith(GRANT)],
                "public": form.get("kind") == "public", "pkce": "pkce" in form,
                "resource_server": "resource_server" in form,
                "id_token_alg": form.get("id_token_alg", DEFAULT_ALGORITHM)}

    async def create(self, act: Act) -> Reply:
        values = self._values(act.form)
        uris = tuple(line.strip() for line in values["redirect_uris"].splitlines() if line.strip())
        asked = Registration(name=values["name"], redirect_uris=uris, scopes=tuple(values["scopes"]),
                             grants=tuple(values["grants"]), public=values["public"],
                             resource_server=values["resource_server"], pkce_required=values["pkce"],
                             id_token_alg=values["id_token_alg"])
        try:
            client = self._rules.client(asked, NAMES)
        except RegistrationError as e:
            return self._refused(act, values, str(e))
        secret = None if client.public else new_secret()
        await self.pool.run(self.pool.store.add_client, client, secret)
        self.record(act, "client create", **audited(client))
        return self.render(act, 200, "admin_secret.html", client=client, secret=secret, created=True,
                           path=client_path(client.client_id))

    def _refused(self, act: Act, values: Mapping[str, Any], reason: str) -> Reply:
        self.record(act, "client create", "refused", reason=reason, client_name=values["name"] or None)
        return self._form(act, 400, values, error=sentence(RegistrationError(reason)))

    # -- one client ---------------------------------------------------------------------------------

    async def show(self, act: Act) -> Reply:
        found = await self.pool.run(_with_grants, self.pool.store, act.arg)
        if found is None:
            return self.not_found("client")
        client, granted = found
        scopes = [(s, self._rules.scopes.get(s, "")) for s in client.scope.split()]
        return self.render(act, 200, "admin_client.html", client=client, granted=granted, scopes=scopes,
                           grants=grant_names(client), registered=when(client.created_at),
                           path=client_path(client.client_id))

    async def rotate(self, act: Act) -> Reply:
        secret = new_secret()
        client = await self.pool.run(_rotate, self.pool.store, act.arg, secret)
        if client is None:
            return self.not_found("client")
        if client.public:
            return self.pages.error(400, "invalid_request", "A public client has no secret to rotate.")
        self.record(act, "client rotate", client_id=client.client_id, client_name=client.name)
        return self.render(act, 200, "admin_secret.html", client=client, secret=secret, created=False,
                           path=client_path(client.client_id))

    async def confirm_delete(self, act: Act) -> Reply:
        found = await self.pool.run(_with_grants, self.pool.store, act.arg)
        if found is None:
            return self.not_found("client")
        client, granted = found
        return self.render(act, 200, "admin_client_delete.html", client=client, granted=granted,
                           path=client_path(client.client_id))

    async def delete(self, act: Act) -> Reply:
        client = await self.pool.run(_delete, self.pool.store, act.arg)
        if client is None:
            return self.not_found("client")
        self.record(act, "client delete", client_id=client.client_id, client_name=client.name)
        return await self.overview(act, notice=f"Deleted {client.name} with its codes, tokens and consents.")


# In the pool: each reads and changes what a page needs in one transaction.

def _with_grants(store: SqlStore, client_id: str) -> tuple[Client, int] | None:
    """A client and how many users granted it access."""
    client = store.get_client(client_id)
    return None if client is None else (client, store.consent_counts().get(client_id, 0))


def _rotate(store: SqlStore, client_id: str, secret: str) -> Client | None:
    """The client, given `secret` as its new secret unless it is public (it has none)."""
    client = store.get_client(client_id)
    if client is not None and not client.public:
        store.rotate_client_secret(client_id, secret)
    return client


def _delete(store: SqlStore, client_id: str) -> Client | None:
    """The client, deleted with its codes, tokens and consents."""
    client = store.get_client(client_id)
    if client is not None:
        store.delete_client(client_id)
    return client
