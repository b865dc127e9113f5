//! The machine side of `bake`: block devices (attached volumes, loop devices over cached
//! images), mounts, and the sandbox the code and the
//! provisioners go into the image through.

pub mod credential_guard;
pub mod device;
pub mod disk_image;
pub mod ext4_journal;
pub mod extract;
pub mod image_cache;
pub mod image_root;
pub mod loop_device;
pub mod mount;
pub mod run_lock;
pub mod sandbox;
