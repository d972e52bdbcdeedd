<?php
// Roundcube 1.6 (Debian 12's roundcube-core 1.6.5) signing users in with bearerbridge, and
// opening their mailbox on Dovecot with the access token it gets (IMAP AUTHENTICATE XOAUTH2).
//
// Append everything below the `<?php` line to /etc/roundcube/config.inc.php (after its
// `$config = [];`), replacing auth.example.org with bearerbridge's [server] issuer and
// mail.example.org with your IMAP server. tests/test_rp_roundcube.py runs this file, with only
// those URLs and the client's credentials replaced, against a real Roundcube, Dovecot and
// bearerbridge.
//
// Register Roundcube with bearerbridge first:
//   bearerbridge client create --name Roundcube --json \
//       --redirect-uri https://webmail.example.org/index.php/login/oauth \
//       --scope "openid email imap" --no-pkce
// - The redirect URI is always Roundcube's own address followed by /index.php/login/oauth (it
//   is built from the Host header of the browser's request, without any query string).
// - --no-pkce: Roundcube 1.6 sends no PKCE challenge (nor a nonce). This is safe enough only
//   because it is a confidential client: it redeems the code with its secret, which never
//   leaves the server.
// - --scope: the three scopes asked for below; add `smtp` to both if Roundcube sends mail
//   through a Postfix that asks bearerbridge (Roundcube then uses XOAUTH2 with the same token).

// Any non-empty value turns OAuth on: the login page gets a "Login with bearerbridge" button.
$config['oauth_provider'] = 'generic';
$config['oauth_provider_name'] = 'bearerbridge';

// Roundcube authenticates at the token endpoint with client_secret_post only (the client_id
// and the secret in the POST body, never an Authorization: Basic header); bearerbridge accepts
// that for any confidential client. The secret is printed once by `client create`; this file
// then holds a secret, so keep it readable by the web server's user only (Debian: root:www-data,
// mode 640).
$config['oauth_client_id'] = 'CLIENT_ID';
$config['oauth_client_secret'] = 'CLIENT_SECRET';

$config['oauth_auth_uri'] = 'https://auth.example.org/authorize';
$config['oauth_token_uri'] = 'https://auth.example.org/token';
// Only asked when the ID token has none of the identity fields below. bearerbridge puts the
// user's `email` in the ID token when the `email` scope is granted, so this is a fallback.
$config['oauth_identity_uri'] = 'https://auth.example.org/userinfo';

// openid: an ID token comes with the access token. email: it carries the user's address.
// imap: the access token opens the mailbox (Dovecot's dovecot-oauth2.conf.ext requires
// `scope = imap`, and bearerbridge's [sasl.services] maps Dovecot's imap service to it).
$config['oauth_scope'] = 'openid email imap';

// Roundcube logs in to IMAP as the first of these claims it finds in the ID token (else in the
// userinfo answer). It reads the ID token without checking its signature, which is tolerable
// only because it got the token straight from bearerbridge's token endpoint; the mailbox is
// opened by the access token, which Dovecot checks with bearerbridge. The user name is then
// the email address: give every user one (bearerbridge user add NAME --email ...), and set
// `username_attribute = email` in Dovecot's dovecot-oauth2.conf.ext so that the address
// matches the token's owner.
$config['oauth_identity_fields'] = ['email'];

// Check bearerbridge's TLS certificate (the default; the CAs are the system's).
$config['oauth_verify_peer'] = true;

// true: opening Roundcube without a session goes straight to bearerbridge, with no button.
$config['oauth_login_redirect'] = false;

// The IMAP server where these tokens open a mailbox: Dovecot with conf/dovecot/oauth2.conf.
// Roundcube always uses AUTHENTICATE XOAUTH2 with the token for OAuth logins, whatever the
// server advertises.
$config['imap_host'] = 'tls://mail.example.org:143';
