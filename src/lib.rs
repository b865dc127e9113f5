//! amibake bakes Amazon Machine Images. Two modes share one engine: `base` provisions a vendor
//! AMI over SSH into a base AMI; `bake` puts a code tarball into a volume of that base AMI,
//! chroot-style (on an EC2 build host, or anywhere through the EBS direct APIs), and registers
//! a deployment AMI per commit.
//!
//! The binary only parses arguments and renders outcomes; everything here takes plain option
//! structs and already-built SDK clients, so a test can point it at any endpoint.

pub mod artifact;
pub mod aws;
pub mod commands;
pub mod communicator;
pub mod engine;
pub mod host;
pub mod modes;
pub mod provision;
pub mod run_id;
pub mod sandbox;
pub mod schemas;
pub mod template;
pub mod validate;

/// Process exit codes, the contract with CI scripts.
pub mod exit {
    pub const OK: i32 = 0;
    pub const BUILD_FAILED: i32 = 1;
    pub const USAGE: i32 = 2;
    /// Interrupted by SIGINT (Ctrl-C), after cleaning up.
    pub const INTERRUPTED: i32 = 130;
    /// Interrupted by SIGTERM (a CI system stopping the job), after cleaning up.
    pub const TERMINATED: i32 = 143;
}
