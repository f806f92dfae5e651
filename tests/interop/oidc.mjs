#!/usr/bin/env node
// A real OpenID provider (panva/oidc-provider) for tower-fhir's interop tests.
//
// It issues OAuth 2.0 client-credentials JWT access tokens (ES256, typ at+jwt)
// for one resource server (the gateway), through the resource indicators
// feature, with a default resource so that clients need not send `resource`.
//
//   node oidc.mjs --port P --keys FILE [--rotate] --client ID:SECRET \
//                 --audience AUD --scopes "s1 s2 ..."
//
// Prints `READY <issuer>` on stdout once listening; exits on SIGTERM/SIGINT.
import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const ALG = 'ES256';

function usage(message) {
  process.stderr.write(
    `${message}\nusage: node oidc.mjs --port P --keys FILE [--rotate] --client ID:SECRET `
      + '--audience AUD --scopes "s1 s2 ..."\n',
  );
  process.exit(2);
}

let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      port: { type: 'string' },
      keys: { type: 'string' },
      rotate: { type: 'boolean', default: false },
      client: { type: 'string' },
      audience: { type: 'string' },
      scopes: { type: 'string' },
    },
    strict: true,
  }));
} catch (err) {
  usage(err.message);
}
for (const name of ['port', 'keys', 'client', 'audience', 'scopes']) {
  if (opts[name] === undefined) usage(`missing --${name}`);
}
const port = Number(opts.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`bad --port ${opts.port}`);
const sep = opts.client.indexOf(':');
if (sep <= 0) usage('--client must be ID:SECRET');
const clientId = opts.client.slice(0, sep);
const clientSecret = opts.client.slice(sep + 1);
const audience = opts.audience;
const scopes = opts.scopes.split(/\s+/).filter(Boolean);
if (scopes.length === 0) usage('--scopes must list at least one scope');

// Resource indicators must be absolute URIs; an audience that is not one is
// still the token's `aud`, behind a URN indicator.
const resourceIndicator = URL.parse(audience) && !audience.includes('#')
  ? audience
  : `urn:tower-fhir:audience:${encodeURIComponent(audience)}`;

// ---------------------------------------------------------------- signing keys
function newSigningKey() {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = privateKey.export({ format: 'jwk' });
  // RFC 7638 thumbprint as the kid.
  const canonical = JSON.stringify({ crv: jwk.crv, kty: jwk.kty, x: jwk.x, y: jwk.y });
  const kid = createHash('sha256').update(canonical).digest('base64url');
  return { kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y, d: jwk.d, kid, alg: ALG, use: 'sig' };
}

function loadKeys(file, rotate) {
  let jwks = { keys: [] };
  if (existsSync(file)) {
    jwks = JSON.parse(readFileSync(file, 'utf8'));
    if (!Array.isArray(jwks.keys)) throw new Error(`${file}: not a JWKS`);
  }
  if (jwks.keys.length === 0 || rotate) {
    // The first key is the one used for signing; older ones stay published.
    jwks.keys.unshift(newSigningKey());
    const tmp = `${file}.tmp-${process.pid}`;
    writeFileSync(tmp, `${JSON.stringify(jwks, null, 2)}\n`, { mode: 0o600 });
    renameSync(tmp, file);
  }
  return jwks;
}

const jwks = loadKeys(opts.keys, opts.rotate);

// ---------------------------------------------------------------- provider
function configuration() {
  return {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      // client_secret_post is accepted for such a client as well.
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    jwks,
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => resourceIndicator,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, indicator) => {
          if (indicator !== resourceIndicator && indicator !== audience) {
            throw new errors.InvalidTarget();
          }
          return {
            audience,
            scope: scopes.join(' '),
            accessTokenFormat: 'jwt',
            accessTokenTTL: 3600,
            jwt: { sign: { alg: ALG } },
          };
        },
      },
    },
    // Tokens for the resource server are signed with ES256 (the only key type here).
    enabledJWA: { idTokenSigningAlgValues: [ALG] },
    clientDefaults: { id_token_signed_response_alg: ALG },
  };
}

const server = createServer();
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  let provider;
  try {
    provider = new Provider(issuer, configuration());
  } catch (err) {
    process.stderr.write(`oidc.mjs: ${err.stack || err}\n`);
    process.exit(1);
  }
  provider.on('server_error', (ctx, err) => process.stderr.write(`oidc server_error: ${err.stack}\n`));
  server.on('request', provider.callback());
  process.stdout.write(`READY ${issuer}\n`);
});
server.on('error', (err) => {
  process.stderr.write(`oidc.mjs: ${err.message}\n`);
  process.exit(1);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
