//! Commands that run no engine steps: each reads or tidies state, in the cloud or on this
//! machine, and returns what it found or did for the binary to print.

pub mod cache;
pub mod channel;
pub mod gc;
pub mod history;
pub mod iam_policy;
pub mod promote;
pub mod prune;
pub mod rollback;
