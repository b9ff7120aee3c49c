// Attribute allow-list, the JavaScript twin of plugins/allow-list (Rust).
//
// Serves `variant` when a context attribute is one of the configured values,
// and `otherwise` (or the flag's default) when not. Configuration:
// {"attribute": "country", "values": ["NL", "DE"], "variant": "on", "otherwise": "off"}
// Values compare by type: 1 does not match "1".
//
// The component exports the contract's `rule` interface: `checkConfig`, and
// the `targeting` resource as the class `Targeting`. A function that throws
// a string answers `err(string)`.

import { get } from "flaghost:rules/context@0.1.0";
import { attempt } from "../flaghost-rule.js";

const FIELDS = ["attribute", "values", "variant", "otherwise"];

function parse(variants, text) {
  const config = JSON.parse(text);
  if (config === null || typeof config !== "object" || Array.isArray(config)) {
    throw "invalid configuration: expected an object";
  }
  const unknown = Object.keys(config).filter((key) => !FIELDS.includes(key));
  if (unknown.length > 0) {
    throw `invalid configuration: unknown field ${JSON.stringify(unknown[0])}`;
  }
  if (typeof config.attribute !== "string" || config.attribute === "") {
    throw "attribute must not be empty";
  }
  if (!Array.isArray(config.values)) {
    throw "invalid configuration: values must be a list";
  }
  for (const value of config.values) {
    if (!["string", "number", "boolean"].includes(typeof value)) {
      throw `values may hold strings, numbers and booleans, not ${JSON.stringify(value)}`;
    }
  }
  if (config.variant === undefined) {
    throw "invalid configuration: missing field 'variant'";
  }
  for (const name of [config.variant, config.otherwise]) {
    if (name !== undefined && !variants.includes(name)) {
      throw `variant ${JSON.stringify(name)} is not one of the flag's variants ${JSON.stringify(variants)}`;
    }
  }
  return config;
}

// What each context value kind may match: text a string, integer and float
// a number, boolean a boolean.
const KINDS = { text: "string", integer: "number", float: "number", boolean: "boolean" };

class Targeting {
  constructor(config) {
    this.config = config;
  }

  static create(flagKey, variants, config) {
    return attempt(() => new Targeting(parse(variants, config)));
  }

  evaluate() {
    return attempt(() => {
      const { attribute, values, variant, otherwise } = this.config;
      const value = get(attribute);
      const kind = value && KINDS[value.tag];
      const actual = value && (value.tag === "integer" ? Number(value.val) : value.val);
      if (kind && values.some((allowed) => typeof allowed === kind && allowed === actual)) {
        return variant;
      }
      return otherwise;
    });
  }
}

export const rule = {
  checkConfig(flagKey, variants, config) {
    attempt(() => parse(variants, config));
  },
  Targeting,
};
