//! The ebpf-proxy agent as a library: the binary (`main.rs`) is a thin CLI over it,
//! and the tests and the demo drive the same code.
//!
//! Data flows one way: *sources* (`source::manifests`, `source::kubernetes`) yield
//! Kubernetes objects, the `tracker` re-translates (`translate`) only the services
//! that changed into frontends of the desired `model`, `sync` writes those differences
//! to the kernel `datapath` maps (through `datapath::codec`), and `listing`, `trace`,
//! `conntrack`, `status` and `metrics` read the maps back for operators.

pub mod adoption;
pub mod agent;
pub mod capabilities;
pub mod conntrack;
pub mod datapath;
pub mod health;
pub mod healthcheck;
pub mod kube_proxy_config;
pub mod limits;
pub mod listing;
pub mod metrics;
pub mod model;
pub mod node;
pub mod node_ports;
pub mod output;
pub mod scheduling;
pub mod server;
pub mod source;
pub mod status;
pub mod sync;
pub mod trace;
pub mod tracker;
pub mod translate;
