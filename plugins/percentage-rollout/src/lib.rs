//! Percentage rollout: serves `variant` to `percentage`% of users and
//! `otherwise` (or the flag's default) to the rest.
//!
//! A user's bucket is `murmur3_x86_32(salt + targetingKey) % 10_000`, so a
//! user keeps their answer across calls and instances, and raising the
//! percentage only adds users. `salt` defaults to the flag key, so two flags at
//! 10% reach different users unless they share a salt on purpose.
//!
//! Configuration: `{"percentage": 25.5, "variant": "on", "otherwise": "off", "salt": "..."}`
//! (`otherwise` and `salt` optional). Without a targeting key the rule answers
//! the flag's default: there is nothing stable to bucket by.

use flaghost_rule::{Rule, context};
use serde::Deserialize;

/// Buckets per 100%: rollouts are precise to a hundredth of a percent.
const BUCKETS: u32 = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    percentage: f64,
    variant: String,
    otherwise: Option<String>,
    salt: Option<String>,
}

struct Rollout {
    salt: String,
    /// Users whose bucket is below this get `variant`.
    threshold: u32,
    variant: String,
    otherwise: Option<String>,
}

fn parse(flag_key: &str, variants: &[String], config: &str) -> Result<Rollout, String> {
    let config: Config =
        serde_json::from_str(config).map_err(|e| format!("invalid configuration: {e}"))?;
    if !(0.0..=100.0).contains(&config.percentage) {
        return Err(format!(
            "percentage must be between 0 and 100, got {}",
            config.percentage
        ));
    }
    for name in std::iter::once(&config.variant).chain(config.otherwise.as_ref()) {
        if !variants.contains(name) {
            return Err(format!(
                "variant {name:?} is not one of the flag's variants {variants:?}"
            ));
        }
    }
    Ok(Rollout {
        salt: config.salt.unwrap_or_else(|| flag_key.to_owned()),
        threshold: (config.percentage * f64::from(BUCKETS) / 100.0).round() as u32,
        variant: config.variant,
        otherwise: config.otherwise,
    })
}

/// The user's bucket in `0..BUCKETS`.
fn bucket(salt: &str, targeting_key: &str) -> u32 {
    let mut bytes = Vec::with_capacity(salt.len() + targeting_key.len());
    bytes.extend_from_slice(salt.as_bytes());
    bytes.extend_from_slice(targeting_key.as_bytes());
    // NB: reading from an in-memory cursor cannot fail.
    let hash = murmur3::murmur3_32(&mut std::io::Cursor::new(bytes), 0).unwrap_or(0);
    hash % BUCKETS
}

impl Rule for Rollout {
    fn parse(flag_key: &str, variants: &[String], config: &str) -> Result<Self, String> {
        parse(flag_key, variants, config)
    }

    fn evaluate(&self) -> Result<Option<String>, String> {
        let Some(key) = context::targeting_key() else {
            return Ok(None);
        };
        if bucket(&self.salt, &key) < self.threshold {
            Ok(Some(self.variant.clone()))
        } else {
            Ok(self.otherwise.clone())
        }
    }
}

flaghost_rule::export_rule!(Rollout);
