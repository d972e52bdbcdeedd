// A web application signing its users in with bearerbridge through Node's openid-client (v6;
// tested with 6.9.1 on Node 20): discovery, the code flow with PKCE S256, state and a nonce, the
// ID token checked (signature, iss, aud, exp, nonce), then /userinfo. The two handlers below,
// login() and callback(), are what an application puts behind its own routes; the rest makes
// this file run on its own as a demonstration. tests/test_rp_openid_client.py runs this very
// file against a real bearerbridge.
//
// Register the application with bearerbridge first; it prints CLIENT_ID and CLIENT_SECRET once:
//   bearerbridge client create --name "Example app" --json \
//       --redirect-uri https://app.example.org/callback --scope "openid email profile"
//
// Then: npm install openid-client, and
//   ISSUER=https://auth.example.org CLIENT_ID=... CLIENT_SECRET=... \
//   REDIRECT_URI=https://app.example.org/callback PORT=3000 node openid-client.mjs
// It serves plain HTTP on 127.0.0.1:PORT, for a reverse proxy that serves REDIRECT_URI's host
// with TLS. Open / to sign in; the callback shows the ID token's claims and userinfo's answer.
import * as http from 'node:http';
import * as client from 'openid-client';

const { ISSUER, CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, PORT = '3000' } = process.env;
const SCOPE = 'openid email profile'; // each among the client's --scope

// openid-client speaks https only. Plain http is tolerable on loopback alone (a test, or an
// issuer on the same host), so only there is it allowed.
const issuer = new URL(ISSUER);
const loopback = ['127.0.0.1', '[::1]', 'localhost'].includes(issuer.hostname);
const execute = issuer.protocol === 'http:' && loopback ? [client.allowInsecureRequests] : [];
// An ID token that comes straight from the token endpoint over TLS has its claims checked, but
// not its signature (OpenID Connect Core §3.1.3.7 lets TLS stand in for it). This check verifies
// the signature too, against the keys at bearerbridge's /jwks, which openid-client caches: a
// rotation needs no new fetch, as bearerbridge publishes its next key before it signs with it.
execute.push(client.enableNonRepudiationChecks);

// Reads ISSUER/.well-known/openid-configuration, and checks that it names ISSUER. A secret given
// as a string authenticates with client_secret_post; bearerbridge accepts that and
// client_secret_basic (client.ClientSecretBasic(CLIENT_SECRET) as the fourth argument).
const config = await client.discovery(issuer, CLIENT_ID, CLIENT_SECRET, undefined, { execute });

// What each authorization request in flight must be answered with, by state. A real application
// keeps these in the user's session (and a Map grows with every abandoned sign-in).
const pending = new Map();

// Send the browser to bearerbridge, which requires PKCE of every client (unless registered with
// --no-pkce); the nonce comes back inside the ID token, the state with the code.
async function login(req, res) {
  const checks = {
    pkceCodeVerifier: client.randomPKCECodeVerifier(), expectedNonce: client.randomNonce(),
    expectedState: client.randomState(), idTokenExpected: true,
  };
  pending.set(checks.expectedState, checks);
  const url = client.buildAuthorizationUrl(config, {
    redirect_uri: REDIRECT_URI, scope: SCOPE, state: checks.expectedState, nonce: checks.expectedNonce,
    code_challenge: await client.calculatePKCECodeChallenge(checks.pkceCodeVerifier),
    code_challenge_method: 'S256',
  });
  res.writeHead(302, { Location: url.href }).end();
}

// bearerbridge's answer: ?code&state&iss, or ?error&state&iss when the user refused.
async function callback(req, res) {
  // REDIRECT_URI with the query as received: openid-client sends it back as redirect_uri.
  const current = new URL(REDIRECT_URI);
  current.search = new URL(req.url, REDIRECT_URI).search;
  const checks = pending.get(current.searchParams.get('state'));
  if (!checks) return res.writeHead(400).end('unknown or used state\n');
  pending.delete(checks.expectedState);
  // Checks state and iss (RFC 9207), redeems the code with the PKCE verifier, and checks the ID
  // token: signature, iss, aud, exp, iat and the nonce. Throws on any error answer.
  const tokens = await client.authorizationCodeGrant(config, current, checks);
  const claims = tokens.claims(); // sub (opaque, stable per client), preferred_username, email
  // Throws unless userinfo answers for the same sub (Core §5.3.4).
  const userinfo = await client.fetchUserInfo(config, tokens.access_token, claims.sub);
  // Here an application starts its own session for claims.sub.
  res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify({ claims, userinfo }) + '\n');
}

const callbackPath = new URL(REDIRECT_URI).pathname;
http.createServer((req, res) => {
  const path = new URL(req.url, REDIRECT_URI).pathname;
  const handler = { '/': login, [callbackPath]: callback }[path];
  if (!handler) return res.writeHead(404).end();
  handler(req, res).catch((err) => {
    console.error(err);
    res.writeHead(400).end(`sign-in failed: ${err.error ?? err.code ?? err.name}\n`);
  });
}).listen(Number(PORT), '127.0.0.1', () => console.log(`listening on http://127.0.0.1:${PORT}/`));
