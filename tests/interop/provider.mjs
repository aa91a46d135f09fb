#!/usr/bin/env node
// A CIS2-shaped OpenID provider for interop tests, built on panva's certified
// `oidc-provider`. See README.md in this folder.
//
//   node provider.mjs --client client.json [--port 0] [--access-token-ttl 3600]
//                     [--account account.json] [--verbose]
//
// Prints exactly one line on stdout when ready: the issuer. Everything else
// (oidc-provider notices, request log with --verbose) goes to stderr.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

// oidc-provider prints its notices with console.info (stdout); stdout is
// reserved for the issuer line, so send all console output to stderr.
console.log = console.error;
console.info = console.error;
console.debug = console.error;

const { default: Provider, errors, interactionPolicy } = await import('oidc-provider');

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    client: { type: 'string' },
    'access-token-ttl': { type: 'string', default: '3600' },
    account: { type: 'string' },
    verbose: { type: 'boolean', default: false },
  },
  strict: true,
});

function die(msg) {
  process.stderr.write(`provider.mjs: ${msg}\n`);
  process.exit(2);
}

if (!args.client) die('--client FILE is required');
const port = Number(args.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) die(`bad --port ${args.port}`);
const accessTokenTtl = Number(args['access-token-ttl']);
if (!Number.isInteger(accessTokenTtl) || accessTokenTtl <= 0) {
  die(`bad --access-token-ttl ${args['access-token-ttl']}`);
}

let clientFile;
try {
  clientFile = JSON.parse(fs.readFileSync(args.client, 'utf8'));
} catch (err) {
  die(`cannot read client file ${args.client}: ${err.message}`);
}
if (typeof clientFile.client_id !== 'string') die('client file: client_id missing');

// ---------------------------------------------------------------------------
// CIS2 shape
// ---------------------------------------------------------------------------

const REALM_PATH = '/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare';

// Scope -> claims, as in cis2-reference.md §5. The `openid` entry lists what
// CIS2 always puts in the ID token; selectedrole/changedrole add
// selected_roleid (ID token only, see claimsFor below).
const CLAIMS = {
  acr: null,
  amr: null,
  auth_time: null,
  sid: null,
  iss: null,
  openid: ['sub', 'acr', 'amr', 'auth_time', 'id_assurance_level', 'authentication_assurance_level'],
  profile: ['name', 'given_name', 'family_name', 'uid'],
  email: ['email'],
  nhsperson: ['nhsid_useruid', 'title', 'initials', 'middle_names', 'display_name', 'idassurancelevel'],
  nationalrbacaccess: ['nhsid_nrbac_roles'],
  associatedorgs: ['nhsid_user_orgs'],
  selectedrole: ['selected_roleid'],
  changedrole: ['selected_roleid'],
};
const SCOPES = [
  'openid', 'profile', 'email', 'nhsperson', 'nationalrbacaccess',
  'associatedorgs', 'selectedrole', 'changedrole',
];
const ACR_VALUES = ['AAL3_ANY', 'AAL2_OR_AAL3_ANY'];
const DEFAULT_ACR = 'AAL3_ANY';
const AMR = ['N3_SMARTCARD'];

// The fixed test account. --account FILE replaces it (same shape: a JSON
// object of userinfo claims; `sub` is required).
const DEFAULT_ACCOUNT = {
  sub: '555021935107',
  uid: '555021935107',
  nhsid_useruid: '555021935107',
  name: 'Amelia Hart',
  given_name: 'Amelia',
  family_name: 'Hart',
  title: 'Dr',
  initials: 'A',
  display_name: 'Amelia Hart',
  email: 'amelia.hart@example.nhs.uk',
  idassurancelevel: '3',
  nhsid_nrbac_roles: [
    {
      person_orgid: '111122223333',
      person_roleid: '555566667777',
      org_code: 'RX1',
      role_code: 'S8000:G8000:R8000',
      role_name: '"Clinical":"Clinical Provision":"Clinical Practitioner Access Role"',
      activities: ['Independent Prescribing'],
      activity_codes: ['B0420'],
    },
    {
      person_orgid: '111122224444',
      person_roleid: '5555666677778888',
      org_code: 'A9A5A',
      role_code: 'S8000:G8000:R8001',
      role_name: '"Clinical":"Clinical Provision":"Nurse Access Role"',
    },
  ],
  nhsid_user_orgs: [
    { org_code: 'RX1', org_name: 'INTEROP TEST HOSPITALS NHS TRUST' },
    { org_code: 'A9A5A', org_name: 'INTEROP TEST SURGERY' },
  ],
};

let account = DEFAULT_ACCOUNT;
if (args.account) {
  try {
    account = JSON.parse(fs.readFileSync(args.account, 'utf8'));
  } catch (err) {
    die(`cannot read account file ${args.account}: ${err.message}`);
  }
  if (typeof account.sub !== 'string') die('account file: sub missing');
}
// CIS2 returns the role picked on its role-selection page; this stub always
// "picks" the first role (none when the user has no roles).
const selectedRoleId = account.selected_roleid
  ?? account.nhsid_nrbac_roles?.[0]?.person_roleid;

function claimsFor(use) {
  if (use === 'id_token') {
    // CIS2's ID token: no profile/role data, only these (acr, amr and
    // auth_time are added by oidc-provider from the login result).
    const out = {
      sub: account.sub,
      id_assurance_level: account.idassurancelevel ?? '3',
      authentication_assurance_level: '3',
    };
    if (selectedRoleId !== undefined) out.selected_roleid = selectedRoleId;
    return out;
  }
  // userinfo: everything but selected_roleid (CIS2 puts that in the ID token).
  const { selected_roleid: _ignored, ...rest } = account;
  return rest;
}

// oidc-provider's default policy, less `native_client_prompt` (which makes
// every request from a native client interactive, so there would be no silent
// SSO). login still happens on no session, prompt=login, max_age exceeded,
// id_token_hint/claims mismatches; consent on scopes/claims not yet granted.
function cis2Policy() {
  const policy = interactionPolicy.base();
  policy.get('consent').checks.remove('native_client_prompt');
  return policy;
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

const client = {
  application_type: 'native', // loopback redirect URIs match any port (RFC 8252 §7.3)
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: 'private_key_jwt',
  token_endpoint_auth_signing_alg: 'RS512',
  id_token_signed_response_alg: 'RS256',
  ...clientFile,
};

// ---------------------------------------------------------------------------
// Provider signing keys: fresh RSA keys per run. ID tokens are RS256 (the
// first key) unless the client file asks for RS512; two keys with different
// kids also make the relying party pick its key by kid.
// ---------------------------------------------------------------------------

function signingKey(alg) {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const { e, kty, n } = jwk;
  jwk.kid = crypto.createHash('sha256').update(JSON.stringify({ e, kty, n })).digest('base64url'); // RFC 7638
  jwk.alg = alg;
  jwk.use = 'sig';
  return jwk;
}
const signingKeys = [signingKey('RS256'), signingKey('RS512')];

// ---------------------------------------------------------------------------
// HTTP server: listen first (port 0 = pick one), then build the provider with
// the real port in the issuer.
// ---------------------------------------------------------------------------

let provider;
let prefix; // REALM_PATH
const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    process.stderr.write(`provider.mjs: ${err.stack || err}\n`);
    if (!res.headersSent) {
      res.statusCode = 500;
      res.setHeader('Content-Type', 'text/plain');
    }
    res.end(`internal error: ${err.message}\n`);
  });
});

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const actualPort = server.address().port;
const issuer = `http://127.0.0.1:${actualPort}${REALM_PATH}`;
prefix = REALM_PATH;

provider = new Provider(issuer, {
  clients: [client],
  jwks: { keys: signingKeys },

  routes: {
    authorization: '/authorize',
    token: '/access_token',
    userinfo: '/userinfo',
    jwks: '/connect/jwk_uri',
    end_session: '/connect/endSession',
    // unused features keep their defaults
  },

  scopes: SCOPES,
  claims: CLAIMS,
  // Scope claims go into the ID token too; claimsFor('id_token') limits the
  // ID token to CIS2's set.
  conformIdTokenClaims: false,
  acrValues: ACR_VALUES,
  responseTypes: ['code'],
  pkce: { methods: ['S256'], required: () => true },
  clientAuthMethods: ['private_key_jwt', 'client_secret_post', 'client_secret_basic', 'none'],
  enabledJWA: {
    clientAuthSigningAlgValues: ['RS256', 'RS384', 'RS512', 'PS256', 'PS512', 'ES256', 'HS256'],
    idTokenSigningAlgValues: ['RS256', 'RS512', 'PS256', 'ES256'],
    userinfoSigningAlgValues: ['RS256', 'RS512'],
  },

  features: {
    devInteractions: { enabled: false },
    claimsParameter: { enabled: true },
    rpInitiatedLogout: {
      enabled: true,
      // oidc-provider asks "Do you want to sign out?"; this page answers yes
      // by itself in a browser. Plain HTTP clients POST the form's fields
      // plus logout=yes to its action (see README).
      logoutSource(ctx, form) {
        ctx.type = 'html';
        ctx.body = `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Signing out</title></head>
<body>
${form}
<noscript><button type="submit" form="op.logoutForm" name="logout" value="yes">Sign out</button></noscript>
<script>
var f = document.getElementById('op.logoutForm');
var i = document.createElement('input');
i.type = 'hidden'; i.name = 'logout'; i.value = 'yes';
f.appendChild(i);
f.submit();
</script>
</body></html>`;
      },
    },
    // Opt-in per client: put backchannel_logout_uri in the client file.
    backchannelLogout: { enabled: true },
    pushedAuthorizationRequests: { enabled: false },
    dPoP: { enabled: false },
    revocation: { enabled: false },
    introspection: { enabled: false },
  },

  interactions: {
    policy: cis2Policy(),
    url: (_ctx, interaction) => `${REALM_PATH}/interaction/${interaction.uid}`,
  },

  // CIS2's rules for the private_key_jwt assertion, stricter than
  // oidc-provider's (which also takes the issuer as aud and any exp):
  // sub = client_id, aud = the token endpoint as discovery gives it,
  // exp at most 5 minutes ahead.
  async assertJwtClientAuthClaimsAndHeader(ctx, claims) {
    const tokenEndpoint = ctx.oidc.urlFor('token');
    if (claims.sub !== ctx.oidc.client.clientId) {
      throw new errors.InvalidClientAuth('sub must be the client_id');
    }
    const auds = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (!auds.includes(tokenEndpoint)) {
      throw new errors.InvalidClientAuth(`aud must be the token endpoint ${tokenEndpoint}`);
    }
    if (claims.exp > Math.floor(Date.now() / 1000) + 300 + 15) {
      throw new errors.InvalidClientAuth('exp must be at most 5 minutes ahead');
    }
  },

  async findAccount(_ctx, sub) {
    if (sub !== account.sub) return undefined;
    return {
      accountId: sub,
      async claims(use) {
        return claimsFor(use);
      },
    };
  },

  issueRefreshToken: async (_ctx, c) => c.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: true,

  ttl: {
    AccessToken: accessTokenTtl,
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: 8 * 3600,
    Interaction: 600,
    Session: 8 * 3600,
    Grant: 8 * 3600,
  },

  // No cookies.keys: cookies are unsigned, so the stand-in cookies below work.

  renderError(ctx, out) {
    ctx.type = 'application/json; charset=utf-8';
    ctx.body = JSON.stringify(out);
  },
});

// CIS2 always puts `sid` in the ID token; oidc-provider does so only for
// clients registered for back-channel logout with session required.
provider.Client.prototype.includeSid = () => true;

provider.on('server_error', (_ctx, err) => {
  process.stderr.write(`provider.mjs server_error: ${err.stack || err}\n`);
});
if (args.verbose) {
  for (const ev of ['grant.error', 'authorization.error', 'userinfo.error', 'end_session.error']) {
    provider.on(ev, (_ctx, err) => {
      process.stderr.write(`provider.mjs ${ev}: ${err.message} ${err.error_description || ''} ${err.error_detail || ''}\n`);
    });
  }
}

const providerCallback = provider.callback();
const INTERACTION_RE = new RegExp(`^${REALM_PATH}/interaction/([A-Za-z0-9_-]+)$`);
const RESUME_RE = new RegExp(`^${REALM_PATH}/authorize/([A-Za-z0-9_-]+)$`);

// Cookieless clients (a plain HTTP client standing in for the browser) get
// the interaction/resume cookies filled in from the uid in the URL: both
// cookies hold nothing but that uid. Clients that do keep cookies are left
// alone, and only they keep an SSO session between requests.
function addInteractionCookie(req, name, uid) {
  const cookie = req.headers.cookie ?? '';
  if (cookie.split(';').some((c) => c.trim().startsWith(`${name}=`))) return;
  req.headers.cookie = [cookie, `${name}=${uid}`].filter(Boolean).join('; ');
}

async function handle(req, res) {
  const path = req.url.split('?')[0];
  if (args.verbose) process.stderr.write(`provider.mjs ${req.method} ${req.url}\n`);

  const im = INTERACTION_RE.exec(path);
  if (im) {
    addInteractionCookie(req, provider.cookieName('interaction'), im[1]);
    if (req.method !== 'GET') {
      res.statusCode = 405;
      res.end();
      return;
    }
    await interact(req, res);
    return;
  }
  const rm = RESUME_RE.exec(path);
  if (rm) addInteractionCookie(req, provider.cookieName('resume'), rm[1]);

  if (path === prefix || path.startsWith(`${prefix}/`)) {
    req.originalUrl = req.url;
    req.url = req.url.slice(prefix.length) || '/';
    providerCallback(req, res);
    return;
  }
  res.statusCode = 404;
  res.setHeader('Content-Type', 'text/plain');
  res.end('not found\n');
}

// The "sign-in page": no page at all. Signs in the test account with a
// smartcard and consents to everything asked, then redirects back to
// oidc-provider, which redirects to the client with ?code&state.
async function interact(req, res) {
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    res.statusCode = 400;
    res.setHeader('Content-Type', 'text/plain');
    res.end(`interaction: ${err.message}\n`);
    return;
  }
  const { prompt, params, session } = details;
  if (args.verbose) {
    process.stderr.write(`provider.mjs interaction ${prompt.name} reasons=${prompt.reasons.join(',')} session=${session?.accountId ?? '-'}\n`);
  }
  const result = {};

  let accountId = session?.accountId;
  if (prompt.name === 'login' || !accountId) {
    // prompt=login, max_age exceeded, no session: (re-)authenticate now.
    const acr = (typeof params.acr_values === 'string' && params.acr_values.trim())
      ? params.acr_values.trim().split(/\s+/)[0]
      : DEFAULT_ACR;
    accountId = account.sub;
    result.login = { accountId, acr, amr: AMR, remember: true };
  }

  // Consent to all requested scopes and claims.
  let grant;
  if (details.grantId) grant = await provider.Grant.find(details.grantId);
  if (!grant || grant.accountId !== accountId) {
    grant = new provider.Grant({ accountId, clientId: params.client_id });
  }
  if (typeof params.scope === 'string') grant.addOIDCScope(params.scope);
  const claimNames = new Set(prompt.details?.missingOIDCClaims ?? []);
  if (typeof params.claims === 'string') {
    try {
      const c = JSON.parse(params.claims);
      for (const k of Object.keys(c.id_token ?? {})) claimNames.add(k);
      for (const k of Object.keys(c.userinfo ?? {})) claimNames.add(k);
    } catch { /* oidc-provider already validated it */ }
  }
  if (claimNames.size) grant.addOIDCClaims([...claimNames]);
  result.consent = { grantId: await grant.save() };

  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
}

// Validate the client file now rather than on the first request.
try {
  if (!await provider.Client.find(client.client_id)) throw new Error('not loaded');
} catch (err) {
  die(`client file ${args.client} rejected: ${err.message} ${err.error_description ?? ''}`);
}

process.stdout.write(`${issuer}\n`);

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
