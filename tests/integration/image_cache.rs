//! The `direct` backend's base-image cache, against the local cloud's EBS direct APIs: a
//! base fetched once and byte for byte, never trusted half-made, fetched again from disk.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::util::localcloud::LocalCloud;
use amibake::host::image_cache::ImageCache;
use tokio_util::sync::CancellationToken;

/// A completed snapshot of this account holding the Debian root: EBS direct reads no
/// public snapshot, so the vendor's goes through a volume first.
async fn owned_snapshot(cloud: &LocalCloud, clients: &amibake::aws::Clients) -> String {
    let volume = cloud.vendor_root_volume(clients).await;
    LocalCloud::snapshot_of_volume(clients, &volume).await
}

const BLOCK: u64 = 512 * 1024;

/// The 512 KiB blocks of a sparse file that hold data (holes read as zeros in both files
/// compared, so these are all the blocks that can differ).
fn allocated_blocks(path: &Path) -> BTreeSet<u64> {
    let file = std::fs::File::open(path).unwrap();
    let (fd, size) = (file.as_raw_fd(), file.metadata().unwrap().len() as i64);
    let mut blocks = BTreeSet::new();
    let mut offset = 0;
    while offset < size {
        // SAFETY: lseek on an open descriptor; no memory is shared.
        let start = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
        if start < 0 {
            break;
        }
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        blocks.extend(start as u64 / BLOCK..=(end as u64 - 1) / BLOCK);
        offset = end;
    }
    blocks
}

fn block(path: &Path, index: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0; BLOCK as usize];
    let read = std::fs::File::open(path)
        .unwrap()
        .read_at(&mut data, index * BLOCK)
        .unwrap();
    data[read..].fill(0);
    data
}

fn gets(cloud: &LocalCloud, since: usize) -> usize {
    cloud.calls()[since..]
        .iter()
        .filter(|c| c["action"] == "GetSnapshotBlock")
        .count()
}

#[test]
fn a_base_is_fetched_once_byte_for_byte_and_never_trusted_half_made() {
    let _module = crate::util::module_turn(module_path!());
    let story = crate::util::Story::new("quick");
    let (cloud, runtime, clients, dir) =
        (&story.cloud, &story.runtime, &story.clients, story.dir());
    let snapshot = runtime.block_on(owned_snapshot(cloud, clients));
    let cache = ImageCache::new(dir.join("cache"));
    let never = CancellationToken::new();
    let fetch = || runtime.block_on(cache.fetch(clients, &snapshot, &snapshot, &|_, _| {}, &never));

    // A block whose read fails (an error the SDK does not retry): the fetch fails naming
    // the call, and leaves neither an entry nor a partial one.
    cloud.cli(&[
        "fault",
        "GetSnapshotBlock",
        "--after",
        "5",
        "--error",
        "AccessDeniedException",
    ]);
    let failed = fetch().unwrap_err().to_string();
    assert!(
        failed.contains(&format!("GetSnapshotBlock {snapshot} block"))
            && failed.contains("AccessDeniedException"),
        "{failed}"
    );
    assert!(cache.entry(&snapshot).unwrap().is_none());
    let left: Vec<_> = std::fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "nothing of the failed fetch is left: {left:?}"
    );

    // What a killed fetch leaves (a partial entry nobody holds) is removed, and an entry
    // without its digests is not trusted.
    let abandoned = cache.dir().join(format!(".fetching-{snapshot}-Q1w2e3"));
    std::fs::create_dir_all(&abandoned).unwrap();
    std::fs::write(abandoned.join("image"), b"half").unwrap();
    std::fs::write(abandoned.join("lock"), b"").unwrap();
    std::fs::create_dir_all(cache.dir().join("snap-0000000000000000a")).unwrap();
    assert!(cache.entry("snap-0000000000000000a").unwrap().is_none());

    // Another run's live fetch of the same snapshot, in a container whose pids this one
    // cannot see: held by its lock, it is left alone.
    let live = cache.dir().join(format!(".fetching-{snapshot}-aB3xYz"));
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("image"), b"another run's").unwrap();
    let live_lock = std::fs::File::create(live.join("lock")).unwrap();
    rustix::fs::flock(
        &live_lock,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .unwrap();

    // With 30 % of the calls throttled, the fetch still completes (the SDK retries them).
    cloud.cli(&["fault", "--throttle", "30"]);
    let before = cloud.calls().len();
    let entry = fetch().unwrap();
    cloud.cli(&["fault", "--throttle", "0"]);
    assert!(!abandoned.exists(), "the abandoned partial entry is gone");
    assert_eq!(
        std::fs::read(live.join("image")).unwrap(),
        b"another run's",
        "a live fetch's partial entry is untouched"
    );
    drop(live_lock);
    std::fs::remove_dir_all(&live).unwrap();
    let listed = cloud.calls()[before..]
        .iter()
        .filter(|c| c["action"] == "GetSnapshotBlock" && c["code"] == "OK")
        .count();
    assert_eq!(entry.downloaded, listed, "each block fetched once");
    assert_eq!(entry.digests.0.len(), entry.downloaded);
    assert!(entry.downloaded > 10);

    // Byte for byte what EC2 has.
    let exported = dir.join("exported.img");
    cloud.cli(&["export-snapshot", &snapshot, exported.to_str().unwrap()]);
    let downloaded = entry.downloaded;
    let is_the_snapshot = |image: &Path| {
        let blocks = allocated_blocks(image)
            .union(&allocated_blocks(&exported))
            .copied()
            .collect::<Vec<_>>();
        assert!(blocks.len() >= downloaded);
        for index in blocks {
            assert_eq!(
                block(image, index),
                block(&exported, index),
                "block {index} of the cached image is the snapshot's"
            );
        }
    };
    is_the_snapshot(&entry.image);

    // Blocks damaged on their way down are written into place as they arrive, then
    // fetched again and written over: the entry is still the snapshot, byte for byte.
    // Two with a byte flipped; then the highest allocated block, whose next block is the
    // snapshot's zeros (so a write past its own 512 KiB would show in the entry), cut short,
    // and grown past its end.
    let highest = *entry.digests.0.keys().max().unwrap();
    // Let go: prune keeps an entry in use.
    let digests = entry.digests.clone();
    drop(entry);
    for (kind, aimed_at) in [
        ("flip", None),
        ("short", Some(highest)),
        ("long", Some(highest)),
    ] {
        assert_eq!(cache.prune(None).unwrap().removed.len(), 1, "{kind}");
        match aimed_at {
            Some(block) => cloud.damage_block("GetSnapshotBlock", kind, block),
            None => cloud.damage_blocks_by("GetSnapshotBlock", kind, 3, 2),
        }
        let before = cloud.calls().len();
        let refetched = fetch().unwrap();
        let damaged = if aimed_at.is_some() { 1 } else { 2 };
        assert_eq!(
            gets(cloud, before),
            refetched.downloaded + damaged,
            "the {kind} blocks fetched again"
        );
        if let Some(block) = aimed_at {
            let fetched = cloud.calls()[before..]
                .iter()
                .filter(|c| c["action"] == "GetSnapshotBlock")
                .filter(|c| c["ids"]["BlockIndex"] == block.to_string().as_str())
                .count();
            assert_eq!(fetched, 2, "block {block}, {kind}, fetched again");
        }
        assert_eq!(refetched.digests, digests, "{kind}");
        is_the_snapshot(&refetched.image);
    }

    // The next fetch comes from disk: no block is downloaded.
    let before = cloud.calls().len();
    let again = fetch().unwrap();
    assert_eq!(again.downloaded, 0);
    assert_eq!(gets(cloud, before), 0, "no GetSnapshotBlock");
    assert_eq!(again.digests, digests);
    assert_eq!(
        cache
            .list()
            .iter()
            .map(|listed| listed.snapshot_id.as_str())
            .collect::<Vec<_>>(),
        [snapshot.as_str()]
    );
}
