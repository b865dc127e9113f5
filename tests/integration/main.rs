//! Every integration test, one binary: each module holds the stories of one part of
//! amibake, run through the real binary against the local cloud (`util::localcloud`). One
//! binary links the AWS SDK once. The modules under `machine_wide` assert what the whole
//! machine holds (any bake's mount, loop devices, /dev links, processes) or sweep it (gc): a
//! module's stories there run only beside each other, and `tests/run` runs them in a pass of
//! their own. The other modules' stories share the machine (`util::module_turn`). Each starts
//! its own local cloud, and one that keeps a run to look at takes `util::alone()`.

mod util;

mod machine_wide;

mod aws_layer;
mod bake;
mod base;
mod base_image;
mod channels;
mod cli;
mod distribute;
mod engine;
mod extract;
mod iam_policy;
mod image_cache;
mod image_test;
mod layouts;
mod prune;
mod ssm;
mod stages;
