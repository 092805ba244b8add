//! Shared helpers of the integration tests. Each test binary uses a subset.
#![allow(dead_code)]

pub mod cluster;
pub mod datapath;
pub mod packets;
