//! [`misbehaving_rule!`]: a targeting rule that accepts any configuration and
//! runs the given body as its `evaluate`, so each test fixture is only its
//! misbehaviour. The fixture crate depends on `wit-bindgen` itself (the macro
//! expands `wit_bindgen::generate!` there) and lives in `plugins/fixtures/<name>/`
//! (the WIT path is relative to it).

/// Defines and exports a rule whose `evaluate` is `$evaluate`, a block
/// answering `Result<Option<String>, String>`, against the repository's
/// `wit/` or, with `wit = "path"`, another copy of the contract.
#[macro_export]
macro_rules! misbehaving_rule {
    ($evaluate:block) => {
        $crate::misbehaving_rule!(wit = "../../../wit", $evaluate);
    };
    // A fixture built against its own copy of the contract (another version).
    (wit = $wit:literal, $evaluate:block) => {
        wit_bindgen::generate!({ path: $wit, world: "targeting-rule" });

        use exports::flaghost::rules::rule::{Guest, GuestTargeting, Targeting};

        struct Component;

        impl Guest for Component {
            type Targeting = Rule;

            fn check_config(
                _flag_key: String,
                _variants: Vec<String>,
                _config: String,
            ) -> Result<(), String> {
                Ok(())
            }
        }

        struct Rule;

        impl GuestTargeting for Rule {
            fn create(
                _flag_key: String,
                _variants: Vec<String>,
                _config: String,
            ) -> Result<Targeting, String> {
                Ok(Targeting::new(Rule))
            }

            fn evaluate(&self) -> Result<Option<String>, String> $evaluate
        }

        export!(Component);
    };
}
