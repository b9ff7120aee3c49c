//! Shared set-up for the benches.
