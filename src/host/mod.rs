//! The machine side of `bake`: block devices (attached volumes, loop devices over cached
//! images) and mounts; the code and the provisioners reach the image through `crate::sandbox`.

pub mod block_digests;
pub mod boot_mounts;
pub mod device;
pub mod disk_image;
pub mod ext4_journal;
pub mod extract;
pub mod filesystem;
pub mod image_cache;
pub mod image_root;
pub mod loop_device;
pub mod mount;
pub mod partitions;
pub mod run_lock;
