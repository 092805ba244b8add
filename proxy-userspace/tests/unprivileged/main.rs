//! Tests that need no privileges: the deploy manifests checked against the agent, the
//! translation rules one by one, property tests of the rules and the tracker, and
//! the TCP state machine conntrack follows.

mod conntrack_entries;
mod deploy;
mod kube_proxy_config;
mod tcp_states;
mod translation_props;
mod translation_rules;
mod transports;
