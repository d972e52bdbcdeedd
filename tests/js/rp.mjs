// One relying party built on Node's openid-client, driven by tests/test_rp_openid_client.py.
//
// The test writes one JSON object a line on stdin and reads exactly one JSON line back for each:
// {"ok": true, ...} or {"ok": false, "error": ..., "code": ..., "oauth_error": ...}. The process
// keeps ONE Configuration (and so one JWKS cache) for its whole life, which is what lets a test
// show that a relying party which fetched /jwks before a key rotation still accepts ID tokens
// signed after it.
//
//   {"op": "discover", "issuer", "client_id", "client_secret", "auth": "basic"|"post", "id_token_alg"?}
//   {"op": "begin", "redirect_uri", "scope"}  -> {"url"}: PKCE S256, nonce and state kept for finish
//   {"op": "finish", "callback_url"}          -> {"header", "claims", "userinfo", "token_type", "jwks"}
import * as readline from 'node:readline';
import * as client from 'openid-client';

const TIMEOUT = 10; // seconds, for every request openid-client makes

let config; // the one Configuration of this relying party
let pending; // the checks of the authorization request in flight

async function discover({ issuer, client_id, client_secret, auth, id_token_alg }) {
  const authentication = { basic: client.ClientSecretBasic, post: client.ClientSecretPost }[auth];
  if (!authentication) throw new TypeError(`auth must be "basic" or "post", not ${JSON.stringify(auth)}`);
  // With id_token_alg given, openid-client refuses ID tokens signed with any other algorithm.
  const metadata = id_token_alg ? { id_token_signed_response_alg: id_token_alg } : undefined;
  // An ID token from the token endpoint has its claims checked, but its signature only with
  // enableNonRepudiationChecks (OpenID Connect Core §3.1.3.7 lets TLS stand in for it): without it
  // openid-client would never fetch /jwks and the test would prove nothing about the keys.
  config = await client.discovery(new URL(issuer), client_id, metadata, authentication(client_secret),
    { execute: [client.allowInsecureRequests, client.enableNonRepudiationChecks], timeout: TIMEOUT });
  return { metadata: config.serverMetadata() };
}

async function begin({ redirect_uri, scope }) {
  pending = { verifier: client.randomPKCECodeVerifier(), nonce: client.randomNonce(), state: client.randomState() };
  const url = client.buildAuthorizationUrl(config, {
    redirect_uri, scope, nonce: pending.nonce, state: pending.state,
    code_challenge: await client.calculatePKCECodeChallenge(pending.verifier), code_challenge_method: 'S256',
  });
  return { url: url.href };
}

async function finish({ callback_url }) {
  const checks = pending;
  pending = undefined;
  const tokens = await client.authorizationCodeGrant(config, new URL(callback_url), {
    pkceCodeVerifier: checks.verifier, expectedNonce: checks.nonce, expectedState: checks.state,
    idTokenExpected: true,
  });
  const claims = tokens.claims(); // the ID token, its signature and claims already checked
  const userinfo = await client.fetchUserInfo(config, tokens.access_token, claims.sub); // checks sub
  const cache = client.getJwksCache(config);
  return {
    header: JSON.parse(Buffer.from(tokens.id_token.split('.')[0], 'base64url')),
    claims, userinfo, token_type: tokens.token_type, scope: tokens.scope,
    jwks: { fetched_at: cache?.uat, kids: cache?.jwks.keys.map((k) => k.kid) },
  };
}

const OPS = { discover, begin, finish };

// An error as data: openid-client's code (OAUTH_...), the OAuth error of a server's answer (in its
// body, or in a WWW-Authenticate challenge after a 401), and the cause.
function failure(err) {
  const challenge = err instanceof client.WWWAuthenticateChallengeError ? err.cause[0]?.parameters : undefined;
  return {
    ok: false, error: `${err.name}: ${err.message}`, code: err.code, oauth_error: err.error ?? challenge?.error,
    error_description: err.error_description, status: err.status,
    cause: err.cause instanceof Error ? `${err.cause.name}: ${err.cause.message}` : err.cause,
  };
}

for await (const line of readline.createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  let answer;
  try {
    const command = JSON.parse(line);
    const op = OPS[command.op];
    if (!op) throw new TypeError(`unknown op ${JSON.stringify(command.op)}`);
    answer = { ok: true, ...(await op(command)) };
  } catch (err) {
    answer = failure(err);
  }
  let text;
  try {
    text = JSON.stringify(answer);
  } catch (err) { // a cause that is no data (circular, BigInt): keep the message only
    text = JSON.stringify({ ok: false, error: answer.error ?? `${err.name}: ${err.message}` });
  }
  process.stdout.write(text + '\n');
}
