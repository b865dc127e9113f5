//! Commands that run no engine steps: each reads or tidies local state and prints it.

pub mod cache;
