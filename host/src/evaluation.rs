//! Evaluation: which variant a flag serves for a context, and why.
//!
//! Pure, synchronous code over an immutable [`FlagSet`]: no I/O, no locks, no
//! HTTP. A targeting rule is reached through [`TargetingRule`], so the
//! semantics here are tested without wasm; the plugin runtime implements it.

pub use crate::rules::{ContextError, EvaluationContext, RuleError, TargetingRule};

use std::sync::Arc;

use crate::flags::{Flag, FlagSet, FlagState, Metadata, Targeting, Value, ValueType, Variant};

/// Why a flag resolved as it did (OpenFeature's resolution reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No rule: the default variant.
    Static,
    /// A rule picked the variant.
    TargetingMatch,
    /// A rule ran and answered nothing: the default variant (or the code default).
    Default,
    /// The flag is disabled: the caller's code default.
    Disabled,
    /// The evaluation failed; see the error code.
    Error,
    /// The value comes from a flag set served past its TTL because nothing
    /// could refresh it (set by the HTTP edge, never by [`evaluate`]).
    Stale,
}

impl Reason {
    /// The OpenFeature name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Default => "DEFAULT",
            Reason::Disabled => "DISABLED",
            Reason::Error => "ERROR",
            Reason::Stale => "STALE",
        }
    }
}

/// Why an evaluation failed (OpenFeature's error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No flag with that key in the environment.
    FlagNotFound,
    /// The flag's rule could not be parsed.
    ParseError,
    /// The flag's type is not the one the caller asked for.
    TypeMismatch,
    /// Anything else: a rule that failed, or answered a variant the flag lacks.
    General,
}

impl ErrorCode {
    /// The OpenFeature name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::General => "GENERAL",
        }
    }
}

/// An evaluation that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationError {
    /// The OpenFeature error code.
    pub code: ErrorCode,
    /// What went wrong, for the caller's logs.
    pub details: String,
    /// The flag's metadata, when the flag exists.
    pub metadata: Option<Arc<Metadata>>,
}

/// A successful evaluation, borrowing from the flag set it was evaluated
/// over: the hot path allocates nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution<'a> {
    /// The value served; `None` means the caller's code default applies
    /// (disabled flag, or no default variant).
    pub value: Option<&'a Value>,
    /// The variant served, when there is one.
    pub variant: Option<&'a str>,
    /// Why.
    pub reason: Reason,
    /// The flag's metadata laid over the flag set's.
    pub metadata: &'a Metadata,
    /// The variant served, whole (`value` with its JSON), when there is one.
    pub served: Option<&'a Variant>,
}

impl Resolution<'_> {
    /// The reason as answered: STALE for a value from a flag set served
    /// past its TTL because nothing could refresh it (DISABLED and errors
    /// keep theirs: they carry no value to doubt).
    pub fn reason_sent(&self, stale: bool) -> Reason {
        if stale && self.value.is_some() {
            Reason::Stale
        } else {
            self.reason
        }
    }
}

/// A [`Resolution`] without borrows, to carry back from the thread that
/// evaluated it (the plugin pool): the variant by its ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The [`Variant::ordinal`] of the variant served, when there is one.
    pub variant: Option<usize>,
    /// Why.
    pub reason: Reason,
}

impl Resolution<'_> {
    /// This resolution without borrows.
    pub fn verdict(&self) -> Verdict {
        Verdict {
            variant: self.served.map(|variant| variant.ordinal),
            reason: self.reason,
        }
    }
}

impl Verdict {
    /// The resolution this verdict on `flag` stands for.
    pub fn resolve<'a>(&self, flag: &'a Flag) -> Resolution<'a> {
        // NB: the ordinal came from evaluating this very flag (the same
        // `Arc`'d flag set), so it is one of its variants (or none).
        served(
            flag,
            self.variant.and_then(|at| flag.variants.at(at)),
            self.reason,
        )
    }
}

/// Evaluates flag `key` of `set` for `context`.
///
/// `expected` is the type the caller asked for, if it said (OFREP does not; an
/// SDK checks the type itself): a flag of another type is TYPE_MISMATCH.
pub fn evaluate<'a>(
    set: &'a FlagSet,
    key: &str,
    context: &EvaluationContext,
    expected: Option<ValueType>,
) -> Result<Resolution<'a>, EvaluationError> {
    let Some(flag) = set.flags.get(key) else {
        return Err(EvaluationError {
            code: ErrorCode::FlagNotFound,
            details: format!(
                "flag {key:?} was not found in environment {:?}",
                set.environment
            ),
            metadata: None,
        });
    };
    evaluate_flag(flag, context, expected)
}

/// Evaluates `flag` for `context`: [`evaluate`] once the flag is found (a
/// bulk evaluation walks the set's flags and looks none up).
pub fn evaluate_flag<'a>(
    flag: &'a Flag,
    context: &EvaluationContext,
    expected: Option<ValueType>,
) -> Result<Resolution<'a>, EvaluationError> {
    let key = flag.key.as_str();
    let fail = |code, details| EvaluationError {
        code,
        details,
        metadata: Some(flag.metadata.clone()),
    };
    if let (Some(expected), Some(actual)) = (expected, flag.value_type())
        && expected != actual
    {
        return Err(fail(
            ErrorCode::TypeMismatch,
            format!("flag {key:?} is a {actual} flag, not a {expected} flag"),
        ));
    }
    if flag.state == FlagState::Disabled {
        return Ok(resolved(flag, None, Reason::Disabled));
    }
    match &flag.targeting {
        Targeting::None => {
            let reason = match flag.default_variant {
                Some(_) => Reason::Static,
                None => Reason::Default,
            };
            Ok(resolved(flag, flag.default_variant.as_deref(), reason))
        }
        Targeting::Unparsable(why) => Err(fail(
            ErrorCode::ParseError,
            format!("flag {key:?} has a rule that could not be parsed: {why}"),
        )),
        Targeting::Rule(rule) => match rule.evaluate(context) {
            Ok(None) => Ok(resolved(
                flag,
                flag.default_variant.as_deref(),
                Reason::Default,
            )),
            Ok(Some(variant)) => match flag.variants.get_key_value(variant) {
                Some(served) => Ok(self::served(flag, Some(served), Reason::TargetingMatch)),
                // NB: rules report names the flag lacks themselves (they
                // know its variants); this is for one that did not. A rule
                // that runs plugins may have made the name from a plugin's
                // answer (which may carry another caller's data): it is not
                // echoed. A JsonLogic rule's own is the flag file's text.
                None if rule.lane().is_some() => Err(fail(
                    ErrorCode::General,
                    format!(
                        "{} answered a variant flag {key:?} does not have",
                        rule.describe()
                    ),
                )),
                None => Err(fail(
                    ErrorCode::General,
                    format!(
                        "{} answered variant {variant:?}, which flag {key:?} does not have",
                        rule.describe()
                    ),
                )),
            },
            Err(e) => Err(fail(ErrorCode::General, e.0)),
        },
    }
}

/// A resolution serving the flag's variant named `variant` (or the code
/// default when `None`).
fn resolved<'a>(flag: &'a Flag, variant: Option<&str>, reason: Reason) -> Resolution<'a> {
    // NB: `variant` is the flag's default variant, which parsing checked is
    // one of its variants.
    served(
        flag,
        variant.and_then(|v| flag.variants.get_key_value(v)),
        reason,
    )
}

/// A resolution serving `variant` of `flag`, with its name (or the code
/// default when `None`).
fn served<'a>(
    flag: &'a Flag,
    variant: Option<(&'a str, &'a Variant)>,
    reason: Reason,
) -> Resolution<'a> {
    Resolution {
        value: variant.map(|(_, v)| &v.value),
        variant: variant.map(|(name, _)| name),
        reason,
        metadata: &flag.metadata,
        served: variant.map(|(_, v)| v),
    }
}

#[cfg(test)]
mod tests;
