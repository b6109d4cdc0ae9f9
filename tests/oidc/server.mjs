// A real OpenID Connect provider for imgrepo's login tests: the npm package `oidc-provider`
// with the device flow (RFC 8628), refresh-token rotation and token revocation enabled.
// It listens on 127.0.0.1 only and prints one line `OIDC_READY <issuer>` when it is ready.
//
//   node tests/oidc/server.mjs            # random free port
//   OIDC_PORT=9400 node tests/oidc/server.mjs
//
// Environment (all optional; lifetimes in seconds):
//   OIDC_PORT                 port to listen on (default 0: any free port)
//   OIDC_CLIENT_ID            the public client's id (default "imgrepo-test")
//   OIDC_TTL_ID_TOKEN         ID token lifetime (default 3600)
//   OIDC_TTL_ACCESS_TOKEN     access token lifetime (default 3600)
//   OIDC_TTL_REFRESH_TOKEN    refresh token lifetime (default 14 days)
//   OIDC_TTL_DEVICE_CODE      device code lifetime (default 600)
//
// Test hooks (not part of any standard; JSON in and out), used by tests/auth:
//   POST /_test/settings  {"ttl": {"IdToken": 5, ...}, "slowDown": 2, "interval": 1,
//                          "expiresIn": 600, "resetStats": true}
//       ttl        changes lifetimes of tokens issued from now on
//       slowDown   answers the next N device-code polls with `slow_down`
//                  (the package itself never sends slow_down)
//       interval   adds `interval` to device authorization responses (it never sends one)
//       expiresIn  overrides the `expires_in` advertised to the client (not the real lifetime),
//                  so that the provider's own `expired_token` answer can be tested
//   GET  /_test/stats      counts of token requests by grant type and outcome, poll times

import http from 'node:http';
import querystring from 'node:querystring';

import Provider from 'oidc-provider';

const num = (name, fallback) => {
  const value = process.env[name];
  return value ? Number(value) : fallback;
};

const ttl = {
  IdToken: num('OIDC_TTL_ID_TOKEN', 3600),
  AccessToken: num('OIDC_TTL_ACCESS_TOKEN', 3600),
  RefreshToken: num('OIDC_TTL_REFRESH_TOKEN', 14 * 24 * 3600),
  DeviceCode: num('OIDC_TTL_DEVICE_CODE', 600),
};
const clientId = process.env.OIDC_CLIENT_ID || 'imgrepo-test';

const hooks = { slowDown: 0, interval: null, expiresIn: null };
let stats;
const resetStats = () => {
  stats = { token: {}, devicePolls: [], deviceAuthorizations: 0, revocations: 0 };
};
resetStats();

const count = (key) => {
  stats.token[key] = (stats.token[key] || 0) + 1;
};

const readBody = (req) =>
  new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });

const configuration = {
  clients: [
    {
      client_id: clientId,
      client_name: 'imgrepo (tests)',
      token_endpoint_auth_method: 'none',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      response_types: [],
      redirect_uris: [],
    },
  ],
  features: {
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    devInteractions: { enabled: true },
  },
  scopes: ['openid', 'offline_access', 'email', 'profile'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  },
  conformIdTokenClaims: false,
  cookies: { keys: ['imgrepo-test-cookie-key'] },
  ttl: {
    IdToken: () => ttl.IdToken,
    AccessToken: () => ttl.AccessToken,
    RefreshToken: () => ttl.RefreshToken,
    DeviceCode: () => ttl.DeviceCode,
    Grant: () => 14 * 24 * 3600,
    Session: () => 14 * 24 * 3600,
    Interaction: () => 3600,
  },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: `${id}@example.test`,
          email_verified: true,
          name: `Test User ${id}`,
          preferred_username: id,
        };
      },
    };
  },
};

const server = http.createServer();
server.listen(num('OIDC_PORT', 0), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, configuration);

  provider.use(async (ctx, next) => {
    if (ctx.path === '/_test/settings' && ctx.method === 'POST') {
      const body = JSON.parse((await readBody(ctx.req)) || '{}');
      Object.assign(ttl, body.ttl || {});
      for (const key of ['slowDown', 'interval', 'expiresIn']) {
        if (key in body) hooks[key] = body[key];
      }
      if (body.resetStats) resetStats();
      ctx.body = { ttl, hooks };
      return;
    }
    if (ctx.path === '/_test/stats' && ctx.method === 'GET') {
      ctx.body = stats;
      return;
    }
    if (ctx.path === '/token' && ctx.method === 'POST') {
      // Read the form here (the provider then uses it) to count and to inject slow_down.
      const raw = await readBody(ctx.req);
      ctx.req.body = raw;
      const form = querystring.parse(raw);
      const grant = form.grant_type || 'none';
      if (grant === 'urn:ietf:params:oauth:grant-type:device_code') {
        stats.devicePolls.push(Date.now() / 1000);
        if (hooks.slowDown > 0) {
          hooks.slowDown -= 1;
          count('device_code:slow_down');
          ctx.status = 400;
          ctx.set('Cache-Control', 'no-store');
          ctx.body = { error: 'slow_down', error_description: 'you are polling too quickly' };
          return;
        }
      }
      await next();
      const outcome = ctx.status === 200 ? 'ok' : (ctx.body && ctx.body.error) || String(ctx.status);
      count(`${grant === 'urn:ietf:params:oauth:grant-type:device_code' ? 'device_code' : grant}:${outcome}`);
      return;
    }
    await next();
    if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body) {
      stats.deviceAuthorizations += 1;
      if (hooks.interval !== null) ctx.body.interval = hooks.interval;
      if (hooks.expiresIn !== null) ctx.body.expires_in = hooks.expiresIn;
    }
    if (ctx.path === '/token/revocation') stats.revocations += 1;
  });

  server.on('request', provider.callback());
  process.stdout.write(`OIDC_READY ${issuer}\n`);
});

const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
