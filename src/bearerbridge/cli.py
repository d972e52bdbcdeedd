"""`bearerbridge`: the operator's command line for users, clients and tokens.

It opens the same database as the service (applying migrations first) and works
on it directly; the service does not need to be running. Every command that changes
something is recorded in the audit log as an `admin` event: the action, the object, who
ran it (`actor`, the OS user) and the outcome, never a password or secret it prints.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bearerbridge import config as configuration
from bearerbridge import keys as keys_module
from bearerbridge.audit import AuditLog, AuditValue, open_audit_log
from bearerbridge.bootstrap import OpenError, describe_url, one_line, open_store
from bearerbridge.crypto import hash_password, new_secret, use_password_parameters
from bearerbridge.keys import Stage
from bearerbridge.oauth.access_tokens import new_access_token, token_format
from bearerbridge.oauth.oidc import SigningKeys
from bearerbridge.oauth.registration import (
    GRANTS,
    PUBLIC_NEEDS_PKCE,
    ClientRules,
    Registration,
    RegistrationError,
    audited,
    describe,
)
from bearerbridge.storage.store import SqlStore, StoreError


class CommandError(Exception):
    """A refused command; printed without a traceback, exit status 1."""


@dataclass(frozen=True)
class Done:
    """What a command that changes something prints, and what its `admin` audit event says of
    it besides the action, actor and outcome (never a secret)."""
    output: str
    audit: dict[str, AuditValue] = field(default_factory=dict)


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


# -- users ----------------------------------------------------------------------------------

def user_add(store: SqlStore, args: argparse.Namespace) -> Done:
    """Add a user; the first one on an empty database is an admin, so that someone can use /admin."""
    password = hash_password(_read_password(args.password_stdin))
    first = not store.has_users()
    user = store.add_user(args.name, args.email, password, args.display_name, is_admin=args.admin or first)
    why = " (the first user: an admin)" if first and not args.admin else " (an admin)" if args.admin else ""
    return Done(f"added user {user.username}{why}", {"user": user.username, "is_admin": user.is_admin})


def user_admin(store: SqlStore, args: argparse.Namespace) -> Done:
    store.set_admin(args.name, args.admin)
    return Done(f"{args.name} is {'now' if args.admin else 'no longer'} an admin (may use /admin)",
                {"user": args.name, "is_admin": args.admin})


def user_passwd(store: SqlStore, args: argparse.Namespace) -> Done:
    ended = store.set_password(args.name, hash_password(_read_password(args.password_stdin)))
    return Done(f"password of {args.name} changed; {ended} browser session(s) ended (its tokens still work)",
                {"user": args.name, "sessions_ended": ended})


def user_disable(store: SqlStore, args: argparse.Namespace) -> Done:
    sessions, tokens = store.set_disabled(args.name, True)
    return Done(f"disabled {args.name}: {sessions} browser session(s) ended and {tokens} token(s) revoked; "
                "enabling the user again brings none of them back",
                {"user": args.name, "sessions_ended": sessions, "revoked": tokens})


def user_enable(store: SqlStore, args: argparse.Namespace) -> Done:
    store.set_disabled(args.name, False)
    return Done(f"enabled {args.name}", {"user": args.name})


def user_list(store: SqlStore, args: argparse.Namespace) -> str:
    return "\n".join(f"{u.username}\t{u.email or '-'}\t{'disabled' if u.disabled else 'enabled'}"
                     f"\t{'admin' if u.is_admin else '-'}" for u in store.list_users())


# -- clients --------------------------------------------------------------------------------

def client_create(store: SqlStore, args: argparse.Namespace, config: configuration.Config) -> Done:
    asked = Registration(
        name=args.name, redirect_uris=tuple(args.redirect_uri or ()),
        scopes=tuple(args.scope.split()) if args.scope is not None else None,
        grants=tuple(args.grant) if args.grant else None, public=args.public, resource_server=args.resource_server,
        pkce_required=not args.no_pkce, id_token_alg=args.id_token_alg, token_format=args.token_format,
        website=args.website, logo_uri=args.logo_uri,
        post_logout_redirect_uris=tuple(args.post_logout_redirect_uri or ()))
    try:
        client = ClientRules.of(config).client(asked)
    except RegistrationError as e:
        raise CommandError(str(e)) from None
    secret = None if args.public else new_secret()
    store.add_client(client, secret)
    audit = audited(client)
    if args.json:
        return Done(json.dumps({**describe(client), "client_secret": secret}), audit)
    lines = [f"client_id: {client.client_id}"]
    if secret:
        lines.append(f"client_secret: {secret}")
        lines.append("(the secret is shown only now; bearerbridge keeps only a hash of it)")
    return Done("\n".join(lines), audit)


def client_list(store: SqlStore, args: argparse.Namespace) -> str:
    return "\n".join(f"{c.client_id}\t{c.name}\t{'public' if c.public else 'confidential'}\t{c.scope}"
                     for c in store.list_clients())


def client_show(store: SqlStore, args: argparse.Namespace) -> str:
    client = store.get_client(args.id)
    if client is None:
        raise CommandError(f"no client {args.id!r}")
    return json.dumps(describe(client), indent=2)


def client_update(store: SqlStore, args: argparse.Namespace) -> Done:
    client = store.get_client(args.id)
    if client is None:
        raise CommandError(f"no client {args.id!r}")
    if args.pkce is False and client.public:
        raise CommandError(PUBLIC_NEEDS_PKCE)
    store.update_client(args.id, resource_server=args.resource_server, pkce_required=args.pkce)
    return Done(json.dumps(describe(store.get_client(args.id) or client), indent=2),
                {"client_id": args.id, "resource_server": args.resource_server, "pkce_required": args.pkce})


def client_delete(store: SqlStore, args: argparse.Namespace) -> Done:
    if not store.delete_client(args.id):
        raise CommandError(f"no client {args.id!r}")
    return Done(f"deleted client {args.id} with its codes, tokens and consents", {"client_id": args.id})


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
    jwt = token_format(config, client) == "jwt"
    if jwt and ttl is not None and ttl > config.tokens.access_ttl:  # its key is published no longer than that
        raise ValueError(f"a JWT access token lives at most [tokens] access_ttl ({config.tokens.access_ttl} s)")
    expires_in = ttl or config.tokens.access_ttl
    access_token = new_access_token(config, store.keyring, SigningKeys(store), client, user, " ".join(scopes),
                                    expires_in)
    store.save_token(access_token, None, client_id, user.id, " ".join(scopes), expires_in, None)
    return {"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in,
            "scope": " ".join(scopes)}


def token_issue(store: SqlStore, args: argparse.Namespace, config: configuration.Config) -> Done:
    try:
        token = issue_token(store, config, args.user, args.client, args.scope.split(), args.ttl)
    except ValueError as e:
        raise CommandError(str(e)) from None
    saved = store.find_access_token(token["access_token"])
    return Done(json.dumps(token) if args.json else token["access_token"],
                {"user": args.user, "client_id": args.client, "scope": token["scope"],
                 "expires_in": token["expires_in"], "token_id": saved.id if saved else None,
                 "family": saved.family if saved else None})


def token_revoke(store: SqlStore, args: argparse.Namespace) -> Done:
    if args.user:
        user = store.get_user_by_name(args.user)
        if user is None:
            raise CommandError(f"no user {args.user!r}")
        revoked = store.revoke_for_user(user.id)
        return Done(f"revoked {revoked} token(s) of {args.user}", {"user": args.user, "revoked": revoked})
    if args.client:
        if store.get_client(args.client) is None:
            raise CommandError(f"no client {args.client!r}")
        revoked = store.revoke_for_client(args.client)
        return Done(f"revoked {revoked} token(s) of client {args.client}",
                    {"client_id": args.client, "revoked": revoked})
    token = store.find_access_token(args.token) or store.find_refresh_token(args.token)
    if token is None:
        raise CommandError("no such token")
    revoked = store.revoke_family(token.family)
    return Done(f"revoked {revoked} token(s)", {"token_id": token.id, "family": token.family,
                                                "client_id": token.client_id, "user": token.username,
                                                "revoked": revoked})


def keys_list(store: SqlStore, args: argparse.Namespace) -> str:
    """The signing keys: kid, algorithm, stage, since when, and when a retired one leaves the JWKS."""
    rows = [f"{k.kid}  {k.alg}  {k.stage:<7}  since {_when(k.since)}"
            + (f"  published until {_when(k.expires_at)}" if k.expires_at else "")
            for k in sorted(store.ensure_signing_keys(), key=lambda k: (k.alg, list(Stage).index(k.stage)))]
    return "\n".join(rows)


def keys_dovecot(store: SqlStore, args: argparse.Namespace) -> str:
    """Write the published public keys where Dovecot's `local_validation_key_dict =
    fs:posix:prefix=DIR/` reads them, and remove the ones no longer published. Each file is written
    whole, then renamed into place, so Dovecot never reads half a key."""
    directory = Path(args.directory)
    entries = keys_module.dovecot_entries(store.ensure_signing_keys(), store.sealer, int(time.time()))
    for name, pem in entries.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(pem)
        partial.chmod(0o644)
        partial.replace(path)
    removed = 0
    for alg in keys_module.ALGORITHMS:
        for path in (directory / "default" / alg).glob("*"):
            if f"default/{alg}/{path.name}" not in entries:
                path.unlink()
                removed += 1
    return (f"wrote {len(entries)} key(s) to {directory}/default/; removed {removed}. Dovecot keeps a key it "
            "has read until `doveadm reload`; run this after each rotation (`bearerbridge keys rotate`, or "
            "[keys] rotate_every)")


def keys_rotate(store: SqlStore, args: argparse.Namespace, config: configuration.Config) -> Done:
    """Retire the current keys, sign with the next ones, and make new next ones."""
    store.ensure_signing_keys()
    store.rotate_signing_keys(config.tokens.access_ttl)
    signing = sorted(k.kid for k in store.ensure_signing_keys() if k.stage is Stage.CURRENT)
    return Done(f"rotated: now signing with {', '.join(signing)}; running services sign with them within "
                f"{keys_module.REREAD} seconds", {"kids": signing})


def _when(stamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bearerbridge", description=(__doc__ or "").splitlines()[0])
    top.add_argument("--config", help=f"the TOML config (default: ${configuration.ENV_VAR}, else built-in defaults)")
    nouns = top.add_subparsers(dest="noun", required=True)

    def verb(noun: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Callable[..., str | Done],
             help: str) -> argparse.ArgumentParser:
        """A command; one that changes something returns `Done`, and is audited."""
        p = noun.add_parser(name, help=help)
        p.set_defaults(func=func, changes=func not in (user_list, client_list, client_show, keys_list, keys_dovecot))
        return p

    user = nouns.add_parser("user", help="manage users").add_subparsers(dest="verb", required=True)
    for name, func, help in (("add", user_add, "add a user"), ("passwd", user_passwd, "set a user's password")):
        p = verb(user, name, func, help)
        p.add_argument("name")
        if name == "add":
            p.add_argument("--email", help="the address relying parties see (OpenID's email claim)")
            p.add_argument("--display-name", help="the name relying parties see (OpenID's name claim)")
            p.add_argument("--admin", action="store_true",
                           help="may use /admin (the first user added to an empty database always may)")
        p.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    verb(user, "disable", user_disable, "disable a user (its tokens stop working)").add_argument("name")
    verb(user, "enable", user_enable, "enable a disabled user").add_argument("name")
    verb(user, "list", user_list, "list users")
    p = verb(user, "admin", user_admin, "make a user an admin (who may use /admin), or no longer one")
    p.add_argument("name")
    p.add_argument("--admin", action=argparse.BooleanOptionalAction, required=True,
                   help="--admin: may use /admin; --no-admin: may not")

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
    p.add_argument("--id-token-alg", choices=keys_module.ALGORITHMS, default=keys_module.DEFAULT_ALGORITHM,
                   help="how its OpenID Connect ID tokens are signed (default: %(default)s)")
    p.add_argument("--token-format", choices=configuration.TOKEN_FORMATS,
                   help="its access tokens: opaque, or RFC 9068 JWTs (default: [tokens] format)")
    p.add_argument("--website", help="its home page, linked on the consent page (https)")
    p.add_argument("--logo-uri", help="its logo, shown on the consent page (https)")
    p.add_argument("--post-logout-redirect-uri", action="append",
                   help="where OpenID logout may send the browser afterwards (exact; repeat for several)")
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

    keys = nouns.add_parser("keys", help="the signing keys").add_subparsers(dest="verb", required=True)
    verb(keys, "list", keys_list, "list the signing keys")
    verb(keys, "rotate", keys_rotate, "rotate the signing keys now")
    verb(keys, "dovecot", keys_dovecot, "write the public keys for Dovecot's local JWT validation").add_argument(
        "directory", help="the prefix of Dovecot's local_validation_key_dict = fs:posix:prefix=DIRECTORY/")

    db = nouns.add_parser("db", help="the database").add_subparsers(dest="verb", required=True)
    verb(db, "upgrade", lambda store, args: Done("the schema is up to date"), "apply migrations")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every refusal and start-up failure is one line on stderr with status 1
    (130 for Ctrl-C), never a traceback. A command that changes something opens the audit log
    first (one that cannot be opened refuses the command) and records its outcome there, done
    once committed or refused with the reason."""
    args = parser().parse_args(argv)
    audit: AuditLog | None = None
    try:
        config = configuration.load(args.config)
        use_password_parameters(config.passwords)
        if args.changes:  # a failed write later is said on stderr: the change stands
            audit = open_audit_log(config.audit, lambda message: print(f"bearerbridge: {message}", file=sys.stderr))
        output = _run(args, config)
    except (CommandError, StoreError, configuration.ConfigError, OpenError) as e:
        if audit is not None:
            _audit(audit, args, "refused", reason=" ".join(str(e).split()), **_named(args))
        return _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    if isinstance(output, Done):
        if audit is not None:
            _audit(audit, args, "done", **output.audit)
        output = output.output
    if output:
        print(output)
    return 0


def _run(args: argparse.Namespace, config: configuration.Config) -> str | Done:
    """Run the command in one transaction."""
    store = open_store(config)
    try:
        with store.transaction():
            needs_config = args.func in (client_create, token_issue, keys_rotate)
            return args.func(store, args, config) if needs_config else args.func(store, args)
    except sa.exc.DBAPIError as e:  # locked, gone away: the driver's words, not the statement
        raise CommandError(f"database {describe_url(config.database.url)}: {one_line(e.orig or e)}") from None


def _audit(audit: AuditLog, args: argparse.Namespace, outcome: str, **fields: AuditValue) -> None:
    audit.record("admin", action=f"{args.noun} {args.verb}", actor=_actor(), outcome=outcome, **fields)


def _actor() -> str:
    """The OS user running the command (a uid where the system has no name for it)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # OSError from Python 3.13, KeyError before
        return f"uid {os.getuid()}"


def _named(args: argparse.Namespace) -> dict[str, AuditValue]:
    """The object a refused command named, as the audit log calls it (never a token)."""
    name = getattr(args, "name", None)
    return {"user": name if args.noun == "user" else getattr(args, "user", None),
            "client_name": name if args.noun == "client" else None,
            "client_id": getattr(args, "id", None) or getattr(args, "client", None)}


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
