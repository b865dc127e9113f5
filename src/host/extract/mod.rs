//! Putting the code tarball into the image, resolving every path as the booted image would
//! and never reaching the build host.
//!
//! The unpacking runs in a child process (this binary, `internal-extract`) that first leaves
//! the host's namespaces and chroots into the image with only the capabilities to create and
//! own files (`sandbox`), before any host filesystem is mounted into the image. Inside, every
//! path goes through `image_root`: `dest` is resolved as the image resolves it (its
//! `/var/www -> /srv/www` leads to its own `/srv/www`), and each entry is placed below
//! `dest` with `RESOLVE_BENEATH`, so neither `..`, an absolute path, a symlink from the
//! tarball or one already in the image, nor a `/proc/<pid>/root` magic link can take a write
//! anywhere else. Device nodes and FIFOs are refused; setuid and setgid bits are dropped
//! unless the template keeps them.
//!
//! The tarball is inflated once, by its check before any AWS call, which keeps the tar
//! stream it read (`check_entries`); the extraction reads that stream and never decompresses
//! (`unpack`): what it places is what was checked, whatever its first bytes look like.
//!
//! `entry` judges each entry from the tarball alone, `writer` places it, `child` runs both
//! in their sandboxed child processes.

mod child;
mod entry;
mod kept;
mod writer;

pub use child::{check_child_main, check_tarball, child_main, extract_into_image, Tarball};
pub use entry::EntryError;
pub use kept::Kept;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};
use tar::EntryType;

use super::image_root::ImageRoot;
use crate::engine::events::printable;
use crate::sandbox;
use entry::admit;
use writer::{set_owner, Writer};

/// A user and group of the image, by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What an extraction put into the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extracted {
    pub files: u64,
    pub bytes: u64,
    /// Files whose setuid or setgid bit was dropped.
    #[serde(default)]
    pub setuid_dropped: u64,
}

/// How the tarball goes into the image: the template's `dest`, `owner`, `keep_setuid`.
#[derive(Debug, Clone, Default)]
pub struct ExtractSpec {
    /// The destination directory, as the image names it.
    pub dest: String,
    /// `user` or `user:group` of the image, for every entry, `dest` and the directories
    /// made on the way to it.
    pub owner: Option<String>,
    pub keep_setuid: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// `reason` is shown with its control characters escaped: it may quote the tarball.
    #[error("tarball entry {index} ({path}): {}", printable(&.reason.to_string()))]
    Entry {
        index: u64,
        path: String,
        reason: EntryError,
    },
    #[error("tarball is damaged or not a tar archive: {0}")]
    Corrupt(String),
    /// No bake means to deliver nothing: an empty artifact is a build that went wrong.
    #[error("the tarball holds no entries: an empty file, or only an archive's end")]
    Empty,
    #[error("owner `{spec}`: {reason}")]
    Owner { spec: String, reason: String },
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("cannot create {dest} in the image: {reason}")]
    Dest { dest: String, reason: String },
    /// The child could not start, ended on a signal, or failed other than on the tarball.
    #[error("{0}")]
    Child(String),
    /// What a child said of a tarball it refused (an entry, a damaged archive, no entries).
    #[error("{0}")]
    Refused(String),
    #[error("cannot read the tarball {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The check could not keep the tar stream it read for the extraction.
    #[error("cannot keep the tarball's tar stream for the extraction: {0}")]
    Keep(std::io::Error),
}

// Magic numbers at the start of a compressed stream.
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Mode of the directories made on the way to an entry the tarball does not list itself.
pub(crate) const IMPLIED_DIR_MODE: u32 = 0o755;
/// The setuid and setgid bits.
pub(crate) const SET_ID_BITS: u32 = 0o6000;

/// How much of the tarball is read at once, and how much inflated data a piece holds.
const PIECE: usize = 256 * 1024;
/// Pieces queued between the decompressor and the tar reader: with the piece each holds,
/// 1.5 MiB at most, whatever the tarball.
const PIECES_AHEAD: usize = 4;

/// Reads `input` through the decompressor its first bytes call for (gzip, zstd, or none)
/// and hands the tar stream to `read`. Inflating is most of an extraction's CPU and
/// writing the files the rest, so a compressed tarball is inflated on a thread of its own,
/// a few pieces ahead of `read`, and the two share the machine's cores.
fn decompressed<'i, T>(
    input: impl Read + Send + 'i,
    read: impl FnOnce(Box<dyn Read + '_>) -> Result<T, ExtractError>,
) -> Result<T, ExtractError> {
    let mut input = BufReader::with_capacity(PIECE, input);
    let head = input
        .fill_buf()
        .map_err(|e| ExtractError::Corrupt(e.to_string()))?;
    let gzip = head.starts_with(GZIP_MAGIC);
    if !gzip && !head.starts_with(ZSTD_MAGIC) {
        return read(Box::new(input));
    }
    let decoder = move || -> std::io::Result<Box<dyn Read + 'i>> {
        Ok(if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(input))
        } else {
            Box::new(zstd::stream::read::Decoder::with_buffer(input)?)
        })
    };
    let (pieces, inflated) = std::sync::mpsc::sync_channel(PIECES_AHEAD);
    std::thread::scope(|scope| {
        let inflating = scope.spawn(move || inflate_into(decoder, pieces));
        // Dropping the receiver when `read` is done (or failed) ends the decompressor at
        // its next piece.
        let read = read(Box::new(Pieces::new(inflated)));
        match inflating.join() {
            Ok(()) => read,
            Err(_) => Err(ExtractError::Corrupt(DECOMPRESSOR_FAILED.into())),
        }
    })
}

/// What the reader meets where the decompressor's thread stopped without reaching the
/// stream's end: said, never read as a shorter tarball.
const DECOMPRESSOR_FAILED: &str = "the decompressor stopped before the end of the stream";

/// The decompressor's thread: reads pieces of the tar stream until its end, an error
/// (sent on, for the reader to meet where the stream breaks), or a reader gone.
fn inflate_into<'i>(
    decoder: impl FnOnce() -> std::io::Result<Box<dyn Read + 'i>>,
    pieces: std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>,
) {
    let mut decoder = match decoder() {
        Ok(decoder) => decoder,
        Err(e) => {
            let _ = pieces.send(Err(e));
            return;
        }
    };
    loop {
        let mut piece = vec![0; PIECE];
        let (filled, error) = read_up_to(&mut decoder, &mut piece);
        piece.truncate(filled);
        // What was inflated before an error goes first: the reader meets the error where
        // the stream breaks, as it would reading the decompressor itself.
        if filled > 0 && pieces.send(Ok(piece)).is_err() {
            return;
        }
        match error {
            Some(e) => {
                let _ = pieces.send(Err(e));
                return;
            }
            None if filled < PIECE => {
                // An empty piece marks the end; a thread gone without one failed.
                let _ = pieces.send(Ok(Vec::new()));
                return;
            }
            None => {}
        }
    }
}

/// Fills `buf` as far as `input` goes: fewer bytes only at its end or an error, which
/// comes with what was read before it.
fn read_up_to(input: &mut dyn Read, buf: &mut [u8]) -> (usize, Option<std::io::Error>) {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (filled, Some(e)),
        }
    }
    (filled, None)
}

/// The tar stream as the decompressor's thread inflates it, piece by piece, up to the
/// empty piece that marks its end.
struct Pieces {
    inflated: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    piece: Vec<u8>,
    at: usize,
    ended: bool,
    /// Why the stream broke, said again to a reader that reads on: the thread that sent it
    /// is gone, and its absence would otherwise read as a different failure.
    broke: Option<(std::io::ErrorKind, String)>,
}

impl Pieces {
    fn new(inflated: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> Pieces {
        Pieces {
            inflated,
            piece: Vec::new(),
            at: 0,
            ended: false,
            broke: None,
        }
    }
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.piece.len() {
            if let Some((kind, why)) = &self.broke {
                return Err(std::io::Error::new(*kind, why.clone()));
            }
            if self.ended {
                return Ok(0);
            }
            match self.inflated.recv() {
                Ok(Ok(piece)) => {
                    self.piece = piece;
                    self.at = 0;
                    self.ended = self.piece.is_empty();
                }
                Ok(Err(e)) => self.broke = Some((e.kind(), e.to_string())),
                // The thread is gone before the end: it panicked.
                Err(_) => {
                    self.broke = Some((std::io::ErrorKind::Other, DECOMPRESSOR_FAILED.into()))
                }
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Unpacks a tar stream (as the check kept it: never decompressed here) into `spec.dest` of
/// `image`. `on_progress` hears the running totals after each entry.
pub fn unpack(
    input: impl Read + Send,
    image: &ImageRoot,
    spec: &ExtractSpec,
    owner: Option<Owner>,
    mut on_progress: impl FnMut(Extracted),
) -> Result<Extracted, ExtractError> {
    let dest_error = |reason: String| ExtractError::Dest {
        dest: spec.dest.clone(),
        reason,
    };
    let (dest, made) = image
        .create_dirs(&spec.dest, IMPLIED_DIR_MODE)
        .map_err(|e| dest_error(e.to_string()))?;
    if let Some(owner) = owner {
        // `dest` itself and every directory made on the way to it belong to the owner too.
        for path in made.iter().map(String::as_str).chain([spec.dest.as_str()]) {
            let dir = image
                .open_at(path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
                .map_err(|e| dest_error(format!("{path}: {e}")))?;
            set_owner(dir.as_fd(), "", owner).map_err(|e| dest_error(format!("{path}: {e}")))?;
        }
    }
    let mut writer = Writer {
        dest,
        owner,
        keep_setuid: spec.keep_setuid,
        parent: None,
        dir_times: Vec::new(),
    };
    let mut done = Extracted::default();
    let tar_stream: Box<dyn Read + '_> = Box::new(BufReader::with_capacity(PIECE, input));
    each_entry_of(tar::Archive::new(tar_stream), &mut |entry, path| {
        let size = entry.header().size().unwrap_or(0);
        let admitted = admit(entry, path)?;
        let placed = writer.place(entry, admitted)?;
        done.setuid_dropped += u64::from(placed.setuid_dropped);
        done.files += 1;
        done.bytes += size;
        on_progress(done);
        Ok(())
    })?;
    writer.finish().map_err(|e| dest_error(e.to_string()))?;
    Ok(done)
}

/// Reads a whole tarball (gzip, zstd or a plain tar stream, told by its first bytes) as
/// `unpack` would, placing nothing: every check that needs no image (`admit`), and every
/// entry's data read to its end, so a damaged or cut-short tarball is refused too, as is one
/// with no entries. Every byte of the tar stream it reads goes to `keep` (to the archive's
/// end, where `unpack` stops too): the extraction reads that, and never inflates again.
/// Answers what it holds.
pub fn check_entries(
    input: impl Read + Send,
    keep: &mut Kept<impl Write>,
) -> Result<Extracted, ExtractError> {
    let mut held = Extracted::default();
    let checked = decompressed(input, |tar_stream| {
        let kept: Box<dyn Read + '_> = Box::new(keep.tee(tar_stream));
        each_entry_of(tar::Archive::new(kept), &mut |entry, path| {
            admit(entry, path)?;
            let size = entry.header().size().unwrap_or(0);
            std::io::copy(entry, &mut std::io::sink()).map_err(EntryError::Unreadable)?;
            held.files += 1;
            held.bytes += size;
            Ok(())
        })
    });
    // A write that failed reads as a broken stream to the tar reader: said as what it is.
    if let Some(e) = keep.failure() {
        return Err(ExtractError::Keep(e));
    }
    checked?;
    if held.files == 0 {
        return Err(ExtractError::Empty);
    }
    keep.finish().map_err(ExtractError::Keep)?;
    Ok(held)
}

/// Reads the tar stream in `archive` entry by entry. `on_entry` gets each entry and its
/// path; what it refuses is named by the entry's number (from 1) and path.
fn each_entry_of<'a>(
    mut archive: tar::Archive<Box<dyn Read + 'a>>,
    on_entry: &mut impl FnMut(&mut tar::Entry<'_, Box<dyn Read + 'a>>, &str) -> Result<(), EntryError>,
) -> Result<(), ExtractError> {
    let entries = archive
        .entries()
        .map_err(|e| ExtractError::Corrupt(printable(&e.to_string())))?;
    for (index, entry) in entries.enumerate() {
        let index = index as u64 + 1;
        let mut entry = entry.map_err(|e| {
            ExtractError::Corrupt(format!("at entry {index}: {}", printable(&e.to_string())))
        })?;
        if entry.header().entry_type() == EntryType::XGlobalHeader {
            // `git archive` puts the commit here; it names no file.
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        on_entry(&mut entry, &path).map_err(|reason| ExtractError::Entry {
            index,
            path: printable(&path),
            reason,
        })?;
    }
    Ok(())
}

/// `user` or `user:group`, by name or number, looked up in the image's own /etc/passwd and
/// /etc/group, which `read_etc` reads by name.
pub fn resolve_owner(
    spec: &str,
    read_etc: impl Fn(&str) -> std::io::Result<Vec<u8>>,
) -> Result<Owner, ExtractError> {
    let fail = |reason: String| ExtractError::Owner {
        spec: spec.into(),
        reason,
    };
    let table = |file: &str| -> Result<HashMap<String, (u32, u32)>, ExtractError> {
        let bytes = read_etc(file)
            .map_err(|e| fail(format!("cannot read the image's /etc/{file}: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                let id = fields.get(2)?.parse().ok()?;
                let group = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
                Some((fields[0].to_string(), (id, group)))
            })
            .collect())
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => *table("passwd")?
            .get(user)
            .ok_or_else(|| fail(format!("no user `{user}` in the image's /etc/passwd")))?,
    };
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                table("group")?
                    .get(g)
                    .ok_or_else(|| fail(format!("no group `{g}` in the image's /etc/group")))?
                    .0
            }
        },
    };
    Ok(Owner { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tarball file that breaks the decompressor's thread after its first read: the
    /// reader must hear of it, not take the bytes before it for the whole stream.
    struct BreaksAfterFirstRead(std::io::Cursor<Vec<u8>>, bool);

    impl Read for BreaksAfterFirstRead {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            assert!(!self.1, "the tarball's file broke under the decompressor");
            self.1 = true;
            let first = buf.len().min(4096);
            self.0.read(&mut buf[..first])
        }
    }

    /// A gzip stream of 1 MiB that does not compress, so it outlasts a first read by far,
    /// on a file that breaks after that first read.
    fn gzip_that_breaks_midway() -> BreaksAfterFirstRead {
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut noise = 0x9e37_79b9_u32;
        let plain: Vec<u8> = (0..1 << 20)
            .map(|_| {
                noise ^= noise << 13;
                noise ^= noise >> 17;
                noise ^= noise << 5;
                noise as u8
            })
            .collect();
        std::io::Write::write_all(&mut gzip, &plain).unwrap();
        BreaksAfterFirstRead(std::io::Cursor::new(gzip.finish().unwrap()), false)
    }

    #[test]
    fn a_decompressor_that_dies_midway_is_an_error_not_a_shorter_stream() {
        let read = decompressed(gzip_that_breaks_midway(), |mut stream| {
            let mut all = Vec::new();
            stream
                .read_to_end(&mut all)
                .map_err(|e| ExtractError::Corrupt(e.to_string()))?;
            Ok(all.len())
        });
        match read {
            Err(ExtractError::Corrupt(reason)) => assert_eq!(reason, DECOMPRESSOR_FAILED),
            other => panic!("a broken decompressor read as {other:?}"),
        }
    }

    /// The thread's failure is said even to a reader that took the stream's end for good.
    #[test]
    fn a_decompressor_that_dies_midway_fails_a_reader_that_ignores_read_errors() {
        let read = decompressed(gzip_that_breaks_midway(), |mut stream| {
            let _ = stream.read_to_end(&mut Vec::new());
            Ok(())
        });
        match read {
            Err(ExtractError::Corrupt(reason)) => assert_eq!(reason, DECOMPRESSOR_FAILED),
            other => panic!("a broken decompressor read as {other:?}"),
        }
    }

    /// The reader itself tells a thread gone before the end-of-stream mark from the end.
    #[test]
    fn pieces_without_their_end_mark_read_as_an_error_after_what_came() {
        let (pieces, inflated) = std::sync::mpsc::sync_channel(PIECES_AHEAD);
        pieces.send(Ok(b"part".to_vec())).unwrap();
        drop(pieces);
        let mut stream = Pieces::new(inflated);
        let mut all = Vec::new();
        let error = stream.read_to_end(&mut all).unwrap_err();
        assert_eq!(all, b"part");
        assert_eq!(error.to_string(), DECOMPRESSOR_FAILED);
    }

    /// A damaged stream's error is said again to a reader that reads on past it, not
    /// taken for the thread's absence.
    #[test]
    fn a_damaged_streams_error_is_said_again_to_a_reader_that_reads_on() {
        let (pieces, inflated) = std::sync::mpsc::sync_channel(PIECES_AHEAD);
        pieces.send(Ok(b"part".to_vec())).unwrap();
        pieces
            .send(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "corrupt deflate stream",
            )))
            .unwrap();
        drop(pieces);
        let mut stream = Pieces::new(inflated);
        let mut all = Vec::new();
        let first = stream.read_to_end(&mut all).unwrap_err();
        assert_eq!(all, b"part");
        let again = stream.read(&mut [0; 8]).unwrap_err();
        for error in [first, again] {
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            assert_eq!(error.to_string(), "corrupt deflate stream");
        }
    }

    #[test]
    fn a_whole_stream_reads_to_its_end_through_the_decompressor() {
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let plain: Vec<u8> = (0..3 * PIECE + 17).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut gzip, &plain).unwrap();
        let read = decompressed(
            std::io::Cursor::new(gzip.finish().unwrap()),
            |mut stream| {
                let mut all = Vec::new();
                stream
                    .read_to_end(&mut all)
                    .map_err(|e| ExtractError::Corrupt(e.to_string()))?;
                // Past the end, the stream stays at its end.
                assert_eq!(stream.read(&mut [0; 8]).unwrap(), 0);
                Ok(all)
            },
        );
        assert!(read.unwrap() == plain, "the stream came back changed");
    }

    fn etc_with(
        passwd: &'static str,
        group: &'static str,
    ) -> impl Fn(&str) -> std::io::Result<Vec<u8>> + Copy {
        move |file: &str| match file {
            "passwd" => Ok(passwd.as_bytes().to_vec()),
            "group" => Ok(group.as_bytes().to_vec()),
            _ => Err(std::io::ErrorKind::NotFound.into()),
        }
    }

    #[test]
    fn owners_come_from_the_image_files() {
        let etc = etc_with("root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/sh\napp:x:4242:100::/srv:/bin/sh\n", "users:x:100:\nweb:x:5000:\n");
        assert_eq!(
            resolve_owner("www-data", etc).unwrap(),
            Owner { uid: 33, gid: 33 }
        );
        assert_eq!(
            resolve_owner("app", etc).unwrap(),
            Owner {
                uid: 4242,
                gid: 100
            }
        );
        assert_eq!(
            resolve_owner("app:web", etc).unwrap(),
            Owner {
                uid: 4242,
                gid: 5000
            }
        );
        assert_eq!(
            resolve_owner("1001:1002", etc).unwrap(),
            Owner {
                uid: 1001,
                gid: 1002
            }
        );
        let err = resolve_owner("nobody-here", etc).unwrap_err().to_string();
        assert_eq!(
            err,
            "owner `nobody-here`: no user `nobody-here` in the image's /etc/passwd"
        );
        assert!(resolve_owner("app:nogroup", etc)
            .unwrap_err()
            .to_string()
            .contains("no group `nogroup`"));
    }
}
