"""`bearerbridge`: the operator's command line for users, clients and tokens.

It opens the same database as the service (applying migrations first) and works
on it directly; the service does not need to be running.
"""

from __future__ import annotations

import argparse
import getpass
import json
import secrets
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa

from bearerbridge import config as configuration
from bearerbridge.bootstrap import OpenError, describe_url, one_line, open_store
from bearerbridge.crypto import hash_password, new_secret
from bearerbridge.oauth.grants import GRANT_TYPES
from bearerbridge.storage.models import Client
from bearerbridge.storage.store import SqlStore, StoreError
from bearerbridge.uris import redirect_uri_problem

# The grants a client may be registered for, by the short names the command line takes
# (`device_code` for RFC 8628's URN).
GRANTS = {grant_type.rpartition(":")[2]: grant_type for grant_type in GRANT_TYPES}


class CommandError(Exception):
    """A refused command; printed without a traceback, exit status 1."""


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = _ask("Password: ")
        if _ask("Again: ") != password:
            raise CommandError("the passwords differ")
    if not password:
        raise CommandError("an empty password is not allowed")
    return password


def _ask(prompt: str) -> str:
    """A password typed at the terminal. Without a terminal getpass would warn over several lines
    and read stdin with echo: refused instead. Ctrl-D ends with a refusal; Ctrl-C reaches main."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            return getpass.getpass(prompt)
        except getpass.GetPassWarning:
            raise CommandError("no terminal to ask for the password on; give it with --password-stdin") from None
        except EOFError:
            raise CommandError("no password given (the input ended)") from None


def _check_redirect_uri(uri: str) -> str:
    """A URI that may be registered (`uris.redirect_uri_problem`), else a refusal saying why."""
    problem = redirect_uri_problem(uri)
    if problem is not None:
        raise CommandError(f"redirect URI {uri!r}: {problem}")
    return uri


# -- users ----------------------------------------------------------------------------------

def user_add(store: SqlStore, args: argparse.Namespace) -> str:
    password = hash_password(_read_password(args.password_stdin))
    user = store.add_user(args.name, args.email, password)
    return f"added user {user.username}"


def user_passwd(store: SqlStore, args: argparse.Namespace) -> str:
    ended = store.set_password(args.name, hash_password(_read_password(args.password_stdin)))
    return f"password of {args.name} changed; {ended} browser session(s) ended (its tokens still work)"


def user_disable(store: SqlStore, args: argparse.Namespace) -> str:
    sessions, tokens = store.set_disabled(args.name, True)
    return (f"disabled {args.name}: {sessions} browser session(s) ended and {tokens} token(s) revoked; "
            "enabling the user again brings none of them back")


def user_enable(store: SqlStore, args: argparse.Namespace) -> str:
    store.set_disabled(args.name, False)
    return f"enabled {args.name}"


def user_list(store: SqlStore, args: argparse.Namespace) -> str:
    return "\n".join(f"{u.username}\t{u.email or '-'}\t{'disabled' if u.disabled else 'enabled'}"
                     for u in store.list_users())


# -- clients --------------------------------------------------------------------------------

def client_create(store: SqlStore, args: argparse.Namespace, config: configuration.Config) -> str:
    grants = tuple(dict.fromkeys(GRANTS[g] for g in args.grant or (
        ["client_credentials"] if not args.redirect_uri and not args.public
        else ["authorization_code", "refresh_token"])))
    if args.public and args.resource_server:
        raise CommandError("a public client cannot be a resource server (it has no secret to introspect with)")
    if args.public and args.no_pkce:
        raise CommandError("a public client must use PKCE (it has no secret to prove itself with)")
    if args.public and "client_credentials" in grants:
        raise CommandError("a public client cannot use client_credentials (it has no secret)")
    if "authorization_code" in grants and not args.redirect_uri:
        raise CommandError("the authorization_code grant needs at least one --redirect-uri")
    if args.scope is None and "client_credentials" in grants:
        raise CommandError("name the scopes a client_credentials client may get with --scope")
    scopes = args.scope.split() if args.scope is not None else [
        s for s in config.scopes if s not in config.server.operator_scopes]
    unknown = [s for s in scopes if s not in config.scopes]
    if unknown or not scopes:
        raise CommandError(f"unknown scope(s) {' '.join(unknown)}; known: {' '.join(config.scopes)}")
    client = Client(client_id=secrets.token_hex(16), name=args.name,
                    redirect_uris=tuple(_check_redirect_uri(u) for u in args.redirect_uri or ()),
                    scope=" ".join(scopes), grant_types=grants, public=args.public,
                    resource_server=args.resource_server, pkce_required=not args.no_pkce)
    secret = None if args.public else new_secret()
    store.add_client(client, secret)
    if args.json:
        return json.dumps({**_describe(client), "client_secret": secret})
    lines = [f"client_id: {client.client_id}"]
    if secret:
        lines.append(f"client_secret: {secret}")
        lines.append("(the secret is shown only now; bearerbridge keeps only a hash of it)")
    return "\n".join(lines)


def _describe(client: Client) -> dict[str, Any]:
    return {"client_id": client.client_id, "name": client.name, "public": client.public,
            "redirect_uris": list(client.redirect_uris), "scope": client.scope,
            "grant_types": list(client.grant_types), "resource_server": client.resource_server,
            "pkce_required": client.pkce_required}


def client_list(store: SqlStore, args: argparse.Namespace) -> str:
    return "\n".join(f"{c.client_id}\t{c.name}\t{'public' if c.public else 'confidential'}\t{c.scope}"
                     for c in store.list_clients())


def client_show(store: SqlStore, args: argparse.Namespace) -> str:
    client = store.get_client(args.id)
    if client is None:
        raise CommandError(f"no client {args.id!r}")
    return json.dumps(_describe(client), indent=2)


def client_update(store: SqlStore, args: argparse.Namespace) -> str:
    client = store.get_client(args.id)
    if client is None:
        raise CommandError(f"no client {args.id!r}")
    if args.pkce is False and client.public:
        raise CommandError("a public client must use PKCE (it has no secret to prove itself with)")
    store.update_client(args.id, resource_server=args.resource_server, pkce_required=args.pkce)
    return json.dumps(_describe(store.get_client(args.id) or client), indent=2)


def client_delete(store: SqlStore, args: argparse.Namespace) -> str:
    if not store.delete_client(args.id):
        raise CommandError(f"no client {args.id!r}")
    return f"deleted client {args.id} with its codes, tokens and consents"


# -- tokens ---------------------------------------------------------------------------------

def issue_token(store: SqlStore, config: configuration.Config, username: str, client_id: str, scope: Iterable[str],
                ttl: int | None = None) -> dict[str, Any]:
    """An operator-issued access token (for testing a service), as a token response."""
    user = store.get_user_by_name(username)
    if user is None or user.disabled:
        raise ValueError(f"no enabled user {username!r}")
    client = store.get_client(client_id)
    if client is None:
        raise ValueError(f"no client {client_id!r}")
    scopes = list(dict.fromkeys(scope))
    unknown = [s for s in scopes if s not in config.scopes]
    if unknown:
        raise ValueError(f"unknown scope(s): {' '.join(unknown)}")
    outside = [s for s in scopes if s not in client.scope.split()]
    if outside:
        raise ValueError(f"the client is not registered for {' '.join(outside)} (it has: {client.scope})")
    if ttl is not None and ttl <= 0:
        raise ValueError("--ttl must be a positive number of seconds")
    access_token, expires_in = new_secret(), ttl or config.tokens.access_ttl
    store.save_token(access_token, None, client_id, user.id, " ".join(scopes), expires_in, None)
    return {"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in,
            "scope": " ".join(scopes)}


def token_issue(store: SqlStore, args: argparse.Namespace, config: configuration.Config) -> str:
    try:
        token = issue_token(store, config, args.user, args.client, args.scope.split(), args.ttl)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return json.dumps(token) if args.json else token["access_token"]


def token_revoke(store: SqlStore, args: argparse.Namespace) -> str:
    if args.user:
        user = store.get_user_by_name(args.user)
        if user is None:
            raise CommandError(f"no user {args.user!r}")
        return f"revoked {store.revoke_for_user(user.id)} token(s) of {args.user}"
    if args.client:
        if store.get_client(args.client) is None:
            raise CommandError(f"no client {args.client!r}")
        return f"revoked {store.revoke_for_client(args.client)} token(s) of client {args.client}"
    token = store.find_access_token(args.token) or store.find_refresh_token(args.token)
    if token is None:
        raise CommandError("no such token")
    return f"revoked {store.revoke_family(token.family)} token(s)"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bearerbridge", description=(__doc__ or "").splitlines()[0])
    top.add_argument("--config", help=f"the TOML config (default: ${configuration.ENV_VAR}, else built-in defaults)")
    nouns = top.add_subparsers(dest="noun", required=True)

    def verb(noun: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Callable[..., str],
             help: str) -> argparse.ArgumentParser:
        p = noun.add_parser(name, help=help)
        p.set_defaults(func=func)
        return p

    user = nouns.add_parser("user", help="manage users").add_subparsers(dest="verb", required=True)
    for name, func, help in (("add", user_add, "add a user"), ("passwd", user_passwd, "set a user's password")):
        p = verb(user, name, func, help)
        p.add_argument("name")
        if name == "add":
            p.add_argument("--email")
        p.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    verb(user, "disable", user_disable, "disable a user (its tokens stop working)").add_argument("name")
    verb(user, "enable", user_enable, "enable a disabled user").add_argument("name")
    verb(user, "list", user_list, "list users")

    client = nouns.add_parser("client", help="manage OAuth clients").add_subparsers(dest="verb", required=True)
    p = verb(client, "create", client_create, "register a client; prints its id and secret")
    p.add_argument("--name", required=True, help="shown to users on the consent page")
    p.add_argument("--redirect-uri", action="append", help="an exact redirect URI (repeat for several)")
    p.add_argument("--scope", help="the scopes it may ask for (default: all, except for client_credentials)")
    p.add_argument("--public", action="store_true", help="a public client (no secret; must use PKCE)")
    p.add_argument("--resource-server", action="store_true",
                   help="may introspect other clients' tokens (an IMAP, WebDAV or mail server); any client "
                        "may introspect its own")
    p.add_argument("--no-pkce", action="store_true",
                   help="a legacy confidential client that sends no PKCE challenge (OAuth 2.1 wants one from all)")
    p.add_argument("--grant", action="append", choices=GRANTS,
                   help="a grant it may use (default: authorization_code and refresh_token with a redirect URI, "
                        "else client_credentials)")
    p.add_argument("--json", action="store_true")
    verb(client, "list", client_list, "list clients")
    verb(client, "show", client_show, "show one client").add_argument("id")
    p = verb(client, "update", client_update, "change whether a client is a resource server or must use PKCE")
    p.add_argument("id")
    p.add_argument("--resource-server", action=argparse.BooleanOptionalAction,
                   help="may it introspect other clients' tokens")
    p.add_argument("--pkce", action=argparse.BooleanOptionalAction,
                   help="must it send a PKCE S256 challenge (--no-pkce: only for a legacy confidential client)")
    verb(client, "delete", client_delete, "delete a client with its tokens").add_argument("id")

    token = nouns.add_parser("token", help="issue and revoke tokens").add_subparsers(dest="verb", required=True)
    p = verb(token, "issue", token_issue, "issue an access token for testing a service")
    p.add_argument("--user", required=True)
    p.add_argument("--client", required=True)
    p.add_argument("--scope", required=True)
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: [tokens] access_ttl)")
    p.add_argument("--json", action="store_true", help="print the token response object")
    p = verb(token, "revoke", token_revoke, "revoke a token and its grant, or all of a user's or client's")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("token", nargs="?")
    which.add_argument("--user")
    which.add_argument("--client")

    db = nouns.add_parser("db", help="the database").add_subparsers(dest="verb", required=True)
    verb(db, "upgrade", lambda store, args: "the schema is up to date", "apply migrations")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every refusal and start-up failure is one line on stderr with status 1
    (130 for Ctrl-C), never a traceback."""
    args = parser().parse_args(argv)
    try:
        config = configuration.load(args.config)
        store = open_store(config)
        try:
            with store.transaction():
                needs_config = args.func in (client_create, token_issue)
                output = args.func(store, args, config) if needs_config else args.func(store, args)
        except sa.exc.DBAPIError as e:  # locked, gone away: the driver's words, not the statement
            raise CommandError(f"database {describe_url(config.database.url)}: {one_line(e.orig or e)}") from None
    except (CommandError, StoreError, configuration.ConfigError, OpenError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    if output:
        print(output)
    return 0


def _fail(message: str) -> int:
    """Print a refusal as one line on stderr; exit status 1."""
    print(f"bearerbridge: {' '.join(message.split())}", file=sys.stderr)
    return 1


def announce(config_path: str | None = None) -> None:
    """What `make run` prints before it starts the service: where it listens, where its data is,
    and the next step. Nothing for a config that does not load: twistd then says why, in one line."""
    try:
        config = configuration.load(config_path)
    except configuration.ConfigError:
        return
    command = ".venv/bin/bearerbridge" + (f" --config {config_path}" if config_path else "")
    print(f"bearerbridge: serving {config.server.issuer} (listening on {', '.join(config.http.listen)}); "
          f"data in {describe_url(config.database.url)}\n"
          f"Next, in another terminal, create a user:  echo 'a long passphrase' | {command} user add NAME "
          "--password-stdin\n"
          "then a client and a token: README.md, Quickstart. Ctrl-C stops the service.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
