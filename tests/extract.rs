//! Putting a code tarball into an image: byte-for-byte where the image resolves the
//! destination, and never a write on the host, whatever the tarball or the image contains.
//! Runs the real binary's chrooted child (`amibake internal-extract`) against an image root
//! made in a temp dir, with a canary on the host that must never change.

mod util;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use amibake::host::extract::{extract_into_image, Tarball};
use tar::EntryType;
use tokio_util::sync::CancellationToken;
use util::tarballs::{append_raw, assert_composer_like_at, composer_like, gzip, tarball, Canary};

/// A minimal image root: its own users, and an absolute symlink as real images have.
struct Image {
    dir: tempfile::TempDir,
}

impl Image {
    fn new() -> Image {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["etc", "srv/www", "var", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nwww-data:x:33:\n").unwrap();
        std::os::unix::fs::symlink("/srv/www", root.join("var/www")).unwrap();
        Image { dir }
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
}

fn extract(image: &Image, dest: &str, owner: Option<&str>, tarball: &[u8]) -> util::Run {
    let mut args = vec![
        "internal-extract".to_string(),
        "--root".into(),
        image.root().display().to_string(),
        "--dest".into(),
        dest.into(),
    ];
    if let Some(o) = owner {
        args.extend(["--owner".into(), o.into()]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_amibake"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Fed from a thread while stdout is drained, as the real parent does: the child reports
    // progress as it reads. A child that refuses early stops reading; that is its answer.
    let mut stdin = child.stdin.take().unwrap();
    let bytes = tarball.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
    });
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    util::Run {
        command: format!("amibake {}", args.join(" ")),
        output,
    }
}

#[test]
fn a_composer_like_tarball_lands_byte_for_byte_where_the_image_resolves_dest() {
    let (tar_bytes, files) = composer_like();
    let zstd_bytes = zstd::encode_all(tar_bytes.as_slice(), 3).unwrap();
    for (dest, bytes) in [
        ("/var/www/shop", gzip(&tar_bytes)),
        ("/var/www/plain", tar_bytes.clone()),
        ("/opt/zstd", zstd_bytes),
    ] {
        let image = Image::new();
        let canary = Canary::new();
        extract(&image, dest, Some("www-data"), &bytes).expect_code(0);
        // The image's /var/www is a link to /srv/www: the files are where the image sees them.
        let landed = image
            .root()
            .join(dest.trim_start_matches('/').replace("var/www", "srv/www"));
        assert_composer_like_at(&landed, &files, 33);
        canary.assert_untouched(dest);
    }
}

#[test]
fn hostile_and_broken_tarballs_are_refused_or_contained_and_the_host_is_never_touched() {
    let canary = Canary::new();
    let canary_dir = canary.path().display().to_string();
    let canary_file = canary.file().display().to_string();
    struct Case {
        name: &'static str,
        bytes: Vec<u8>,
        /// None: contained (exit 0); Some(text): refused with this in the error.
        refused_with: Option<&'static str>,
    }
    let mut corrupted = tarball(|b| append_raw(b, EntryType::Regular, "ok.txt", None, b"fine"));
    corrupted[150] ^= 0xff; // inside the header's checksummed bytes
    let full = gzip(&composer_like().0);
    let cases = vec![
        Case { name: "dot-dot path", bytes: tarball(|b| append_raw(b, EntryType::Regular, "../../escape.txt", None, b"out")), refused_with: Some("tarball entry 1 (../../escape.txt): its path leaves the destination") },
        Case { name: "absolute path", bytes: tarball(|b| append_raw(b, EntryType::Regular, "/etc/amibake-absolute", None, b"abs")), refused_with: None },
        Case {
            name: "symlink out, then a write through it",
            bytes: tarball(|b| {
                append_raw(b, EntryType::Symlink, "out", Some(&canary_dir), b"");
                append_raw(b, EntryType::Regular, "out/pwned", None, b"pwned");
            }),
            refused_with: Some("tarball entry 2 (out/pwned)"),
        },
        Case {
            name: "symlink to a directory the image has, then a write through it",
            bytes: tarball(|b| {
                append_raw(b, EntryType::Symlink, "etc-link", Some("/etc"), b"");
                append_raw(b, EntryType::Regular, "etc-link/pwned", None, b"pwned");
            }),
            refused_with: Some("tarball entry 2 (etc-link/pwned): trying to unpack outside of destination path: /srv/www/app"),
        },
        Case { name: "hard link to a host file", bytes: tarball(|b| append_raw(b, EntryType::Link, "hl", Some(&canary_file), b"")), refused_with: Some("tarball entry 1 (hl)") },
        Case { name: "device node", bytes: tarball(|b| append_raw(b, EntryType::Char, "dev-null", None, b"")), refused_with: Some("tarball entry 1 (dev-null): device nodes are not allowed") },
        Case { name: "fifo", bytes: tarball(|b| append_raw(b, EntryType::Fifo, "pipe", None, b"")), refused_with: Some("tarball entry 1 (pipe): FIFOs are not allowed") },
        Case { name: "truncated gzip", bytes: full[..full.len() / 2].to_vec(), refused_with: Some("tarball") },
        Case { name: "checksum error", bytes: corrupted, refused_with: Some("damaged or not a tar archive") },
    ];
    for case in cases {
        let image = Image::new();
        let run = extract(&image, "/srv/www/app", None, &case.bytes);
        match case.refused_with {
            Some(text) => {
                run.expect_code(1);
                assert!(
                    run.stderr().contains(text),
                    "{}: wanted {text:?}\n{}",
                    case.name,
                    run.dump()
                );
            }
            None => {
                run.expect_code(0);
                assert!(
                    image
                        .root()
                        .join("srv/www/app/etc/amibake-absolute")
                        .exists(),
                    "{}: contained in dest",
                    case.name
                );
                assert!(
                    !Path::new("/etc/amibake-absolute").exists(),
                    "{}: not on the host",
                    case.name
                );
            }
        }
        assert!(
            !image.root().join("etc/pwned").exists(),
            "{}: nothing written outside dest in the image either",
            case.name
        );
        canary.assert_untouched(case.name);
    }
}

#[test]
fn a_symlink_already_in_the_image_to_a_host_path_stays_inside_the_image() {
    let canary = Canary::new();
    let image = Image::new();
    std::fs::create_dir_all(image.root().join("srv/www/app")).unwrap();
    std::os::unix::fs::symlink(canary.path(), image.root().join("srv/www/app/evil")).unwrap();
    let bytes = tarball(|b| append_raw(b, EntryType::Regular, "evil/pwned", None, b"pwned"));
    let run = extract(&image, "/srv/www/app", None, &bytes);
    // Inside the chroot the link names the image's own path: it is made there, or refused.
    if run.code() == 0 {
        assert!(
            image
                .root()
                .join(canary.path().strip_prefix("/").unwrap())
                .join("pwned")
                .exists(),
            "{}",
            run.dump()
        );
    } else {
        assert!(
            run.stderr().contains("tarball entry 1 (evil/pwned)"),
            "{}",
            run.dump()
        );
    }
    canary.assert_untouched("symlink in the image");
}

#[test]
fn an_unknown_owner_is_named() {
    let image = Image::new();
    let run = extract(&image, "/srv/www/app", Some("deploy"), &tarball(|_| {}));
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("owner `deploy`: no user `deploy` in the image's /etc/passwd"),
        "{}",
        run.dump()
    );
}

#[tokio::test]
async fn the_parent_side_reports_progress_and_errors() {
    let (tar_bytes, files) = composer_like();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.tar.gz");
    let gzipped = gzip(&tar_bytes);
    std::fs::write(&file, &gzipped).unwrap();
    let image = Image::new();
    let exe = Path::new(env!("CARGO_BIN_EXE_amibake"));
    let mut seen = Vec::new();
    let done = extract_into_image(
        exe,
        image.root(),
        "/var/www/app",
        None,
        &Tarball::File(file),
        |p, read| seen.push((p, read)),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(
        done.files as usize > files.len(),
        "files, directories and links all count"
    );
    let (last, read) = *seen.last().unwrap();
    assert_eq!(last, done);
    assert_eq!(
        read,
        gzipped.len() as u64,
        "the whole tarball was read, counted as given (compressed)"
    );
    assert!(seen
        .windows(2)
        .all(|w| w[1].0.files > w[0].0.files && w[1].0.bytes >= w[0].0.bytes && w[1].1 >= w[0].1));

    let err = extract_into_image(
        exe,
        image.root(),
        "/var/www/app",
        None,
        &Tarball::File(dir.path().join("missing.tar")),
        |_, _| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("cannot read the tarball") && err.contains("missing.tar"),
        "{err}"
    );

    let bad = dir.path().join("bad.tar");
    std::fs::write(
        &bad,
        tarball(|b| append_raw(b, EntryType::Regular, "../x", None, b"x")),
    )
    .unwrap();
    let err = extract_into_image(
        exe,
        image.root(),
        "/var/www/app",
        None,
        &Tarball::File(bad),
        |_, _| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "extraction failed: tarball entry 1 (../x): its path leaves the destination (`..`)"
    );
}
