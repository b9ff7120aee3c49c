"""Schemathesis hooks for flaghost's OFREP run (tests/schemathesis/run.sh).

The OFREP OpenAPI file (../shared/reference/ofrep/openapi.yaml) is read-only
reference material, so what flaghost answers beyond it, or where the file
itself cannot be met by any server, is told to schemathesis here, in memory,
each change with its reason. Nothing else is loosened: every other response
is still checked against the file as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import schemathesis
from hypothesis import strategies as st

SINGLE = "/ofrep/v1/evaluate/flags/{key}"
BULK = "/ofrep/v1/evaluate/flags"

# The keys of the flag file run.sh serves (tests/schemathesis/flags/), so the
# generated requests evaluate real flags of every type, not only unknown keys.
FLAG_KEYS = sorted(
    json.loads((Path(__file__).parent / "flags" / "production.json").read_text())["flags"]
)


@schemathesis.hook
def before_load_schema(context, raw_schema):
    schemas = raw_schema["components"]["schemas"]

    # 1. Reasons DEFAULT and STALE. OpenFeature defines both
    #    (https://openfeature.dev/specification/types/#resolution-reason);
    #    OFREP's enum lists only STATIC, TARGETING_MATCH, SPLIT, DISABLED,
    #    UNKNOWN. flaghost answers DEFAULT when a rule ran and chose nothing
    #    (the default variant, or the code default), as flagd does, and STALE
    #    when it serves a flag set past its TTL because nothing could refresh
    #    it (README, "Stale answers").
    reason = schemas["evaluationSuccess"]["allOf"][0]["properties"]["reason"]
    for extra in ("DEFAULT", "STALE"):
        if extra not in reason["enum"]:
            reason["enum"].append(extra)

    # 2. The value types are listed with `oneOf`, but they overlap, so no
    #    answer can match exactly one: `codeDefaultFlag` (`properties: {}`)
    #    matches every object, and an integer value is also a `floatFlag`
    #    (type number). `{"value": true}` is "valid under more than one of
    #    the schemas listed in the 'oneOf' keyword" for any server. The file
    #    means "one of these shapes", which is `anyOf`.
    value_shapes = schemas["evaluationSuccess"]["allOf"][1]
    if "oneOf" in value_shapes:
        value_shapes["anyOf"] = value_shapes.pop("oneOf")

    # 3. Statuses flaghost answers that the file does not list (README,
    #    "OFREP beyond the spec"), each with flaghost's OFREP-shaped error
    #    body. 405: a known path called with another method (with `Allow:
    #    POST`); 413: a body over --body-limit (errorCode INVALID_CONTEXT);
    #    503: an environment whose flag set cannot be loaded at all (errorCode
    #    GENERAL). On the single-flag path the body carries the key, as the
    #    file's own 400 does; 405 is answered before any key is read.
    schemas["flaghostError"] = {
        "type": "object",
        "required": ["errorCode"],
        "properties": {
            "key": {"type": "string"},
            "errorCode": {"type": "string", "enum": ["INVALID_CONTEXT", "GENERAL"]},
            "errorDetails": {"type": "string"},
        },
    }
    for path, keyed in ((SINGLE, "#/components/schemas/evaluationFailure"),
                        (BULK, "#/components/schemas/bulkEvaluationFailure")):
        responses = raw_schema["paths"][path]["post"]["responses"]
        for status, ref, description in (
            ("405", "#/components/schemas/flaghostError", "Another method than POST (flaghost)."),
            ("413", keyed, "Request body over --body-limit (flaghost)."),
            ("503", keyed, "The environment's flag set cannot be loaded (flaghost)."),
        ):
            responses.setdefault(status, {
                "description": description,
                "content": {"application/json": {"schema": {"$ref": ref}}},
            })

    # 4. A request without a body, with an absent or null `context`, or
    #    with a context without `targetingKey` (or a null one) is evaluated
    #    with that (empty) context and answered 200, not refused: targeting
    #    keys are optional in OpenFeature, the SDKs send contexts without one
    #    whenever the application sets none, and flagd evaluates them too; a
    #    rule that needs one answers its default. A `targetingKey` that is not
    #    a string, a `context` that is not an object and a body that is not
    #    a JSON object are still refused (400 INVALID_CONTEXT), and negative
    #    testing checks that.
    for path in (SINGLE, BULK):
        raw_schema["paths"][path]["post"]["requestBody"]["required"] = False
    for name in ("evaluationRequest", "bulkEvaluationRequest"):
        schemas[name].pop("required", None)
    schemas["context"]["type"] = ["object", "null"]
    schemas["context"].pop("required", None)
    schemas["context"]["properties"]["targetingKey"] = {"type": ["string", "null"]}

    # 5. flagConfigEtag and flagConfigLastModified are hints a provider sends
    #    after an event-stream notification (ADR-0008). flaghost announces no
    #    `eventStreams`, so it never asks for them, and it ignores them
    #    whatever they hold (it answers 200, or 304 on a matching
    #    If-None-Match) instead of refusing a request for a malformed hint.
    for parameter in ("flagConfigEtag", "flagConfigLastModified"):
        raw_schema["components"]["parameters"][parameter]["schema"] = {"type": "string"}


@schemathesis.hook("flatmap_path_parameters").apply_to(path=SINGLE)
def known_flag_keys(context, path_parameters):
    """Half the single-flag cases evaluate one of the served flags."""
    return st.one_of(
        st.just(path_parameters),
        st.sampled_from(FLAG_KEYS).map(lambda key: {**path_parameters, "key": key}),
    )


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """A schema-valid request for a flag whose rule cannot be evaluated
    (`broken-rule`: a `$ref` to a missing evaluator, which loads and answers
    PARSE_ERROR, as in flagd) is answered 400 with errorCode PARSE_ERROR: the
    file documents exactly that under 400 (evaluationFailure, whose errorCode
    enum has PARSE_ERROR and GENERAL). Only that answer is excused from
    positive_data_acceptance (ST202); a 400 INVALID_CONTEXT for valid data,
    or any other status, still fails."""
    if failure.code != "ST202" or response.status_code != 400:
        return True
    try:
        body = response.json()
    except ValueError:
        return True
    if not isinstance(body, dict):
        return True
    return body.get("errorCode") != "PARSE_ERROR" or body.get("key") != "broken-rule"
