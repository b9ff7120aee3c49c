//! A flaghost targeting rule in Rust, written as the rule itself.
//!
//! Implement [`Rule`] (parse a flag's configuration; evaluate it against the
//! caller's context, read through [`context`]) and export it with
//! [`export_rule!`]; build the crate as a `cdylib` for `wasm32-wasip2`:
//!
//! ```ignore
//! use flaghost_rule::{Rule, context};
//!
//! struct OnlyNl;
//!
//! impl Rule for OnlyNl {
//!     fn parse(_flag_key: &str, variants: &[String], _config: &str) -> Result<Self, String> {
//!         if variants.iter().any(|v| v == "on") { Ok(OnlyNl) } else { Err("needs an \"on\" variant".into()) }
//!     }
//!
//!     fn evaluate(&self) -> Result<Option<String>, String> {
//!         let nl = matches!(context::get("country"), Some(context::Value::Text(c)) if c == "NL");
//!         Ok(nl.then(|| "on".to_owned()))
//!     }
//! }
//!
//! flaghost_rule::export_rule!(OnlyNl);
//! ```
//!
//! The contract (`wit/rules.wit`, `flaghost:rules@0.1.0`) is compiled into
//! this crate: a rule needs neither the WIT files nor `wit-bindgen`.

// NB: the bindings name this crate by its path (`runtime_path`), inside it too.
extern crate self as flaghost_rule;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The contract's bindings, generated once here; [`export_rule!`] exports
/// a [`Rule`] through them.
#[doc(hidden)]
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "targeting-rule",
        pub_export_macro: true,
        default_bindings_module: "flaghost_rule::bindings",
        runtime_path: "flaghost_rule::__wit_bindgen::rt",
    });
}

/// The caller's context, read on demand: `targeting_key()`, and `get(path)`
/// for an attribute or a dotted path into nested objects
/// (`user.address.country`). Objects and arrays come as JSON text.
pub use bindings::flaghost::rules::context;

use bindings::exports::flaghost::rules::rule;

/// One flag's targeting rule.
///
/// flaghost calls [`Rule::parse`] when a flag file that uses the rule loads
/// (so a bad configuration is refused then, with your message) and again to
/// create the rule it evaluates; [`Rule::evaluate`] for each evaluation.
pub trait Rule: Sized + 'static {
    /// The rule for flag `flag_key` with `variants`, from `config` (the
    /// JSON text of its configuration in the flag file), or why not.
    fn parse(flag_key: &str, variants: &[String], config: &str) -> Result<Self, String>;

    /// The variant that applies to the current context, `None` for the
    /// flag's default, or an error (for the flag's operators: callers get
    /// only the plugin's name and an error id).
    fn evaluate(&self) -> Result<Option<String>, String>;
}

/// A [`Rule`] as the contract's component.
#[doc(hidden)]
pub struct Component<R>(std::marker::PhantomData<R>);

impl<R: Rule> rule::Guest for Component<R> {
    type Targeting = Targeting<R>;

    fn check_config(flag_key: String, variants: Vec<String>, config: String) -> Result<(), String> {
        R::parse(&flag_key, &variants, &config).map(drop)
    }
}

/// A [`Rule`] as the contract's `targeting` resource.
#[doc(hidden)]
pub struct Targeting<R>(R);

impl<R: Rule> rule::GuestTargeting for Targeting<R> {
    fn create(
        flag_key: String,
        variants: Vec<String>,
        config: String,
    ) -> Result<rule::Targeting, String> {
        R::parse(&flag_key, &variants, &config).map(|r| rule::Targeting::new(Targeting(r)))
    }

    fn evaluate(&self) -> Result<Option<String>, String> {
        self.0.evaluate()
    }
}

/// Exports `$rule`, a [`Rule`], as this component's targeting rule. Once
/// per crate.
#[macro_export]
macro_rules! export_rule {
    ($rule:ty) => {
        type __FlaghostRule = $crate::Component<$rule>;
        $crate::bindings::export!(__FlaghostRule with_types_in $crate::bindings);
    };
}
