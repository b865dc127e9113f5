//! Stories that assert what the whole machine holds, or sweep it: each module's stories run
//! beside each other only (`util::module_turn`).

mod bake_direct;
mod bake_failures;
mod base_failures;
mod build_host;
mod credential_guard;
mod gc;
mod sandbox;
