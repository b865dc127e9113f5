//! What a built image is known by: its tags, its fingerprint (what it was built from, so an
//! identical build can be found and reused) and the manifest a pipeline reads.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

pub const TAG_BUILD_ID: &str = "amibake:build-id";
pub const TAG_FINGERPRINT: &str = "amibake:fingerprint";
pub const TAG_COMMIT: &str = "amibake:commit";
pub const TAG_TARBALL_SHA256: &str = "amibake:tarball-sha256";
pub const TAG_BASE_AMI: &str = "amibake:base-ami";
pub const TAG_SOURCE_AMI: &str = "amibake:source-ami";
/// `normal` or `destructive`: which of a template's variants the image is.
pub const TAG_VARIANT: &str = "amibake:variant";
/// `building` from the create call on, `finished` once the run got past its last step: only
/// a finished image is an artifact, reused by a later run with its fingerprint and left
/// alone by `gc`. (Images from before this tag have none, and count as finished.)
pub const TAG_STATE: &str = "amibake:state";
pub const STATE_BUILDING: &str = "building";
pub const STATE_FINISHED: &str = "finished";
/// `passed` once an instance of the image passed the template's `[[base.test]]` or `[[bake.test]]` entries: an
/// image reused without it (made with `--no-test`, or before the template had tests) is
/// booted and tested before it is published again.
/// `private` (root in the image was nobody on the build host) or `compat` (it was root,
/// held by the sandbox's other walls): how the image's provisioners were confined.
pub const TAG_SANDBOX: &str = "amibake:sandbox";
/// The image's architecture (`x86_64`, `arm64`), as AWS names it.
pub const TAG_ARCHITECTURE: &str = "amibake:architecture";
/// The channels (SSM parameters, space-separated) the image is published to: the template's
/// when it is made, and each one `promote` puts it in. So `prune` knows every channel whose
/// versions and labels may name an image, even when it is not told them.
pub const TAG_CHANNEL: &str = "amibake:channel";
pub const TAG_TESTED: &str = "amibake:tested";
pub const TESTED_PASSED: &str = "passed";

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(sha256_hex(hasher))
}

/// A SHA-256 digest as lowercase hex, as the tags and manifests carry it.
pub fn sha256_hex(hasher: Sha256) -> String {
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The fingerprint of a build: the same inputs give the same fingerprint. `parts` are
/// (name, value) pairs; each is length-prefixed so no two different inputs can collide by
/// concatenation.
pub fn fingerprint(parts: &[(&str, &str)]) -> String {
    let mut hasher = Sha256::new();
    for (name, value) in parts {
        for field in [name, value] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
    }
    hex(&hasher.finalize())
}

/// A copy of the image in another region, as the manifest lists it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct RegionCopy {
    pub region: String,
    pub ami_id: String,
    pub snapshot_ids: Vec<String>,
    /// True when an earlier run had made it already.
    pub reused: bool,
    /// The version of that region's channel naming the copy, when the run published it.
    pub ssm_version: Option<i64>,
}

/// What a mode prints as its result, and writes with `--manifest`.
pub trait Manifest: Serialize {
    fn ami_id(&self) -> &str;
    fn region(&self) -> &str;
    /// One line for a person: what was built or reused, from what.
    fn summary(&self) -> String;
}

/// What `bake` prints as its result, and writes with `--manifest`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct BakeManifest {
    pub ami_id: String,
    pub region: String,
    pub name: String,
    pub snapshot_id: Option<String>,
    pub base_ami: String,
    /// The image's architecture, the base's (`x86_64`, `arm64`).
    pub architecture: String,
    pub commit: String,
    pub tarball_sha256: String,
    pub fingerprint: String,
    pub build_id: String,
    /// `attach` or `direct`: which backend made the image (none when it was reused).
    pub backend: Option<String>,
    /// True when an image with the same fingerprint existed and was reused.
    pub reused: bool,
    /// `normal` or `destructive`.
    pub variant: &'static str,
    /// `private` or `compat` (`bake.sandbox`): how this run confined the tarball and the
    /// provisioners; none when it reused an image.
    pub sandbox: Option<&'static str>,
    pub files: u64,
    pub bytes: u64,
    /// The channel and its version naming this image, when the run published it.
    pub ssm_parameter: Option<String>,
    pub ssm_version: Option<i64>,
    /// The image in every other region it was delivered to.
    pub copies: Vec<RegionCopy>,
    pub step_seconds: BTreeMap<String, f64>,
}

impl Manifest for BakeManifest {
    fn ami_id(&self) -> &str {
        &self.ami_id
    }
    fn region(&self) -> &str {
        &self.region
    }
    fn summary(&self) -> String {
        let how = match (&self.backend, self.reused) {
            (_, true) => "reused (same fingerprint)".to_string(),
            (Some(backend), false) => format!("baked by the {backend} backend"),
            (None, false) => "baked".to_string(),
        };
        let compat = if self.sandbox == Some("compat") {
            " (sandbox compat: root in the image was root on the build host)"
        } else {
            ""
        };
        format!(
            "{how}: {} \"{}\" in {} from {} at {}{}{}{compat}",
            self.ami_id,
            self.name,
            self.region,
            self.base_ami,
            self.commit,
            published(&self.ssm_parameter, self.ssm_version),
            copied(&self.copies)
        )
    }
}

/// What `base` prints as its result, and writes with `--manifest`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct BaseManifest {
    pub ami_id: String,
    pub region: String,
    pub name: String,
    pub snapshot_ids: Vec<String>,
    pub source_ami: String,
    /// The image's architecture, the source's (`x86_64`, `arm64`).
    pub architecture: String,
    pub fingerprint: String,
    pub build_id: String,
    /// True when an image with the same fingerprint existed and was reused.
    pub reused: bool,
    /// `normal` or `destructive`.
    pub variant: &'static str,
    /// The SSM parameter the id was published to, and the version that holds it.
    pub ssm_parameter: Option<String>,
    pub ssm_version: Option<i64>,
    /// The image in every other region it was delivered to.
    pub copies: Vec<RegionCopy>,
    pub step_seconds: BTreeMap<String, f64>,
}

impl Manifest for BaseManifest {
    fn ami_id(&self) -> &str {
        &self.ami_id
    }
    fn region(&self) -> &str {
        &self.region
    }
    fn summary(&self) -> String {
        let how = if self.reused {
            "unchanged, reused (same fingerprint)"
        } else {
            "built"
        };
        format!(
            "{how}: {} \"{}\" in {} from {}{}{}",
            self.ami_id,
            self.name,
            self.region,
            self.source_ami,
            published(&self.ssm_parameter, self.ssm_version),
            copied(&self.copies)
        )
    }
}

/// ", published to P version V" when the run published to a channel.
fn published(parameter: &Option<String>, version: Option<i64>) -> String {
    match (parameter, version) {
        (Some(p), Some(v)) => format!(", published to {p} version {v}"),
        _ => String::new(),
    }
}

/// "; copies: ami-2 in eu-west-1, ami-3 in us-west-2" when the image went elsewhere too.
fn copied(copies: &[RegionCopy]) -> String {
    if copies.is_empty() {
        return String::new();
    }
    let each: Vec<String> = copies
        .iter()
        .map(|c| format!("{} in {}", c.ami_id, c.region))
        .collect();
    format!("; copies: {}", each.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_change_with_any_input_and_do_not_collide_by_concatenation() {
        let a = fingerprint(&[("base", "ami-1"), ("tarball", "abc")]);
        assert_eq!(a, fingerprint(&[("base", "ami-1"), ("tarball", "abc")]));
        assert_ne!(a, fingerprint(&[("base", "ami-2"), ("tarball", "abc")]));
        assert_ne!(fingerprint(&[("a", "bc")]), fingerprint(&[("ab", "c")]));
    }

    #[test]
    fn a_bake_summary_says_which_backend_made_the_image() {
        let manifest = BakeManifest {
            ami_id: "ami-1".into(),
            region: "eu-west-1".into(),
            name: "shop-abc".into(),
            snapshot_id: Some("snap-1".into()),
            base_ami: "ami-0".into(),
            architecture: "x86_64".into(),
            commit: "abc1234".into(),
            tarball_sha256: String::new(),
            fingerprint: String::new(),
            build_id: "ab-1".into(),
            backend: Some("direct".into()),
            reused: false,
            variant: "normal",
            sandbox: Some("private"),
            files: 1,
            bytes: 1,
            ssm_parameter: None,
            ssm_version: None,
            copies: Vec::new(),
            step_seconds: BTreeMap::new(),
        };
        assert_eq!(
            manifest.summary(),
            "baked by the direct backend: ami-1 \"shop-abc\" in eu-west-1 from ami-0 at abc1234"
        );
        let reused = BakeManifest {
            backend: None,
            reused: true,
            ..manifest
        };
        assert!(reused
            .summary()
            .starts_with("reused (same fingerprint): ami-1"));
        let compat = BakeManifest {
            sandbox: Some("compat"),
            ..reused
        };
        assert!(compat.summary().contains("sandbox compat"));
    }

    #[test]
    fn sha256_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
