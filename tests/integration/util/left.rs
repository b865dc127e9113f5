//! What runs on one local cloud may have left, read at once from the cloud and from this
//! machine: the one way every story says "nothing left". What belongs to a run still
//! holding its lock (a story beside this one) is not counted on this machine's side.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::localcloud::{bake_mounts_left, LocalCloud, ACCOUNT};

/// Everything a run may leave, by kind; each list empty when nothing is left.
pub struct Left {
    /// Instances alive, or terminated with their processes still running, but the build
    /// host.
    pub instances: Vec<Value>,
    pub key_pairs: Vec<Value>,
    pub security_groups: Vec<Value>,
    /// Volumes but the build host's root.
    pub volumes: Vec<Value>,
    pub attachments: Vec<Value>,
    /// The account's own images and snapshots (a vendor's are not a run's); what a run that
    /// succeeded keeps.
    pub images: Vec<Value>,
    pub snapshots: Vec<Value>,
    /// Mounts of runs that are over.
    pub mounts: Vec<String>,
    /// The credential guard's cgroups made since the cloud started.
    pub cgroups: Vec<PathBuf>,
    /// Loop devices over a device whose file is this cloud's: a partition of an image (a
    /// grown root, a /boot) over an attached volume.
    pub loops_over_devices: Vec<String>,
    /// Private-key directories made since the cloud started.
    pub private_keys: Vec<String>,
    /// S3 objects, as `BUCKET/KEY`: a run's are staging only.
    pub objects: Vec<Value>,
}

impl LocalCloud {
    /// What is left on this cloud and this machine now.
    pub fn left(&self) -> Left {
        let ls = self.ls();
        let build_host = self.build_host();
        let list = |kind: &str, keep: &dyn Fn(&Value) -> bool| -> Vec<Value> {
            ls[kind]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| keep(x))
                .cloned()
                .collect()
        };
        let ours = |x: &Value| x["owner"] == ACCOUNT;
        Left {
            instances: list("instances", &|i| {
                i["id"] != build_host && (i["state"] != "terminated" || i["booted"] == true)
            }),
            key_pairs: list("key_pairs", &|_| true),
            security_groups: list("security_groups", &|_| true),
            volumes: list("volumes", &|v| {
                v["attached_to"] != build_host || v["device"] != "/dev/xvda"
            }),
            attachments: list("attachments", &|_| true),
            images: list("images", &ours),
            snapshots: list("snapshots", &ours),
            mounts: bake_mounts_left(),
            cgroups: self.guard_cgroups_left(),
            loops_over_devices: loops_over_devices_of(&self.state),
            private_keys: self.private_key_dirs_left(),
            objects: list("objects", &|_| true),
        }
    }

    /// Nothing temporary of any run is left: what a run that succeeded keeps is its image
    /// and snapshots.
    pub fn assert_nothing_temporary(&self) {
        self.left().assert_nothing_temporary("");
    }
}

impl Left {
    /// Panics naming every kind of temporary thing left, with `context` (a run's output).
    pub fn assert_nothing_temporary(&self, context: &str) {
        let found = self.temporary();
        assert!(found.is_empty(), "left:\n{found}\n{context}");
    }

    /// Panics naming whatever is left, images and snapshots of the account included: what a
    /// run that failed must leave.
    pub fn assert_nothing(&self, context: &str) {
        let mut found = self.temporary();
        listed(&mut found, "images", &self.images);
        listed(&mut found, "snapshots", &self.snapshots);
        assert!(found.is_empty(), "left:\n{found}\n{context}");
    }

    fn temporary(&self) -> String {
        let mut found = String::new();
        listed(&mut found, "instances", &self.instances);
        listed(&mut found, "key pairs", &self.key_pairs);
        listed(&mut found, "security groups", &self.security_groups);
        listed(&mut found, "work volumes", &self.volumes);
        listed(&mut found, "attachments", &self.attachments);
        listed(&mut found, "bake mounts", &self.mounts);
        listed(&mut found, "provisioner cgroups", &self.cgroups);
        listed(
            &mut found,
            "loop devices over a device",
            &self.loops_over_devices,
        );
        listed(&mut found, "private key directories", &self.private_keys);
        listed(&mut found, "S3 objects", &self.objects);
        found
    }
}

fn listed(found: &mut String, kind: &str, items: &[impl std::fmt::Debug]) {
    if !items.is_empty() {
        writeln!(found, "  {kind}: {items:?}").unwrap();
    }
}

/// Loop devices over a device that is itself a loop device over a file of the cloud whose
/// state is `state`: only those are this cloud's (the stories beside it have their own).
fn loops_over_devices_of(state: &Path) -> Vec<String> {
    let state = std::fs::canonicalize(state).unwrap();
    let backing_of = |block: &Path| {
        std::fs::read_to_string(block.join("loop/backing_file"))
            .ok()
            .map(|b| b.trim_end().to_string())
    };
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| backing_of(&e.path()))
        .filter(|backing| {
            backing
                .strip_prefix("/dev/")
                .and_then(|device| backing_of(&Path::new("/sys/block").join(device)))
                .is_some_and(|file| Path::new(&file).starts_with(&state))
        })
        .collect()
}
