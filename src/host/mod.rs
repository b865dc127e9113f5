//! The build-host side of `bake`: block devices, mounts, and the sandbox the code and the
//! provisioners go into the image through.

pub mod credential_guard;
pub mod device;
pub mod extract;
pub mod image_cache;
pub mod image_root;
pub mod mount;
pub mod sandbox;
