//! The build-host side of `bake`: block devices, mounts and the chroot the code goes into.

pub mod device;
pub mod extract;
pub mod mount;
