//! Tests that need no privileges: the deploy manifests checked against the agent, and
//! property tests of the translation rules and the change tracker.

mod deploy;
mod translation_props;
