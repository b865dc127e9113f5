//! Every integration test, one binary: each module holds the stories of one part of
//! amibake, run through the real binary against the local cloud (`util::localcloud`). One
//! binary links the AWS SDK once. A module's stories run beside each other, never beside
//! another module's (`util::module_turn`: several assert what the whole machine holds);
//! each starts its own local cloud, and one that keeps a run to look at takes
//! `util::alone()`.

mod util;

mod aws_layer;
mod bake;
mod bake_direct;
mod bake_failures;
mod base;
mod base_failures;
mod base_image;
mod build_host;
mod channels;
mod cli;
mod credential_guard;
mod distribute;
mod engine;
mod extract;
mod gc;
mod iam_policy;
mod image_cache;
mod image_test;
mod prune;
mod sandbox;
mod stages;
