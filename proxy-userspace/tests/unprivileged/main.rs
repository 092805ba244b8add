//! Tests that need no privileges: the deploy manifests checked against the agent, the
//! translation rules one by one, and property tests of the rules and the tracker.

mod deploy;
mod translation_props;
mod translation_rules;
