//! `amibake gc`: what runs that are over left behind, in the cloud and on this machine.
//!
//! Every resource a run makes carries its build id, tagged in the create call itself, and a
//! run holds a lock named by its build id on its machine while it lives. A run is over when
//! no process here holds its lock and it started longer ago than `older_than` (a run on
//! another machine is judged by its age alone). Of an over run, gc removes the instances,
//! volumes (unmounted and detached first), key pairs, security groups, snapshots no image
//! uses, and images still `building` (the run never finished them) or stuck in `failed`,
//! with their snapshots; on this machine, its mounts, loop devices, work
//! directories, private-key directories, cache copies and the cgroups (with their BPF
//! programs) that kept its provisioners from the host's credentials.
//! It looks in the run's region, or with `all_regions` in every region the account has
//! enabled, where a killed bake's copies are. The images a run finished are its
//! artifacts: prune judges those, never gc.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::channel::{self, ChannelError};
use crate::artifact::{STATE_BUILDING, TAG_STATE};
use crate::aws::{self, AwsError, AwsOptions, Clients};
use crate::engine::{error_chain, BoxError, EventSink, Progress};
use crate::host::image_cache::{self, ImageCache};
use crate::host::{loop_device, mount, run_lock};
use crate::sandbox::credential_guard;

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub aws: AwsOptions,
    pub older_than: Duration,
    pub apply: bool,
    /// The direct backend's image cache, whose copies and partial entries killed runs leave.
    pub cache_dir: Option<PathBuf>,
    /// Look in every region the account has enabled, not only the run's: copies a killed
    /// bake was making live in the regions it copied to.
    pub all_regions: bool,
    /// Only this run's leftovers, whatever its age: a run kept with `--on-error=abort`,
    /// once its instance or mount has been looked at.
    pub build_id: Option<String>,
}

/// One thing a run left.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Leftover {
    pub build_id: String,
    /// `instance`, `volume`, `key pair`, `security group`, `snapshot`, `image`, `mount`,
    /// `loop device`, `file`, `cgroup`.
    pub kind: &'static str,
    pub id: String,
    /// The region of a cloud resource; none for what is on this machine.
    pub region: Option<String>,
    /// With `--apply`: `removed`, or why it could not be.
    pub outcome: Option<String>,
}

/// A run whose build id was seen but which gc leaves alone, and why.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Spared {
    pub build_id: String,
    pub why: String,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Collected {
    pub region: String,
    /// Every region looked in.
    pub regions: Vec<String>,
    pub apply: bool,
    pub leftovers: Vec<Leftover>,
    pub spared: Vec<Spared>,
    pub failed: Vec<String>,
}

impl Collected {
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .leftovers
            .iter()
            .map(|l| {
                let what = match (&l.outcome, self.apply) {
                    (Some(outcome), _) => outcome.clone(),
                    (None, false) => "would remove".into(),
                    (None, true) => "left".into(),
                };
                let place = l
                    .region
                    .as_ref()
                    .map(|r| format!(" in {r}"))
                    .unwrap_or_default();
                format!("{what:<12} {} {}{place} (run {})", l.kind, l.id, l.build_id)
            })
            .collect();
        lines.extend(
            self.spared
                .iter()
                .map(|s| format!("spared       run {}: {}", s.build_id, s.why)),
        );
        lines.push(if self.apply {
            format!(
                "{} leftovers of killed runs removed, {} failed",
                self.leftovers
                    .iter()
                    .filter(|l| l.outcome.as_deref() == Some("removed"))
                    .count(),
                self.failed.len()
            )
        } else {
            format!(
                "dry run: {} leftovers of killed runs would be removed; run again with --apply",
                self.leftovers.len()
            )
        });
        lines
    }
}

/// Why a run's leftovers are spared.
#[derive(Debug, Clone, thiserror::Error)]
enum SparedBecause {
    #[error("running on this machine")]
    Running,
    #[error("started {} ago, less than --older-than {}", humantime::format_duration(*.age), humantime::format_duration(*.older_than))]
    Young { age: Duration, older_than: Duration },
    #[error("its build id does not say when it started")]
    NoStart,
}

/// Whether a run is over, or why it is spared.
fn judge(build_id: &str, older_than: Duration) -> Result<(), SparedBecause> {
    if run_lock::is_held(build_id) {
        return Err(SparedBecause::Running);
    }
    let started = started(build_id).ok_or(SparedBecause::NoStart)?;
    let age = time::OffsetDateTime::now_utc() - started;
    if age < time::Duration::try_from(older_than).unwrap_or(time::Duration::MAX) {
        return Err(SparedBecause::Young {
            age: Duration::from_secs(age.whole_seconds().max(0) as u64),
            older_than,
        });
    }
    Ok(())
}

/// When a run started, from its build id (`ab-YYYYMMDDHHMMSS-xxxxxxxx`).
fn started(build_id: &str) -> Option<time::OffsetDateTime> {
    let stamp = build_id.strip_prefix("ab-")?.split('-').next()?;
    if stamp.len() != 14 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |range: std::ops::Range<usize>| stamp[range].parse::<u32>().ok();
    let date = time::Date::from_calendar_date(
        n(0..4)? as i32,
        time::Month::try_from(n(4..6)? as u8).ok()?,
        n(6..8)? as u8,
    )
    .ok()?;
    let clock = time::Time::from_hms(n(8..10)? as u8, n(10..12)? as u8, n(12..14)? as u8).ok()?;
    Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
}

/// Whether `text` is a build id as runs make them: `ab-YYYYMMDDHHMMSS-xxxxxxxx`.
pub fn is_build_id(text: &str) -> bool {
    started(text).is_some()
        && text
            .rsplit('-')
            .next()
            .is_some_and(|hex| hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The build id a local path of amibake's names: `amibake-<id>-…` (work and key
/// directories) or `.copy-<id>-…` (a cache copy; `.work-<id>-<pid>` before locks).
pub fn build_id_in(name: &str) -> Option<String> {
    let rest = name
        .strip_prefix("amibake-")
        .or_else(|| name.strip_prefix(".copy-"))
        .or_else(|| name.strip_prefix(".work-"))?;
    // `ab-` + 14 digits + `-` + 8 hex digits.
    let id = rest.get(..26)?;
    is_build_id(id).then(|| id.to_string())
}

/// Finds what runs that are over left behind, in this region or all of them, and with
/// `apply` removes it, looking again after each pass.
pub async fn gc(
    options: &GcOptions,
    sink: std::sync::Arc<dyn EventSink>,
) -> Result<Collected, ChannelError> {
    let clients = channel::clients(&options.aws).await?;
    let regions = if options.all_regions {
        aws::enabled_regions(&clients)
            .await?
            .iter()
            .map(|r| clients.in_region(r))
            .collect()
    } else {
        vec![clients.clone()]
    };
    let progress = Progress::new(sink, "gc");
    let mut verdicts: BTreeMap<String, Result<(), SparedBecause>> = BTreeMap::new();
    let mut leftovers: Vec<Leftover> = Vec::new();
    // With --apply, another look after each pass: what removing one thing shows (a call
    // the killed run made that EC2 carried out late, a snapshot its image held), until a
    // look finds nothing new.
    // With --all-regions, a region that cannot be read (an organization's policy denies
    // it) is named as failed, and the others are still swept.
    let mut unread: BTreeMap<String, String> = BTreeMap::new();
    for _pass in 0..PASSES {
        let found = look(options, &regions, &mut unread).await?;
        for l in &found {
            // A leftover of no run (a partial entry of the image cache) is listed only
            // once nobody holds it, whatever its age. A run named by
            // --build-id is over once it no longer holds its lock, however young.
            verdicts.entry(l.build_id.clone()).or_insert_with(|| {
                match (is_build_id(&l.build_id), &options.build_id) {
                    (true, Some(_)) => judge(&l.build_id, Duration::ZERO),
                    (true, None) => judge(&l.build_id, options.older_than),
                    (false, _) => Ok(()),
                }
            });
        }
        // Seen and removed already; what failed is tried again (it may have waited on
        // something a later look found: a mount a killed run's child made late).
        let seen: BTreeSet<(String, String)> = leftovers
            .iter()
            .filter(|l| l.outcome.as_deref() == Some("removed"))
            .map(|l| (l.kind.to_string(), l.id.clone()))
            .collect();
        let retried: BTreeSet<(String, String)> = leftovers
            .iter()
            .filter(|l| l.outcome.as_deref() != Some("removed"))
            .map(|l| (l.kind.to_string(), l.id.clone()))
            .collect();
        let mut new: Vec<Leftover> = found
            .into_iter()
            .filter(|l| verdicts.get(&l.build_id).is_some_and(Result::is_ok))
            .filter(|l| !seen.contains(&(l.kind.to_string(), l.id.clone())))
            .collect();
        leftovers.retain(|l| !retried.contains(&(l.kind.to_string(), l.id.clone())));
        if new.is_empty() || !options.apply {
            leftovers.append(&mut new);
            break;
        }
        remove_in_order(&mut new, (&clients, &regions), &progress).await;
        leftovers.append(&mut new);
    }
    let spared = spared(&verdicts);
    let failed = failures(&leftovers, unread);
    Ok(Collected {
        region: clients.region.clone(),
        regions: regions.iter().map(|c| c.region.clone()).collect(),
        apply: options.apply,
        leftovers,
        spared,
        failed,
    })
}

/// The runs whose leftovers were not touched, and why.
fn spared(verdicts: &BTreeMap<String, Result<(), SparedBecause>>) -> Vec<Spared> {
    verdicts
        .iter()
        .filter_map(|(id, v)| {
            v.as_ref().err().map(|why| Spared {
                build_id: id.clone(),
                why: why.to_string(),
            })
        })
        .collect()
}

/// What the sweep could not do: each leftover it failed to remove, each region it could
/// not read.
fn failures(leftovers: &[Leftover], unread: BTreeMap<String, String>) -> Vec<String> {
    let mut failed: Vec<String> = leftovers
        .iter()
        .filter_map(|l| {
            let why = l.outcome.as_deref()?.strip_prefix("failed: ")?;
            Some(format!("{} {}: {why}", l.kind, l.id))
        })
        .collect();
    failed.extend(
        unread
            .into_iter()
            .map(|(region, why)| format!("what is left in {region} (not read): {why}")),
    );
    failed
}

/// Looks at what is left, at most, with --apply.
const PASSES: usize = 3;

const ORDER: &[&str] = &[
    "cgroup",
    "mount",
    "loop device",
    "file",
    "instance",
    "volume",
    "key pair",
    "security group",
    "image",
    "snapshot",
];

/// Mounts under a run's work directory (deepest first), loop devices over a run's cache
/// copy, and the run's directories and copies in the temporary and cache directories.
fn machine_leftovers(cache_dir: Option<&Path>) -> Vec<Leftover> {
    let mut found = Vec::new();
    let leftover = |build_id: String, kind, id: String| Leftover {
        build_id,
        kind,
        id,
        region: None,
        outcome: None,
    };
    let mut mounts: Vec<(String, String)> = mount::mount_points()
        .into_iter()
        .filter_map(|point| {
            let text = point.to_string_lossy().into_owned();
            let id = point
                .ancestors()
                .filter_map(|a| a.file_name())
                .find_map(|n| build_id_in(&n.to_string_lossy()))?;
            Some((id, text))
        })
        .collect();
    // Deepest first: /…/root/proc before /…/root.
    mounts.sort_by_key(|(_, point)| std::cmp::Reverse(point.len()));
    found.extend(mounts.into_iter().map(|(id, p)| leftover(id, "mount", p)));
    for (device, backing) in loop_device::all() {
        let name = Path::new(&backing)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(id) = build_id_in(&name) {
            found.push(leftover(
                id,
                "loop device",
                device.to_string_lossy().into_owned(),
            ));
        }
    }
    for (build_id, dir) in credential_guard::guards() {
        if is_build_id(&build_id) {
            found.push(leftover(
                build_id,
                "cgroup",
                dir.to_string_lossy().into_owned(),
            ));
        }
    }
    // What killed runs left in the cache is what its own sweep would remove: a copy or a
    // partial entry nobody holds, whichever container its run was in.
    for path in cache_dir
        .map(ImageCache::new)
        .map_or(Vec::new(), |c| c.abandoned())
    {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let by = build_id_in(&name).unwrap_or_else(|| "image cache".to_string());
        found.push(leftover(by, "file", path.to_string_lossy().into_owned()));
    }
    let mut seen = BTreeSet::new();
    for dir in [std::env::temp_dir(), PathBuf::from("/dev/shm")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = build_id_in(&name) {
                if seen.insert(path.clone()) {
                    found.push(leftover(id, "file", path.to_string_lossy().into_owned()));
                }
            }
        }
    }
    found
}

/// One look for leftovers: this machine's, and the cloud's in each region (with
/// `--all-regions`, a region that cannot be read is noted in `unread`, and the others are
/// still looked at).
async fn look(
    options: &GcOptions,
    regions: &[Clients],
    unread: &mut BTreeMap<String, String>,
) -> Result<Vec<Leftover>, ChannelError> {
    let mut found = machine_leftovers(options.cache_dir.as_deref());
    for clients in regions {
        match cloud_leftovers(clients).await {
            Ok(more) => found.extend(more),
            Err(e) if options.all_regions => {
                unread.insert(clients.region.clone(), error_chain(&e));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(only) = &options.build_id {
        found.retain(|l| l.build_id == *only);
    }
    Ok(found)
}

/// Removes `leftovers`, noting each outcome: this machine's first (a mounted volume is
/// unmounted before it is detached), then the cloud's in dependency order (instances
/// before their groups, volumes detached before they are deleted), each in its own region.
async fn remove_in_order(
    leftovers: &mut [Leftover],
    (own, regions): (&Clients, &[Clients]),
    progress: &Progress,
) {
    for kind in ORDER {
        for l in leftovers.iter_mut().filter(|l| l.kind == *kind) {
            let home = l
                .region
                .as_ref()
                .and_then(|r| regions.iter().find(|c| &c.region == r))
                .unwrap_or(own);
            let removed = remove(home, l, progress).await;
            l.outcome = Some(match removed {
                Ok(()) => "removed".into(),
                Err(e) => format!("failed: {}", error_chain(e.as_ref())),
            });
        }
    }
}

/// Everything tagged with a build id that only a run in progress should have: instances
/// not terminated, volumes, key pairs, security groups, images in `failed`, snapshots no
/// image uses.
async fn cloud_leftovers(clients: &Clients) -> Result<Vec<Leftover>, AwsError> {
    let leftover = |kind| {
        move |(build_id, id): (String, String)| Leftover {
            build_id,
            kind,
            id,
            region: Some(clients.region.clone()),
            outcome: None,
        }
    };
    let mut found: Vec<Leftover> = Vec::new();
    let instances = aws::instance::of_runs(clients).await?;
    found.extend(instances.into_iter().map(leftover("instance")));
    let volumes = aws::volume::of_runs(clients).await?;
    found.extend(volumes.into_iter().map(leftover("volume")));
    let key_pairs = aws::key_pair::of_runs(clients).await?;
    found.extend(key_pairs.into_iter().map(leftover("key pair")));
    let groups = aws::security_group::of_runs(clients).await?;
    found.extend(groups.into_iter().map(leftover("security group")));
    let mut used = BTreeSet::new();
    for image in aws::image::of_account(clients).await? {
        used.extend(aws::image::snapshot_ids(&image));
        let failed = image.state().is_some_and(|s| s.as_str() == "failed");
        let unfinished = image
            .tags()
            .iter()
            .any(|t| t.key() == Some(TAG_STATE) && t.value() == Some(STATE_BUILDING));
        let made = aws::resources::build_id_of(image.tags()).zip(image.image_id());
        if let (true, Some((build_id, id))) = (failed || unfinished, made) {
            found.push(leftover("image")((build_id, id.to_string())));
        }
    }
    let snapshots = aws::snapshot::of_runs(clients).await?;
    found.extend(
        snapshots
            .into_iter()
            .filter(|(_, id)| !used.contains(id))
            .map(leftover("snapshot")),
    );
    Ok(found)
}

async fn remove(clients: &Clients, l: &Leftover, progress: &Progress) -> Result<(), BoxError> {
    let (c, id) = (clients.clone(), l.id.clone());
    match l.kind {
        "cgroup" => Ok(credential_guard::remove_leftover(Path::new(&id))?),
        "mount" => {
            let unmounted = tokio::task::spawn_blocking(move || {
                mount::unmount(Path::new(&id), None, mount::RELEASE_WAIT)
            });
            Ok(unmounted.await??)
        }
        "loop device" => Ok(loop_device::detach(Path::new(&id))?),
        "file" => {
            let path = Path::new(&id);
            let named = path.file_name().unwrap_or_default().to_string_lossy();
            if image_cache::is_leftover(&named) {
                Ok(image_cache::remove_leftover(path)?)
            } else {
                Ok(remove_local(path)?)
            }
        }
        "instance" => crate::aws::instance::terminate(c, id, progress.clone())
            .await
            .map_err(Into::into),
        "volume" => {
            // Listed a moment ago, so unknown now is a volume gone with its instance (an
            // instance's root is deleted on termination).
            let Some(attached) = aws::volume::attached_to(clients, &id).await? else {
                return Ok(());
            };
            for instance in attached {
                crate::aws::volume::detach(c.clone(), id.clone(), instance, progress.clone())
                    .await?;
            }
            Ok(crate::aws::volume::delete(c, id).await?)
        }
        "key pair" => crate::aws::key_pair::delete(c, id)
            .await
            .map_err(Into::into),
        "security group" => crate::aws::security_group::delete(c, id)
            .await
            .map_err(Into::into),
        "image" => crate::aws::image::deregister(c, id)
            .await
            .map_err(Into::into),
        "snapshot" => crate::aws::snapshot::delete(c, id)
            .await
            .map_err(Into::into),
        other => Err(format!("no way to remove a {other}").into()),
    }
}

/// A run's directory or file here. A work directory is emptied entry by entry, never
/// recursively: a mount that could not be undone must stop it, not be walked into. A key
/// directory holds only the key; a cache copy is a file.
fn remove_local(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    for entry in std::fs::read_dir(path)?.flatten() {
        let entry_path = entry.path();
        if mount::is_mount_point(&entry_path) {
            return Err(std::io::Error::other(format!(
                "{} is still mounted",
                entry_path.display()
            )));
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir(&entry_path)?;
        } else {
            std::fs::remove_file(&entry_path)?;
        }
    }
    std::fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_found_in_the_paths_runs_make() {
        let id = "ab-20261203015529-09e26fd9";
        assert_eq!(
            build_id_in(&format!("amibake-{id}-Xy12Ab")).as_deref(),
            Some(id)
        );
        assert_eq!(
            build_id_in(&format!("amibake-{id}-key-Q1w2e3")).as_deref(),
            Some(id)
        );
        assert_eq!(
            build_id_in(&format!(".copy-{id}-aB3xYz")).as_deref(),
            Some(id)
        );
        assert_eq!(
            build_id_in(&format!(".work-{id}-4242")).as_deref(),
            Some(id)
        );
        assert_eq!(build_id_in("amibake-locks"), None);
        assert_eq!(build_id_in("amibake-ab-2026120301552-09e26fd9x"), None);
        let when = started(id).unwrap();
        assert_eq!((when.year(), when.hour(), when.second()), (2026, 1, 29));
    }

    #[test]
    fn a_recent_run_is_spared_an_old_one_is_over() {
        assert!(judge("ab-20261203015529-09e26fd9", Duration::ZERO).is_ok());
        let now = crate::run_id::timestamp_now();
        let recent = format!("ab-{now}-00000000");
        let why = judge(&recent, Duration::from_secs(3600))
            .unwrap_err()
            .to_string();
        assert!(why.contains("less than --older-than 1h"), "{why}");
        assert!(judge("ab-notatime-00000000", Duration::ZERO).is_err());
    }
}
