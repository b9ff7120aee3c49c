//! Generated bindings for the plugin contract, kept private to `plugins`.
//!
//! One module per contract version the host serves. A breaking version adds a
//! module beside this one (`v0_2`) and a variant to [`super::Contract`]; the
//! runtime dispatches on the version a component exports.

/// `flaghost:rules@0.1.0`.
pub(super) mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "flaghost:rules/targeting-rule@0.1.0",
    });
}
