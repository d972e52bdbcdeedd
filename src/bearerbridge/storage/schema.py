"""The schema: every table bearerbridge keeps, and the statements on hot paths built once."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(255), nullable=False, unique=True),
    sa.Column("email", sa.String(255)),
    sa.Column("password_hash", sa.String(255)),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # The name and the address case-folded (str.casefold, the same on every database): a name or
    # address differing only in case is the same one. `Alice` next to `alice`, or
    # `ALICE@example.org` next to `alice@example.org`, would log in as the other wherever names
    # are matched without regard to case (SASL identities, Dovecot's user lookups).
    sa.Column("username_key", sa.String(255), nullable=False, unique=True),
    sa.Column("email_key", sa.String(255), unique=True),
    sa.Column("display_name", sa.String(255)),  # OpenID's `name` claim
    # May use /admin (web/admin.py): the first user the command line creates, or one it names.
    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
)

clients = sa.Table(
    "clients", metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("secret_digest", sa.String(64)),
    sa.Column("redirect_uris", sa.Text, nullable=False),  # one per line
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("grant_types", sa.Text, nullable=False),     # space-separated
    sa.Column("public", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # May introspect other clients' tokens (RFC 7662 §4): an IMAP, WebDAV or mail server.
    sa.Column("resource_server", sa.Boolean, nullable=False, server_default=sa.false()),
    # Must send a PKCE S256 challenge (OAuth 2.1); only a legacy confidential client is let off.
    sa.Column("pkce_required", sa.Boolean, nullable=False, server_default=sa.true()),
    # OpenID Connect: how its ID tokens are signed, and where RP-initiated logout may return (one per line).
    sa.Column("id_token_alg", sa.String(16), nullable=False, server_default="ES256"),
    sa.Column("post_logout_redirect_uris", sa.Text, nullable=False, server_default=""),
    # Shown on the consent page beside its name, when registered.
    sa.Column("website", sa.Text),
    sa.Column("logo_uri", sa.Text),
    sa.Column("access_token_format", sa.String(16)),  # "opaque" or "jwt"; NULL: [tokens] format
)


def _client_fk() -> sa.ForeignKey:
    return sa.ForeignKey("clients.client_id", ondelete="CASCADE")


def _user_fk() -> sa.ForeignKey:
    return sa.ForeignKey("users.id", ondelete="CASCADE")


auth_codes = sa.Table(
    "auth_codes", metadata,
    sa.Column("code_digest", sa.String(64), primary_key=True),
    sa.Column("client_id", sa.String(64), _client_fk(), nullable=False),
    sa.Column("user_id", sa.Integer, _user_fk(), nullable=False),
    sa.Column("redirect_uri", sa.Text, nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("code_challenge", sa.String(128)),
    sa.Column("code_challenge_method", sa.String(16)),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
    # OpenID Connect: the request's nonce (a client may not use one twice while its codes live),
    # and when and how the user had signed in, for the ID token.
    sa.Column("nonce", sa.String(255)),
    sa.Column("auth_time", sa.BigInteger),
    sa.Column("amr", sa.String(64)),
    sa.Index("ix_auth_codes_nonce", "client_id", "nonce"),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("access_digest", sa.String(64), nullable=False, unique=True),
    sa.Column("refresh_digest", sa.String(64), unique=True),
    sa.Column("client_id", sa.String(64), _client_fk(), nullable=False, index=True),
    sa.Column("user_id", sa.Integer, _user_fk(), index=True),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("issued_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("refresh_expires_at", sa.BigInteger),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("rotated", sa.Boolean, nullable=False, default=False),
    sa.Column("family", sa.String(32), nullable=False, index=True),
    sa.Column("code_digest", sa.String(64), index=True),
    # The refresh token's scope when it differs from the access token's: a refresh that asked for
    # less keeps the grant's whole scope for the next one (RFC 6749 §6).
    sa.Column("refresh_scope", sa.Text),
)

consents = sa.Table(
    "consents", metadata,
    sa.Column("user_id", sa.Integer, _user_fk(), primary_key=True),
    sa.Column("client_id", sa.String(64), _client_fk(), primary_key=True),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)


# The statements on the hot paths, built once: constructing a statement costs more than a
# point lookup on a held connection (bench/README.md), so they take their values as parameters.
CLIENT_BY_ID = clients.select().where(clients.c.client_id == sa.bindparam("client_id"))
USER_BY_ID = users.select().where(users.c.id == sa.bindparam("user_id"))
CODE_BY_DIGEST = auth_codes.select().where(auth_codes.c.code_digest == sa.bindparam("digest"))
USE_CODE = (auth_codes.update().where(auth_codes.c.code_digest == sa.bindparam("digest"),
                                       auth_codes.c.used.is_(False)).values(used=True))
INSERT_CODE = auth_codes.insert()
INSERT_TOKEN = tokens.insert()
# Never a revoked token: a revocation that committed since the token was read wins (on PostgreSQL,
# an UPDATE re-checks its WHERE on the newest version of a row it waited for).
MARK_ROTATED = (tokens.update().where(tokens.c.id == sa.bindparam("token_id"), tokens.c.rotated.is_(False),
                                      tokens.c.revoked.is_(False))
                .values(rotated=True))
TOKEN_QUERY = (
    sa.select(tokens, users.c.username, users.c.email,
              sa.func.coalesce(users.c.disabled, False).label("user_disabled"))
    .select_from(tokens.outerjoin(users, tokens.c.user_id == users.c.id))
)
TOKEN_BY_ACCESS = TOKEN_QUERY.where(tokens.c.access_digest == sa.bindparam("digest"))
TOKEN_BY_REFRESH = TOKEN_QUERY.where(tokens.c.refresh_digest == sa.bindparam("digest"))
TOKENS_BY_ACCESS = TOKEN_QUERY.where(tokens.c.access_digest.in_(sa.bindparam("digests", expanding=True)))


device_codes = sa.Table(
    "device_codes", metadata,
    sa.Column("device_digest", sa.String(64), primary_key=True),
    sa.Column("user_code", sa.String(16), nullable=False, unique=True),
    sa.Column("client_id", sa.String(64), _client_fk(), nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("interval", sa.Integer, nullable=False),
    sa.Column("last_poll_at", sa.Float),
    sa.Column("user_id", sa.Integer, _user_fk()),
    sa.Column("approved", sa.Boolean),      # None until the user decides
    sa.Column("used", sa.Boolean, nullable=False),
    sa.Column("auth_time", sa.BigInteger),  # when and how the approving user had signed in
    sa.Column("amr", sa.String(64)),
)


# Browser sign-ins (the cookie holds the id; only its digest is kept): logout, a password
# change or a disabled user end them, even where a cookie was copied.
sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id_digest", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, _user_fk(), nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    # How the user signed in (RFC 8176 `amr` values, space-separated): `pwd` for a password.
    sa.Column("amr", sa.String(64), nullable=False, server_default="pwd"),
    # Where the sign-in came from, for the user's list of their sessions.
    sa.Column("address", sa.String(64)),
    sa.Column("user_agent", sa.String(255)),
)


# When each grant (a token family) was last used at each service (imap, smtp, xmpp, webdav,
# userinfo, ...) and from where (Dovecot's rip, the HTTP peer): the user's "connected apps".
# Written behind, in batches, off the SASL hot path.
token_uses = sa.Table(
    "token_uses", metadata,
    sa.Column("family", sa.String(32), primary_key=True),
    sa.Column("service", sa.String(32), primary_key=True),
    sa.Column("last_used_at", sa.BigInteger, nullable=False),
    sa.Column("address", sa.String(64)),
)


# Two-factor sign-in: a user's TOTP secret (sealed with a key derived from the server's secret;
# `last_step` refuses a code used before) and their single-use recovery codes, kept as digests.
totp_secrets = sa.Table(
    "totp_secrets", metadata,
    sa.Column("user_id", sa.Integer, _user_fk(), primary_key=True),
    sa.Column("sealed", sa.Text, nullable=False),
    sa.Column("confirmed_at", sa.BigInteger),  # None while enrolment waits for a first code
    sa.Column("last_step", sa.BigInteger),
)

recovery_codes = sa.Table(
    "recovery_codes", metadata,
    sa.Column("code_digest", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, _user_fk(), nullable=False, index=True),
    sa.Column("used_at", sa.BigInteger),
)


# Failed sign-ins per user name and per address (throttle.py), kept here so that every instance
# sharing the database counts together. Keyed by a digest: no user name or address in clear.
throttle_strikes = sa.Table(
    "throttle_strikes", metadata,
    sa.Column("key_digest", sa.String(64), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last", sa.Float, nullable=False),
    sa.Column("blocked_until", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),  # when the row means nothing any more
)


# Signing keys (keys.py): the private JWK sealed with a key derived from the server's secret.
signing_keys = sa.Table(
    "signing_keys", metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("alg", sa.String(16), nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("sealed", sa.Text, nullable=False),
    sa.Column("since", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger),
)


# App passwords (issue 12): a long random secret a user makes for one app and some services
# (space-separated, as [sasl.services] and the forward-auth rules name them), accepted as the
# PLAIN password or HTTP Basic there; kept as a keyed digest (no slow hash: 256 random bits).
# Its uses go to `token_uses` under the family "app:<id>".
app_passwords = sa.Table(
    "app_passwords", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, _user_fk(), nullable=False, index=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("services", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger),  # None: until revoked
    sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
)


# Passkeys (WebAuthn credentials, issue 12): as a second factor and for signing in without a
# password. `user_handle` is the random WebAuthn user id of the user (the same on all their
# passkeys, never their name); `sign_count` refuses a cloned authenticator going backwards.
passkeys = sa.Table(
    "passkeys", metadata,
    sa.Column("credential_id", sa.String(1024), primary_key=True),  # base64url
    sa.Column("user_id", sa.Integer, _user_fk(), nullable=False, index=True),
    sa.Column("user_handle", sa.String(128), nullable=False),
    sa.Column("public_key", sa.Text, nullable=False),  # COSE, base64url
    sa.Column("sign_count", sa.BigInteger, nullable=False),
    sa.Column("transports", sa.String(255)),  # space-separated, as the browser reported them
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("last_used_at", sa.BigInteger),
)

