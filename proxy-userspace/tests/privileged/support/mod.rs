//! Helpers the privileged tests share.

pub mod cluster;
pub mod datapath;
pub mod families;
pub mod in_guest;
pub mod kubernetes;
pub mod packets;
pub mod services;
pub mod traffic;
