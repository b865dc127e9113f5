//! How fast the direct backend's upload finds the blocks it changed: `changed_blocks` over a
//! bake-sized working copy (a base of 600 blocks holding data, 150 of them rewritten and 150
//! new), with one reader and with more. Prints figures; asserts nothing of time.
//!
//! `cargo bench --bench reading`, on an otherwise idle machine.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use amibake::aws::ebs::BLOCK_SIZE;
use amibake::host::block_digests::BlockDigests;
use amibake::host::disk_image::{changed_blocks, copy_sparse, data_blocks};

const BASE_BLOCKS: u64 = 600;
const ROUNDS: usize = 5;

fn main() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let b = BLOCK_SIZE as u64;
    // Incompressible blocks, from a cheap generator: what is read is what counts.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; BLOCK_SIZE];
    let mut fill = |block: &mut [u8]| {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
    };
    let base = dir.path().join("base");
    let file = File::create(&base).unwrap();
    file.set_len(8 << 30).unwrap();
    for i in 0..BASE_BLOCKS {
        fill(&mut block);
        file.write_all_at(&block, i * 2 * b).unwrap();
    }
    // The base's digests, as its cache entry holds them: every block of it holding data.
    let parent = BlockDigests(
        changed_blocks(&base, None, 1, || true, |_| ())
            .unwrap()
            .into_iter()
            .map(|block| (block.index, block.digest))
            .collect(),
    );
    let work = dir.path().join("work");
    copy_sparse(&base, &File::create(&work).unwrap(), 0).unwrap();
    let w = std::fs::OpenOptions::new().write(true).open(&work).unwrap();
    for i in 0..BASE_BLOCKS / 4 {
        fill(&mut block);
        w.write_all_at(&block, i * 8 * b).unwrap();
        w.write_all_at(&block, (i * 8 + 1) * b).unwrap();
    }
    let candidates = data_blocks(&File::open(&work).unwrap()).unwrap().len();
    println!("{candidates} blocks holding data, read from the page cache");
    for readers in [1, 2, 4] {
        let mut best = Duration::MAX;
        let mut changed = 0;
        for _ in 0..ROUNDS {
            let started = Instant::now();
            changed = changed_blocks(&work, Some(&parent), readers, || true, |_| ())
                .unwrap()
                .len();
            best = best.min(started.elapsed());
        }
        let seconds = best.as_secs_f64();
        println!(
            "{readers} reader(s): {changed} changed found in {:.0} ms, {:.0} blocks read a second",
            seconds * 1000.0,
            candidates as f64 / seconds
        );
    }
}
