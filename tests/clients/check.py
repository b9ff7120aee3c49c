"""Drives flaghost with the OpenFeature Python SDK and its OFREP provider.

Usage: python3 check.py <flaghost base URL> [<base URL of a stale copy>]
The second flaghost, if given, serves the examples past their TTL with the
flag file broken, so its answers carry reason STALE.
With FLAGHOST_KEYED_BASE, FLAGHOST_PROD_KEY and FLAGHOST_STAGING_KEY set,
it also checks a flaghost that requires API keys (--api-keys-file): each
key sent through the provider's headers_factory, both ways OFREP defines.
Prints one line per check and exits 1 if any failed. The flags are the
bundled examples (examples/flags); tests/real_clients.rs starts flaghost.
"""

import os
import sys

from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import ErrorCode

base = sys.argv[1]
failures = []


def check(name, got, want):
    ok = got == want
    print(f"{'ok  ' if ok else 'FAIL'} python {name}: got {got!r}, want {want!r}")
    if not ok:
        failures.append(name)


api.set_provider(OFREPProvider(base_url=base), domain="production")
api.set_provider(OFREPProvider(base_url=f"{base}/environments/staging"), domain="staging")
prod = api.get_client("production")
staging = api.get_client("staging")

dutch_beta = EvaluationContext("user-1", {"country": "NL", "account": {"tier": "beta"}})
nobody = EvaluationContext()

d = prod.get_boolean_details("beta-search", False, dutch_beta)
check("boolean by nested attribute", (d.value, d.variant, d.reason), (True, "on", "TARGETING_MATCH"))
d = prod.get_string_details("eu-pricing-banner", "fallback", dutch_beta)
check("string by attribute", (d.value, d.variant, d.reason), ("Prices include VAT", "eu", "TARGETING_MATCH"))
d = prod.get_string_details("eu-pricing-banner", "fallback", EvaluationContext("u", {"country": "US"}))
check("string default variant", (d.value, d.variant, d.reason), ("", "none", "DEFAULT"))
d = prod.get_integer_details("items-per-page", 1, nobody)
check("integer", (d.value, d.variant, d.reason), (10, "small", "STATIC"))
d = prod.get_float_details("discount-rate", 0.5, nobody)
check("float", (d.value, d.variant, d.reason), (0.15, "sale", "STATIC"))
d = prod.get_object_details("theme", {}, nobody)
check("object", (d.value, d.variant), ({"background": "#ffffff", "accent": "#0057b8"}, "light"))
check("metadata", (d.flag_metadata.get("flagSetId"), d.flag_metadata.get("team")), ("shop", "platform"))

d = prod.get_boolean_details("no-such-flag", True, nobody)
check("missing flag", (d.value, d.error_code), (True, ErrorCode.FLAG_NOT_FOUND))
d = prod.get_boolean_details("legacy-reports", False, nobody)
check("disabled flag", (d.value, d.reason), (False, "DISABLED"))
d = prod.get_boolean_details("items-per-page", False, nobody)
check("type mismatch", (d.value, d.error_code), (False, ErrorCode.TYPE_MISMATCH))

for user, want in (("user-1", False), ("user-2", True)):
    d = prod.get_boolean_details("new-checkout", not want, EvaluationContext(user))
    check(f"targeting key {user}", (d.value, d.reason), (want, "TARGETING_MATCH"))

d = staging.get_boolean_details("new-checkout", False, nobody)
check("environment by base URL", (d.value, d.variant, d.reason), (True, "on", "STATIC"))
d = staging.get_string_details("eu-pricing-banner", "fallback", EvaluationContext("u", {"country": "PL"}))
check("environment by base URL, targeted", d.value, "Prices include VAT")

if len(sys.argv) > 2:
    api.set_provider(OFREPProvider(base_url=sys.argv[2]), domain="stale")
    stale = api.get_client("stale")
    d = stale.get_integer_details("items-per-page", 1, nobody)
    check("stale static", (d.value, d.variant, d.reason, d.error_code), (10, "small", "STALE", None))
    d = stale.get_boolean_details("beta-search", False, dutch_beta)
    check("stale targeted", (d.value, d.variant, d.reason, d.error_code), (True, "on", "STALE", None))

keyed = os.environ.get("FLAGHOST_KEYED_BASE")
if keyed:
    prod_key = os.environ["FLAGHOST_PROD_KEY"]
    staging_key = os.environ["FLAGHOST_STAGING_KEY"]
    for domain, url, headers in (
        ("keyed-api-key", keyed, {"X-API-Key": prod_key}),
        ("keyed-bearer", keyed, {"Authorization": f"Bearer {prod_key}"}),
        ("keyed-staging", f"{keyed}/environments/staging", {"Authorization": f"Bearer {staging_key}"}),
        ("keyed-wrong-env", f"{keyed}/environments/staging", {"X-API-Key": prod_key}),
        ("keyed-none", keyed, None),
    ):
        api.set_provider(
            OFREPProvider(base_url=url, headers_factory=(lambda h=headers: h) if headers else None),
            domain=domain,
        )
    for domain in ("keyed-api-key", "keyed-bearer"):
        d = api.get_client(domain).get_integer_details("items-per-page", 1, nobody)
        check(f"{domain}: the key admits", (d.value, d.variant, d.reason, d.error_code), (10, "small", "STATIC", None))
    d = api.get_client("keyed-staging").get_boolean_details("new-checkout", False, nobody)
    check("keyed: staging's key admits staging", (d.value, d.reason), (True, "STATIC"))
    d = api.get_client("keyed-wrong-env").get_integer_details("items-per-page", 1, nobody)
    check("keyed: another environment's key (403)", (d.value, d.reason, d.error_code, d.error_message),
          (1, "ERROR", ErrorCode.GENERAL, "forbidden"))
    d = api.get_client("keyed-none").get_integer_details("items-per-page", 1, nobody)
    check("keyed: no key (401)", (d.value, d.reason, d.error_code, d.error_message),
          (1, "ERROR", ErrorCode.GENERAL, "unauthorized"))

print(f"python: {len(failures)} failed")
sys.exit(1 if failures else 0)
