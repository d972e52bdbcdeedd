-- Prosody: XMPP logins with OAuth 2.0 bearer tokens, decided by bearerbridge.
--
-- For Prosody 0.12 (Debian 12) with mod_auth_dovecot from Debian's prosody-modules:
--
--   apt-get install prosody prosody-modules
--
-- The module lands in /usr/lib/prosody/modules/mod_auth_dovecot/, which Prosody searches
-- already: no plugin_paths entry is needed. It speaks the Dovecot authentication protocol,
-- which bearerbridge serves, so no Dovecot needs to be installed.
--
-- Copy this file to /etc/prosody/conf.d/bearerbridge.cfg.lua: Debian's prosody.cfg.lua includes
-- conf.d/*.cfg.lua at its end, and an included file starts in the global section, so the lines
-- below apply to every VirtualHost (and override the main file's `authentication`). To use
-- bearerbridge for some hosts only, put them under those VirtualHost lines instead.
-- Then `prosodyctl check config` and restart Prosody (a reload does not swap auth providers).
--
-- bearerbridge's side (conf/bearerbridge.toml):
--
--   [sasl]
--   listen = ["unix:/run/bearerbridge/auth:mode=660"]   # or "tcp:12345:interface=127.0.0.1"
--   [sasl.services]
--   xmpp = "xmpp"            # Prosody says service=xmpp: a token needs the `xmpp` scope
--   [sasl.usernames]
--   xmpp = "localpart"       # see "The user name" below
--
-- XMPP clients then log in with OAUTHBEARER (RFC 7628) or XOAUTH2 (whatever bearerbridge's
-- [sasl] mechanisms lists; Prosody offers exactly the MECH lines bearerbridge sends), with an
-- access token the user granted the app for `xmpp`. A token for `smtp` alone is refused: the
-- client gets RFC 7628's JSON error as a <challenge>, answers <response>AQ==</response>, and gets
-- <failure><not-authorized/>. tests/test_peers_xmpp.py runs these settings (the UNIX socket,
-- [sasl.usernames]) against a real Prosody.

-- Prosody's name for mod_auth_dovecot. Auth modules are not listed in modules_enabled.
authentication = "dovecot"

-- Where bearerbridge's [sasl] listen endpoint is. A UNIX socket: the `prosody` user must be
-- able to connect to it, so give the socket a group that prosody is in (e.g. run bearerbridge
-- with group `bearerbridge` and `adduser prosody bearerbridge`) and "mode=660".
dovecot_auth_socket = "/run/bearerbridge/auth"
-- Or TCP. Setting dovecot_auth_port switches the module to TCP and dovecot_auth_socket is then
-- ignored; dovecot_auth_host defaults to "127.0.0.1". Keep it on loopback: the protocol is
-- unencrypted and carries the tokens.
--dovecot_auth_host = "127.0.0.1"
--dovecot_auth_port = 12345

-- The service name Prosody puts in each request (service=); "xmpp" is the default. It must be a
-- key of bearerbridge's [sasl.services], which says what scope a token needs. Whatever the
-- name, bearerbridge recognises Prosody (by its VERSION 1 1 greeting, or service=xmpp) and never
-- sends it the empty challenge that crashes mod_auth_dovecot's session (when a client sends
-- <auth/> without an initial response): such a login is refused with "initial response required".
--service_name = "xmpp"

-- The user name. bearerbridge answers a good login with `user=<name>` and Prosody makes the JID
-- <name>@<VirtualHost> from it. By default (handle_appended = "escape") Prosody escapes an "@"
-- in that name (XEP-0106), so `bob@example.org` would become `bob\40example.org@example.org`:
-- that is why bearerbridge reports the localpart to xmpp (`[sasl.usernames] xmpp = "localpart"`,
-- the part of the user name before any "@"). The name is also NODEprepped, which lowercases it
-- and refuses characters not allowed in a JID's localpart: give XMPP users names that are valid
-- localparts, and note that users `bob@a.example` and `bob@b.example` would both be `bob` here.
--
-- The alternative keeps the whole name: have bearerbridge report "user@realm" with `realm` set
-- to the XMPP domain, and let Prosody split it and check the domain:
--   bearerbridge:  [sasl] realm = "example.org"   [sasl.usernames] xmpp = "user@realm"
--   Prosody:       handle_appended = "split"
--                  validate_append_host = true    -- refuse a domain other than the host's
-- Do NOT set auth_append_host = true: it replaces the module's SASL with PLAIN only, and no
-- token mechanism would be offered.

-- A bearer token is as good as a password: only log in over TLS. This is Prosody's default; it is
-- here so that nobody turns it off for the token mechanisms. (OAUTHBEARER and XOAUTH2 are not in
-- Prosody's insecure_sasl_mechanisms, so with this off they would be offered in the clear.)
c2s_require_encryption = true

-- Availability. mod_auth_dovecot connects when the host loads and refuses to load if it cannot:
-- the host then has no working authentication until Prosody is restarted. So start bearerbridge
-- before Prosody (with systemd: a drop-in for prosody.service with After= and
-- Wants=bearerbridge.service). Prosody keeps that one connection for its whole life and waits for
-- each answer with blocking I/O and no timeout, so a slow answer stalls all of Prosody;
-- bearerbridge answers from memory or one indexed query, and must stay close (loopback).
