#!/usr/bin/env node
// Sanity check of provider.mjs itself (no Rust involved): starts it, runs the
// CIS2-style code flow end to end as a relying party would, and exits 0 when
// every check passes, 1 otherwise.
//
//   node tests/interop/smoke.mjs            (from the repository root)
//
// Needs `npm ci` in tests/interop first.

import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
if (!fs.existsSync(path.join(HERE, 'node_modules', 'oidc-provider'))) {
  console.log(`FAIL - oidc-provider not installed: run \`npm ci --prefix ${path.relative(process.cwd(), HERE) || '.'}\` first`);
  console.log('smoke: 0 passed, 1 failed');
  process.exit(1);
}
const CLIENT_ID = '123456789012.apps.national';
const REALM_PATH = '/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare';
const ACCESS_TOKEN_TTL = 30;
const ALL_SCOPES = 'openid profile email nhsperson nationalrbacaccess associatedorgs selectedrole';

let passed = 0;
let failed = 0;
function check(name, cond, detail) {
  if (cond) {
    passed += 1;
    console.log(`ok - ${name}`);
  } else {
    failed += 1;
    console.log(`FAIL - ${name}${detail === undefined ? '' : `: ${typeof detail === 'string' ? detail : JSON.stringify(detail)}`}`);
  }
  return cond;
}

// ---------------------------------------------------------------------------
// Client key and registration file
// ---------------------------------------------------------------------------

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cis2-interop-'));
const { privateKey: clientKey, publicKey: clientPub } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const clientJwk = clientPub.export({ format: 'jwk' });
const clientKid = thumbprint(clientJwk);
const clientFile = path.join(tmp, 'client.json');
fs.writeFileSync(clientFile, JSON.stringify({
  client_id: CLIENT_ID,
  jwks: { keys: [{ ...clientJwk, kid: clientKid, alg: 'RS512', use: 'sig' }] },
  redirect_uris: ['http://127.0.0.1/callback'],
  token_endpoint_auth_method: 'private_key_jwt',
  token_endpoint_auth_signing_alg: 'RS512',
  id_token_signed_response_alg: 'RS256',
}, null, 2));

function thumbprint({ e, kty, n }) {
  return crypto.createHash('sha256').update(JSON.stringify({ e, kty, n })).digest('base64url');
}

const b64json = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
const unb64json = (s) => JSON.parse(Buffer.from(s, 'base64url').toString('utf8'));

function clientAssertion(aud, { alg = 'RS512', lifetime = 300 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const input = `${b64json({ alg, typ: 'JWT', kid: clientKid })}.${b64json({
    iss: CLIENT_ID, sub: CLIENT_ID, aud, jti: crypto.randomUUID(), iat: now, exp: now + lifetime,
  })}`;
  const hash = { RS256: 'sha256', RS512: 'sha512' }[alg];
  return `${input}.${crypto.sign(hash, Buffer.from(input), clientKey).toString('base64url')}`;
}

// ---------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------

async function run() {
  check('issuer line', /^http:\/\/127\.0\.0\.1:\d+\/openam\/oauth2\/realms\/root\/realms\/NHSIdentity\/realms\/Healthcare$/.test(issuer), issuer);

  // --- Discovery -----------------------------------------------------------
  const disc = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
  check('discovery issuer is exact', disc.issuer === issuer, disc.issuer);
  const ep = {
    authorization_endpoint: '/authorize',
    token_endpoint: '/access_token',
    userinfo_endpoint: '/userinfo',
    jwks_uri: '/connect/jwk_uri',
    end_session_endpoint: '/connect/endSession',
  };
  for (const [k, p] of Object.entries(ep)) {
    check(`discovery ${k} = issuer + ${p}`, disc[k] === issuer + p, disc[k]);
  }
  check('discovery: S256 only', JSON.stringify(disc.code_challenge_methods_supported) === '["S256"]', disc.code_challenge_methods_supported);
  check('discovery: response_type code only', JSON.stringify(disc.response_types_supported) === '["code"]', disc.response_types_supported);
  check('discovery: acr_values', JSON.stringify(disc.acr_values_supported) === '["AAL3_ANY","AAL2_OR_AAL3_ANY"]', disc.acr_values_supported);
  check('discovery: private_key_jwt RS512', disc.token_endpoint_auth_methods_supported.includes('private_key_jwt')
    && disc.token_endpoint_auth_signing_alg_values_supported.includes('RS512'));
  check('discovery: CIS2 scopes', ALL_SCOPES.split(' ').every((s) => disc.scopes_supported.includes(s)), disc.scopes_supported);

  const jwks = await (await fetch(disc.jwks_uri)).json();
  check('jwks has an RS256 key', jwks.keys.some((k) => k.kty === 'RSA' && k.alg === 'RS256' && k.kid), jwks);

  // --- Code flow, cookieless client, callback on an arbitrary loopback port --
  const cbPort = 49152 + crypto.randomInt(10000);
  const redirectUri = `http://127.0.0.1:${cbPort}/callback`;
  const a = await authorize(disc, {
    redirectUri, scope: ALL_SCOPES, acr: 'AAL3_ANY', prompt: 'login', maxAge: 300,
  });
  check('authorize ends at the loopback callback (any port)', a.callback !== undefined, a.trail);
  if (!a.callback) return;
  const cb = a.callback.searchParams;
  check('callback has code', !!cb.get('code'));
  check('callback state echoed', cb.get('state') === a.state, cb.get('state'));
  check('callback iss = issuer (RFC 9207)', cb.get('iss') === issuer, cb.get('iss'));
  check('interaction happened (login)', a.trail.some((u) => u.includes('/interaction/')), a.trail);

  const t = await token(disc, {
    grant_type: 'authorization_code', code: cb.get('code'), redirect_uri: redirectUri, code_verifier: a.verifier,
  });
  check('token endpoint 200', t.status === 200, t.body);
  if (t.status !== 200) return;
  check('token_type Bearer', t.body.token_type === 'Bearer', t.body.token_type);
  check(`expires_in = --access-token-ttl (${ACCESS_TOKEN_TTL})`, t.body.expires_in === ACCESS_TOKEN_TTL, t.body.expires_in);
  check('refresh_token issued', typeof t.body.refresh_token === 'string');

  const id = verifyIdToken(t.body.id_token, jwks);
  check('id_token signature verifies against jwks (RS256, kid)', id.ok, id.error);
  const c = id.payload ?? {};
  check('id_token iss exact', c.iss === issuer, c.iss);
  check('id_token aud = client_id', c.aud === CLIENT_ID || (Array.isArray(c.aud) && c.aud.includes(CLIENT_ID)), c.aud);
  check('id_token sub', c.sub === '555021935107', c.sub);
  check('id_token nonce', c.nonce === a.nonce, c.nonce);
  check('id_token acr = first requested', c.acr === 'AAL3_ANY', c.acr);
  check('id_token amr', JSON.stringify(c.amr) === '["N3_SMARTCARD"]', c.amr);
  const now = Math.floor(Date.now() / 1000);
  check('id_token auth_time recent', typeof c.auth_time === 'number' && now - c.auth_time < 60, c.auth_time);
  check('id_token id_assurance_level "3"', c.id_assurance_level === '3', c.id_assurance_level);
  check('id_token authentication_assurance_level "3"', c.authentication_assurance_level === '3', c.authentication_assurance_level);
  check('id_token sid', typeof c.sid === 'string', c.sid);
  check('id_token has no role arrays (userinfo only)', c.nhsid_nrbac_roles === undefined && c.nhsid_user_orgs === undefined);

  const ui = await fetch(disc.userinfo_endpoint, { headers: { authorization: `Bearer ${t.body.access_token}` } });
  const u = await ui.json();
  check('userinfo 200', ui.status === 200, u);
  check('userinfo sub = id_token sub', u.sub === c.sub, u.sub);
  check('userinfo profile', u.name === 'Amelia Hart' && u.given_name === 'Amelia' && u.family_name === 'Hart' && u.uid === '555021935107', u);
  check('userinfo email', typeof u.email === 'string', u.email);
  check('userinfo nhsperson', u.nhsid_useruid === '555021935107' && u.idassurancelevel === '3' && typeof u.display_name === 'string', u);
  const roles = u.nhsid_nrbac_roles ?? [];
  check('userinfo nhsid_nrbac_roles: 2 roles', roles.length === 2
    && roles.every((r) => r.person_roleid && r.org_code && r.role_code && r.role_name), roles);
  check('userinfo roles in RX1 and A9A5A', roles.map((r) => r.org_code).sort().join() === 'A9A5A,RX1', roles);
  check('userinfo nhsid_user_orgs', (u.nhsid_user_orgs ?? []).map((o) => o.org_code).sort().join() === 'A9A5A,RX1', u.nhsid_user_orgs);
  check('selected_roleid = first role', c.selected_roleid === roles[0]?.person_roleid, c.selected_roleid);

  // --- Refresh with rotation ------------------------------------------------
  const r = await token(disc, { grant_type: 'refresh_token', refresh_token: t.body.refresh_token });
  check('refresh 200', r.status === 200, r.body);
  check('refresh rotates the refresh token', r.body.refresh_token && r.body.refresh_token !== t.body.refresh_token);
  const rid = r.body.id_token ? verifyIdToken(r.body.id_token, jwks) : { ok: false };
  check('refresh returns a valid id_token with the same sub', rid.ok && rid.payload.sub === c.sub, rid.error);
  const reuse = await token(disc, { grant_type: 'refresh_token', refresh_token: t.body.refresh_token });
  check('old refresh token rejected (invalid_grant)', reuse.status === 400 && reuse.body.error === 'invalid_grant', reuse.body);

  // --- Negative cases -------------------------------------------------------
  const replay = await token(disc, {
    grant_type: 'authorization_code', code: cb.get('code'), redirect_uri: redirectUri, code_verifier: a.verifier,
  });
  check('code replay rejected (invalid_grant)', replay.body.error === 'invalid_grant', replay.body);

  const a2 = await authorize(disc, { redirectUri, scope: 'openid' });
  const badPkce = await token(disc, {
    grant_type: 'authorization_code', code: a2.callback?.searchParams.get('code'), redirect_uri: redirectUri,
    code_verifier: crypto.randomBytes(32).toString('base64url'),
  });
  check('wrong code_verifier rejected (invalid_grant)', badPkce.body.error === 'invalid_grant', badPkce.body);

  const noPkce = await authorize(disc, { redirectUri, scope: 'openid', pkce: false });
  check('authorize without PKCE rejected', noPkce.callback?.searchParams.get('error') === 'invalid_request', noPkce.trail);

  const badRedirect = await authorize(disc, { redirectUri: `http://127.0.0.1:${cbPort}/other`, scope: 'openid' });
  check('unregistered redirect path not redirected to', badRedirect.callback === undefined && badRedirect.status === 400, badRedirect);

  const a3 = await authorize(disc, { redirectUri, scope: 'openid' });
  const badAud = await token(disc, {
    grant_type: 'authorization_code', code: a3.callback?.searchParams.get('code'), redirect_uri: redirectUri, code_verifier: a3.verifier,
  }, { aud: 'https://wrong.example/access_token' });
  check('client assertion with wrong aud rejected (invalid_client)', badAud.status === 401 && badAud.body.error === 'invalid_client', badAud.body);
  const issAud = await token(disc, {
    grant_type: 'authorization_code', code: a3.callback?.searchParams.get('code'), redirect_uri: redirectUri, code_verifier: a3.verifier,
  }, { aud: issuer });
  check('client assertion with aud = issuer rejected (CIS2: token endpoint only)', issAud.body.error === 'invalid_client', issAud.body);
  const longExp = await token(disc, {
    grant_type: 'authorization_code', code: a3.callback?.searchParams.get('code'), redirect_uri: redirectUri, code_verifier: a3.verifier,
  }, { lifetime: 3600 });
  check('client assertion with exp > 5 min rejected', longExp.body.error === 'invalid_client', longExp.body);
  const okExp = await token(disc, {
    grant_type: 'authorization_code', code: a3.callback?.searchParams.get('code'), redirect_uri: redirectUri, code_verifier: a3.verifier,
  });
  check('...the same code then still redeems with a good assertion', okExp.status === 200, okExp.body);

  // --- Sessions: a client that keeps cookies (like a browser) ---------------
  const jar = new CookieJar();
  const s1 = await authorize(disc, { redirectUri, scope: 'openid selectedrole', jar });
  const t1 = await token(disc, { grant_type: 'authorization_code', code: s1.callback?.searchParams.get('code'), redirect_uri: redirectUri, code_verifier: s1.verifier });
  const at1 = t1.body.id_token ? unb64json(t1.body.id_token.split('.')[1]).auth_time : undefined;
  check('browser-like client: first sign-in', typeof at1 === 'number', t1.body);
  check('acr defaults to AAL3_ANY when none asked', t1.body.id_token && unb64json(t1.body.id_token.split('.')[1]).acr === 'AAL3_ANY');

  await sleep(1100);
  const s2 = await authorize(disc, { redirectUri, scope: 'openid selectedrole', jar });
  const t2 = await token(disc, { grant_type: 'authorization_code', code: s2.callback?.searchParams.get('code'), redirect_uri: redirectUri, code_verifier: s2.verifier });
  check('SSO: no interaction, same auth_time', !s2.trail.some((x) => x.includes('/interaction/'))
    && t2.body.id_token && unb64json(t2.body.id_token.split('.')[1]).auth_time === at1, s2.trail);

  const s3 = await authorize(disc, { redirectUri, scope: 'openid selectedrole', jar, prompt: 'login' });
  const t3 = await token(disc, { grant_type: 'authorization_code', code: s3.callback?.searchParams.get('code'), redirect_uri: redirectUri, code_verifier: s3.verifier });
  const at3 = t3.body.id_token ? unb64json(t3.body.id_token.split('.')[1]).auth_time : undefined;
  check('prompt=login: re-authenticates, newer auth_time', s3.trail.some((x) => x.includes('/interaction/')) && at3 > at1, { at1, at3 });

  await sleep(2100);
  const s4 = await authorize(disc, { redirectUri, scope: 'openid selectedrole', jar, maxAge: 1 });
  const t4 = await token(disc, { grant_type: 'authorization_code', code: s4.callback?.searchParams.get('code'), redirect_uri: redirectUri, code_verifier: s4.verifier });
  const at4 = t4.body.id_token ? unb64json(t4.body.id_token.split('.')[1]).auth_time : undefined;
  check('max_age exceeded: re-authenticates, newer auth_time', s4.trail.some((x) => x.includes('/interaction/')) && at4 > at3, { at3, at4 });

  // --- RP-initiated logout ends the session -------------------------------
  const es = new URL(disc.end_session_endpoint);
  es.searchParams.set('id_token_hint', t4.body.id_token);
  es.searchParams.set('client_id', CLIENT_ID);
  const page = await fetch(es, { headers: { cookie: jar.header(es.href) } });
  jar.store(es.href, page.headers.getSetCookie());
  const html = await page.text();
  const action = /<form[^>]*action="([^"]+)"/.exec(html)?.[1];
  const fields = Object.fromEntries([...html.matchAll(/<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"/g)].map((m) => [m[1], m[2]]));
  check('endSession shows the logout form', page.status === 200 && !!action && !!fields.xsrf, html.slice(0, 300));
  if (action) {
    const confirmUrl = new URL(action, es).href;
    const done = await fetch(confirmUrl, {
      method: 'POST',
      redirect: 'manual',
      headers: { cookie: jar.header(confirmUrl) },
      body: new URLSearchParams({ ...fields, logout: 'yes' }),
    });
    jar.store(confirmUrl, done.headers.getSetCookie());
    await done.arrayBuffer();
    check('logout confirm accepted', done.status === 303 || done.status === 200, done.status);
    const s5 = await authorize(disc, { redirectUri, scope: 'openid', jar });
    check('after logout: sign-in is interactive again', s5.trail.some((x) => x.includes('/interaction/')) && !!s5.callback, s5.trail);
  }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

async function authorize(disc, {
  redirectUri, scope, acr, prompt, maxAge, pkce = true, jar,
}) {
  const verifier = crypto.randomBytes(32).toString('base64url');
  const state = crypto.randomBytes(12).toString('base64url');
  const nonce = crypto.randomBytes(12).toString('base64url');
  const url = new URL(disc.authorization_endpoint);
  const q = url.searchParams;
  q.set('response_type', 'code');
  q.set('client_id', CLIENT_ID);
  q.set('redirect_uri', redirectUri);
  q.set('scope', scope);
  q.set('state', state);
  q.set('nonce', nonce);
  if (pkce) {
    q.set('code_challenge', crypto.createHash('sha256').update(verifier).digest('base64url'));
    q.set('code_challenge_method', 'S256');
  }
  if (acr) q.set('acr_values', acr);
  if (prompt) q.set('prompt', prompt);
  if (maxAge !== undefined) q.set('max_age', String(maxAge));

  // Follow redirects by hand, stopping at the client's callback.
  const cbOrigin = new URL(redirectUri).origin;
  const trail = [];
  let next = url.href;
  for (let i = 0; i < 10; i += 1) {
    trail.push(next);
    const headers = jar ? { cookie: jar.header(next) } : {};
    const res = await fetch(next, { redirect: 'manual', headers });
    if (jar) jar.store(next, res.headers.getSetCookie());
    const loc = res.headers.get('location');
    if (res.status < 300 || res.status >= 400 || !loc) {
      return { status: res.status, body: await res.text(), trail, verifier, state, nonce };
    }
    await res.arrayBuffer();
    const abs = new URL(loc, next);
    if (abs.origin === cbOrigin) {
      trail.push(abs.href);
      return { callback: abs, status: res.status, trail, verifier, state, nonce };
    }
    next = abs.href;
  }
  return { status: 0, trail, verifier, state, nonce };
}

async function token(disc, params, { aud = disc.token_endpoint, lifetime = 300 } = {}) {
  const body = new URLSearchParams({
    ...params,
    client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
    client_assertion: clientAssertion(aud, { lifetime }),
  });
  const res = await fetch(disc.token_endpoint, { method: 'POST', body });
  let json;
  try { json = await res.json(); } catch { json = {}; }
  return { status: res.status, body: json };
}

function verifyIdToken(jwt, jwks) {
  try {
    const [h, p, s] = jwt.split('.');
    const header = unb64json(h);
    if (header.alg !== 'RS256') return { ok: false, error: `alg ${header.alg}` };
    const jwk = jwks.keys.find((k) => k.kid === header.kid);
    if (!jwk) return { ok: false, error: `no key ${header.kid}` };
    const key = crypto.createPublicKey({ key: jwk, format: 'jwk' });
    const ok = crypto.verify('sha256', Buffer.from(`${h}.${p}`), key, Buffer.from(s, 'base64url'));
    return { ok, payload: unb64json(p), error: ok ? undefined : 'bad signature' };
  } catch (err) {
    return { ok: false, error: err.message };
  }
}

// Just enough of a cookie jar (host-only, Path-scoped) for the session checks.
class CookieJar {
  #cookies = new Map(); // `${name};${path}` -> { name, value, path }

  store(url, setCookies) {
    const reqPath = new URL(url).pathname;
    for (const sc of setCookies) {
      const [pair, ...attrs] = sc.split(';');
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      let cpath = reqPath.slice(0, reqPath.lastIndexOf('/')) || '/';
      let expired = value === '';
      for (const a of attrs) {
        const [k, v = ''] = a.split('=');
        const key = k.trim().toLowerCase();
        if (key === 'path') cpath = v.trim();
        if (key === 'max-age' && Number(v) <= 0) expired = true;
        if (key === 'expires' && Date.parse(v) <= Date.now()) expired = true;
      }
      const id = `${name};${cpath}`;
      if (expired) this.#cookies.delete(id);
      else this.#cookies.set(id, { name, value, path: cpath });
    }
  }

  header(url) {
    const p = new URL(url).pathname;
    return [...this.#cookies.values()]
      .filter((c) => p === c.path || p.startsWith(c.path.endsWith('/') ? c.path : `${c.path}/`))
      .map((c) => `${c.name}=${c.value}`)
      .join('; ');
  }
}

function sleep(ms) {
  return new Promise((r) => { setTimeout(r, ms); });
}

// ---------------------------------------------------------------------------
// Provider process
// ---------------------------------------------------------------------------

const child = spawn(process.execPath, [
  path.join(HERE, 'provider.mjs'),
  '--port', '0',
  '--client', clientFile,
  '--access-token-ttl', String(ACCESS_TOKEN_TTL),
  ...(process.env.SMOKE_VERBOSE ? ['--verbose'] : []),
], { stdio: ['ignore', 'pipe', 'pipe'] });

let stderrText = '';
child.stderr.on('data', (d) => { stderrText += d; });

function cleanup() {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  fs.rmSync(tmp, { recursive: true, force: true });
}

const issuer = await new Promise((resolve, reject) => {
  let out = '';
  const timer = setTimeout(() => reject(new Error('provider did not print its issuer within 20 s')), 20_000);
  child.stdout.on('data', (d) => {
    out += d;
    const nl = out.indexOf('\n');
    if (nl !== -1) {
      clearTimeout(timer);
      resolve(out.slice(0, nl));
    }
  });
  child.on('exit', (code) => {
    clearTimeout(timer);
    reject(new Error(`provider exited early (${code}): ${stderrText}`));
  });
}).catch((err) => {
  console.log(`FAIL - provider start: ${err.message}`);
  cleanup();
  process.exit(1);
});

try {
  await run();
} catch (err) {
  failed += 1;
  console.log(`FAIL - unexpected error: ${err.stack || err}`);
}
cleanup();
if (failed) console.log(`--- provider stderr ---\n${stderrText}`);
console.log(`smoke: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
