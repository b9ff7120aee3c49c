// Drives flaghost with the OpenFeature JavaScript server SDK and its OFREP
// provider. Usage: node check.mjs <flaghost base URL> [<base URL of a stale copy>]
// The second flaghost, if given, serves the examples past their TTL with the
// flag file broken, so its answers carry reason STALE.
// With FLAGHOST_KEYED_BASE, FLAGHOST_PROD_KEY and FLAGHOST_STAGING_KEY set, it
// also checks a flaghost that requires API keys (--api-keys-file), each key
// sent through the provider's `headers` or `headersFactory`.
// Prints one line per check and exits 1 if any failed.
import { OpenFeature, ErrorCode } from '@openfeature/server-sdk';
import { OFREPProvider } from '@openfeature/ofrep-provider';
import { isDeepStrictEqual } from 'node:util';

const base = process.argv[2];
const failures = [];

function check(name, got, want) {
  const ok = isDeepStrictEqual(got, want);
  console.log(`${ok ? 'ok  ' : 'FAIL'} js ${name}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  if (!ok) failures.push(name);
}

await OpenFeature.setProviderAndWait('production', new OFREPProvider({ baseUrl: base }));
await OpenFeature.setProviderAndWait('staging', new OFREPProvider({ baseUrl: `${base}/environments/staging` }));
const prod = OpenFeature.getClient('production');
const staging = OpenFeature.getClient('staging');

const dutchBeta = { targetingKey: 'user-1', country: 'NL', account: { tier: 'beta' } };
const nobody = {};
let d;

d = await prod.getBooleanDetails('beta-search', false, dutchBeta);
check('boolean by nested attribute', [d.value, d.variant, d.reason], [true, 'on', 'TARGETING_MATCH']);
d = await prod.getStringDetails('eu-pricing-banner', 'fallback', dutchBeta);
check('string by attribute', [d.value, d.variant, d.reason], ['Prices include VAT', 'eu', 'TARGETING_MATCH']);
d = await prod.getStringDetails('eu-pricing-banner', 'fallback', { targetingKey: 'u', country: 'US' });
check('string default variant', [d.value, d.variant, d.reason], ['', 'none', 'DEFAULT']);
d = await prod.getNumberDetails('items-per-page', 1, nobody);
check('integer', [d.value, d.variant, d.reason], [10, 'small', 'STATIC']);
d = await prod.getNumberDetails('discount-rate', 0.5, nobody);
check('float', [d.value, d.variant, d.reason], [0.15, 'sale', 'STATIC']);
d = await prod.getObjectDetails('theme', {}, nobody);
check('object', [d.value, d.variant], [{ background: '#ffffff', accent: '#0057b8' }, 'light']);
check('metadata', [d.flagMetadata.flagSetId, d.flagMetadata.team], ['shop', 'platform']);

d = await prod.getBooleanDetails('no-such-flag', true, nobody);
check('missing flag', [d.value, d.errorCode], [true, ErrorCode.FLAG_NOT_FOUND]);
// A disabled flag answers no value (the caller's default applies). This
// provider (0.1.3) only accepts successes that carry a value, so it reports an
// error instead of DISABLED; the caller still gets its default.
d = await prod.getBooleanDetails('legacy-reports', false, nobody);
check('disabled flag', d.value, false);
d = await prod.getBooleanDetails('items-per-page', false, nobody);
check('type mismatch', [d.value, d.errorCode], [false, ErrorCode.TYPE_MISMATCH]);

for (const [user, want] of [['user-1', false], ['user-2', true]]) {
  d = await prod.getBooleanDetails('new-checkout', !want, { targetingKey: user });
  check(`targeting key ${user}`, [d.value, d.reason], [want, 'TARGETING_MATCH']);
}

d = await staging.getBooleanDetails('new-checkout', false, nobody);
check('environment by base URL', [d.value, d.variant, d.reason], [true, 'on', 'STATIC']);
d = await staging.getStringDetails('eu-pricing-banner', 'fallback', { targetingKey: 'u', country: 'PL' });
check('environment by base URL, targeted', d.value, 'Prices include VAT');

if (process.argv[3]) {
  await OpenFeature.setProviderAndWait('stale', new OFREPProvider({ baseUrl: process.argv[3] }));
  const stale = OpenFeature.getClient('stale');
  d = await stale.getNumberDetails('items-per-page', 1, nobody);
  check('stale static', [d.value, d.variant, d.reason, d.errorCode], [10, 'small', 'STALE', undefined]);
  d = await stale.getBooleanDetails('beta-search', false, dutchBeta);
  check('stale targeted', [d.value, d.variant, d.reason, d.errorCode], [true, 'on', 'STALE', undefined]);
}

const keyed = process.env.FLAGHOST_KEYED_BASE;
if (keyed) {
  const prodKey = process.env.FLAGHOST_PROD_KEY;
  const stagingKey = process.env.FLAGHOST_STAGING_KEY;
  const providers = {
    'keyed-api-key': { baseUrl: keyed, headers: { 'X-API-Key': prodKey } },
    'keyed-bearer': { baseUrl: keyed, headersFactory: async () => [['Authorization', `Bearer ${prodKey}`]] },
    'keyed-staging': { baseUrl: `${keyed}/environments/staging`, headers: [['Authorization', `Bearer ${stagingKey}`]] },
    'keyed-wrong-env': { baseUrl: `${keyed}/environments/staging`, headers: { 'X-API-Key': prodKey } },
    'keyed-none': { baseUrl: keyed },
  };
  for (const [domain, options] of Object.entries(providers)) {
    await OpenFeature.setProviderAndWait(domain, new OFREPProvider(options));
  }
  for (const domain of ['keyed-api-key', 'keyed-bearer']) {
    d = await OpenFeature.getClient(domain).getNumberDetails('items-per-page', 1, nobody);
    check(`${domain}: the key admits`, [d.value, d.variant, d.reason, d.errorCode], [10, 'small', 'STATIC', undefined]);
  }
  d = await OpenFeature.getClient('keyed-staging').getBooleanDetails('new-checkout', false, nobody);
  check("keyed: staging's key admits staging", [d.value, d.reason], [true, 'STATIC']);
  // This provider reports 401 and 403 alike: the caller's default, GENERAL.
  for (const domain of ['keyed-wrong-env', 'keyed-none']) {
    d = await OpenFeature.getClient(domain).getNumberDetails('items-per-page', 1, nobody);
    check(`${domain}: refused`, [d.value, d.reason, d.errorCode], [1, 'ERROR', ErrorCode.GENERAL]);
  }
}

console.log(`js: ${failures.length} failed`);
await OpenFeature.close();
process.exit(failures.length ? 1 : 0);
